//! Finding relays: DNS service records, with the last good answer cached on
//! disk for when DNS is down, or a fixed list.
//!
//! # The zone
//! Operators publish every client-facing relay under one zone:
//!
//! ```text
//! _relay._udp.edge.example.com. 60 IN SRV 10 1 4433 relay-1.edge.example.com.
//! relay-1.edge.example.com.     60 IN A   203.0.113.10
//! relay-1.edge.example.com.     60 IN TXT "region=sin" "loc=1.35,103.82" "country=SG"
//! ```
//!
//! SRV gives the host and port (lower priority first, then higher weight);
//! A/AAAA the address; TXT, optionally, the region, coordinates (`loc=lat,lon`
//! in degrees) and country, which let the SDK order relays by distance
//! before probing them. The SRV target is also the TLS name the relay's
//! certificate must carry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use serde::{Deserialize, Serialize};

/// A relay a client may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Host name: the SRV target without its final dot, and the name the
    /// relay's TLS certificate must carry.
    pub name: String,
    /// Where to reach it.
    pub addr: SocketAddr,
    /// Region code from TXT `region=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `(latitude, longitude)` in degrees from TXT `loc=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<(f64, f64)>,
    /// ISO 3166 country code from TXT `country=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// SRV priority (lower is preferred).
    #[serde(default)]
    pub priority: u16,
    /// SRV weight (higher is preferred among equal priorities).
    #[serde(default)]
    pub weight: u16,
}

impl Candidate {
    /// A candidate known only by name and address.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Candidate {
            name: name.into(),
            addr,
            region: None,
            location: None,
            country: None,
            priority: 0,
            weight: 0,
        }
    }

    /// Parses `NAME@ADDR` (or a bare `ADDR`, named `localhost`), the form
    /// the command line takes.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, addr) = match s.split_once('@') {
            Some((n, a)) => (n, a),
            None => ("localhost", s),
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("relay {s:?}: bad address: {e}"))?;
        if name.is_empty() {
            return Err(format!("relay {s:?}: empty name"));
        }
        Ok(Candidate::new(name, addr))
    }

    /// Applies one TXT string (`key=value`); unknown keys are ignored so
    /// operators can add their own.
    fn apply_txt(&mut self, entry: &str) {
        let Some((key, value)) = entry.split_once('=') else {
            return;
        };
        let value = value.trim();
        match key.trim() {
            "region" if !value.is_empty() => self.region = Some(value.to_owned()),
            "country" if value.len() == 2 => self.country = Some(value.to_ascii_uppercase()),
            "loc" => self.location = parse_location(value),
            _ => {}
        }
    }
}

/// `lat,lon` in degrees, range-checked.
fn parse_location(s: &str) -> Option<(f64, f64)> {
    let (lat, lon) = s.split_once(',')?;
    let (lat, lon): (f64, f64) = (lat.trim().parse().ok()?, lon.trim().parse().ok()?);
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

/// How to reach DNS and what to ask it.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The zone relays are published under, e.g. `edge.example.com`.
    pub zone: String,
    /// Service label prepended to the zone.
    pub service: String,
    /// Name servers to ask; empty means the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Time allowed per query.
    pub timeout: Duration,
    /// Queries per name server before giving up.
    pub attempts: usize,
    /// Where the last good answer is kept, for when DNS fails.
    pub cache: Option<PathBuf>,
}

impl DnsConfig {
    /// Defaults for `zone`: `_relay._udp`, system name servers, 2 s per
    /// query, two attempts, no cache file.
    pub fn new(zone: impl Into<String>) -> Self {
        DnsConfig {
            zone: zone.into(),
            service: "_relay._udp".into(),
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            cache: None,
        }
    }

    /// The SRV name queried, fully qualified.
    pub fn srv_name(&self) -> String {
        format!("{}.{}.", self.service, self.zone.trim_end_matches('.'))
    }
}

/// Where the SDK finds relays.
#[derive(Debug, Clone)]
pub enum RelaySource {
    /// DNS service discovery.
    Dns(DnsConfig),
    /// A fixed list (tests, private deployments).
    Static(Vec<Candidate>),
}

/// Where a candidate list came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A fresh DNS answer.
    Dns,
    /// DNS failed; this is the last good answer from the cache file.
    Cache {
        /// Why DNS failed.
        error: String,
    },
    /// The configured list.
    Static,
}

