//! `relay-loadgen`: load generator for relayd.
//!
//! Starts real `relayd` processes on loopback (one relay, or a chain of
//! two), connects publisher/subscriber pairs through them with the SDK (each
//! client on its own socket), and pushes 200-byte datagrams at a fixed rate.
//! Reports, per run:
//! - datagrams forwarded per second (by each relay),
//! - the relays' CPU time per million forwarded datagrams (from
//!   /proc/<pid>/stat) and so forwarded datagrams per second per core used,
//!   next to the load generator's own CPU (the two share the machine),
//! - p50/p99 one-way latency publisher -> relay(s) -> subscriber, and loss;
//! - the latency the relays add: each publisher also has a direct QUIC
//!   connection (same endpoint, same transport settings) to a sink in the
//!   load generator, and the relayed and direct paths are measured at the
//!   same rate in interleaved rounds; added = relayed minus direct, at p50
//!   and at p99. And paired: in the relayed rounds one datagram in
//!   [`PAIRED_EVERY`] is also sent on the direct connection at the same
//!   moment, and the percentiles of the per-datagram difference are the
//!   latency the relays added to those datagrams, with part of the load
//!   generator's own stalls (those that delay both copies alike) taken
//!   out;
//! - the shape of the load: in the added-latency rounds, a datagram the
//!   pacer reaches more than `--max-lateness-us` late is shed, not sent
//!   (counted): one thread stands in for all the publishers, and sending
//!   all it owes after a stall of its own would be a burst of every client
//!   at once, which independent clients do not make;
//! - the latency the path adds under the load, measured beside it: a
//!   publisher/subscriber pair of its own, on real-time threads above the
//!   load's, sends `--probe-rate` probes/s on the path and on its direct
//!   connection at once (see [`Probe`]): free of the generator's delays
//!   in sending and reading the probes, at any rate the load runs at
//!   (not of the bursts its stalls put into the load, which the path
//!   must drain).
//!
//! `--sweep` raises the rate until loss appears or the relay cannot keep
//! up, then measures the added latency at half of that maximum.
//! `--realtime` runs the relays under SCHED_FIFO, to tell the relays' own
//! latency from the host's scheduling noise; `--generator-policy
//! realtime` does the same for the generator's own threads (precise
//! latencies, but a wake-up per datagram caps its rate). Every run prints
//! the time the hypervisor took from the relays' and the generator's CPUs
//! (steal). `--idle-poll` keeps the relays' CPUs from idling (a SCHED_IDLE
//! spinner on each, as the kernel's `idle=poll` would): on a VM an idle
//! virtual CPU halts and may wait for the hypervisor to run it again when
//! the next packet comes.
//! `--baseline` measures a plain UDP forwarder (`udp-forward`: no
//! decryption, one `recvfrom` and one `sendto` per datagram, as a TURN
//! relay without encryption) the same way, on the relays' CPU, and prints
//! the two side by side: its maximum, and its CPU per datagram and added
//! latency at the rate the relays' latency was measured at.
//! `--coturn` does the same for coturn, the TURN server operators run:
//! the same QUIC connection crosses it in a TURN channel (ChannelData over
//! UDP, no authentication; see `turn.rs`).
//!
//! ```text
//! cargo run -p relayd --release --bin relay-loadgen -- --sweep
//! cargo run -p relayd --release --bin relay-loadgen -- --topology chain --rate 50000
//! ```
#![allow(clippy::disallowed_methods)] // a benchmark reads clocks

mod turn;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use relay_core::token::Claims;
use relay_core::wire::client::Role;
use relay_net::pki::{Node, init_dev_pki};
use relay_net::quic::{DEFAULT_SOCKET_BUFFER, bind_udp, media_transport};
use relay_net::tls::{TlsIdentity, quic_client_with_roots};
use relay_sdk::session::{Incoming, MediaSender, Session, client_config};
use relayd::config::default_cluster_domain;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// How the load generator's own threads are scheduled.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum GeneratorPolicy {
    /// SCHED_FIFO when allowed: receivers at [`REALTIME_PRIORITY`], the
    /// pacer at [`PACER_PRIORITY`].
    Realtime,
    /// The default policy.
    Normal,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Pin {
    /// Pin when there are enough CPUs.
    Auto,
    /// Let the scheduler place everything.
    Off,
}

/// CPU sets for the relays and the load generator.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    relays: Vec<u32>,
    generator: Vec<u32>,
}

/// The CPUs this process may run on (Linux `Cpus_allowed_list`, e.g.
/// "0-3,8").
fn allowed_cpus() -> anyhow::Result<Vec<u32>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    parse_cpu_list(list.trim())
}

fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<u32>()?..=b.parse::<u32>()?),
            None => cpus.push(part.parse()?),
        }
    }
    Ok(cpus)
}

/// A CPU set as a `taskset` list ("0,2,3").
fn join_cpus(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits `cpus`: the last `relay_cpus` for the relays, the rest for the
/// load generator; `None` when that leaves the generator nothing.
fn placement(cpus: &[u32], relay_cpus: usize) -> Option<Placement> {
    let relay_cpus = relay_cpus.max(1);
    if cpus.len() <= relay_cpus {
        return None;
    }
    let (generator, relays) = cpus.split_at(cpus.len() - relay_cpus);
    Some(Placement {
        relays: relays.to_vec(),
        generator: generator.to_vec(),
    })
}

/// Pins this process's main thread (threads started later inherit it).
fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    anyhow::ensure!(status.success(), "taskset failed: {status}");
    Ok(())
}

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
    /// Interleaved rounds of the direct and the relayed path for the
    /// added-latency figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Keep the run's folder (relay configs and logs) and print its path.
    #[arg(long)]
    keep: bool,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
    /// Worker threads of each relayd.
    #[arg(long, default_value_t = 1)]
    relay_threads: usize,
    /// Give the relays CPUs of their own (the last `--relay-threads` of
    /// those this process may use) and keep the load generator on the
    /// others, so that the figures are the relays', not those of a fight
    /// for the same cores. Needs at least one CPU left for the generator.
    #[arg(long, value_enum, default_value = "auto")]
    pin: Pin,
    /// Run the relays under the real-time policy SCHED_FIFO (`chrt`; needs
    /// root or CAP_SYS_NICE), so that other work on their CPU (kernel
    /// threads, other processes) cannot hold them up: separates the
    /// relays' own latency from the host's scheduling noise.
    #[arg(long)]
    realtime: bool,
    /// Keep the relays' CPUs from going idle: a thread under SCHED_IDLE
    /// spins on each (needs the relays pinned, and root or CAP_SYS_NICE).
    /// It runs only when nothing else on that CPU can, and gives way at
    /// once to any thread that wakes there, so it takes no CPU time from
    /// the relays. What it changes: an idle virtual CPU halts, the
    /// hypervisor may give its physical CPU to another guest, and the
    /// relay's next packet then waits for the virtual CPU to be run again
    /// (counted as steal). This is what the kernel's `idle=poll`, or the
    /// `cpuidle-haltpoll` driver of KVM guests, do for a CPU's idle time;
    /// this machine has neither. Its time is the CPUs' idle time: the
    /// relays' CPU figures leave it out.
    #[arg(long)]
    idle_poll: bool,
    /// Scheduling of the load generator's own threads. Under the normal
    /// policy its pacer and its receivers share its CPU in time slices,
    /// and datagrams wait in its sockets, up to milliseconds, for their
    /// receiver's turn: its p99s are largely its own, but it receives in
    /// large batches and drives several hundred thousand datagrams/s.
    /// Under `realtime` (SCHED_FIFO when allowed; `chrt` on each thread) a
    /// receiver runs as soon as a datagram arrives and the pacer, one
    /// priority below, sends in the gaps (each datagram is stamped as it
    /// is sent): latencies to tens of microseconds, but a wake-up per
    /// datagram, so the generator saturates at a few tens of thousands of
    /// datagrams/s (it says so).
    #[arg(long, value_enum, default_value = "normal")]
    generator_policy: GeneratorPolicy,
    /// Also measure the baseline: a plain UDP forwarder (`udp-forward`,
    /// what a TURN relay does without encryption) started the way the
    /// relays are, on their CPU. Each publisher gets a third connection,
    /// to the sink through it; with `--sweep` its own maximum and the
    /// latency it adds at half of that are found too.
    #[arg(long)]
    baseline: bool,
    /// Also measure coturn (TURN over UDP, no authentication, one relay
    /// thread) the same way, started like the relays, on their CPU. Each
    /// publisher gets one more connection to a sink, through a TURN
    /// allocation and channel of its own.
    #[arg(long)]
    coturn: bool,
    /// Latency probes per second, sent beside the load (in the sweep's
    /// runs and the added-latency rounds) by a publisher/subscriber pair
    /// of their own on real-time threads (as root or with CAP_SYS_NICE),
    /// each on the measured path and on the direct path at once: the
    /// latency the path adds at the load's rate, without the generator's
    /// own delays in sending and reading them. The sweep judges a path's
    /// stalls by them. 0: no probes.
    #[arg(long, default_value_t = 1000)]
    probe_rate: u64,
    /// In the added-latency rounds, the pacer sheds (does not send) a
    /// datagram it reaches more than this many microseconds after it was
    /// due; 0: it sends every datagram, however late. One thread stands in
    /// for all the publishers: when it is held up, sending all it owes at
    /// once would be a burst of every client together, which independent
    /// clients do not make and which the path would have to drain. What it
    /// sheds is counted, and a warning says when it is over 1 %. The
    /// sweep's runs send every datagram (their figure is a throughput).
    #[arg(long, default_value_t = 250)]
    max_lateness_us: u64,
    /// coturn's server binary (Debian package `coturn`).
    #[arg(long, default_value = "turnserver")]
    turnserver: PathBuf,
}

/// Priority of the relays under `--realtime` (1-99; low, so that the
/// kernel's own real-time threads still come first).
const REALTIME_PRIORITY: &str = "10";

/// How the relay processes are started: under `chrt` and `taskset` when
/// asked.
#[derive(Debug, Clone, Default)]
struct Launch {
    cpus: Option<String>,
    realtime: bool,
}

