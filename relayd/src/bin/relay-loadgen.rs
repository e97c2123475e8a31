//! `relay-loadgen`: load generator for relayd.
//!
//! Starts real `relayd` processes on loopback (one relay, or a chain of
//! two), connects publisher/subscriber pairs through them with the SDK, and
//! pushes 200-byte datagrams at a fixed rate. Reports, per run:
//! - datagrams forwarded per second (by each relay),
//! - the relays' CPU time per million forwarded datagrams (from
//!   /proc/<pid>/stat) and so forwarded datagrams per second per core used,
//! - p50/p99 end-to-end latency publisher -> relay(s) -> subscriber, and
//! - loss.
//!
//! `--sweep` raises the rate until loss appears or the relay cannot keep
//! up, then measures latency at half of that maximum.
//!
//! ```text
//! cargo run -p relayd --release --bin relay-loadgen -- --sweep
//! cargo run -p relayd --release --bin relay-loadgen -- --topology chain --rate 50000
//! ```
#![allow(clippy::disallowed_methods)] // a benchmark reads clocks

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use relay_core::token::Claims;
use relay_core::wire::client::Role;
use relay_net::pki::{Node, init_dev_pki};
use relay_sdk::session::{Session, client_config};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Topology {
    /// Publishers and subscribers on one relay.
    Single,
    /// Publishers on relay 1, subscribers on relay 2.
    Chain,
}

