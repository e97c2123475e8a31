//! `netshim`: a user-space impairment proxy for UDP (and so QUIC) between
//! real processes, built on the simulator's link model (`netmodel`).
//!
//! Each link listens on an address and forwards every datagram to a
//! target, applying the forward profile; replies come back through the
//! same link with the reverse profile. Point a relay's peer address at the
//! link instead of the other relay, and the path between them gets the
//! profile's delay, jitter, bursty loss and rate cap.
//!
//! ```text
//! netshim --link ac,127.0.0.1:7001,127.0.0.1:4403 --set "ac both delay_ms=20 loss=0.1" \
//!         --control 127.0.0.1:7000
//! ```
//!
//! Profiles change at run time over the control port, one command per line:
//! `set <link> <fwd|rev|both> key=value...` (keys: delay_ms, jitter_ms, loss,
//! burst, rate_kbps, queue_ms) answers `ok` or `error: ...`; `show` answers
//! one JSON line with every link's profiles and counters; `block <link>...`
//! and `unblock <link>...` cut and restore links entirely (partitions). On
//! start the shim prints one JSON line with the bound addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use netmodel::{LinkModel, Profile};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::Instant;

#[derive(Parser)]
#[command(version, about = "User-space impairment proxy for UDP")]
struct Cli {
    /// A link: NAME,LISTEN_ADDR,TARGET_ADDR (repeatable). Port 0 picks a port.
    #[arg(long = "link", required = true)]
    links: Vec<String>,
    /// An initial profile setting, as a control command without "set"
    /// (repeatable): "NAME fwd|rev|both key=value...".
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Control port address.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Seed of the impairment randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One direction's model and counters.
struct Direction {
    model: Mutex<LinkModel>,
}

struct Link {
    name: String,
    target: SocketAddr,
    fwd: Direction,
    rev: Direction,
    /// Drops everything both ways (a cut or a partition).
    blocked: std::sync::atomic::AtomicBool,
}

#[derive(Serialize)]
struct LinkView {
    name: String,
    target: SocketAddr,
    fwd: Profile,
    rev: Profile,
    fwd_stats: netmodel::LinkStats,
    rev_stats: netmodel::LinkStats,
}

struct Shim {
    links: HashMap<String, Arc<Link>>,
    started: Instant,
}

impl Shim {
    fn apply(&self, command: &str) -> anyhow::Result<()> {
        let mut words = command.split_whitespace();
        let name = words.next().context("missing link name")?;
        let link = self
            .links
            .get(name)
            .with_context(|| format!("no link {name}"))?;
        let dirs: Vec<&Direction> = match words.next() {
            Some("fwd") => vec![&link.fwd],
            Some("rev") => vec![&link.rev],
            Some("both") => vec![&link.fwd, &link.rev],
            other => bail!("expected fwd, rev or both, got {other:?}"),
        };
        let settings: Vec<(&str, &str)> = words
            .map(|kv| {
                kv.split_once('=')
                    .with_context(|| format!("expected key=value, got {kv:?}"))
            })
            .collect::<Result<_, _>>()?;
        for d in dirs {
            let mut m = d.model.lock().expect("model lock");
            let mut p = *m.profile();
            for (k, v) in &settings {
                p.set(k, v)?;
            }
            p.validate()?;
            m.set_profile(p);
        }
        Ok(())
    }

