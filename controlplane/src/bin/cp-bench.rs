//! `cp-bench`: benchmarks of a three-node control plane on loopback, with
//! fsync on (sled flushes before every acknowledgement that raft requires).
//!
//! - commit latency: sequential writes over one connection to the leader,
//!   p50/p99, and writes/s;
//! - batched throughput: many concurrent writers (link reports arrive from
//!   many relays at once); raft batches them into fewer fsyncs;
//! - leader failover: `kill -9` the leader during a steady stream of writes
//!   (one every 10 ms), five times; the gap between the last write
//!   acknowledged before the kill and the first after, and a check that no
//!   acknowledged write is lost.
//!
//! ```text
//! cargo build --release -p controlplane -p relayd --bins
//! target/release/cp-bench [--writes 2000] [--writers 64] [--kills 5]
//! ```
#![allow(clippy::disallowed_methods)] // a benchmark reads clocks

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use controlplane::api::{Consistency, Request, Response};
use controlplane::client::{CpClient, NodeAddr};
use relay_net::pki::{Node, init_dev_pki};
use relay_net::tls::TlsIdentity;

#[derive(Parser)]
struct Cli {
    /// Sequential writes for the latency run.
    #[arg(long, default_value_t = 2000)]
    writes: usize,
    /// Concurrent writers for the throughput run.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Leader kills for the failover run.
    #[arg(long, default_value_t = 5)]
    kills: usize,
}