#[derive(Parser)]
#[command(about = "Load generator for relayd")]
struct Cli {
    #[arg(long, value_enum, default_value = "single")]
    topology: Topology,
    /// Publisher/subscriber pairs (one channel each).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Datagram payload size, bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Offered rate, datagrams per second over all publishers.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Find the maximum rate, then measure at half of it.
    #[arg(long)]
    sweep: bool,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
    /// Worker threads of each relayd.
    #[arg(long, default_value_t = 1)]
    relay_threads: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    topology: String,
    offered_rate: u64,
    sent: u64,
    received: u64,
    loss: f64,
    /// Datagrams forwarded per second, summed over the relays.
    forwarded_per_s: f64,
    /// Relay CPU seconds per second of run (cores used), summed.
    relay_cores: f64,
    /// Relay CPU seconds per million forwarded datagrams.
    cpu_s_per_million: f64,
    /// Forwarded datagrams per second per core of relay CPU.
    per_core: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

struct Relay {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    // SAFETY-free: sysconf via libc is safe to call.
    let ticks = clock_ticks();
    Ok((utime + stime) / ticks)
}

fn clock_ticks() -> f64 {
    // _SC_CLK_TCK is 100 on Linux in practice; read it to be sure.
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const SECRET_HEX: &str = "4c6f616467656e2d7365637265742d30313233343536373839";

fn start_relays(dir: &Path, topology: Topology, threads: usize) -> anyhow::Result<Vec<Relay>> {
    let n = if topology == Topology::Chain { 2 } else { 1 };
    init_dev_pki(
        &dir.join("pki"),
        &(1..=n).map(Node::Relay).collect::<Vec<_>>(),
        "relays.internal",
        &[],
    )?;
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let relayd = std::env::current_exe()?.with_file_name("relayd");
    if !relayd.is_file() {
        bail!(
            "{} not found: build it (cargo build -p relayd --release)",
            relayd.display()
        );
    }
    let mut relays = Vec::new();
    for i in 0..n {
        let id = i + 1;
        let mut cfg = format!(
            "[relay]\nid = {id}\nlisten = \"127.0.0.1:{}\"\nworker_threads = {threads}\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/relay-{id}.pem\"\nkey = \"pki/relay-{id}.key\"\n\n[log]\nlevel = \"warn\"\n\n[[apps]]\nid = \"bench\"\nsecret = \"{SECRET_HEX}\"\n",
            ports[i as usize]
        );
        for j in 0..n {
            if j != i {
                cfg += &format!(
                    "\n[[peers]]\nid = {}\naddr = \"127.0.0.1:{}\"\n",
                    j + 1,
                    ports[j as usize]
                );
            }
        }
        let path = dir.join(format!("relay-{id}.toml"));
        std::fs::write(&path, cfg)?;
        let log = std::fs::File::create(dir.join(format!("relay-{id}.log")))?;
        let child = Command::new(&relayd)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        relays.push(Relay {
            child,
            addr: ([127, 0, 0, 1], ports[i as usize]).into(),
        });
    }
    Ok(relays)
}

fn token(channel: &str, user: &str, role: Role) -> String {
    let secret: Vec<u8> = (0..SECRET_HEX.len() / 2)
        .map(|i| u8::from_str_radix(&SECRET_HEX[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Claims {
        app: "bench".into(),
        channel: channel.into(),
        user: user.into(),
        role,
        expires: now + 3600,
    }
    .sign(&secret)
}

struct Pair {
    publisher: Arc<Session>,
    channel: relay_core::ChannelId,
}

struct Shared {
    received: AtomicU64,
    histogram: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    epoch: Instant,
    recording: std::sync::atomic::AtomicBool,
}

async fn connect(
    roots: Arc<rustls::RootCertStore>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Session> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let config = client_config(roots)?;
    // Retry while the relay starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Session::connect(
            &endpoint,
            config.clone(),
            addr,
            "localhost",
            Duration::from_secs(2),
        )
        .await
        {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing_like(&format!("waiting for relay at {addr}: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn tracing_like(msg: &str) {
    if std::env::var_os("LOADGEN_VERBOSE").is_some() {
        eprintln!("{msg}");
    }
}

async fn setup(
    dir: &Path,
    relays: &[Relay],
    pairs: usize,
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<Pair>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("pki/ca.pem"))? {
        roots.add(c?)?;
    }
    let roots = Arc::new(roots);
    let pub_addr = relays[0].addr;
    let sub_addr = relays[relays.len() - 1].addr;
    let mut out = Vec::new();
    for i in 0..pairs {
        let name = format!("bench-{i}");
        let mut sub = connect(roots.clone(), sub_addr).await?;
        sub.join(&name, &token(&name, &format!("sub{i}"), Role::Subscriber))
            .await?;
        let mut publisher = connect(roots.clone(), pub_addr).await?;
        let joined = publisher
            .join(&name, &token(&name, &format!("pub{i}"), Role::Publisher))
            .await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Ok(m) = sub.recv_media().await {
                let sent_ns = u64::from_be_bytes(m.payload[..8].try_into().expect("8-byte stamp"));
                let now_ns = shared.epoch.elapsed().as_nanos() as u64;
                if shared.recording.load(Ordering::Relaxed) {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                    let us = now_ns.saturating_sub(sent_ns) / 1000;
                    let _ = shared.histogram.lock().unwrap().record(us.max(1));
                }
            }
        });
        out.push(Pair {
            publisher: Arc::new(publisher),
            channel: joined.channel,
        });
    }
    Ok(out)
}

async fn run_once(
    cli: &Cli,
    pairs: &[Pair],
    relays: &[Relay],
    shared: &Arc<Shared>,
    rate: u64,
) -> anyhow::Result<RunResult> {
    shared.received.store(0, Ordering::Relaxed);
    shared.histogram.lock().unwrap().reset();
    shared.recording.store(true, Ordering::Relaxed);
    let cpu_before: Vec<f64> = relays
        .iter()
        .map(|r| cpu_seconds(r.child.id()))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let duration = Duration::from_secs_f64(cli.duration);
    let per_pair = rate as f64 / pairs.len() as f64;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let n = pairs.len();
    for (i, p) in pairs.iter().enumerate() {
        let (publisher, channel, sent, shared) =
            (p.publisher.clone(), p.channel, sent.clone(), shared.clone());
        let size = cli.size;
        tasks.push(tokio::spawn(async move {
            let mut payload = vec![0u8; size];
            // Send in 1 ms ticks, as many as the schedule says are due;
            // publishers tick at staggered phases so their bursts spread.
            let phase = Duration::from_micros((1000 * i / n) as u64);
            let mut tick =
                tokio::time::interval_at((Instant::now() + phase).into(), Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut done = 0u64;
            loop {
                tick.tick().await;
                let elapsed = started.elapsed();
                if elapsed >= duration {
                    break;
                }
                let due = (elapsed.as_secs_f64() * per_pair) as u64;
                while done < due {
                    let stamp = shared.epoch.elapsed().as_nanos() as u64;
                    payload[..8].copy_from_slice(&stamp.to_be_bytes());
                    if publisher.publish(channel, &payload).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the tail arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shared.recording.store(false, Ordering::Relaxed);
    let cpu_after: Vec<f64> = relays
        .iter()
        .map(|r| cpu_seconds(r.child.id()))
        .collect::<Result<_, _>>()?;
    let cpu: f64 = cpu_after.iter().zip(&cpu_before).map(|(a, b)| a - b).sum();
    let sent = sent.load(Ordering::Relaxed);
    let received = shared.received.load(Ordering::Relaxed);
    // Each delivered datagram was forwarded once per relay on its way.
    let forwarded = received * relays.len() as u64;
    let h = shared.histogram.lock().unwrap();
    let forwarded_per_s = forwarded as f64 / elapsed;
    let relay_cores = cpu / (elapsed + 0.3);
    Ok(RunResult {
        topology: format!("{:?}", cli.topology).to_lowercase(),
        offered_rate: rate,
        sent,
        received,
        loss: if sent == 0 {
            0.0
        } else {
            1.0 - received as f64 / sent as f64
        },
        forwarded_per_s,
        relay_cores,
        cpu_s_per_million: if forwarded == 0 {
            0.0
        } else {
            cpu / forwarded as f64 * 1e6
        },
        per_core: if cpu == 0.0 {
            0.0
        } else {
            forwarded as f64 / cpu
        },
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        max_us: h.max() as f64,
    })
}

fn print(r: &RunResult) {
    println!(
        "{:<6} offered {:>7}/s  sent {:>8}  received {:>8}  loss {:>6.3} %  forwarded {:>8.0}/s  relay CPU {:.2} cores  \
         {:.2} CPU-s per million  {:>7.0}/s per core  latency p50 {:.0} us p99 {:.0} us max {:.0} us",
        r.topology,
        r.offered_rate,
        r.sent,
        r.received,
        100.0 * r.loss,
        r.forwarded_per_s,
        r.relay_cores,
        r.cpu_s_per_million,
        r.per_core,
        r.p50_us,
        r.p99_us,
        r.max_us
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempdir()?;
        let relays = start_relays(&dir, cli.topology, cli.relay_threads)?;
        let shared = Arc::new(Shared {
            received: AtomicU64::new(0),
            histogram: std::sync::Mutex::new(hdrhistogram::Histogram::new_with_bounds(
                1, 60_000_000, 3,
            )?),
            epoch: Instant::now(),
            recording: std::sync::atomic::AtomicBool::new(false),
        });
        let pairs = setup(&dir, &relays, cli.pairs, shared.clone()).await?;
        // Interest propagates between chained relays.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Warm up.
        run_once(
            &Cli {
                duration: 1.0,
                ..cli.clone_args()
            },
            &pairs,
            &relays,
            &shared,
            cli.rate.min(5000),
        )
        .await?;
        let mut results = Vec::new();
        if cli.sweep {
            let mut rate = 10_000u64;
            let mut best: Option<RunResult> = None;
            loop {
                let r = run_once(&cli, &pairs, &relays, &shared, rate).await?;
                print(&r);
                let keeps_up =
                    r.loss < 0.001 && (r.sent as f64) >= 0.98 * rate as f64 * cli.duration;
                results.push(r.clone());
                if !keeps_up || rate >= 1_000_000 {
                    break;
                }
                best = Some(r);
                rate = (rate as f64 * 1.3) as u64;
            }
            let max = best.map(|b| b.offered_rate).unwrap_or(rate);
            println!("maximum loss-free rate: {max} datagrams/s offered");
            let half = run_once(&cli, &pairs, &relays, &shared, max / 2).await?;
            print(&half);
            println!(
                "at half of the maximum: p99 latency {:.0} us, loss {:.3} %",
                half.p99_us,
                100.0 * half.loss
            );
            results.push(half);
        } else {
            let r = run_once(&cli, &pairs, &relays, &shared, cli.rate).await?;
            print(&r);
            results.push(r);
        }
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&results)?);
        }
        drop(relays);
        let _ = std::fs::remove_dir_all(&dir);
        anyhow::Ok(())
    })
}

impl Cli {
    fn clone_args(&self) -> Cli {
        Cli {
            topology: self.topology,
            pairs: self.pairs,
            size: self.size,
            rate: self.rate,
            duration: self.duration,
            sweep: self.sweep,
            json: self.json,
            relay_threads: self.relay_threads,
        }
    }
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("relay-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