    fn show(&self) -> String {
        let mut views: Vec<LinkView> = self
            .links
            .values()
            .map(|l| {
                let f = l.fwd.model.lock().expect("model lock");
                let r = l.rev.model.lock().expect("model lock");
                LinkView {
                    name: l.name.clone(),
                    target: l.target,
                    fwd: *f.profile(),
                    rev: *r.profile(),
                    fwd_stats: f.stats(),
                    rev_stats: r.stats(),
                }
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        serde_json::to_string(&views).expect("serialisable")
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Sends `data` to `to` from `socket` after `delay` (or drops it).
fn schedule(
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    data: Vec<u8>,
    delay: Option<Duration>,
) {
    let Some(delay) = delay else { return };
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let _ = match to {
            Some(addr) => socket.send_to(&data, addr).await,
            None => socket.send(&data).await,
        };
    });
}

async fn serve_link(shim: Arc<Shim>, link: Arc<Link>, socket: Arc<UdpSocket>) {
    let mut sessions: HashMap<SocketAddr, (Arc<UdpSocket>, Instant)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut last_sweep = Instant::now();
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let upstream = match sessions.get_mut(&from) {
            Some((s, seen)) => {
                *seen = Instant::now();
                s.clone()
            }
            None => {
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if s.connect(link.target).await.is_err() {
                    continue;
                }
                let s = Arc::new(s);
                sessions.insert(from, (s.clone(), Instant::now()));
                // Replies from the target go back to this client.
                let (shim, link, back, up) =
                    (shim.clone(), link.clone(), socket.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        // A connected UDP socket reports ICMP errors (target
                        // not up yet) on the next receive: keep going.
                        let Ok(n) = up.recv(&mut buf).await else {
                            continue;
                        };
                        if link.blocked.load(std::sync::atomic::Ordering::Relaxed) {
                            continue;
                        }
                        let fate = link
                            .rev
                            .model
                            .lock()
                            .expect("model lock")
                            .transmit(shim.now(), n);
                        schedule(back.clone(), Some(from), buf[..n].to_vec(), fate);
                    }
                });
                s
            }
        };
        if link.blocked.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let fate = link
            .fwd
            .model
            .lock()
            .expect("model lock")
            .transmit(shim.now(), n);
        schedule(upstream, None, buf[..n].to_vec(), fate);
        if last_sweep.elapsed() > Duration::from_secs(10) {
            last_sweep = Instant::now();
            sessions.retain(|_, (_, seen)| seen.elapsed() < Duration::from_secs(60));
        }
    }
}

async fn control(shim: Arc<Shim>, listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let shim = shim.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line = line.trim();
                let reply = if line == "show" {
                    shim.show()
                } else if let Some(rest) = line
                    .strip_prefix("block ")
                    .or_else(|| line.strip_prefix("unblock "))
                {
                    let block = line.starts_with("block ");
                    let mut unknown = Vec::new();
                    for name in rest.split_whitespace() {
                        match shim.links.get(name) {
                            Some(l) => l.blocked.store(block, std::sync::atomic::Ordering::Relaxed),
                            None => unknown.push(name),
                        }
                    }
                    if unknown.is_empty() {
                        "ok".to_owned()
                    } else {
                        format!("error: no link {unknown:?}")
                    }
                } else if let Some(cmd) = line.strip_prefix("set ") {
                    match shim.apply(cmd) {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => format!("error: {e:#}"),
                    }
                } else if line.is_empty() {
                    continue;
                } else {
                    "error: commands are `set <link> <fwd|rev|both> key=value...` and `show`"
                        .to_owned()
                };
                if write
                    .write_all(format!("{reply}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut links = HashMap::new();
    let mut sockets = Vec::new();
    let mut bound = serde_json::Map::new();
    for (i, spec) in cli.links.iter().enumerate() {
        let parts: Vec<&str> = spec.split(',').collect();
        let [name, listen, target] = parts[..] else {
            bail!("--link {spec:?}: expected NAME,LISTEN,TARGET");
        };
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("--link {spec:?}: listen address"))?;
        let target: SocketAddr = target
            .parse()
            .with_context(|| format!("--link {spec:?}: target address"))?;
        let socket = UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        bound.insert(name.to_owned(), socket.local_addr()?.to_string().into());
        let seed = cli.seed.wrapping_mul(1_000_003).wrapping_add(2 * i as u64);
        let link = Arc::new(Link {
            name: name.to_owned(),
            target,
            fwd: Direction {
                model: Mutex::new(LinkModel::new(Profile::CLEAN, seed)),
            },
            rev: Direction {
                model: Mutex::new(LinkModel::new(Profile::CLEAN, seed + 1)),
            },
            blocked: std::sync::atomic::AtomicBool::new(false),
        });
        if links.insert(name.to_owned(), link.clone()).is_some() {
            bail!("link {name} given twice");
        }
        sockets.push((link, Arc::new(socket)));
    }
    let shim = Arc::new(Shim {
        links,
        started: Instant::now(),
    });
    for s in &cli.sets {
        shim.apply(s).with_context(|| format!("--set {s:?}"))?;
    }
    let listener = TcpListener::bind(cli.control)
        .await
        .context("binding the control port")?;
    println!(
        "{}",
        serde_json::json!({ "links": bound, "control": listener.local_addr()?.to_string() })
    );
    for (link, socket) in sockets {
        tokio::spawn(serve_link(shim.clone(), link, socket));
    }
    tokio::select! {
        _ = control(shim, listener) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