impl Launch {
    fn command(&self, relayd: &std::path::Path) -> Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if self.realtime {
            argv.extend(["chrt", "--fifo", REALTIME_PRIORITY].map(Into::into));
        }
        if let Some(cpus) = &self.cpus {
            argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        argv.push(relayd.into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command
    }
}

/// The load generator's pacer, under [`GeneratorPolicy::Realtime`]: below
/// its receivers, above everything else on its CPU.
const PACER_PRIORITY: &str = "5";

/// Whether real-time scheduling, when `asked` for, is allowed to this
/// process (`chrt` succeeds: root or CAP_SYS_NICE); says which.
fn realtime_if_allowed(asked: bool, granted: &str, refused: &str) -> bool {
    if !asked {
        return false;
    }
    let allowed = Command::new("chrt")
        .args(["--fifo", REALTIME_PRIORITY, "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    println!("{}", if allowed { granted } else { refused });
    allowed
}

/// Puts the calling thread under SCHED_FIFO at `priority` (`chrt` on its
/// thread id). Best effort: the permission was checked before.
fn make_thread_realtime(priority: &str) {
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return;
    };
    let Some(tid) = link.file_name() else { return };
    let _ = Command::new("chrt")
        .args(["--fifo", "-p", priority])
        .arg(tid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Processes that spin under SCHED_IDLE, one on each of the relays' CPUs,
/// until dropped (`--idle-poll`). Processes, not threads of this one, so
/// that the generator's CPU figures leave them out.
struct IdlePoller {
    spinners: Vec<Child>,
}

impl IdlePoller {
    fn start(cpus: &[u32]) -> anyhow::Result<Self> {
        let mut poller = Self {
            spinners: Vec::new(),
        };
        for cpu in cpus {
            // `:` is a shell builtin: the loop never leaves user space.
            let child = Command::new("chrt")
                .args(["--idle", "0", "taskset", "-c", &cpu.to_string()])
                .args(["sh", "-c", "while :; do :; done"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting chrt")?;
            poller.spinners.push(child);
        }
        // A spinner that could not be placed exits at once: refuse rather
        // than leave one running where it should not.
        std::thread::sleep(Duration::from_millis(100));
        for child in &mut poller.spinners {
            if let Some(status) = child.try_wait()? {
                let mut why = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut why);
                }
                bail!("the spinner exited ({status}): {}", why.trim());
            }
        }
        Ok(poller)
    }
}

impl Drop for IdlePoller {
    fn drop(&mut self) {
        for child in &mut self.spinners {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process this load generator started (a relay, `udp-forward` or
/// coturn), killed when dropped.
struct Spawned {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Packets the kernel has dropped so far at this host's UDP sockets bound
/// to `ports` (the last column of `/proc/net/udp` and `udp6`).
fn udp_drops(ports: &[u16]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        sum += socket_drops(&text, ports)?;
    }
    Ok(sum)
}

/// Sums the drops of the sockets in a `/proc/net/udp` table whose local
/// port is one of `ports`.
fn socket_drops(table: &str, ports: &[u16]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(drops)) = (fields.get(1), fields.last()) else {
            continue;
        };
        let port = local.rsplit_once(':').context("bad local address")?.1;
        if ports.contains(&u16::from_str_radix(port, 16)?) {
            sum += drops.parse::<u64>()?;
        }
    }
    Ok(sum)
}

/// User + system CPU seconds so far of a process (`pid`, or "self").
fn cpu_seconds(pid: &str, ticks: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    Ok((utime + stime) / ticks)
}

/// CPU time the hypervisor took so far from `cpus` (steal: the eighth
/// value on their lines of `/proc/stat`), in seconds per CPU.
fn cpu_steal(stat: &str, cpus: &[u32], ticks: f64) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields.next().and_then(|f| f.strip_prefix("cpu")) else {
            continue;
        };
        if cpu.parse().is_ok_and(|n: u32| cpus.contains(&n)) {
            let steal = fields.nth(7).context("no steal in /proc/stat")?;
            sum += steal.parse::<f64>()?;
        }
    }
    Ok(sum / ticks / cpus.len().max(1) as f64)
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

fn start_relays(
    dir: &std::path::Path,
    topology: Topology,
    threads: usize,
    launch: &Launch,
) -> anyhow::Result<Vec<Spawned>> {
    let n = if topology == Topology::Chain { 2 } else { 1 };
    init_dev_pki(
        &dir.join("pki"),
        &(1..=n).map(Node::Relay).collect::<Vec<_>>(),
        &default_cluster_domain(),
        &[],
    )?;
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let relayd = sibling_binary("relayd")?;
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
        let child = launch
            .command(&relayd)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        relays.push(Spawned {
            child,
            addr: ([127, 0, 0, 1], ports[i as usize]).into(),
        });
    }
    Ok(relays)
}

/// A binary of this package, next to this one.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build -p relayd --release)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts the plain forwarder towards `upstream` the way the relays are
/// started (same CPUs, same scheduling); the clients in `client_upstreams`
/// (the probe's) go to upstreams of their own, through the same socket.
fn start_forwarder(
    dir: &std::path::Path,
    upstream: std::net::SocketAddr,
    client_upstreams: &[(std::net::SocketAddr, std::net::SocketAddr)],
    launch: &Launch,
) -> anyhow::Result<Spawned> {
    use std::io::BufRead;
    let log = std::fs::File::create(dir.join("udp-forward.log"))?;
    let mut command = launch.command(&sibling_binary("udp-forward")?);
    command
        .args(["--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string());
    for (client, upstream) in client_upstreams {
        command.arg(format!("--client-upstream={client}={upstream}"));
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()?;
    // It picks its own port and prints it once bound: no port chosen here
    // can be taken by another socket before it binds, and nothing connects
    // before it listens.
    let mut line = String::new();
    let stdout = child.stdout.take().context("udp-forward's stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line.trim().parse().with_context(|| {
        format!(
            "udp-forward did not start (printed {line:?}; see {})",
            dir.join("udp-forward.log").display()
        )
    })?;
    Ok(Spawned { child, addr })
}

/// Starts coturn on a port of its own, the way the relays are started:
/// UDP only, anonymous (no credentials to check, as for `udp-forward`),
/// one relay thread as relayd has one worker, peers on loopback allowed.
fn start_coturn(
    dir: &std::path::Path,
    turnserver: &std::path::Path,
    launch: &Launch,
) -> anyhow::Result<Spawned> {
    let port = free_port();
    let log = std::fs::File::create(dir.join("coturn.out"))?;
    let child = launch
        .command(turnserver)
        .args([
            "-n",
            "--no-auth",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--no-tcp-relay",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
            "--allow-loopback-peers",
            "--relay-threads",
            "1",
            "--realm",
            "loadgen",
            "--simple-log",
        ])
        .arg("--listening-port")
        .arg(port.to_string())
        .arg("--log-file")
        .arg(dir.join("coturn.log"))
        .arg("--pidfile")
        .arg(dir.join("coturn.pid"))
        .arg("--userdb")
        .arg(dir.join("coturn.sqlite"))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (coturn: apt install coturn)",
                turnserver.display()
            )
        })?;
    Ok(Spawned {
        child,
        addr: ([127, 0, 0, 1], port).into(),
    })
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

/// A median one-way latency above this means datagrams wait in a queue
/// that keeps growing: the path is saturated (unloaded it is well under a
/// millisecond on loopback).
const SATURATED_P50_US: f64 = 5000.0;
/// A p99 above this means long stalls: bursts queue behind a relay that
/// no longer drains them quickly, although the median still looks fine.
const SATURATED_P99_US: f64 = 10_000.0;

/// Which way the datagrams go in a measurement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// Publisher -> relay(s) -> subscriber.
    Relayed,
    /// Publisher's endpoint -> the load generator's own QUIC sink: the same
    /// client stacks and machine without the relays, the baseline that
    /// "added latency" is measured against.
    Direct,
    /// Publisher's endpoint -> `udp-forward` -> a second sink: the same
    /// QUIC connection relayed as plain UDP (`--baseline`).
    Forwarded,
    /// A TURN client socket of the publisher's -> coturn -> a third sink:
    /// the same QUIC connection in a TURN channel (`--coturn`).
    Turned,
}

impl Path {
    /// The name printed for the path's results.
    fn name(self, topology: Topology) -> String {
        match self {
            Path::Relayed => format!("{topology:?}").to_lowercase(),
            Path::Direct => "direct".into(),
            Path::Forwarded => "udp-forward".into(),
            Path::Turned => "coturn".into(),
        }
    }
}

/// In the added-latency rounds, one datagram in this many is sent on the
/// direct path too, at the same moment (see [`PairedAdded`]).
const PAIRED_EVERY: u64 = 8;

/// Receive side of one path: counts and one-way latencies, and when the
/// datagrams of paired sequence numbers arrived.
struct Recorder {
    received: AtomicU64,
    histogram: Mutex<Histogram<u64>>,
    /// One sequence number in this many is paired: [`PAIRED_EVERY`] for the
    /// load, 1 for the probes.
    paired_every: u64,
    /// Arrival (nanoseconds since the epoch, 0 while not arrived) of
    /// sequence number `i * paired_every`, at index `i`.
    arrivals: Mutex<Vec<u64>>,
    recording: AtomicBool,
}

impl Recorder {
    fn new(paired_every: u64) -> anyhow::Result<Arc<Recorder>> {
        Ok(Arc::new(Recorder {
            received: AtomicU64::new(0),
            histogram: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            paired_every: paired_every.max(1),
            arrivals: Mutex::new(Vec::new()),
            recording: AtomicBool::new(false),
        }))
    }

    /// Records a datagram whose first 8 bytes are its send time and the
    /// next 8 its sequence number in the run (see [`pace`]).
    fn record(&self, payload: &[u8], epoch: Instant) {
        let now_ns = epoch.elapsed().as_nanos() as u64;
        let (Some(stamp), Some(seq)) = (payload.get(..8), payload.get(8..16)) else {
            return;
        };
        let sent_ns = u64::from_be_bytes(stamp.try_into().expect("8 bytes"));
        let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        let us = now_ns.saturating_sub(sent_ns) / 1000;
        let _ = self.histogram.lock().unwrap().record(us.max(1));
        if seq % self.paired_every == 0
            && let Some(slot) = self
                .arrivals
                .lock()
                .unwrap()
                .get_mut((seq / self.paired_every) as usize)
            && *slot == 0
        {
            *slot = now_ns.max(1);
        }
    }

    /// Starts counting, with room for the arrivals of the paired sequence
    /// numbers among `sent` datagrams (none when `sent` is 0: an unpaired
    /// run).
    fn start(&self, sent: u64) {
        self.received.store(0, Ordering::Relaxed);
        self.histogram.lock().unwrap().reset();
        let mut arrivals = self.arrivals.lock().unwrap();
        arrivals.clear();
        arrivals.resize(sent.div_ceil(self.paired_every) as usize, 0);
        drop(arrivals);
        self.recording.store(true, Ordering::Relaxed);
    }

    fn stop(&self) -> (u64, Histogram<u64>, Vec<u64>) {
        self.recording.store(false, Ordering::Relaxed);
        (
            self.received.load(Ordering::Relaxed),
            self.histogram.lock().unwrap().clone(),
            std::mem::take(&mut *self.arrivals.lock().unwrap()),
        )
    }
}

struct Pair {
    /// Subscriber and publisher; both stay open for the run.
    sessions: [Session; 2],
    publisher: MediaSender,
    channel: relay_core::ChannelId,
    /// From the publisher's endpoint straight to the sink.
    direct: quinn::Connection,
    /// The subscriber's UDP port (its socket's kernel drops are counted).
    subscriber_port: u16,
    /// Through each of the bench's baselines, in their order.
    through_baselines: Vec<quinn::Connection>,
}

/// Where a path's datagrams go, resolved once per run.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Through the relays, from the publisher's session.
    Relays,
    /// To the direct path's sink.
    Direct,
    /// Through the bench's baseline at this index.
    Baseline(usize),
}

impl Pair {
    /// The publisher's own QUIC connection on `via`; none through the
    /// relays, where it publishes through its session.
    fn connection(&self, via: Via) -> Option<&quinn::Connection> {
        match via {
            Via::Relays => None,
            Via::Direct => Some(&self.direct),
            Via::Baseline(i) => Some(&self.through_baselines[i]),
        }
    }

    fn sender(&self, via: Via) -> Sender {
        match self.connection(via) {
            Some(c) => Sender::Direct(c.clone()),
            None => Sender::Relayed(self.publisher.clone(), self.channel),
        }
    }

    fn stats(&self, via: Via) -> quinn::ConnectionStats {
        match self.connection(via) {
            Some(c) => c.stats(),
            None => self.sessions[1].connection_stats(),
        }
    }
}

/// What one or more runs on one path measured.
#[derive(Clone)]
struct Sample {
    path: Path,
    rate: u64,
    sent: u64,
    /// Datagrams the pacer shed, too late to send (see [`Schedule`]).
    shed: u64,
    received: u64,
    /// Sending time.
    send_seconds: f64,
    /// Sending time plus the wait for the tail (CPU is counted over it).
    seconds: f64,
    relay_cpu: f64,
    own_cpu: f64,
    /// Datagrams the publishers' QUIC stacks put into packets: fewer than
    /// `sent` when the generator could not send as fast as it offered and
    /// quinn dropped queued datagrams (its send buffer is bounded).
    on_wire: u64,
    /// Packets the kernel dropped at the generator's receiving sockets for
    /// the path (full receive buffers: the generator did not read fast
    /// enough).
    receive_drops: u64,
    /// Time the hypervisor took from the relays' CPUs (the baseline's on
    /// its paths) and from the generator's, seconds per CPU.
    relay_steal: f64,
    generator_steal: f64,
    histogram: Histogram<u64>,
    /// Paired runs: for each datagram sent on the path and the direct path
    /// at once that arrived on both, path minus direct, nanoseconds.
    paired_ns: Vec<i64>,
    /// Paired runs with a [`Probe`]: what its probes measured.
    probe: Option<ProbeSample>,
}

impl Sample {
    fn merge(&mut self, other: &Sample) {
        self.sent += other.sent;
        self.shed += other.shed;
        self.received += other.received;
        self.send_seconds += other.send_seconds;
        self.seconds += other.seconds;
        self.relay_cpu += other.relay_cpu;
        self.own_cpu += other.own_cpu;
        self.on_wire += other.on_wire;
        self.receive_drops += other.receive_drops;
        self.relay_steal += other.relay_steal;
        self.generator_steal += other.generator_steal;
        self.paired_ns.extend_from_slice(&other.paired_ns);
        self.histogram
            .add(&other.histogram)
            .expect("histograms of the same bounds");
        match (&mut self.probe, &other.probe) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, Some(theirs)) => self.probe = Some(theirs.clone()),
            _ => {}
        }
    }

