//! `relayctl`: the operator CLI of the control plane.
//!
//! ```text
//! relayctl --pki pki --node 127.0.0.1:7001 status [--all]
//! relayctl ... relays | links | route 1 3 | drain 2 | undrain 2
//! relayctl ... members add 4 127.0.0.1:7004 | members remove 4
//! relayctl ... apps list | apps put shop --secret-file s.hex | apps delete shop
//! relayctl --json ...   machine-readable output
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use controlplane::api::{Consistency, Request, Response};
use controlplane::client::{CpClient, NodeAddr};
use controlplane::state::{Admin, Policy, Secret};
use relay_net::tls::TlsIdentity;
use topology::RelayId;

#[derive(Parser)]
#[command(version, about = "Operate the edge relay control plane")]
struct Cli {
    /// Control-plane nodes (`ID@ADDR` or `ADDR`); the first that answers is used.
    #[arg(
        long,
        env = "RELAYCTL_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001"
    )]
    node: Vec<NodeAddr>,
    /// PKI folder with ca.pem and the operator's certificate and key.
    #[arg(long, env = "RELAYCTL_PKI", default_value = "pki")]
    pki: PathBuf,
    /// Operator name (certificate operator-NAME.pem).
    #[arg(long, env = "RELAYCTL_OPERATOR", default_value = "admin")]
    operator: String,
    /// Cluster domain.
    #[arg(long, default_value = "relays.internal")]
    domain: String,
    /// JSON output for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Members, leader, term, commit and applied index.
    Status {
        /// Ask every node given with --node.
        #[arg(long)]
        all: bool,
    },
    /// Registered relays.
    Relays {
        /// Read this node's state without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Link metrics the routes were computed from.
    Links {
        /// Read this node's state without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// The network map as SVG (relays by coordinates, links by quality,
    /// routes in force): `relayctl map > map.svg`.
    Map {
        /// Read this node's state without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Primary and backup route of a pair, with costs.
    Route {
        /// Source relay.
        from: u32,
        /// Destination relay.
        to: u32,
    },
    /// Stop using a relay for transit and move its clients.
    Drain {
        /// Relay id.
        relay: u32,
    },
    /// Put a drained relay back in service.
    Undrain {
        /// Relay id.
        relay: u32,
    },
    /// Forget a relay.
    RemoveRelay {
        /// Relay id.
        relay: u32,
    },
    /// Control-plane membership.
    Members {
        #[command(subcommand)]
        cmd: MembersCmd,
    },
    /// Apps and their secrets (secrets are never shown).
    Apps {
        #[command(subcommand)]
        cmd: AppsCmd,
    },
    /// Routing policy.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Test key-value writes and reads (benchmarks, tests).
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
    },
}

#[derive(Subcommand)]
enum MembersCmd {
    /// Add a node (start it first with `join = true`).
    Add {
        /// Raft id.
        id: u64,
        /// Its QUIC address.
        addr: String,
    },
    /// Remove a node.
    Remove {
        /// Raft id.
        id: u64,
    },
}

#[derive(Subcommand)]
enum AppsCmd {
    /// List app ids.
    List,
    /// Add or replace an app.
    Put {
        /// App id.
        id: String,
        /// File with the hex secret.
        #[arg(long)]
        secret_file: PathBuf,
    },
    /// Remove an app.
    Delete {
        /// App id.
        id: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Show the policy.
    Get,
    /// Replace the policy from a JSON file.
    Set {
        /// The file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum KvCmd {
    /// Write a key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Read a key.
    Get {
        /// Key.
        key: String,
        /// Read this node's state without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relayctl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relayctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn connect_any(nodes: &[NodeAddr], id: &TlsIdentity) -> anyhow::Result<CpClient> {
    let mut last = None;
    for n in nodes {
        match CpClient::connect(n, id).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no node given")))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let id = TlsIdentity::load(
        &cli.pki.join("ca.pem"),
        &cli.pki.join(format!("operator-{}.pem", cli.operator)),
        &cli.pki.join(format!("operator-{}.key", cli.operator)),
        &cli.domain,
    )
    .context("loading the operator certificate")?;

    if let Cmd::Status { all: true } = cli.command {
        let mut out = Vec::new();
        for n in &cli.node {
            let r = match CpClient::connect(n, &id).await {
                Ok(c) => c
                    .request(&Request::Status)
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: e.to_string(),
                    }),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            };
            out.push((n.addr.to_string(), r));
        }
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "{:<22} {:>4} {:<10} {:>6} {:>7} {:>9} {:>9}",
                "node", "id", "role", "term", "leader", "commit", "applied"
            );
            for (addr, r) in &out {
                match r {
                    Response::Status(s) => println!(
                        "{:<22} {:>4} {:<10} {:>6} {:>7} {:>9} {:>9}",
                        addr,
                        s.node.id,
                        s.node.role,
                        s.node.term,
                        s.node.leader,
                        s.node.commit,
                        s.node.applied
                    ),
                    Response::Error { message } => println!("{addr:<22} unreachable: {message}"),
                    _ => {}
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let client = connect_any(&cli.node, &id).await?;
    let request = match &cli.command {
        Cmd::Status { .. } => Request::Status,
        Cmd::Relays { stale } => Request::Relays {
            consistency: consistency(*stale),
        },
        Cmd::Links { stale } => Request::Links {
            consistency: consistency(*stale),
        },
        Cmd::Map { stale } => Request::Map {
            consistency: consistency(*stale),
        },
        Cmd::Route { from, to } => Request::Route {
            from: RelayId(*from),
            to: RelayId(*to),
        },
        Cmd::Drain { relay } => Request::SetAdmin {
            relay: RelayId(*relay),
            admin: Admin::Draining,
        },
        Cmd::Undrain { relay } => Request::SetAdmin {
            relay: RelayId(*relay),
            admin: Admin::Active,
        },
        Cmd::RemoveRelay { relay } => Request::RemoveRelay {
            relay: RelayId(*relay),
        },
        Cmd::Members {
            cmd: MembersCmd::Add { id, addr },
        } => Request::AddMember {
            id: *id,
            addr: addr.clone(),
        },
        Cmd::Members {
            cmd: MembersCmd::Remove { id },
        } => Request::RemoveMember { id: *id },
        Cmd::Apps { cmd: AppsCmd::List } => Request::Apps,
        Cmd::Apps {
            cmd: AppsCmd::Put { id, secret_file },
        } => {
            let secret = std::fs::read_to_string(secret_file)
                .with_context(|| format!("reading {}", secret_file.display()))?
                .trim()
                .to_owned();
            Request::PutApp {
                id: id.clone(),
                secret: Secret(secret),
            }
        }
        Cmd::Apps {
            cmd: AppsCmd::Delete { id },
        } => Request::DeleteApp { id: id.clone() },
        Cmd::Policy {
            cmd: PolicyCmd::Get,
        } => Request::GetPolicy,
        Cmd::Policy {
            cmd: PolicyCmd::Set { file },
        } => {
            let text = std::fs::read_to_string(file)?;
            let policy: Policy = serde_json::from_str(&text).context("policy JSON")?;
            Request::SetPolicy { policy }
        }
        Cmd::Kv {
            cmd: KvCmd::Put { key, value },
        } => Request::Put {
            key: key.clone(),
            value: value.clone(),
        },
        Cmd::Kv {
            cmd: KvCmd::Get { key, stale },
        } => Request::Get {
            key: key.clone(),
            consistency: consistency(*stale),
        },
    };
    let response = client.request(&request).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(if matches!(response, Response::Error { .. }) {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    print_human(&response)?;
    Ok(if matches!(response, Response::Error { .. }) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_human(r: &Response) -> anyhow::Result<()> {
    match r {
        Response::Ok => println!("ok"),
        Response::Error { message } => bail!("{message}"),
        Response::Status(s) => {
            let n = &s.node;
            println!(
                "node {} ({}) term {} leader {}",
                n.id, n.role, n.term, n.leader
            );
            println!(
                "commit {} applied {} first log index {}",
                n.commit, n.applied, n.first_index
            );
            println!(
                "route epoch {}, {} relays, {} rejected commands",
                s.route_epoch, s.relays, s.rejected
            );
            println!("{:>4}  {:<22} role", "id", "address");
            for (id, addr) in &s.members {
                let role = if *id == n.leader {
                    "leader"
                } else if n.voters.contains(id) {
                    "voter"
                } else if n.learners.contains(id) {
                    "learner"
                } else {
                    "-"
                };
                println!("{id:>4}  {addr:<22} {role}");
            }
        }
        Response::Relays { relays } => {
            println!(
                "{:>5}  {:<14} {:<6} {:<22} {:<9} {:<5} {:>7}",
                "id", "name", "region", "address", "state", "alive", "clients"
            );
            for r in relays {
                println!(
                    "{:>5}  {:<14} {:<6} {:<22} {:<9} {:<5} {:>7}",
                    r.id.0,
                    r.name,
                    r.region,
                    r.addr,
                    format!("{:?}", r.admin).to_lowercase(),
                    if r.alive { "yes" } else { "no" },
                    r.clients
                );
            }
        }
        Response::Map(map) => print!("{}", controlplane::map::svg(map)),
        Response::Links { links, epoch } => {
            println!("epoch {epoch}");
            println!(
                "{:>5} {:>5}  {:>9} {:>10} {:>8}  poor",
                "from", "to", "rtt ms", "jitter ms", "loss %"
            );
            for l in links {
                println!(
                    "{:>5} {:>5}  {:>9.1} {:>10.1} {:>8.3}  {}",
                    l.from.0,
                    l.to.0,
                    l.rtt_ms,
                    l.jitter_ms,
                    100.0 * l.loss,
                    if l.poor { "POOR" } else { "" }
                );
            }
        }
        Response::Route { epoch, entry } => match entry {
            None => println!("epoch {epoch}: no route"),
            Some(e) => {
                let path = |r: &topology::Route| {
                    format!(
                        "{}  (rtt {:.1} ms, jitter {:.1} ms, loss {:.3} %, cost {:.1}{})",
                        r.hops
                            .iter()
                            .map(|h| h.0.to_string())
                            .collect::<Vec<_>>()
                            .join(" -> "),
                        r.metrics.rtt_ms,
                        r.metrics.jitter_ms,
                        100.0 * r.metrics.loss,
                        r.cost,
                        if r.poor { ", POOR" } else { "" }
                    )
                };
                println!("epoch {epoch}");
                println!("primary: {}", path(&e.primary));
                match &e.backup {
                    Some(b) => println!("backup:  {}", path(b)),
                    None => println!("backup:  none"),
                }
            }
        },
        Response::Apps { apps } => {
            for a in apps {
                println!("{a}");
            }
        }
        Response::Policy { policy } => println!("{}", serde_json::to_string_pretty(policy)?),
        Response::Value { value } => match value {
            Some(v) => println!("{v}"),
            None => println!("(not set)"),
        },
    }
    Ok(())
}
