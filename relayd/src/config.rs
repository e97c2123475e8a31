//! Relay configuration: a TOML file (the serde layer, strict about unknown
//! keys, with named defaults) turned into a runtime [`Config`] that cannot
//! hold invalid values. Everything is checked, certificates and secrets
//! included, before any socket opens: that is what `--check-config` runs.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use relay_core::RelayConfig;
use relay_core::links::LinkConfig;
use relay_core::token::MIN_SECRET_LEN;
use relay_core::wire::client::Alternative;
use serde::Deserialize;
use topology::{Metrics, RelayId, Route, RouteEntry, RouteTable};

use relay_net::tls::TlsIdentity;

use relay_net::config::{AppSection, TlsSection, invalid, read_toml, resolve};
pub use relay_net::config::{ConfigError, default_cluster_domain};

/// The file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    relay: RelaySection,
    tls: TlsSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    probe: ProbeSection,
    #[serde(default)]
    drain: DrainSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    apps: Vec<AppSection>,
    #[serde(default)]
    peers: Vec<PeerSection>,
    #[serde(default)]
    routes: Vec<RouteSection>,
    control_plane: Option<ControlPlaneSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneSection {
    /// Nodes as `ID@ADDR`.
    nodes: Vec<String>,
    #[serde(default = "default_report_ms")]
    report_interval_ms: u64,
    #[serde(default = "default_capacity")]
    capacity: u32,
}

fn default_report_ms() -> u64 {
    2000
}

fn default_capacity() -> u32 {
    1000
}

/// How this relay talks to the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Nodes to try, in order.
    pub nodes: Vec<controlplane::client::NodeAddr>,
    /// Time between full link reports (changes go out sooner).
    pub report_interval: Duration,
    /// Clients this relay will serve.
    pub capacity: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelaySection {
    id: u32,
    name: Option<String>,
    #[serde(default)]
    region: String,
    lat: Option<f64>,
    lon: Option<f64>,
    #[serde(default = "default_listen")]
    listen: String,
    /// Where clients and peers reach this relay, if not `listen`.
    public_addr: Option<String>,
    #[serde(default = "default_max_payload")]
    max_payload: u16,
    #[serde(default = "default_hop_limit")]
    hop_limit: u8,
    #[serde(default = "default_max_channels")]
    max_channels_per_client: usize,
    /// Runtime worker threads (1: everything on one thread).
    #[serde(default = "default_worker_threads")]
    worker_threads: usize,
    /// UDP receive and send buffer asked of the kernel, bytes.
    #[serde(default = "default_socket_buffer")]
    socket_buffer_bytes: usize,
}

fn default_socket_buffer() -> usize {
    relay_net::quic::DEFAULT_SOCKET_BUFFER
}

fn default_worker_threads() -> usize {
    2
}

