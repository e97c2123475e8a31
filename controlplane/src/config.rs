//! Control-plane node configuration (TOML), validated before anything
//! starts (`controlplane --check-config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_net::tls::{TlsIdentity, control_plane_name};
use serde::Deserialize;

use crate::engine::EngineConfig;
use crate::node::NodeConfig;
use crate::state::Secret;

pub use relay_net::config::ConfigError;
use relay_net::config::{AppSection, TlsSection, invalid, read_toml, resolve};

/// Raft's logical clock ticks every 10 ms.
const TICK_MS: u64 = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: NodeSection,
    tls: TlsSection,
    #[serde(default)]
    raft: RaftSection,
    cluster: ClusterSection,
    #[serde(default)]
    routing: RoutingSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    apps: Vec<AppSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    id: u64,
    listen: String,
    data_dir: PathBuf,
    http_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RaftSection {
    heartbeat_ms: u64,
    election_ms: u64,
    snapshot_every: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_ms: 1000,
            snapshot_every: 5000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberSection {
    id: u64,
    addr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    /// The initial members (every node lists the same set).
    members: Vec<MemberSection>,
    /// This node joins a running cluster (started empty, added with
    /// `relayctl members add`).
    #[serde(default)]
    join: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RoutingSection {
    epoch_interval_ms: u64,
    lease_ms: u64,
    stale_after_ms: u64,
}

impl Default for RoutingSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        Self {
            epoch_interval_ms: e.epoch_interval.as_millis() as u64,
            lease_ms: e.lease.as_millis() as u64,
            stale_after_ms: e.stale_after.as_millis() as u64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogSection {
    level: String,
    format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// A validated node configuration.
#[derive(Debug)]
pub struct CpConfig {
    /// Raft settings.
    pub node: NodeConfig,
    /// Tick length (the heartbeat interval).
    pub tick: Duration,
    /// QUIC listen address (Raft and API).
    pub listen: SocketAddr,
    /// HTTP listen address (metrics, status page).
    pub http_listen: Option<SocketAddr>,
    /// sled folder.
    pub data_dir: PathBuf,
    /// Certificates.
    pub tls: TlsIdentity,
    /// Initial members `(id, addr)`.
    pub members: Vec<(u64, String)>,
    /// Joining a running cluster.
    pub join: bool,
    /// Route engine timing.
    pub engine: EngineConfig,
    /// Apps to create if absent, proposed by the first leader.
    pub apps: Vec<(String, Secret)>,
    /// Log filter.
    pub log_level: String,
    /// `text` or `json`.
    pub log_json: bool,
}

impl CpConfig {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<CpConfig, ConfigError> {
        let f: File = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if f.node.id == 0 {
            return Err(invalid("node.id", "must be positive"));
        }
        let listen: SocketAddr = f
            .node
            .listen
            .parse()
            .map_err(|e| invalid("node.listen", format!("{e}")))?;
        let http_listen = f
            .node
            .http_listen
            .as_deref()
            .map(|a| {
                a.parse()
                    .map_err(|e| invalid("node.http_listen", format!("{e}")))
            })
            .transpose()?;
        if f.raft.heartbeat_ms < 10 || f.raft.election_ms < 3 * f.raft.heartbeat_ms {
            return Err(invalid(
                "raft",
                "heartbeat_ms must be at least 10 and election_ms at least 3 heartbeats",
            ));
        }
        let mut node = NodeConfig::new(f.node.id);
        // A 10 ms tick: timeouts are counted finely enough that a follower
        // whose timer fires just after another's does not still think the
        // dead leader's lease is valid (which would refuse its pre-vote
        // and cost a whole extra election timeout).
        node.heartbeat_ticks = (f.raft.heartbeat_ms / TICK_MS).max(1) as usize;
        node.election_ticks = (f.raft.election_ms / TICK_MS) as usize;
        // Randomised timeouts in [1, 1.25) x the election timeout: 25 slots
        // of 10 ms for a 1 s timeout, wide enough that three or five nodes
        // rarely fire within one round trip of each other (a split vote),
        // narrow enough that a dead leader is replaced promptly.
        node.election_jitter_ticks = (node.election_ticks / 4).max(2);
        node.snapshot_every = f.raft.snapshot_every.max(10);
        let mut members = Vec::new();
        for (i, m) in f.cluster.members.iter().enumerate() {
            if m.id == 0 || members.iter().any(|(id, _)| *id == m.id) {
                return Err(invalid(
                    format!("cluster.members[{i}].id"),
                    "must be positive and unique",
                ));
            }
            m.addr
                .parse::<SocketAddr>()
                .map_err(|e| invalid(format!("cluster.members[{i}].addr"), format!("{e}")))?;
            members.push((m.id, m.addr.clone()));
        }
        if !f.cluster.join && !members.iter().any(|(id, _)| *id == f.node.id) {
            return Err(invalid(
                "cluster.members",
                "must include this node (or set join = true)",
            ));
        }
        let tls = TlsIdentity::load(
            &resolve(base, &f.tls.ca),
            &resolve(base, &f.tls.cert),
            &resolve(base, &f.tls.key),
            &f.tls.cluster_domain,
        )?;
        tls.check_own_name(&control_plane_name(f.node.id, &f.tls.cluster_domain))?;
        let mut apps = Vec::new();
        for (i, a) in f.apps.iter().enumerate() {
            let (hex_text, _) = a.load_secret(
                base,
                &format!("apps[{i}]"),
                relay_core::token::MIN_SECRET_LEN,
            )?;
            apps.push((a.id.clone(), Secret(hex_text)));
        }
        if tracing_subscriber::EnvFilter::try_new(&f.log.level).is_err() {
            return Err(invalid("log.level", "not a log filter"));
        }
        Ok(CpConfig {
            node,
            tick: Duration::from_millis(TICK_MS),
            listen,
            http_listen,
            data_dir: resolve(base, &f.node.data_dir),
            tls,
            members,
            join: f.cluster.join,
            engine: EngineConfig {
                epoch_interval: Duration::from_millis(f.routing.epoch_interval_ms),
                lease: Duration::from_millis(f.routing.lease_ms),
                stale_after: Duration::from_millis(f.routing.stale_after_ms),
            },
            apps,
            log_level: f.log.level,
            log_json: f.log.format == "json",
        })
    }
}