    fn result(&self, topology: Topology, relays: usize) -> RunResult {
        // The probes cost the forwarder what the load's datagrams do.
        let delivered = self.received + self.probe.as_ref().map_or(0, |p| p.received);
        let forwarded = match self.path {
            // Each delivered datagram was forwarded once per relay on its way.
            Path::Relayed => delivered * relays as u64,
            Path::Direct => 0,
            Path::Forwarded | Path::Turned => delivered,
        };
        let cpu = self.relay_cpu;
        RunResult {
            path: self.path.name(topology),
            offered_rate: self.rate,
            sent: self.sent,
            generator_shed: self.shed,
            sent_per_s: self.sent as f64 / self.send_seconds,
            received: self.received,
            loss: if self.sent == 0 {
                0.0
            } else {
                1.0 - self.received as f64 / self.sent as f64
            },
            generator_dropped: self.sent.saturating_sub(self.on_wire),
            generator_receive_drops: self.receive_drops,
            forwarded_per_s: forwarded as f64 / self.send_seconds,
            relay_cores: cpu / self.seconds,
            loadgen_cores: self.own_cpu / self.seconds,
            relay_cpu_steal: self.relay_steal / self.seconds,
            generator_cpu_steal: self.generator_steal / self.seconds,
            cpu_s_per_million: if forwarded == 0 {
                0.0
            } else {
                cpu / forwarded as f64 * 1e6
            },
            per_core: if cpu == 0.0 || forwarded == 0 {
                0.0
            } else {
                forwarded as f64 / cpu
            },
            p50_us: self.histogram.value_at_quantile(0.5) as f64,
            p99_us: self.histogram.value_at_quantile(0.99) as f64,
            max_us: self.histogram.max() as f64,
            direct_p99_us: None,
            probed_p99_us: self
                .probe
                .as_ref()
                .and_then(|p| PairedAdded::from_differences(&p.paired_ns))
                .map(|added| added.p99_us),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    /// "single" or "chain" (through the relays), "direct" (the path
    /// latency is added to), "udp-forward" (the plain forwarder) or
    /// "coturn".
    path: String,
    offered_rate: u64,
    sent: u64,
    /// Datagrams the load generator's pacer reached too late and shed
    /// rather than send in a burst (added-latency rounds only; see
    /// `--max-lateness-us`).
    generator_shed: u64,
    /// Achieved sending rate (below the offered one when the load
    /// generator cannot keep up).
    sent_per_s: f64,
    received: u64,
    loss: f64,
    /// Of the sent datagrams, those the load generator's own QUIC stacks
    /// dropped before any packet carried them: loss that is the
    /// generator's, not the path's.
    generator_dropped: u64,
    /// Packets (each may carry several datagrams) the kernel dropped
    /// because the generator's receiving sockets were full: loss that is
    /// the generator's too.
    generator_receive_drops: u64,
    /// Datagrams forwarded per second, summed over the relays.
    forwarded_per_s: f64,
    /// Relay CPU seconds per second of run (cores used), summed; the
    /// forwarder's or coturn's on their paths.
    relay_cores: f64,
    /// The load generator's own CPU seconds per second of run.
    loadgen_cores: f64,
    /// Share of the run's time the hypervisor took from the relays' CPUs
    /// (steal): the relays could not run then, whatever they do.
    relay_cpu_steal: f64,
    /// The same for the load generator's CPUs.
    generator_cpu_steal: f64,
    /// Relay CPU seconds per million forwarded datagrams.
    cpu_s_per_million: f64,
    /// Forwarded datagrams per second per core of relay CPU.
    per_core: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// In a sweep, when this run stalled (p99 over the bound) but kept up
    /// otherwise: the p99 of the direct path at the same rate, run right
    /// after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    direct_p99_us: Option<f64>,
    /// With probes beside the load: the latency the path added to them at
    /// p99 (see [`Probe`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    probed_p99_us: Option<f64>,
}

impl RunResult {
    /// Whether the path kept up with the offered rate: no loss, the
    /// generator sent what it offered, and neither a standing queue nor
    /// long stalls (deep socket buffers turn overload into delay before
    /// loss). Stalls are judged by the probes when there are any: what the
    /// path added to them at p99 must stay under the bound. Without, by
    /// the load's p99; when the direct path stalled too at the same rate,
    /// stalls outside the path (the generator's scheduling, the host's)
    /// are taken out: what the path adds to the p99 must stay under the
    /// bound (a relay that drains a backlog slowly still fails).
    fn keeps_up(&self) -> bool {
        self.keeps_up_but_for_stalls()
            && match self.probed_p99_us {
                Some(probed) => probed < SATURATED_P99_US,
                None => {
                    self.p99_us < SATURATED_P99_US
                        || self
                            .direct_p99_us
                            .is_some_and(|d| self.p99_us - d < SATURATED_P99_US)
                }
            }
    }

    /// Whether only a direct run at the same rate can tell whose stalls
    /// these were: the run failed on its p99 alone, with no probes to
    /// judge by (see [`RunResult::keeps_up`]).
    fn needs_direct_run(&self) -> bool {
        self.probed_p99_us.is_none()
            && self.keeps_up_but_for_stalls()
            && self.p99_us >= SATURATED_P99_US
    }

    /// No loss, the offered rate sent, no standing queue.
    fn keeps_up_but_for_stalls(&self) -> bool {
        self.loss < 0.001
            && self.sent_per_s >= 0.98 * self.offered_rate as f64
            && self.p50_us < SATURATED_P50_US
    }
}

/// Latency the relays (or a baseline) add: that path's
/// percentiles minus the direct path's, both measured at the same rate in
/// interleaved rounds.
#[derive(Debug, Clone, serde::Serialize)]
struct Added {
    offered_rate: u64,
    rounds: usize,
    /// The path measured: through the relays, or through a baseline.
    through: RunResult,
    direct: RunResult,
    added_p50_us: f64,
    added_p99_us: f64,
    /// The same, datagram by datagram (none when no datagram arrived on
    /// both paths).
    paired: Option<PairedAdded>,
    /// What the path added to the probes beside the load (none with
    /// `--probe-rate 0`).
    probed: Option<Probed>,
}

impl Added {
    fn new(
        rounds: usize,
        through: RunResult,
        direct: RunResult,
        paired: Option<PairedAdded>,
        probed: Option<Probed>,
    ) -> Added {
        Added {
            offered_rate: through.offered_rate,
            rounds,
            added_p50_us: through.p50_us - direct.p50_us,
            added_p99_us: through.p99_us - direct.p99_us,
            paired,
            probed,
            through,
            direct,
        }
    }
}

/// Latency added datagram by datagram: one datagram in [`PAIRED_EVERY`]
/// of a path's run is sent on the direct path too, from the same
/// publisher's endpoint at the same moment, and each pair's arrival times
/// are subtracted. A stall of the load generator delays both copies,
/// and that part cancels out, where the difference of two runs' p99s keeps
/// whichever stalls each run met. Only part: the copies arrive at
/// different sockets, read by different tasks, and after a stall the
/// generator drains them in its own order, so under the normal-policy
/// generator at high rates this p99 is as noisy as the other. What remains
/// is what the path added, including stalls of the path's own CPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct PairedAdded {
    /// Datagrams that arrived on both paths.
    samples: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl PairedAdded {
    /// From the per-datagram differences, nanoseconds.
    fn from_differences(differences: &[i64]) -> Option<PairedAdded> {
        if differences.is_empty() {
            return None;
        }
        let mut sorted = differences.to_vec();
        sorted.sort_unstable();
        let at = |q: f64| {
            // Nearest rank.
            let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
            sorted[rank - 1] as f64 / 1000.0
        };
        Some(PairedAdded {
            samples: sorted.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: sorted[sorted.len() - 1] as f64 / 1000.0,
        })
    }
}

/// Path minus direct arrival for each paired datagram that arrived on
/// both, nanoseconds (see [`Recorder`]'s arrivals).
fn paired_differences(path: &[u64], direct: &[u64]) -> Vec<i64> {
    path.iter()
        .zip(direct)
        .filter(|&(&p, &d)| p != 0 && d != 0)
        .map(|(&p, &d)| p as i64 - d as i64)
        .collect()
}

/// What was measured on one path: the sweep's runs and maximum (with
/// `--sweep`) and the added latency.
#[derive(Debug, Default, serde::Serialize)]
struct Measured {
    runs: Vec<RunResult>,
    max_loss_free_rate: Option<u64>,
    added: Option<Added>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    /// Whether the relays (and the baselines) ran under SCHED_FIFO.
    realtime: bool,
    /// Whether the load generator's threads did.
    generator_realtime: bool,
    /// `--max-lateness-us` (0: the pacer shed nothing).
    max_lateness_us: u64,
    /// Latency probes per second beside the load (0: none).
    probe_rate: u64,
    /// Whether the relays' CPUs were kept from idling (`--idle-poll`).
    idle_poll: bool,
    /// Whether the probes' threads ran under SCHED_FIFO.
    probes_realtime: bool,
    relays: Measured,
    /// The plain UDP forwarder (`--baseline`).
    baseline: Option<Measured>,
    /// coturn (`--coturn`).
    coturn: Option<Measured>,
}

/// A relay the relays are measured against (`--baseline`, `--coturn`):
/// its process and its own sink.
struct Baseline {
    path: Path,
    process: Spawned,
    sink: std::net::SocketAddr,
    recorder: Arc<Recorder>,
}

/// Real-time priority of the probe's thread (its clients and sinks), above
/// every other thread of the generator's.
const PROBE_PRIORITY: &str = "30";

/// Real-time priority of the probe's pacer: below the probe's receivers,
/// above the load's threads.
const PROBE_PACER_PRIORITY: &str = "20";

/// A thread of its own, running a single-threaded tokio runtime: the
/// probe's clients and sinks, driven apart from the load's. Under
/// SCHED_FIFO (when allowed) it runs as soon as a probe arrives, however
/// busy the load's threads keep the CPU.
struct ProbeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProbeThread {
    fn start(realtime: bool) -> anyhow::Result<ProbeThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                if realtime {
                    make_thread_realtime(PROBE_PRIORITY);
                }
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(ProbeThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A sink driven by this thread, recording every datagram as paired.
    fn sink(
        &self,
        dir: &std::path::Path,
        epoch: Instant,
    ) -> anyhow::Result<(Arc<Recorder>, std::net::SocketAddr)> {
        let recorder = Recorder::new(1)?;
        let _runtime = self.handle.enter();
        let sink = start_sink(dir, recorder.clone(), epoch)?.local_addr()?;
        Ok((recorder, sink))
    }

    /// A subscriber's and a publisher's endpoint driven by this thread.
    fn client_endpoints(&self) -> anyhow::Result<[quinn::Endpoint; 2]> {
        let _runtime = self.handle.enter();
        Ok([client_endpoint()?, client_endpoint()?])
    }
}

impl Drop for ProbeThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Latency under load, measured the way latency-under-load tests (flent's
/// RRUL, irtt beside a bulk transfer) measure it: in every run on a path
/// other than the direct one (the sweep's and the added-latency rounds),
/// beside the load, a publisher/subscriber pair of its own sends
/// `rate` datagrams/s on the measured path, each also on its direct
/// connection at the same moment. Its clients and sinks run on a
/// [`ProbeThread`], its pacer on a real-time thread below them, so a probe
/// leaves on time and is read as soon as it arrives however busy the
/// load keeps the generator's CPU (a wake-up per probe costs little at a
/// thousand per second). The forwarder handles the probes among the load's
/// datagrams, so path minus direct arrival, probe by probe, is what the
/// path adds at the load's rate, including at rates the real-time
/// generator cannot drive. What the load itself is stays the generator's:
/// under the normal policy its stalls hold back every client's datagrams
/// at once and release them as one burst, and a probe behind such a burst
/// waits for the path to drain it.
struct Probe {
    rate: u64,
    /// Whether its threads run under SCHED_FIFO.
    realtime: bool,
    /// Its publisher and subscriber, connected like a pair of the load's.
    pair: Pair,
    relayed: Arc<Recorder>,
    direct: Arc<Recorder>,
    /// In the bench's order.
    baselines: Vec<Arc<Recorder>>,
    /// Last: its clients close before their runtime stops.
    _thread: ProbeThread,
}

impl Probe {
    /// Starts probing `via` for `duration`; none on the direct path, which
    /// the probes are measured against.
    fn start(&self, via: Via, duration: Duration, size: usize, epoch: Instant) -> Option<ProbeRun> {
        let recorder = match via {
            Via::Relays => &self.relayed,
            Via::Direct => return None,
            Via::Baseline(i) => &self.baselines[i],
        };
        Some(start_probes(
            self.pair.sender(via),
            self.pair.sender(Via::Direct),
            [recorder.clone(), self.direct.clone()],
            self.rate,
            self.realtime,
            duration,
            size,
            epoch,
        ))
    }
}

/// Probes being sent: their pacer and where they arrive.
struct ProbeRun {
    pacer: std::thread::JoinHandle<u64>,
    path: Arc<Recorder>,
    direct: Arc<Recorder>,
}

/// Sends `rate` probes/s on `path` for `duration`, each also on `direct`
/// at the same moment, from a pacer thread of their own (real-time when
/// `realtime`); `recorders` are the path's and the direct path's, each
/// recording every probe as paired.
#[allow(clippy::too_many_arguments)]
fn start_probes(
    path: Sender,
    direct: Sender,
    recorders: [Arc<Recorder>; 2],
    rate: u64,
    realtime: bool,
    duration: Duration,
    size: usize,
    epoch: Instant,
) -> ProbeRun {
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let [path_recorder, direct_recorder] = recorders;
    path_recorder.start(total);
    direct_recorder.start(total);
    let pacer = std::thread::spawn(move || {
        if realtime {
            make_thread_realtime(PROBE_PACER_PRIORITY);
        }
        let schedule = Schedule {
            rate,
            duration,
            max_lateness: None,
        };
        pace(&[path], &[direct], 1, schedule, size, epoch).sent
    });
    ProbeRun {
        pacer,
        path: path_recorder,
        direct: direct_recorder,
    }
}

impl ProbeRun {
    /// Once the probes had time to arrive: what they measured.
    fn finish(self) -> anyhow::Result<ProbeSample> {
        let sent = self
            .pacer
            .join()
            .map_err(|_| anyhow::anyhow!("the probe's pacer panicked"))?;
        let (received, histogram, arrivals) = self.path.stop();
        let (_, direct_histogram, direct_arrivals) = self.direct.stop();
        Ok(ProbeSample {
            sent,
            received,
            histogram,
            direct_histogram,
            paired_ns: paired_differences(&arrivals, &direct_arrivals),
        })
    }
}

/// What the probes of one or more runs measured.
#[derive(Clone)]
struct ProbeSample {
    sent: u64,
    /// Probes that arrived through the path (their direct copies aside).
    received: u64,
    /// One-way latencies through the path and on the direct connection.
    histogram: Histogram<u64>,
    direct_histogram: Histogram<u64>,
    /// Path minus direct arrival, for each probe that arrived both ways, ns.
    paired_ns: Vec<i64>,
}

impl ProbeSample {
    fn merge(&mut self, other: &ProbeSample) {
        self.sent += other.sent;
        self.received += other.received;
        self.paired_ns.extend_from_slice(&other.paired_ns);
        for (a, b) in [
            (&mut self.histogram, &other.histogram),
            (&mut self.direct_histogram, &other.direct_histogram),
        ] {
            a.add(b).expect("histograms of the same bounds");
        }
    }

    fn result(&self, rate: u64, realtime: bool) -> Probed {
        let us = |h: &Histogram<u64>, q| h.value_at_quantile(q) as f64;
        Probed {
            rate,
            realtime,
            sent: self.sent,
            lost: self.sent.saturating_sub(self.received),
            path_p50_us: us(&self.histogram, 0.5),
            path_p99_us: us(&self.histogram, 0.99),
            direct_p50_us: us(&self.direct_histogram, 0.5),
            direct_p99_us: us(&self.direct_histogram, 0.99),
            added: PairedAdded::from_differences(&self.paired_ns),
        }
    }
}

/// The latency a path added to the probes sent beside the load (see
/// [`Probe`]).
#[derive(Debug, Clone, serde::Serialize)]
struct Probed {
    /// Probes per second.
    rate: u64,
    /// Whether the probe's threads ran under SCHED_FIFO (if not, their own
    /// waits for the CPU are in these figures).
    realtime: bool,
    sent: u64,
    /// Probes lost on the path.
    lost: u64,
    /// One-way latency of the probes through the path, and of their
    /// copies on the direct connection.
    path_p50_us: f64,
    path_p99_us: f64,
    direct_p50_us: f64,
    direct_p99_us: f64,
    /// Path minus direct, probe by probe: what the path added (none when
    /// no probe arrived both ways).
    added: Option<PairedAdded>,
}

struct Bench {
    duration: Duration,
    size: usize,
    topology: Topology,
    relays: Vec<Spawned>,
    pairs: Vec<Pair>,
    epoch: Instant,
    relayed: Arc<Recorder>,
    direct: Arc<Recorder>,
    /// The direct path's sink.
    sink_port: u16,
    /// The plain forwarder and coturn, as asked for.
    baselines: Vec<Baseline>,
    ticks: f64,
    /// The CPUs the relays and the generator run on (both every CPU when
    /// not pinned), whose steal is counted.
    placement: Placement,
    /// Whether the generator's threads run under SCHED_FIFO.
    generator_realtime: bool,
    /// `--max-lateness-us`, in the added-latency rounds.
    max_lateness: Option<Duration>,
    /// The latency probe beside the load (none with `--probe-rate 0`).
    probe: Option<Probe>,
}

fn client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    let (socket, _) = bind_udp("127.0.0.1:0".parse()?, DEFAULT_SOCKET_BUFFER)?;
    endpoint_on(runtime()?.wrap_udp_socket(socket)?)
}

fn runtime() -> anyhow::Result<Arc<dyn quinn::Runtime>> {
    quinn::default_runtime().context("no async runtime")
}

/// A client endpoint on `socket`.
fn endpoint_on(socket: Arc<dyn quinn::AsyncUdpSocket>) -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime()?,
    )?)
}