/// A candidate list and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// Candidates in DNS preference order (priority, then weight).
    pub candidates: Vec<Candidate>,
    /// Where they came from.
    pub origin: Origin,
}

/// Why discovery found nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    /// DNS failed and there is no usable cached list.
    #[error("DNS lookup of {name} failed: {message}{cache}")]
    Dns {
        /// The name queried.
        name: String,
        /// The resolver's error.
        message: String,
        /// What happened with the cache, for the message.
        cache: String,
    },
    /// DNS answered but listed no usable relay.
    #[error("{name} lists no reachable relay: {message}")]
    NoRelays {
        /// The name queried.
        name: String,
        /// Details.
        message: String,
    },
    /// The fixed list is empty.
    #[error("no relays configured")]
    Empty,
}

/// Runs discovery.
pub async fn discover(source: &RelaySource) -> Result<Discovered, DiscoveryError> {
    match source {
        RelaySource::Static(list) if list.is_empty() => Err(DiscoveryError::Empty),
        RelaySource::Static(list) => Ok(Discovered {
            candidates: list.clone(),
            origin: Origin::Static,
        }),
        RelaySource::Dns(config) => discover_dns(config).await,
    }
}

async fn discover_dns(config: &DnsConfig) -> Result<Discovered, DiscoveryError> {
    let name = config.srv_name();
    let error = match lookup(config).await {
        Ok(candidates) => {
            if let Some(path) = &config.cache
                && let Err(e) = save_cache(path, &candidates)
            {
                tracing::warn!("cannot write the relay cache {}: {e}", path.display());
            }
            return Ok(Discovered {
                candidates,
                origin: Origin::Dns,
            });
        }
        Err(e) => e,
    };
    let message = match &error {
        DiscoveryError::Dns { message, .. } | DiscoveryError::NoRelays { message, .. } => {
            message.clone()
        }
        DiscoveryError::Empty => "empty".into(),
    };
    let cache = match &config.cache {
        None => "; no cache file configured".to_owned(),
        Some(path) => match load_cache(path) {
            Ok(candidates) if !candidates.is_empty() => {
                tracing::warn!(
                    "DNS lookup of {name} failed ({message}); using {} cached relays from {}",
                    candidates.len(),
                    path.display()
                );
                return Ok(Discovered {
                    candidates,
                    origin: Origin::Cache {
                        error: format!("{error}"),
                    },
                });
            }
            Ok(_) => format!("; the cache {} is empty", path.display()),
            Err(e) => format!("; no cached list: {e}"),
        },
    };
    Err(match error {
        DiscoveryError::Dns { name, message, .. } => DiscoveryError::Dns {
            name,
            message,
            cache,
        },
        other => other,
    })
}

fn resolver(config: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system resolver: {e}"))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.timeout = config.timeout;
    opts.attempts = config.attempts;
    builder.build().map_err(|e| format!("resolver: {e}"))
}

async fn lookup(config: &DnsConfig) -> Result<Vec<Candidate>, DiscoveryError> {
    let name = config.srv_name();
    let dns_error = |message: String| DiscoveryError::Dns {
        name: name.clone(),
        message,
        cache: String::new(),
    };
    let resolver = resolver(config).map_err(dns_error)?;
    let srv = resolver
        .srv_lookup(name.as_str())
        .await
        .map_err(|e| dns_error(e.to_string()))?;
    let mut targets: Vec<(String, u16, u16, u16)> = srv
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) if !s.target.is_root() => Some((
                s.target.to_ascii().trim_end_matches('.').to_owned(),
                s.port,
                s.priority,
                s.weight,
            )),
            _ => None,
        })
        .collect();
    targets.sort_by(|a, b| a.2.cmp(&b.2).then(b.3.cmp(&a.3)).then(a.0.cmp(&b.0)));
    targets.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    if targets.is_empty() {
        return Err(DiscoveryError::NoRelays {
            name,
            message: "no SRV records".into(),
        });
    }

    // Hosts and their TXT records, all at once.
    let mut tasks = tokio::task::JoinSet::new();
    for (host, ..) in &targets {
        let (resolver, host) = (resolver.clone(), host.clone());
        tasks.spawn(async move {
            let fqdn = format!("{host}.");
            let (ips, txt) = tokio::join!(
                resolver.lookup_ip(fqdn.as_str()),
                resolver.txt_lookup(fqdn.as_str())
            );
            let ips: Result<Vec<IpAddr>, String> =
                ips.map(|l| l.iter().collect()).map_err(|e| e.to_string());
            let txt: Vec<String> = txt
                .map(|l| {
                    l.answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::TXT(t) => Some(t.txt_data.iter()),
                            _ => None,
                        })
                        .flatten()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            (host, ips, txt)
        });
    }
    let mut hosts = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((host, ips, txt)) = joined {
            hosts.insert(host, (ips, txt));
        }
    }

    let mut candidates = Vec::new();
    let mut problems = Vec::new();
    for (host, port, priority, weight) in targets {
        match hosts.get(&host) {
            Some((Ok(ips), txt)) if !ips.is_empty() => {
                // One address per host: IPv4 first, as most client
                // networks reach it.
                let ip = ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .copied()
                    .unwrap_or(ips[0]);
                let mut c = Candidate::new(host, SocketAddr::new(ip, port));
                c.priority = priority;
                c.weight = weight;
                for entry in txt {
                    c.apply_txt(entry);
                }
                candidates.push(c);
            }
            Some((Ok(_), _)) => problems.push(format!("{host}: no address")),
            Some((Err(e), _)) => problems.push(format!("{host}: {e}")),
            None => problems.push(format!("{host}: lookup failed")),
        }
    }
    for p in &problems {
        tracing::warn!("relay host skipped: {p}");
    }
    if candidates.is_empty() {
        return Err(DiscoveryError::NoRelays {
            name,
            message: problems.join("; "),
        });
    }
    Ok(candidates)
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    relays: Vec<Candidate>,
}