struct NodeProc {
    id: u64,
    addr: SocketAddr,
    config: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    fn start(&mut self, dir: &Path) -> anyhow::Result<()> {
        let bin = std::env::current_exe()?.with_file_name("controlplane");
        let log = std::fs::File::create(dir.join(format!("cp-{}.log", self.id)))?;
        self.child = Some(
            Command::new(bin)
                .arg("--config")
                .arg(&self.config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cluster(dir: &Path) -> anyhow::Result<Vec<NodeProc>> {
    init_dev_pki(
        &dir.join("pki"),
        &[
            Node::ControlPlane(1),
            Node::ControlPlane(2),
            Node::ControlPlane(3),
            Node::Operator("bench".into()),
        ],
        "relays.internal",
        &[],
    )?;
    let ports: Vec<u16> = (0..3).map(|_| port()).collect();
    let members: Vec<String> = (0..3)
        .map(|i| format!("{{ id = {}, addr = \"127.0.0.1:{}\" }}", i + 1, ports[i]))
        .collect();
    let mut nodes = Vec::new();
    for i in 0..3u64 {
        let id = i + 1;
        let config = dir.join(format!("cp-{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id}\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data-{id}\"\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/cp-{id}.pem\"\nkey = \"pki/cp-{id}.key\"\n\n[raft]\nheartbeat_ms = 100\nelection_ms = 1000\n\n[cluster]\nmembers = [{}]\n\n[log]\nlevel = \"warn\"\n",
                ports[i as usize],
                members.join(", ")
            ),
        )?;
        let mut n = NodeProc {
            id,
            addr: ([127, 0, 0, 1], ports[i as usize]).into(),
            config,
            child: None,
        };
        n.start(dir)?;
        nodes.push(n);
    }
    Ok(nodes)
}

async fn client(addr: SocketAddr, id: &TlsIdentity) -> anyhow::Result<CpClient> {
    CpClient::connect(&NodeAddr { id: None, addr }, id).await
}

async fn leader(nodes: &[NodeProc], id: &TlsIdentity) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            if let Ok(c) = client(n.addr, id).await
                && let Ok(Response::Status(s)) = c.request(&Request::Status).await
                && s.node.role == "leader"
            {
                return Ok(i);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn put(key: String) -> Request {
    Request::Put {
        key,
        value: "v".into(),
    }
}

/// Removes the benchmark's scratch directory however `main` returns.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = std::env::temp_dir().join(format!("cp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveOnDrop(dir.clone());
    std::env::set_current_dir(&dir)?;
    let mut nodes = cluster(&dir)?;
    let id = TlsIdentity::load(
        &dir.join("pki/ca.pem"),
        &dir.join("pki/operator-bench.pem"),
        &dir.join("pki/operator-bench.key"),
        "relays.internal",
    )?;
    let l = leader(&nodes, &id).await?;
    let c = client(nodes[l].addr, &id).await?;

    // 1. Sequential commit latency.
    for i in 0..50 {
        c.request(&put(format!("warm{i}"))).await?;
    }
    let mut lat = Vec::with_capacity(cli.writes);
    let start = Instant::now();
    for i in 0..cli.writes {
        let t = Instant::now();
        let r = c.request(&put(format!("seq{i}"))).await?;
        anyhow::ensure!(r == Response::Ok, "write failed: {r:?}");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rate = cli.writes as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    println!(
        "sequential writes (one connection, fsync on): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.0} writes/s",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat[lat.len() - 1],
        rate
    );

    // 2. Batched throughput: many concurrent writers.
    let deadline = Instant::now() + Duration::from_secs_f64(cli.seconds);
    let mut tasks = Vec::new();
    for w in 0..cli.writers {
        let c = client(nodes[l].addr, &id).await?;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                if let Ok(Response::Ok) = c.request(&put(format!("b{w}-{n}"))).await {
                    n += 1;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            (n, lat)
        }));
    }
    let mut total = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (n, l) = t.await?;
        total += n;
        lat.extend(l);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "batched writes ({} concurrent writers): {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms",
        cli.writers,
        total as f64 / cli.seconds,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );

    // 3. Leader failover.
    let mut gaps = Vec::new();
    let mut acked: Vec<String> = Vec::new();
    for k in 0..cli.kills {
        let l = leader(&nodes, &id).await?;
        // Settled: the leader commits.
        let c = client(nodes[l].addr, &id).await?;
        while c.request(&put(format!("settle{k}"))).await? != Response::Ok {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut clients: Vec<Option<CpClient>> = Vec::new();
        for n in &nodes {
            clients.push(client(n.addr, &id).await.ok());
        }
        let mut current = (l + 1) % 3;
        let start = Instant::now();
        let mut killed = None;
        let mut before = None;
        let mut after = None;
        let mut i = 0;
        let mut retries = 0;
        while start.elapsed() < Duration::from_secs(6) && after.is_none() {
            if killed.is_none() && start.elapsed() > Duration::from_secs(1) {
                nodes[l].kill();
                killed = Some(Instant::now());
            }
            let key = format!("f{k}-{i}");
            i += 1;
            let outcome = match &clients[current] {
                Some(c) => {
                    tokio::time::timeout(Duration::from_millis(500), c.request(&put(key.clone())))
                        .await
                }
                None => Ok(Err(anyhow::anyhow!("not connected"))),
            };
            let ok = matches!(outcome, Ok(Ok(Response::Ok)));
            // A live node answering "leadership changed" is worth retrying
            // as is; a dead or silent one is not.
            let alive_answer = matches!(outcome, Ok(Ok(Response::Error { .. })));
            if alive_answer && retries < 20 {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            retries = 0;
            if ok {
                acked.push(key);
                match killed {
                    None => before = Some(Instant::now()),
                    Some(_) => after = Some(Instant::now()),
                }
            } else {
                current = (current + 1) % 3;
                if nodes[current].child.is_none() {
                    current = (current + 1) % 3;
                }
                clients[current] = client(nodes[current].addr, &id).await.ok();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let gap = after
            .context("no write after the kill")?
            .duration_since(before.context("no write before")?);
        println!(
            "kill {}: write gap {:.0} ms",
            k + 1,
            gap.as_secs_f64() * 1e3
        );
        gaps.push(gap.as_secs_f64() * 1e3);
        nodes[l].start(&dir)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    gaps.sort_by(f64::total_cmp);
    println!(
        "leader failover over {} kills (heartbeat 100 ms, election timeout 1 s): median {:.0} ms, worst {:.0} ms",
        gaps.len(),
        pct(&gaps, 0.5),
        gaps[gaps.len() - 1]
    );

    // No acknowledged write lost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = leader(&nodes, &id).await?;
    let c = client(nodes[l].addr, &id).await?;
    let mut lost = 0;
    for key in &acked {
        let r = c
            .request(&Request::Get {
                key: key.clone(),
                consistency: Consistency::Stale,
            })
            .await?;
        if r != (Response::Value {
            value: Some("v".into()),
        }) {
            lost += 1;
        }
    }
    println!(
        "acknowledged writes during failovers: {}, lost: {lost}",
        acked.len()
    );
    drop(nodes);
    anyhow::ensure!(lost == 0, "acknowledged writes lost");
    Ok(())
}