/// A client endpoint whose packets cross `server` (a TURN server) in a
/// channel to `peer`: the only peer it can reach.
async fn turn_endpoint(
    server: std::net::SocketAddr,
    peer: std::net::SocketAddr,
) -> anyhow::Result<quinn::Endpoint> {
    // coturn may still be starting.
    let socket = turn::TurnSocket::connect(server, peer, Duration::from_secs(10))
        .await
        .context("TURN allocation on coturn")?;
    endpoint_on(socket)
}

async fn connect_session(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Session> {
    // Retry while the relay starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Session::connect(
            endpoint,
            config.clone(),
            addr,
            "localhost",
            Duration::from_secs(2),
        )
        .await
        {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                if std::env::var_os("LOADGEN_VERBOSE").is_some() {
                    eprintln!("waiting for relay at {addr}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The direct path's receiver: a QUIC server with the relays' transport
/// settings that records every datagram it gets.
fn start_sink(
    dir: &std::path::Path,
    recorder: Arc<Recorder>,
    epoch: Instant,
) -> anyhow::Result<quinn::Endpoint> {
    let tls = TlsIdentity::load(
        &dir.join("pki/ca.pem"),
        &dir.join("pki/relay-1.pem"),
        &dir.join("pki/relay-1.key"),
        &default_cluster_domain(),
    )?;
    let server = tls.quic_server(&[DIRECT_ALPN], Arc::new(media_transport()))?;
    let (socket, _) = bind_udp("127.0.0.1:0".parse()?, DEFAULT_SOCKET_BUFFER)?;
    let endpoint = tls.quic_endpoint(server, socket)?;
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok(d) = conn.read_datagram().await {
                    recorder.record(&d, epoch);
                }
            });
        }
    });
    Ok(endpoint)
}

const DIRECT_ALPN: &[u8] = b"relay-loadgen-direct";

/// The run's cluster CA, which the relays' and the sinks' certificates
/// chain to.
fn cluster_roots(dir: &std::path::Path) -> anyhow::Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("pki/ca.pem"))? {
        roots.add(c?)?;
    }
    Ok(Arc::new(roots))
}

/// Where a pair's clients connect: the relays (the publisher to the first,
/// the subscriber to the last), the direct path's sink, and each
/// baseline's entry and the sink behind it.
#[derive(Clone)]
struct Targets {
    config: quinn::ClientConfig,
    direct_config: quinn::ClientConfig,
    publish_to: std::net::SocketAddr,
    subscribe_to: std::net::SocketAddr,
    direct_sink: std::net::SocketAddr,
    /// In the bench's order: the path, where its clients send, its sink.
    baselines: Vec<(Path, std::net::SocketAddr, std::net::SocketAddr)>,
}

/// Connects the publisher/subscriber pair `name` (its channel too) on every
/// path of `to`, from the subscriber's and the publisher's endpoints (each
/// client on its own socket, as on separate machines); the media the
/// subscriber receives is recorded into `relayed`.
async fn connect_pair(
    name: String,
    to: Targets,
    [sub_endpoint, pub_endpoint]: [quinn::Endpoint; 2],
    relayed: Arc<Recorder>,
    epoch: Instant,
) -> anyhow::Result<Pair> {
    let subscriber_port = sub_endpoint.local_addr()?.port();
    let mut sub = connect_session(&sub_endpoint, &to.config, to.subscribe_to).await?;
    sub.join(
        &name,
        &token(&name, &format!("{name}-sub"), Role::Subscriber),
    )
    .await?;
    let mut publisher = connect_session(&pub_endpoint, &to.config, to.publish_to).await?;
    let joined = publisher
        .join(
            &name,
            &token(&name, &format!("{name}-pub"), Role::Publisher),
        )
        .await?;
    let direct = pub_endpoint
        .connect_with(to.direct_config.clone(), to.direct_sink, "localhost")?
        .await?;
    let mut through_baselines = Vec::new();
    for &(path, entry, sink) in &to.baselines {
        let connection = match path {
            Path::Forwarded => pub_endpoint
                .connect_with(to.direct_config.clone(), entry, "localhost")?
                .await
                .context("connecting through udp-forward")?,
            _ => turn_endpoint(entry, sink)
                .await?
                .connect_with(to.direct_config.clone(), sink, "localhost")?
                .await
                .context("connecting through coturn")?,
        };
        through_baselines.push(connection);
    }
    let media = sub.datagrams();
    tokio::spawn(async move {
        while let Ok(incoming) = media.recv().await {
            if let Incoming::Media(m) = incoming {
                relayed.record(&m.payload, epoch);
            }
        }
    });
    Ok(Pair {
        publisher: publisher.media_sender(),
        sessions: [sub, publisher],
        channel: joined.channel,
        direct,
        subscriber_port,
        through_baselines,
    })
}