fn default_listen() -> String {
    "0.0.0.0:4433".into()
}
fn default_max_payload() -> u16 {
    1100
}
fn default_hop_limit() -> u8 {
    8
}
fn default_max_channels() -> usize {
    16
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProbeSection {
    interval_ms: u64,
    timeout_ms: u64,
    adaptive_timeout: bool,
    dead_after_losses: u32,
    fast_window_ms: u64,
    recover_after_ms: u64,
}

impl Default for ProbeSection {
    fn default() -> Self {
        let l = LinkConfig::default();
        Self {
            interval_ms: l.probe_interval.as_millis() as u64,
            timeout_ms: l.metrics.probe_timeout.as_millis() as u64,
            adaptive_timeout: l.metrics.adaptive_timeout,
            dead_after_losses: l.metrics.dead_after_losses,
            fast_window_ms: l.fast_window.as_millis() as u64,
            recover_after_ms: l.recover_after.as_millis() as u64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DrainSection {
    deadline_ms: u64,
}

impl Default for DrainSection {
    fn default() -> Self {
        Self {
            deadline_ms: 10_000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogSection {
    level: String,
    format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSection {
    id: u32,
    addr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    to: u32,
    /// Relays after this one, ending with `to`.
    path: Vec<u32>,
    backup: Option<Vec<u32>>,
}

/// A peer relay to keep a connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its id.
    pub id: RelayId,
    /// `host:port` of its QUIC endpoint.
    pub addr: String,
}

/// Validated runtime configuration.
#[derive(Debug)]
pub struct Config {
    /// Settings of the core.
    pub core: RelayConfig,
    /// Human name.
    pub name: String,
    /// Coordinates, if given.
    pub location: Option<(f64, f64)>,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Address clients and peers reach this relay at.
    pub public_addr: String,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Certificates and keys.
    pub tls: TlsIdentity,
    /// Peers to connect with.
    pub peers: Vec<Peer>,
    /// Static routes.
    pub routes: RouteTable,
    /// Log level filter (tracing `EnvFilter` syntax).
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// UDP socket buffers asked of the kernel, bytes each way.
    pub socket_buffer_bytes: usize,
    /// The control plane, if any.
    pub control_plane: Option<ControlPlane>,
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths inside
    /// are relative to the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file: ConfigFile = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        file.validate(base)
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|e| {
        invalid(
            field,
            format!("{s:?} is not an address like 127.0.0.1:4433 ({e})"),
        )
    })
}

fn check_host_port(field: &str, s: &str) -> Result<(), ConfigError> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(invalid(field, format!("{s:?} is not host:port"))),
    }
}

impl ConfigFile {
    fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let r = &self.relay;
        if r.id == 0 {
            return Err(invalid("relay.id", "must be a positive integer"));
        }
        let me = RelayId(r.id);
        let listen = parse_addr("relay.listen", &r.listen)?;
        let public_addr = match &r.public_addr {
            Some(a) => {
                check_host_port("relay.public_addr", a)?;
                a.clone()
            }
            None => r.listen.clone(),
        };
        if r.region.len() > 255 {
            return Err(invalid("relay.region", "longer than 255 bytes"));
        }
        let location = match (r.lat, r.lon) {
            (Some(lat), Some(lon))
                if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) =>
            {
                Some((lat, lon))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "relay.lat/lon",
                    "give both, within -90..90 and -180..180",
                ));
            }
        };
        if !(64..=1200).contains(&r.max_payload) {
            return Err(invalid(
                "relay.max_payload",
                "must be between 64 and 1200 bytes",
            ));
        }
        if !(1..=32).contains(&r.hop_limit) {
            return Err(invalid("relay.hop_limit", "must be between 1 and 32"));
        }
        if !(1..=256).contains(&r.worker_threads) {
            return Err(invalid("relay.worker_threads", "must be between 1 and 256"));
        }
        if !(64 * 1024..=1 << 30).contains(&r.socket_buffer_bytes) {
            return Err(invalid(
                "relay.socket_buffer_bytes",
                "must be between 65536 (64 KiB) and 1073741824 (1 GiB)",
            ));
        }
        if r.max_channels_per_client == 0 {
            return Err(invalid(
                "relay.max_channels_per_client",
                "must be at least 1",
            ));
        }
        let metrics_listen = self
            .metrics
            .listen
            .as_deref()
            .map(|a| parse_addr("metrics.listen", a))
            .transpose()?;

        let p = &self.probe;
        if p.interval_ms < 10 {
            return Err(invalid("probe.interval_ms", "must be at least 10"));
        }
        if p.timeout_ms < 10 || p.fast_window_ms < p.interval_ms {
            return Err(invalid(
                "probe",
                "timeout_ms must be at least 10 and fast_window_ms at least interval_ms",
            ));
        }
        let mut link = LinkConfig {
            probe_interval: Duration::from_millis(p.interval_ms),
            fast_window: Duration::from_millis(p.fast_window_ms),
            recover_after: Duration::from_millis(p.recover_after_ms),
            ..LinkConfig::default()
        };
        if p.dead_after_losses == 0 {
            return Err(invalid("probe.dead_after_losses", "must be at least 1"));
        }
        link.metrics.probe_timeout = Duration::from_millis(p.timeout_ms);
        link.metrics.adaptive_timeout = p.adaptive_timeout;
        link.metrics.dead_after_losses = p.dead_after_losses;

        let mut apps = HashMap::new();
        for (i, a) in self.apps.iter().enumerate() {
            let field = format!("apps[{i}]");
            if a.id.is_empty() || a.id.len() > 255 {
                return Err(invalid(format!("{field}.id"), "must be 1 to 255 bytes"));
            }
            let (_, secret) = a.load_secret(base, &field, MIN_SECRET_LEN)?;
            if apps.insert(a.id.clone(), secret).is_some() {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("app {:?} appears twice", a.id),
                ));
            }
        }

        let mut peer_ids = BTreeSet::new();
        let mut peers = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let field = format!("peers[{i}]");
            if p.id == 0 || p.id == r.id {
                return Err(invalid(
                    format!("{field}.id"),
                    "must be positive and not this relay's id",
                ));
            }
            if !peer_ids.insert(p.id) {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("peer {} appears twice", p.id),
                ));
            }
            check_host_port(&format!("{field}.addr"), &p.addr)?;
            peers.push(Peer {
                id: RelayId(p.id),
                addr: p.addr.clone(),
            });
        }

        let mut entries = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, rt) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}]");
            if rt.to == r.id || !seen.insert(rt.to) {
                return Err(invalid(
                    format!("{field}.to"),
                    "must not be this relay nor repeat a destination",
                ));
            }
            let to_route = |hops: &[u32], which: &str| -> Result<Route, ConfigError> {
                let f = format!("{field}.{which}");
                if hops.last() != Some(&rt.to) {
                    return Err(invalid(&f, format!("must end at {}", rt.to)));
                }
                if !peer_ids.contains(&hops[0]) {
                    return Err(invalid(
                        &f,
                        format!("first hop {} is not a configured peer", hops[0]),
                    ));
                }
                let full: Vec<RelayId> = std::iter::once(me)
                    .chain(hops.iter().map(|&h| RelayId(h)))
                    .collect();
                if full.iter().enumerate().any(|(j, h)| full[..j].contains(h)) {
                    return Err(invalid(&f, "visits a relay twice"));
                }
                Ok(Route {
                    hops: full.into_iter().collect(),
                    metrics: Metrics::default(),
                    cost: 0.0,
                    poor: false,
                })
            };
            let primary = to_route(&rt.path, "path")?;
            let backup = rt
                .backup
                .as_deref()
                .map(|b| to_route(b, "backup"))
                .transpose()?;
            entries.push(RouteEntry {
                destination: RelayId(rt.to),
                primary,
                backup,
            });
        }
        entries.sort_by_key(|e| e.destination);
        let routes =
            RouteTable::new(me, 0, entries).map_err(|e| invalid("routes", e.to_string()))?;

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a log filter", self.log.level),
            ));
        }

        let control_plane = match &self.control_plane {
            None => None,
            Some(cp) => {
                let mut nodes = Vec::new();
                for (i, n) in cp.nodes.iter().enumerate() {
                    let node: controlplane::client::NodeAddr = n
                        .parse()
                        .map_err(|e: String| invalid(format!("control_plane.nodes[{i}]"), e))?;
                    if node.id.is_none() {
                        return Err(invalid(
                            format!("control_plane.nodes[{i}]"),
                            "write nodes as ID@ADDR",
                        ));
                    }
                    nodes.push(node);
                }
                if nodes.is_empty() {
                    return Err(invalid("control_plane.nodes", "name at least one node"));
                }
                if cp.report_interval_ms < 100 {
                    return Err(invalid(
                        "control_plane.report_interval_ms",
                        "must be at least 100",
                    ));
                }
                Some(ControlPlane {
                    nodes,
                    report_interval: Duration::from_millis(cp.report_interval_ms),
                    capacity: cp.capacity,
                })
            }
        };
        let tls = TlsIdentity::load(
            &resolve(base, &self.tls.ca),
            &resolve(base, &self.tls.cert),
            &resolve(base, &self.tls.key),
            &self.tls.cluster_domain,
        )?;
        tls.check_relay_name(me)?;

        let mut core = RelayConfig::new(me);
        core.region = r.region.clone();
        core.hop_limit = r.hop_limit;
        core.max_payload = r.max_payload;
        core.max_channels_per_client = r.max_channels_per_client;
        core.link = link;
        core.apps = apps;
        core.drain_deadline = Duration::from_millis(self.drain.deadline_ms);
        core.alternatives = peers
            .iter()
            .map(|p| Alternative {
                relay: p.id,
                address: p.addr.clone(),
            })
            .collect();

        Ok(Config {
            core,
            name: r.name.clone().unwrap_or_else(|| format!("relay-{}", r.id)),
            location,
            listen,
            public_addr,
            metrics_listen,
            tls,
            peers,
            routes,
            log_level: self.log.level.clone(),
            log_format: self.log.format,
            worker_threads: r.worker_threads,
            socket_buffer_bytes: r.socket_buffer_bytes,
            control_plane,
        })
    }
}