/// Writes the list atomically (temp file, then rename), so a crash never
/// leaves half a cache.
fn save_cache(path: &Path, candidates: &[Candidate]) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(&CacheFile {
        version: 1,
        relays: candidates.to_vec(),
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn load_cache(path: &Path) -> Result<Vec<Candidate>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: CacheFile =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.version != 1 {
        return Err(format!(
            "{}: unknown cache version {}",
            path.display(),
            file.version
        ));
    }
    Ok(file.relays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_entries_fill_region_location_and_country() {
        let mut c = Candidate::new("relay-1.edge.test", "127.0.0.1:1".parse().unwrap());
        for e in [
            "region=sin",
            "loc=1.35, 103.82",
            "country=sg",
            "owner=ops",
            "junk",
        ] {
            c.apply_txt(e);
        }
        assert_eq!(c.region.as_deref(), Some("sin"));
        assert_eq!(c.location, Some((1.35, 103.82)));
        assert_eq!(c.country.as_deref(), Some("SG"));
        // Out-of-range or malformed coordinates are ignored, not trusted.
        for bad in ["loc=91,0", "loc=0,181", "loc=1.3", "loc=a,b"] {
            let mut c = Candidate::new("x", "127.0.0.1:1".parse().unwrap());
            c.apply_txt(bad);
            assert_eq!(c.location, None, "{bad}");
        }
    }

    #[test]
    fn candidates_parse_from_the_command_line_form() {
        let c = Candidate::parse("relay-1.edge.test@127.0.0.1:4433").unwrap();
        assert_eq!(c.name, "relay-1.edge.test");
        assert_eq!(c.addr.port(), 4433);
        assert_eq!(Candidate::parse("127.0.0.1:9").unwrap().name, "localhost");
        assert!(Candidate::parse("x@nowhere").is_err());
        assert!(Candidate::parse("@127.0.0.1:9").is_err());
    }

    #[test]
    fn cache_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/relays.json");
        let mut c = Candidate::new("relay-1.edge.test", "127.0.0.1:4433".parse().unwrap());
        c.region = Some("sin".into());
        c.location = Some((1.35, 103.82));
        save_cache(&path, std::slice::from_ref(&c)).unwrap();
        assert_eq!(load_cache(&path).unwrap(), vec![c]);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load_cache(&path).unwrap_err().contains("relays.json"));
    }

    #[tokio::test]
    async fn dns_failure_without_cache_is_a_clear_error() {
        // Nothing listens on the discard port of loopback: queries time out.
        let mut config = DnsConfig::new("edge.test");
        config.nameservers = vec!["127.0.0.1:9".parse().unwrap()];
        config.timeout = Duration::from_millis(200);
        config.attempts = 1;
        let e = discover(&RelaySource::Dns(config)).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("_relay._udp.edge.test."), "{text}");
        assert!(text.contains("no cache file configured"), "{text}");
    }
}