impl Bench {
    async fn setup(
        cli: &Cli,
        dir: &std::path::Path,
        launch: &Launch,
        placement: Placement,
        generator_realtime: bool,
        probes_realtime: bool,
    ) -> anyhow::Result<Bench> {
        let relays = start_relays(dir, cli.topology, cli.relay_threads, launch)?;
        let epoch = Instant::now();
        let relayed = Recorder::new(PAIRED_EVERY)?;
        let direct = Recorder::new(PAIRED_EVERY)?;
        let sink = start_sink(dir, direct.clone(), epoch)?;
        let sink_addr = sink.local_addr()?;
        // The probe's sinks and clients run on its thread, and exist before
        // the forwarder that routes its publisher to its sink starts.
        let probe_thread = match cli.probe_rate {
            0 => None,
            _ => Some(ProbeThread::start(probes_realtime)?),
        };
        let probe_direct = probe_thread
            .as_ref()
            .map(|t| t.sink(dir, epoch))
            .transpose()?;
        let probe_endpoints = probe_thread
            .as_ref()
            .map(ProbeThread::client_endpoints)
            .transpose()?;
        let probe_publisher = match &probe_endpoints {
            Some([_, publisher]) => Some(publisher.local_addr()?),
            None => None,
        };
        let mut baselines = Vec::new();
        // Per baseline when probing: where the probe sends, its sink.
        let mut probe_routes = Vec::new();
        for (path, asked) in [(Path::Forwarded, cli.baseline), (Path::Turned, cli.coturn)] {
            if !asked {
                continue;
            }
            let recorder = Recorder::new(PAIRED_EVERY)?;
            let sink = start_sink(dir, recorder.clone(), epoch)?.local_addr()?;
            let probe_sink = probe_thread
                .as_ref()
                .map(|t| t.sink(dir, epoch))
                .transpose()?;
            let process = match path {
                Path::Forwarded => {
                    // The probe's publisher goes to the probe's sink,
                    // through the socket the load uses.
                    let probe_upstream: Vec<_> = probe_publisher
                        .zip(probe_sink.as_ref().map(|(_, sink)| *sink))
                        .into_iter()
                        .collect();
                    start_forwarder(dir, sink, &probe_upstream, launch)?
                }
                // The probe's TURN allocation names its own sink.
                _ => start_coturn(dir, &cli.turnserver, launch)?,
            };
            if let Some((recorder, sink)) = probe_sink {
                probe_routes.push((path, process.addr, sink, recorder));
            }
            baselines.push(Baseline {
                path,
                process,
                sink,
                recorder,
            });
        }

        let roots = cluster_roots(dir)?;
        let targets = Targets {
            config: client_config(roots.clone())?,
            direct_config: quic_client_with_roots(roots, DIRECT_ALPN, Arc::new(media_transport()))?,
            publish_to: relays[0].addr,
            subscribe_to: relays[relays.len() - 1].addr,
            direct_sink: sink_addr,
            baselines: baselines
                .iter()
                .map(|b| (b.path, b.process.addr, b.sink))
                .collect(),
        };
        let mut pairs = Vec::new();
        for i in 0..cli.pairs {
            let name = format!("bench-{i}");
            let endpoints = [client_endpoint()?, client_endpoint()?];
            let pair = connect_pair(name, targets.clone(), endpoints, relayed.clone(), epoch);
            pairs.push(pair.await?);
        }
        let probe = match (probe_thread, probe_direct, probe_endpoints) {
            (Some(thread), Some((direct, direct_sink)), Some(endpoints)) => {
                let relayed = Recorder::new(1)?;
                let to = Targets {
                    direct_sink,
                    baselines: probe_routes
                        .iter()
                        .map(|(path, entry, sink, _)| (*path, *entry, *sink))
                        .collect(),
                    ..targets
                };
                // On the probe's thread, so that its clients are driven there.
                let connect = connect_pair("probe".into(), to, endpoints, relayed.clone(), epoch);
                let pair = thread.handle.spawn(connect).await??;
                Some(Probe {
                    rate: cli.probe_rate,
                    realtime: probes_realtime,
                    pair,
                    relayed,
                    direct,
                    baselines: probe_routes.into_iter().map(|r| r.3).collect(),
                    _thread: thread,
                })
            }
            _ => None,
        };
        Ok(Bench {
            duration: Duration::from_secs_f64(cli.duration),
            size: cli.size,
            topology: cli.topology,
            relays,
            pairs,
            epoch,
            relayed,
            direct,
            sink_port: sink_addr.port(),
            baselines,
            probe,
            ticks: clock_ticks(),
            placement,
            generator_realtime,
            max_lateness: match cli.max_lateness_us {
                0 => None,
                us => Some(Duration::from_micros(us)),
            },
        })
    }

    /// Where `path`'s datagrams go in this bench.
    fn via(&self, path: Path) -> anyhow::Result<Via> {
        Ok(match path {
            Path::Relayed => Via::Relays,
            Path::Direct => Via::Direct,
            Path::Forwarded | Path::Turned => Via::Baseline(
                self.baselines
                    .iter()
                    .position(|b| b.path == path)
                    .with_context(|| format!("no {} in this run", path.name(self.topology)))?,
            ),
        })
    }

    /// CPU seconds so far of what forwards on `via`: the relays (counted on
    /// the direct path too, as a check that they are idle), or the
    /// baseline's process.
    fn forwarding_cpu(&self, via: Via) -> anyhow::Result<f64> {
        let processes: Vec<&Spawned> = match via {
            Via::Relays | Via::Direct => self.relays.iter().collect(),
            Via::Baseline(i) => vec![&self.baselines[i].process],
        };
        let mut sum = 0.0;
        for r in processes {
            sum += cpu_seconds(&r.child.id().to_string(), self.ticks)?;
        }
        Ok(sum)
    }

    /// Seconds per CPU the hypervisor has taken so far from the relays'
    /// CPUs and from the generator's (one read of `/proc/stat`).
    fn steal(&self) -> anyhow::Result<(f64, f64)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        Ok((
            cpu_steal(&stat, &self.placement.relays, self.ticks)?,
            cpu_steal(&stat, &self.placement.generator, self.ticks)?,
        ))
    }

    /// DATAGRAM frames the publishers have sent so far on `via`.
    fn on_wire(&self, via: Via) -> u64 {
        self.pairs
            .iter()
            .map(|p| p.stats(via).frame_tx.datagram)
            .sum()
    }

    /// The generator's UDP ports that receive `via`'s datagrams.
    fn receive_ports(&self, via: Via) -> Vec<u16> {
        match via {
            Via::Relays => self.pairs.iter().map(|p| p.subscriber_port).collect(),
            Via::Direct => vec![self.sink_port],
            Via::Baseline(i) => vec![self.baselines[i].sink.port()],
        }
    }

    /// Sends at `rate` datagrams/s on `path` for `duration`; `paired`
    /// sends one datagram in [`PAIRED_EVERY`] on the direct path too (see
    /// [`PairedAdded`]), and the probes beside the load (see [`Probe`]).
    async fn run(
        &self,
        path: Path,
        rate: u64,
        duration: Duration,
        paired: bool,
    ) -> anyhow::Result<Sample> {
        let via = self.via(path)?;
        let recorder = match via {
            Via::Relays => &self.relayed,
            Via::Direct => &self.direct,
            Via::Baseline(i) => &self.baselines[i].recorder,
        };
        let paired = paired && !matches!(via, Via::Direct);
        // Arrival slots only where they are paired.
        let paired_slots = match paired {
            true => (rate as f64 * duration.as_secs_f64()) as u64,
            false => 0,
        };
        recorder.start(paired_slots);
        if paired {
            self.direct.start(paired_slots);
        }
        let relay_before = self.forwarding_cpu(via)?;
        let own_before = cpu_seconds("self", self.ticks)?;
        let steal_before = self.steal()?;
        let started = Instant::now();
        let senders: Vec<Sender> = self.pairs.iter().map(|p| p.sender(via)).collect();
        let also_direct: Vec<Sender> = match paired {
            true => self.pairs.iter().map(|p| p.sender(Via::Direct)).collect(),
            false => Vec::new(),
        };
        let on_wire_before = self.on_wire(via);
        let receivers = self.receive_ports(via);
        let drops_before = udp_drops(&receivers)?;
        let (epoch, size) = (self.epoch, self.size);
        // In the sweep's runs too: they tell the path's stalls from the
        // generator's.
        let probes = self
            .probe
            .as_ref()
            .and_then(|p| p.start(via, duration, size, epoch));
        let realtime = self.generator_realtime;
        // The sweep's runs send every datagram: their figure is a
        // throughput.
        let schedule = Schedule {
            rate,
            duration,
            max_lateness: self.max_lateness.filter(|_| paired),
        };
        let paced = tokio::task::spawn_blocking(move || {
            if realtime {
                make_thread_realtime(PACER_PRIORITY);
            }
            pace(&senders, &also_direct, PAIRED_EVERY, schedule, size, epoch)
        })
        .await?;
        let send_seconds = started.elapsed().as_secs_f64();
        // Let the tail arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (received, histogram, arrivals) = recorder.stop();
        let paired_ns = match paired {
            true => paired_differences(&arrivals, &self.direct.stop().2),
            false => Vec::new(),
        };
        let probe = probes.map(ProbeRun::finish).transpose()?;
        let seconds = started.elapsed().as_secs_f64();
        let steal_after = self.steal()?;
        Ok(Sample {
            path,
            rate,
            sent: paced.sent,
            shed: paced.shed,
            received,
            send_seconds,
            seconds,
            relay_cpu: self.forwarding_cpu(via)? - relay_before,
            own_cpu: cpu_seconds("self", self.ticks)? - own_before,
            on_wire: self.on_wire(via) - on_wire_before,
            // Saturating: a socket that closed takes its count with it.
            receive_drops: udp_drops(&receivers)?.saturating_sub(drops_before),
            relay_steal: steal_after.0 - steal_before.0,
            generator_steal: steal_after.1 - steal_before.1,
            histogram,
            paired_ns,
            probe,
        })
    }

    fn result(&self, sample: &Sample) -> RunResult {
        sample.result(self.topology, self.relays.len())
    }

    /// Whether the load generator used nearly all of its CPUs, or dropped
    /// datagrams it offered before sending them: then it, not the relay,
    /// may set the figures.
    fn generator_saturated(&self, r: &RunResult) -> bool {
        let generator_cpus = self.placement.generator.len().max(1);
        let busy = r.loadgen_cores >= 0.9 * generator_cpus as f64;
        if busy {
            println!(
                "warning: the load generator used {:.2} of its {} CPU(s): it may be what limits this run",
                r.loadgen_cores, generator_cpus
            );
        }
        let dropping = r.generator_dropped as f64 > 0.001 * r.sent as f64;
        if dropping {
            println!(
                "warning: the load generator's QUIC stacks dropped {} of the {} datagrams offered before sending them: that loss is the generator's",
                r.generator_dropped, r.sent
            );
        }
        if r.generator_receive_drops > 0 {
            println!(
                "warning: the kernel dropped {} packets at the load generator's full receiving sockets: that loss is the generator's",
                r.generator_receive_drops
            );
        }
        let due = r.sent + r.generator_shed;
        let shedding = r.generator_shed as f64 > 0.01 * due as f64;
        if shedding {
            println!(
                "warning: the load generator's pacer was too late for {} of the {} datagrams due and shed them: this run offered {:.0}/s, not {}/s",
                r.generator_shed, due, r.sent_per_s, r.offered_rate
            );
        }
        busy || dropping || r.generator_receive_drops > 0 || shedding
    }

    /// Raises the rate on `path` until it no longer keeps up (or the load
    /// generator saturates; see [`Sweep`]); returns the highest rate it
    /// kept up with, if any.
    async fn sweep(&self, path: Path, measured: &mut Measured) -> anyhow::Result<Option<u64>> {
        let mut sweep = Sweep::new();
        loop {
            let rate = sweep.rate;
            let mut r = self.result(&self.run(path, rate, self.duration, false).await?);
            print(&r);
            if r.needs_direct_run() {
                // Stalls of the path, or of the host? The direct path has
                // no relay to stall.
                let direct =
                    self.result(&self.run(Path::Direct, rate, self.duration, false).await?);
                print(&direct);
                r.direct_p99_us = Some(direct.p99_us);
                if r.keeps_up() {
                    println!(
                        "the direct path's p99 at this rate was {:.0} us, and this path added under {} ms to it: stalls outside the path (the generator's or the host's), counted as kept up",
                        direct.p99_us,
                        SATURATED_P99_US / 1000.0
                    );
                }
            }
            let keeps_up = r.keeps_up();
            let generator_saturated = self.generator_saturated(&r);
            measured.runs.push(r);
            if sweep.next(keeps_up, generator_saturated).is_none() {
                break;
            }
            if !keeps_up {
                println!("did not keep up at {rate}/s: trying that rate once more");
            }
        }
        match sweep.best {
            Some(max) => println!("maximum loss-free rate: {max} datagrams/s offered"),
            None => {
                println!("no loss-free rate: the path did not keep up even at {SWEEP_FIRST_RATE}/s")
            }
        }
        measured.max_loss_free_rate = sweep.best;
        Ok(sweep.best)
    }

    /// With `--sweep`, finds `path`'s maximum and measures the latency it
    /// adds at `at`, or else at half of that maximum; without, at `at` or
    /// `--rate`. `by` names the path.
    async fn measure(
        &self,
        path: Path,
        cli: &Cli,
        at: Option<u64>,
        by: &str,
    ) -> anyhow::Result<Measured> {
        let mut measured = Measured::default();
        let half_max = if cli.sweep {
            let max = self.sweep(path, &mut measured).await?;
            if max.is_none() && at.is_none() {
                println!(
                    "measuring the latency it adds at {}/s, half of the lowest rate tried",
                    SWEEP_FIRST_RATE / 2
                );
            }
            Some(max.unwrap_or(SWEEP_FIRST_RATE) / 2)
        } else {
            None
        };
        let rate = at.or(half_max).unwrap_or(cli.rate);
        let added = self.added(path, rate, cli.rounds).await?;
        print_added(&added, by);
        self.generator_saturated(&added.through);
        measured.added = Some(added);
        Ok(measured)
    }

    /// Interleaved rounds of the direct path and `path` at one rate; the
    /// path's rounds are paired.
    async fn added(&self, path: Path, rate: u64, rounds: usize) -> anyhow::Result<Added> {
        let mut through: Option<Sample> = None;
        let mut direct: Option<Sample> = None;
        for _ in 0..rounds.max(1) {
            for (path, acc) in [(Path::Direct, &mut direct), (path, &mut through)] {
                let s = self.run(path, rate, self.duration, true).await?;
                match acc {
                    Some(a) => a.merge(&s),
                    None => *acc = Some(s),
                }
            }
        }
        let through = through.expect("one round");
        let probed = through
            .probe
            .as_ref()
            .zip(self.probe.as_ref())
            .map(|(sample, probe)| sample.result(probe.rate, probe.realtime));
        Ok(Added::new(
            rounds.max(1),
            self.result(&through),
            self.result(&direct.expect("one round")),
            PairedAdded::from_differences(&through.paired_ns),
            probed,
        ))
    }
}

