//! Client SDK for the edge relay network: find the nearest good relay,
//! connect over QUIC, and stay connected when it fails.
//!
//! - [`discovery`]: relays from DNS (SRV, TXT, A/AAAA) with a cached
//!   fallback, or a fixed list.
//! - [`geoip`]: the client's place from its public address (MaxMind DB).
//! - [`select`]: ordering by distance, choice by measured RTT, loss and
//!   jitter, and the decisions to leave a relay (pure logic).
//! - [`probe`]: probing candidates over QUIC.
//! - [`client`]: [`Client`], the API applications use: join, publish,
//!   receive, messages, events, failover.
//! - [`session`]: one connection to one relay (the building block).
//!
//! # Quick start
//! ```no_run
//! # async fn run(token: String) -> anyhow::Result<()> {
//! use relay_sdk::{Client, ClientConfig, DnsConfig, RelaySource, load_roots};
//!
//! let roots = load_roots(std::path::Path::new("pki/ca.pem"))?;
//! let mut dns = DnsConfig::new("edge.example.com");
//! dns.cache = Some("relays.json".into()); // used when DNS is down
//! let config = ClientConfig::new(RelaySource::Dns(dns), roots);
//! let (client, mut media, mut events) = Client::connect(config).await?;
//!
//! let live = client.join("shop-42/live", &token).await?;
//! client.publish(live.channel, b"an encoded frame")?;
//! tokio::spawn(async move {
//!     while let Some(event) = events.recv().await {
//!         println!("{event:?}"); // relay changes, quality, messages
//!     }
//! });
//! while let Some(m) = media.recv().await {
//!     println!("{} bytes from {}", m.payload.len(), m.source);
//! }
//! # Ok(())
//! # }
//! ```
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod client;
pub mod discovery;
pub mod geoip;
pub mod probe;
pub mod select;
pub mod session;

pub use client::{
    Client, ClientConfig, ClientError, ClientStats, Event, EventStream, MediaStream, Quality,
    RelayInfo, probe,
};
pub use discovery::{Candidate, DiscoveryError, DnsConfig, Origin, RelaySource};
pub use geoip::{GeoIp, Place};
pub use probe::{ProbeConfig, ProbeReport, ProbeRound};
pub use select::{Measured, MonitorConfig};
pub use session::{Joined, Media, MediaSender, Session, SessionError, Welcome};

use std::path::Path;
use std::sync::Arc;

/// A CA file that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CA certificates {0}")]
pub struct RootsError(String);

/// Loads CA certificates (PEM) that sign relay certificates.
pub fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, RootsError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let err = |e: &dyn std::fmt::Display| RootsError(format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| err(&e))?;
    for c in certs {
        roots.add(c.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    if roots.is_empty() {
        return Err(err(&"no certificates"));
    }
    Ok(Arc::new(roots))
}