/// The sweep's first rate, datagrams/s.
const SWEEP_FIRST_RATE: u64 = 10_000;

/// The sweep's last rate: it stops there even if the path keeps up.
const SWEEP_LAST_RATE: u64 = 1_000_000;

/// The sweep's steps, without the runs: the rate rises by 30 % from
/// [`SWEEP_FIRST_RATE`] while the path keeps up, until the load generator
/// saturates or [`SWEEP_LAST_RATE`]. A rate that fails is tried once more
/// before the sweep ends there: one stall of the host can fail a run at a
/// rate the path sustains.
#[derive(Debug)]
struct Sweep {
    /// The rate being tried.
    rate: u64,
    /// The highest rate the path kept up with so far.
    best: Option<u64>,
    retried: bool,
}

impl Sweep {
    fn new() -> Sweep {
        Sweep {
            rate: SWEEP_FIRST_RATE,
            best: None,
            retried: false,
        }
    }

    /// Notes how the run at the current rate went; returns the next rate
    /// to try, or none when the sweep is over.
    fn next(&mut self, kept_up: bool, generator_saturated: bool) -> Option<u64> {
        if !kept_up {
            if self.retried {
                return None;
            }
            self.retried = true;
            return Some(self.rate);
        }
        self.retried = false;
        self.best = Some(self.rate);
        if generator_saturated || self.rate >= SWEEP_LAST_RATE {
            return None;
        }
        self.rate = (self.rate as f64 * 1.3) as u64;
        Some(self.rate)
    }
}

/// One publisher's way out.
#[derive(Clone)]
enum Sender {
    Relayed(MediaSender, relay_core::ChannelId),
    Direct(quinn::Connection),
}

/// How far ahead of its schedule the pacer may run before it sleeps.
const PACE_SLACK: Duration = Duration::from_micros(200);

impl Sender {
    fn send(&self, payload: &[u8]) -> bool {
        match self {
            Sender::Relayed(publisher, channel) => publisher.publish(*channel, payload).is_ok(),
            Sender::Direct(conn) => conn.send_datagram(Bytes::copy_from_slice(payload)).is_ok(),
        }
    }
}

/// When a run's datagrams are due, and what the pacer does with one it
/// reaches: the pacing decisions, apart from clocks and sockets.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    rate: u64,
    duration: Duration,
    /// A datagram the pacer reaches later than this after it was due is
    /// shed, not sent; none: every datagram is sent, however late.
    max_lateness: Option<Duration>,
}

/// What the pacer does with a datagram.
#[derive(Debug, PartialEq)]
enum Step {
    /// Sleep this long: it is not due yet.
    Wait(Duration),
    Send,
    /// Drop it unsent: it is too late.
    Shed,
}

impl Schedule {
    fn total(&self) -> u64 {
        (self.rate as f64 * self.duration.as_secs_f64()) as u64
    }

    /// When the `k`th datagram is due, after the start.
    fn due(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 / self.rate as f64)
    }

    /// What to do with the `k`th datagram `elapsed` after the start: wait
    /// when it is due more than [`PACE_SLACK`] later, so that the pacer
    /// sends in bursts of at most that much of the schedule while it keeps
    /// up; when it is late, send it, or shed it if it is later than
    /// `max_lateness`.
    fn step(&self, k: u64, elapsed: Duration) -> Step {
        let due = self.due(k);
        if due > elapsed + PACE_SLACK {
            return Step::Wait(due - elapsed);
        }
        match self.max_lateness {
            Some(max) if elapsed > due + max => Step::Shed,
            _ => Step::Send,
        }
    }
}

/// How many datagrams a pacer sent and shed.
#[derive(Debug, Clone, Copy, Default)]
struct Paced {
    sent: u64,
    shed: u64,
}

/// Sends `schedule`'s datagrams, spread evenly in time and over the
/// publishers in turn (see [`Schedule::step`]). Each payload starts with
/// its send time and its sequence number. When `also` has a sender per
/// publisher, every `paired_every`th datagram is sent on it too, right
/// before or after (in turn, so that neither copy has the head start).
/// Counts what was sent on `senders`, and what was shed.
fn pace(
    senders: &[Sender],
    also: &[Sender],
    paired_every: u64,
    schedule: Schedule,
    size: usize,
    epoch: Instant,
) -> Paced {
    let mut payload = vec![0u8; size.max(16)];
    let started = Instant::now();
    let mut paced = Paced::default();
    for k in 0..schedule.total() {
        let step = loop {
            match schedule.step(k, started.elapsed()) {
                Step::Wait(d) => std::thread::sleep(d),
                step => break step,
            }
        };
        if step == Step::Shed {
            paced.shed += 1;
            continue;
        }
        let stamp = epoch.elapsed().as_nanos() as u64;
        payload[..8].copy_from_slice(&stamp.to_be_bytes());
        payload[8..16].copy_from_slice(&k.to_be_bytes());
        let publisher = k as usize % senders.len();
        let also = also.get(publisher).filter(|_| k % paired_every == 0);
        let also_first = (k / paired_every) % 2 == 1;
        if let Some(a) = also.filter(|_| also_first) {
            a.send(&payload);
        }
        paced.sent += u64::from(senders[publisher].send(&payload));
        if let Some(a) = also.filter(|_| !also_first) {
            a.send(&payload);
        }
    }
    paced
}

fn print(r: &RunResult) {
    println!(
        "{:<6} offered {:>7}/s  sent {:>8} ({:>7.0}/s)  received {:>8}  loss {:>6.3} % (generator: {} shed late, {} unsent, {} packets dropped on receipt)  forwarded {:>8.0}/s  relay CPU {:.2} cores  \
         {:.2} CPU-s per million  {:>7.0}/s per core  latency p50 {:.0} us p99 {:.0} us max {:.0} us  (load generator {:.2} cores)  \
         steal {:.1} % of the relays' CPU, {:.1} % of the generator's{}",
        r.path,
        r.offered_rate,
        r.sent,
        r.sent_per_s,
        r.received,
        100.0 * r.loss,
        r.generator_shed,
        r.generator_dropped,
        r.generator_receive_drops,
        r.forwarded_per_s,
        r.relay_cores,
        r.cpu_s_per_million,
        r.per_core,
        r.p50_us,
        r.p99_us,
        r.max_us,
        r.loadgen_cores,
        100.0 * r.relay_cpu_steal,
        100.0 * r.generator_cpu_steal,
        match r.probed_p99_us {
            Some(p) => format!("  probes: added p99 {p:.0} us"),
            None => String::new(),
        },
    );
}

fn print_added(a: &Added, by: &str) {
    print(&a.direct);
    print(&a.through);
    println!(
        "added by {by} at {}/s ({} interleaved rounds, minus direct): p50 {:.0} us, p99 {:.0} us",
        a.offered_rate, a.rounds, a.added_p50_us, a.added_p99_us
    );
    if let Some(p) = &a.paired {
        println!(
            "added by {by} at {}/s, paired (1 in {PAIRED_EVERY} datagrams also sent direct at the same moment, {} arrived both ways): p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            a.offered_rate, p.samples, p.p50_us, p.p99_us, p.max_us
        );
    }
    if let Some(p) = &a.probed {
        let threads = match p.realtime {
            true => "real-time",
            false => "not real-time: their own waits for the CPU are in this",
        };
        print!(
            "added by {by} at {}/s, probed ({} probes/s beside the load from a client of their own, {threads}; each also sent direct; {} sent, {} lost on the path; one-way p99 {:.0} us through it, {:.0} us direct)",
            a.offered_rate, p.rate, p.sent, p.lost, p.path_p99_us, p.direct_p99_us
        );
        match &p.added {
            Some(d) => println!(
                ": p50 {:.0} us, p99 {:.0} us, max {:.0} us",
                d.p50_us, d.p99_us, d.max_us
            ),
            None => println!(": no probe arrived both ways"),
        }
    }
    if a.through.relay_cpu_steal > HOST_NOISE_STEAL {
        println!(
            "warning: the hypervisor took {:.1} % of the relays' CPU time during these rounds: stalls of theirs that no process on that CPU can avoid are in this tail",
            100.0 * a.through.relay_cpu_steal
        );
    }
    if a.direct.p99_us > HOST_NOISE_P99_US {
        let finer = match a.probed.as_ref().is_some_and(|p| p.realtime) {
            true => {
                "the probed figure is free of the generator's delays, not of the bursts they put into the load"
            }
            false => {
                "the paired figure takes out part of the generator's; real-time probes (as root) take them out"
            }
        };
        println!(
            "warning: the direct path's own p99 is {:.0} us: stalls outside the path (the generator's own scheduling, or the host's) dominate the load's tail, and an added p99 under 1 ms cannot be judged from the difference of the two p99s ({finer})",
            a.direct.p99_us
        );
    }
}

/// A share of the relays' CPU time taken by the hypervisor above this
/// (1 %) comes in stalls of milliseconds, enough to set a p99: runs with
/// 3-4 % steal had p99s of 1-18 ms where the same paths' other runs had
/// 0.2 ms.
const HOST_NOISE_STEAL: f64 = 0.01;

/// A direct-path p99 above this (loopback, no relay) means the host
/// stalls the generator or its sink for longer than the added-latency
/// target, so the difference of two p99s says little.
const HOST_NOISE_P99_US: f64 = 1000.0;

/// The relays' figures next to the baselines', from the same run.
fn compare(relays: &Measured, baselines: &[(Path, String, Measured)]) {
    let at_max = |m: &Measured| {
        let max = m.max_loss_free_rate?;
        let per_core = m
            .runs
            .iter()
            .rev()
            .find(|r| r.offered_rate == max && r.keeps_up())?
            .per_core;
        Some((max, per_core))
    };
    println!("side by side, same CPU, same run:");
    if let Some((max, per_core)) = at_max(relays) {
        println!("  maximum: relays {max}/s, forwarded per core used there {per_core:.0}/s");
    }
    for (_, name, m) in baselines {
        if let Some((max, per_core)) = at_max(m) {
            println!("  maximum: {name} {max}/s, forwarded per core used there {per_core:.0}/s");
        }
    }
    let Some(a) = &relays.added else { return };
    let paired = |a: &Added| {
        let mut finer = String::new();
        if let Some(p) = &a.paired {
            finer += &format!("; paired p50 {:.0} us, p99 {:.0} us", p.p50_us, p.p99_us);
        }
        if let Some(p) = a.probed.as_ref().and_then(|p| p.added.as_ref()) {
            finer += &format!("; probed p50 {:.0} us, p99 {:.0} us", p.p50_us, p.p99_us);
        }
        finer
    };
    println!(
        "  at {}/s: relays {:.2} CPU-s per million, added p50 {:.0} us, p99 {:.0} us{}",
        a.offered_rate,
        a.through.cpu_s_per_million,
        a.added_p50_us,
        a.added_p99_us,
        paired(a),
    );
    for (_, name, m) in baselines {
        if let Some(b) = &m.added {
            println!(
                "  at {}/s: {name} {:.2} CPU-s per million (relays {:.1}x), added p50 {:.0} us, p99 {:.0} us{}",
                b.offered_rate,
                b.through.cpu_s_per_million,
                a.through.cpu_s_per_million / b.through.cpu_s_per_million,
                b.added_p50_us,
                b.added_p99_us,
                paired(b),
            );
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before the runtime starts its threads, so that they inherit the pin.
    let placement = match cli.pin {
        Pin::Off => None,
        Pin::Auto => {
            let placement = placement(&allowed_cpus()?, cli.relay_threads);
            match placement.map(|p| pin_self(&join_cpus(&p.generator)).map(|()| p)) {
                Some(Ok(p)) => {
                    println!(
                        "relays on CPU {}, load generator on CPU {}",
                        join_cpus(&p.relays),
                        join_cpus(&p.generator)
                    );
                    Some(p)
                }
                Some(Err(e)) => {
                    println!("cannot pin ({e:#}): relays and load generator share the CPUs");
                    None
                }
                None => {
                    println!("too few CPUs to pin: relays and load generator share them");
                    None
                }
            }
        }
    };
    let realtime = realtime_if_allowed(
        cli.realtime,
        &format!("relays under SCHED_FIFO, priority {REALTIME_PRIORITY}"),
        "cannot run the relays real-time (chrt failed: no root or CAP_SYS_NICE?): normal scheduling",
    );
    let launch = Launch {
        cpus: placement.as_ref().map(|p| join_cpus(&p.relays)),
        realtime,
    };
    let idle_poller = match (cli.idle_poll, &placement) {
        (false, _) => None,
        (true, None) => {
            println!("cannot keep the relays' CPUs from idling: the relays are not pinned");
            None
        }
        (true, Some(p)) => match IdlePoller::start(&p.relays) {
            Ok(poller) => {
                println!(
                    "relays' CPU {} kept from idling: a SCHED_IDLE process spins there",
                    join_cpus(&p.relays)
                );
                Some(poller)
            }
            Err(e) => {
                println!("cannot keep the relays' CPUs from idling ({e:#})");
                None
            }
        },
    };
    // Unpinned, everything may run everywhere.
    let placement = placement.unwrap_or_else(|| {
        let all = allowed_cpus().unwrap_or_else(|_| {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            (0..n as u32).collect()
        });
        Placement {
            relays: all.clone(),
            generator: all,
        }
    });
    // One worker per CPU of the generator's own: more threads than CPUs
    // would take turns in scheduler slices of milliseconds.
    let generator_cpus = placement.generator.len().max(1);
    let generator_realtime = realtime_if_allowed(
        cli.generator_policy == GeneratorPolicy::Realtime,
        &format!(
            "load generator under SCHED_FIFO: receivers priority {REALTIME_PRIORITY}, pacer {PACER_PRIORITY}"
        ),
        "cannot run the load generator real-time (chrt failed): its latency figures include its own threads' waits for the CPU",
    );
    let probes_realtime = realtime_if_allowed(
        cli.probe_rate > 0,
        &format!(
            "latency probes under SCHED_FIFO: receivers priority {PROBE_PRIORITY}, pacer {PROBE_PACER_PRIORITY}"
        ),
        "cannot run the latency probes real-time (chrt failed): their figures include their own waits for the CPU",
    );
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(generator_cpus).enable_all();
    if generator_realtime {
        rt.on_thread_start(|| make_thread_realtime(REALTIME_PRIORITY));
    }
    let rt = rt.build()?;
    rt.block_on(async {
        let dir = tempdir()?;
        let bench = Bench::setup(
            &cli,
            &dir,
            &launch,
            placement,
            generator_realtime,
            probes_realtime,
        )
        .await?;
        // Interest propagates between chained relays.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Warm up every path.
        let mut paths = vec![Path::Relayed, Path::Direct];
        paths.extend(bench.baselines.iter().map(|b| b.path));
        for path in paths {
            bench
                .run(path, cli.rate.min(5000), Duration::from_secs(1), false)
                .await?;
        }
        let by = format!("{} relay(s)", bench.relays.len());
        let relays = bench.measure(Path::Relayed, &cli, None, &by).await?;
        // At the rate the relays' latency was measured at.
        let at = relays.added.as_ref().map(|a| a.offered_rate);
        let mut baselines = Vec::new();
        for b in &bench.baselines {
            let name = b.path.name(cli.topology);
            println!("baseline: {name} on the relays' CPU");
            let measured = bench.measure(b.path, &cli, at, &name).await?;
            baselines.push((b.path, name, measured));
        }
        if !baselines.is_empty() {
            compare(&relays, &baselines);
        }
        let mut take = |path| {
            let i = baselines.iter().position(|(p, ..)| *p == path)?;
            Some(baselines.remove(i).2)
        };
        let report = Report {
            realtime,
            generator_realtime,
            max_lateness_us: cli.max_lateness_us,
            probe_rate: cli.probe_rate,
            idle_poll: idle_poller.is_some(),
            probes_realtime,
            relays,
            baseline: take(Path::Forwarded),
            coturn: take(Path::Turned),
        };
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        drop(bench);
        if cli.keep {
            println!("relay configs and logs kept in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        anyhow::Ok(())
    })
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("relay-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: Path, latencies_us: &[u64], sent: u64) -> Sample {
        let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for &l in latencies_us {
            histogram.record(l).unwrap();
        }
        Sample {
            path,
            rate: 1000,
            sent,
            shed: 0,
            received: latencies_us.len() as u64,
            send_seconds: 1.0,
            seconds: 1.25,
            relay_cpu: 0.5,
            own_cpu: 0.25,
            on_wire: sent,
            receive_drops: 0,
            relay_steal: 0.05,
            generator_steal: 0.0,
            histogram,
            paired_ns: Vec::new(),
            probe: None,
        }
    }

    /// A PKI, a sink recording into a new recorder (times since `epoch`),
    /// and a client config for it.
    fn sink(
        dir: &std::path::Path,
        epoch: Instant,
    ) -> (Arc<Recorder>, std::net::SocketAddr, quinn::ClientConfig) {
        if !dir.join("pki/ca.pem").exists() {
            init_dev_pki(
                &dir.join("pki"),
                &[Node::Relay(1)],
                &default_cluster_domain(),
                &[],
            )
            .unwrap();
        }
        let recorder = Recorder::new(PAIRED_EVERY).unwrap();
        let sink = start_sink(dir, recorder.clone(), epoch)
            .unwrap()
            .local_addr()
            .unwrap();
        let config = quic_client_with_roots(
            cluster_roots(dir).unwrap(),
            DIRECT_ALPN,
            Arc::new(media_transport()),
        )
        .unwrap();
        (recorder, sink, config)
    }

    /// The coturn path's plumbing, against a TURN server of the test's:
    /// the sink accepts a QUIC connection made through a TURN channel and
    /// receives every datagram sent on it.
    #[tokio::test]
    async fn a_quic_connection_crosses_a_turn_channel() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = Instant::now();
        let (recorder, sink, config) = sink(dir.path(), epoch);
        let (server, _) = turn::tests::tiny_turn_server(false).await;
        let connection = turn_endpoint(server, sink)
            .await
            .unwrap()
            .connect_with(config, sink, "localhost")
            .unwrap()
            .await
            .unwrap();
        recorder.start(100);
        let sender = [Sender::Direct(connection)];
        let sent = pace(
            &sender,
            &[],
            PAIRED_EVERY,
            Schedule {
                rate: 1000,
                duration: Duration::from_millis(100),
                max_lateness: None,
            },
            200,
            epoch,
        )
        .sent;
        let deadline = Instant::now() + Duration::from_secs(5);
        while recorder.received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((sent, recorder.stop().0), (100, 100));
    }

    /// Paired sending: every 8th datagram goes both ways, each recorder
    /// notes when its copy arrived, and the differences pair them up.
    #[tokio::test]
    async fn paired_datagrams_go_both_ways_and_are_matched() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = Instant::now();
        let (path, path_sink, config) = sink(dir.path(), epoch);
        let (direct, direct_sink, _) = sink(dir.path(), epoch);
        let endpoint = client_endpoint().unwrap();
        let connect = async |to| {
            endpoint
                .connect_with(config.clone(), to, "localhost")
                .unwrap()
                .await
                .unwrap()
        };
        let (to_path, to_direct) = (connect(path_sink).await, connect(direct_sink).await);
        path.start(100);
        direct.start(100);
        // The senders are clones: the last handle's drop closes a connection.
        let sent = pace(
            &[Sender::Direct(to_path.clone())],
            &[Sender::Direct(to_direct.clone())],
            PAIRED_EVERY,
            Schedule {
                rate: 1000,
                duration: Duration::from_millis(100),
                max_lateness: None,
            },
            200,
            epoch,
        )
        .sent;
        assert_eq!(sent, 100);
        // Sequence numbers 0, 8, ..., 96 were sent on the direct path too.
        let deadline = Instant::now() + Duration::from_secs(5);
        while (
            path.received.load(Ordering::Relaxed),
            direct.received.load(Ordering::Relaxed),
        ) != (100, 13)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (path_received, _, path_arrivals) = path.stop();
        let (direct_received, _, direct_arrivals) = direct.stop();
        assert_eq!((path_received, direct_received), (100, 13));
        assert_eq!(path_arrivals.len(), 13);
        assert!(path_arrivals.iter().chain(&direct_arrivals).all(|&t| t > 0));
        let differences = paired_differences(&path_arrivals, &direct_arrivals);
        assert_eq!(differences.len(), 13);
        // Same host, same moment: the copies arrive within a second.
        assert!(
            differences.iter().all(|d| d.abs() < 1_000_000_000),
            "{differences:?}"
        );
    }

    /// The probe's plumbing: sinks and clients driven by a thread of their
    /// own, a pacer sending every probe both ways, every probe paired.
    #[tokio::test]
    async fn probes_go_both_ways_from_a_thread_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = Instant::now();
        // The PKI and a client config (its sink is not used).
        let (_, _, config) = sink(dir.path(), epoch);
        let thread = ProbeThread::start(false).unwrap();
        let (path, path_sink) = thread.sink(dir.path(), epoch).unwrap();
        let (direct, direct_sink) = thread.sink(dir.path(), epoch).unwrap();
        let connections = thread
            .handle
            .spawn(async move {
                let endpoint = client_endpoint()?;
                let mut connections = Vec::new();
                for to in [path_sink, direct_sink] {
                    let connecting = endpoint.connect_with(config.clone(), to, "localhost")?;
                    connections.push(connecting.await?);
                }
                anyhow::Ok(connections)
            })
            .await
            .unwrap()
            .unwrap();
        let run = start_probes(
            Sender::Direct(connections[0].clone()),
            Sender::Direct(connections[1].clone()),
            [path.clone(), direct.clone()],
            1000,
            false,
            Duration::from_millis(200),
            200,
            epoch,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while (
            path.received.load(Ordering::Relaxed),
            direct.received.load(Ordering::Relaxed),
        ) != (200, 200)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut sample = run.finish().unwrap();
        assert_eq!((sample.sent, sample.received), (200, 200));
        assert_eq!(sample.paired_ns.len(), 200, "every probe went both ways");
        assert_eq!(sample.direct_histogram.len(), 200);
        // Rounds add up; the figures come from the merged probes.
        sample.merge(&sample.clone());
        let probed = sample.result(1000, false);
        assert_eq!((probed.sent, probed.lost), (400, 0));
        let added = probed.added.unwrap();
        assert_eq!(added.samples, 400);
        // Same host, same moment: the copies arrive within a second.
        assert!(added.max_us.abs() < 1e6 && added.p50_us <= added.p99_us);
        assert!(probed.direct_p50_us > 0.0 && probed.path_p99_us > 0.0);
    }

    /// Probes cost the forwarder what the load's datagrams do: they count
    /// as forwarded, not as the load's received.
    #[test]
    fn probes_count_as_forwarded_datagrams() {
        let mut s = sample(Path::Relayed, &[100; 1000], 1000);
        s.probe = Some(ProbeSample {
            sent: 10,
            received: 9,
            histogram: s.histogram.clone(),
            direct_histogram: s.histogram.clone(),
            paired_ns: vec![1000; 9],
        });
        let r = s.result(Topology::Chain, 2);
        assert_eq!((r.received, r.loss), (1000, 0.0));
        assert_eq!(r.forwarded_per_s, 2018.0, "1009 delivered, twice each");
        let probed = s.probe.unwrap().result(1000, true);
        assert_eq!((probed.lost, probed.added.unwrap().p99_us), (1, 1.0));
    }

    /// The pacer's decisions: it waits while a datagram is not due, sends
    /// it when due or late, and sheds it when later than the bound (never
    /// without one). After a stall it sends only the bound's worth at once.
    #[test]
    fn the_pacer_waits_sends_and_sheds_what_is_too_late() {
        let (ms, us) = (Duration::from_millis, Duration::from_micros);
        let strict = Schedule {
            rate: 1000,
            duration: Duration::from_secs(1),
            max_lateness: Some(us(500)),
        };
        assert_eq!(strict.total(), 1000);
        // The 10th is due at 10 ms; within the slack it goes early.
        assert_eq!(strict.step(10, ms(5)), Step::Wait(ms(5)));
        assert_eq!(strict.step(10, ms(10) - PACE_SLACK), Step::Send);
        assert_eq!(strict.step(10, ms(10) + us(500)), Step::Send);
        assert_eq!(strict.step(10, ms(10) + us(501)), Step::Shed);
        let lenient = Schedule {
            max_lateness: None,
            ..strict
        };
        assert_eq!(lenient.step(10, Duration::from_secs(10)), Step::Send);
        // At 100,000/s, 20 ms into a stall: 2,000 are due, the last 50
        // (0.5 ms of the schedule) are sent, the rest shed.
        let fast = Schedule {
            rate: 100_000,
            ..strict
        };
        let steps: Vec<Step> = (0..2000).map(|k| fast.step(k, ms(20))).collect();
        let sent = steps.iter().filter(|s| **s == Step::Send).count();
        assert_eq!(sent, 50);
        assert!(steps[..1950].iter().all(|s| *s == Step::Shed));
    }

    #[test]
    fn the_sweep_rises_retries_a_failure_once_and_may_find_no_maximum() {
        // Nothing keeps up: the first rate is tried twice, then no maximum
        // (not the failed rate).
        let mut s = Sweep::new();
        assert_eq!(s.next(false, false), Some(SWEEP_FIRST_RATE));
        assert_eq!(s.next(false, false), None);
        assert_eq!(s.best, None);
        // Up by 30 % while it keeps up; a failure passed on its retry does
        // not end the sweep, two in a row do.
        let mut s = Sweep::new();
        assert_eq!(s.next(true, false), Some(13_000));
        assert_eq!(s.next(true, false), Some(16_900));
        assert_eq!(s.next(false, false), Some(16_900), "tried once more");
        assert_eq!(s.next(true, false), Some(21_970));
        assert_eq!(s.next(false, false), Some(21_970));
        assert_eq!(s.next(false, false), None);
        assert_eq!(s.best, Some(16_900));
        // A saturated generator ends it at a rate that kept up.
        let mut s = Sweep::new();
        assert_eq!(s.next(true, true), None);
        assert_eq!(s.best, Some(SWEEP_FIRST_RATE));
        // So does the last rate.
        let mut s = Sweep::new();
        let mut tried = 0;
        while s.next(true, false).is_some() {
            tried += 1;
        }
        assert!(s.best.is_some_and(|b| b >= SWEEP_LAST_RATE), "{s:?}");
        assert_eq!(tried, 18, "10,000/s x 1.3^18 passes 1,000,000/s");
    }

    #[test]
    fn paired_figures_are_percentiles_of_the_differences() {
        // Arrivals in ns; 0 is "never arrived", on either side.
        let path = [5_000, 0, 7_000, 9_000, 3_000];
        let direct = [1_000, 2_000, 0, 10_000, 2_000];
        assert_eq!(
            paired_differences(&path, &direct),
            vec![4_000, -1_000, 1_000]
        );
        let p = PairedAdded::from_differences(&[4_000, -1_000, 1_000]).unwrap();
        assert_eq!(
            p,
            PairedAdded {
                samples: 3,
                p50_us: 1.0,
                p99_us: 4.0,
                max_us: 4.0
            }
        );
        // 1000 differences of 100 us, 20 of 5 ms: the p99 is 5 ms.
        let mut d = vec![100_000i64; 980];
        d.extend([5_000_000; 20]);
        let p = PairedAdded::from_differences(&d).unwrap();
        assert_eq!((p.p50_us, p.p99_us, p.samples), (100.0, 5000.0, 1000));
        assert_eq!(PairedAdded::from_differences(&[]), None);
    }

    #[test]
    fn a_recorder_notes_the_first_arrival_of_paired_numbers() {
        let recorder = Recorder::new(PAIRED_EVERY).unwrap();
        let epoch = Instant::now();
        recorder.start(20);
        let payload = |seq: u64| {
            let mut p = vec![0u8; 200];
            p[8..16].copy_from_slice(&seq.to_be_bytes());
            p
        };
        for seq in [0, 3, 8, 16, 8, 99] {
            recorder.record(&payload(seq), epoch);
        }
        // Too short for a sequence number: not counted.
        recorder.record(&[0u8; 12], epoch);
        let (received, _, arrivals) = recorder.stop();
        assert_eq!(received, 6);
        assert_eq!(arrivals.len(), 3, "sequence numbers 0, 8 and 16");
        assert!(arrivals.iter().all(|&t| t > 0));
        assert!(arrivals[1] <= arrivals[2], "the first copy of 8 counts");
    }

    #[test]
    fn steal_is_read_per_cpu_from_proc_stat() {
        let stat = "cpu  100 0 50 900 0 0 0 30 0 0\n\
                    cpu0 50 0 25 450 0 0 0 10 0 0\n\
                    cpu1 50 0 25 450 0 0 0 20 0 0\n\
                    intr 12345\n";
        assert_eq!(cpu_steal(stat, &[1], 100.0).unwrap(), 0.2);
        // Averaged over the CPUs asked for.
        assert!((cpu_steal(stat, &[0, 1], 100.0).unwrap() - 0.15).abs() < 1e-12);
        assert!(
            cpu_steal("cpu0 1 2 3\n", &[0], 100.0).is_err(),
            "no steal column"
        );
    }

    #[test]
    fn figures_follow_from_counts_and_cpu() {
        // 1000 sent, 990 received through a chain of two relays.
        let latencies: Vec<u64> = (1..=990).collect();
        let mut s = sample(Path::Relayed, &latencies, 1000);
        let r = s.result(Topology::Chain, 2);
        assert_eq!(r.path, "chain");
        assert!((r.loss - 0.01).abs() < 1e-9);
        assert_eq!(r.forwarded_per_s, 1980.0, "each datagram forwarded twice");
        assert_eq!(r.relay_cores, 0.4);
        assert_eq!(r.loadgen_cores, 0.2);
        assert_eq!(r.relay_cpu_steal, 0.04, "0.05 s stolen in 1.25 s");
        assert_eq!(r.per_core, 3960.0);
        assert!((r.cpu_s_per_million - 0.5 / 1980.0 * 1e6).abs() < 1e-6);
        // The plain forwarder forwards each datagram once.
        let r = sample(Path::Forwarded, &latencies, 1000).result(Topology::Chain, 2);
        assert_eq!((r.path.as_str(), r.forwarded_per_s), ("udp-forward", 990.0));
        // Rounds add up.
        s.merge(&sample(Path::Relayed, &latencies, 1000));
        let r = s.result(Topology::Chain, 2);
        assert_eq!((r.sent, r.received), (2000, 1980));
        assert_eq!(r.forwarded_per_s, 1980.0);
        assert_eq!(r.generator_dropped, 0);
        // Datagrams the generator's QUIC stack never sent are its loss.
        let mut s = sample(Path::Turned, &latencies, 1000);
        s.on_wire = 995;
        let r = s.result(Topology::Single, 1);
        assert_eq!((r.path.as_str(), r.generator_dropped), ("coturn", 5));
    }

    #[test]
    fn added_latency_is_relayed_minus_direct() {
        let direct = sample(Path::Direct, &[100; 100], 100).result(Topology::Single, 1);
        assert_eq!((direct.path.as_str(), direct.per_core), ("direct", 0.0));
        let mut relayed: Vec<u64> = vec![300; 98];
        relayed.extend([5000, 5000]);
        let relayed = sample(Path::Relayed, &relayed, 100).result(Topology::Single, 1);
        let a = Added::new(3, relayed, direct, None, None);
        assert_eq!(a.added_p50_us, 200.0);
        // Within the histogram's precision (3 significant digits).
        assert!((a.added_p99_us - 4900.0).abs() <= 5.0, "{}", a.added_p99_us);
        assert_eq!((a.rounds, a.offered_rate), (3, 1000));
    }

    #[test]
    fn keeping_up_needs_no_loss_the_offered_rate_and_short_queues() {
        let ok: Vec<u64> = vec![300; 1000];
        let r = sample(Path::Relayed, &ok, 1000).result(Topology::Single, 1);
        assert!(r.keeps_up());
        let lossy = sample(Path::Relayed, &ok[..990], 1000).result(Topology::Single, 1);
        assert!(!lossy.keeps_up(), "1 % loss");
        let mut slow = sample(Path::Relayed, &ok, 1000).result(Topology::Single, 1);
        slow.sent_per_s = 900.0;
        assert!(!slow.keeps_up(), "the generator fell behind");
        let queued = sample(Path::Relayed, &[8000; 1000], 1000).result(Topology::Single, 1);
        assert!(!queued.keeps_up(), "standing queue");
        // A median of 300 us with 2 % of the datagrams stalled 50 ms.
        let mut stalled = vec![300; 980];
        stalled.extend([50_000; 20]);
        let mut stalled = sample(Path::Relayed, &stalled, 1000).result(Topology::Single, 1);
        assert!(!stalled.keeps_up(), "long stalls");
        assert!(stalled.needs_direct_run() && !queued.needs_direct_run());
        // Unless the direct path stalled nearly as long at that rate.
        stalled.direct_p99_us = Some(2_000.0);
        assert!(!stalled.keeps_up(), "the relay's stalls");
        stalled.direct_p99_us = Some(40_000.0);
        assert!(!stalled.keeps_up(), "the relay added 10 ms to the host's");
        stalled.direct_p99_us = Some(45_000.0);
        assert!(stalled.keeps_up(), "the host's stalls");
        // A standing queue is the path's whatever the host did.
        let mut queued = queued;
        queued.direct_p99_us = Some(40_000.0);
        assert!(!queued.keeps_up());
        // With probes, they judge the stalls: the load's tail is the
        // generator's when the probes crossed the path quickly.
        stalled.direct_p99_us = None;
        stalled.probed_p99_us = Some(2_000.0);
        assert!(!stalled.needs_direct_run(), "the probes judge");
        assert!(stalled.keeps_up(), "the generator's stalls");
        stalled.probed_p99_us = Some(12_000.0);
        assert!(!stalled.keeps_up(), "the path's stalls");
        let mut ok = r;
        ok.probed_p99_us = Some(12_000.0);
        assert!(!ok.keeps_up(), "the probes stalled in the path");
    }

    #[test]
    fn relays_start_under_chrt_and_taskset_when_asked() {
        let argv = |launch: &Launch| {
            let c = launch.command(std::path::Path::new("/bin/relayd"));
            std::iter::once(c.get_program())
                .chain(c.get_args())
                .map(|a| a.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(argv(&Launch::default()), "/bin/relayd");
        let pinned = Launch {
            cpus: Some("1".into()),
            realtime: false,
        };
        assert_eq!(argv(&pinned), "taskset -c 1 /bin/relayd");
        let realtime = Launch {
            realtime: true,
            ..pinned
        };
        assert_eq!(argv(&realtime), "chrt --fifo 10 taskset -c 1 /bin/relayd");
    }

    #[test]
    fn the_idle_poller_spins_under_sched_idle_on_each_cpu_until_dropped() {
        let cpus = allowed_cpus().unwrap();
        let cpu = *cpus.last().unwrap();
        let poller = match IdlePoller::start(&[cpu]) {
            Ok(p) => p,
            // Only root (or CAP_SYS_NICE) may ask for SCHED_IDLE here.
            Err(e) => {
                let uid = std::fs::read_to_string("/proc/self/status").unwrap();
                assert!(
                    !uid.lines().any(|l| l.starts_with("Uid:\t0\t")),
                    "refused as root: {e:#}"
                );
                return;
            }
        };
        let pid = poller.spinners[0].id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command's closing parenthesis: state is the
        // 3rd field of the line, the CPU last run on the 39th, the policy
        // the 41st.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        assert_eq!(fields[41 - 3], "5", "SCHED_IDLE is policy 5: {stat}");
        assert_eq!(fields[39 - 3], cpu.to_string(), "runs on CPU {cpu}: {stat}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        assert_eq!(allowed.trim(), cpu.to_string());
        drop(poller);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the spinner is gone once dropped"
        );
    }

    #[test]
    fn socket_drops_are_summed_by_local_port() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:C235 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9001 2 0000000000000000 44086
  101: 0100007F:DA4A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9002 2 0000000000000000 4152
  102: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9003 2 0000000000000000 7
";
        assert_eq!(socket_drops(table, &[0xC235]).unwrap(), 44086);
        assert_eq!(socket_drops(table, &[0xC235, 0xDA4A]).unwrap(), 48238);
        assert_eq!(socket_drops(table, &[1]).unwrap(), 0);
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn relays_get_the_last_cpus_and_the_generator_keeps_one() {
        let p = placement(&[0, 1], 1).unwrap();
        assert_eq!((p.relays, p.generator), (vec![1], vec![0]));
        let p = placement(&[0, 1, 2, 3], 2).unwrap();
        assert_eq!(
            (join_cpus(&p.relays), join_cpus(&p.generator)),
            ("2,3".into(), "0,1".into())
        );
        assert_eq!(p.generator.len(), 2);
        assert_eq!(placement(&[0], 1), None);
        assert_eq!(placement(&[0, 1], 2), None);
    }
}
