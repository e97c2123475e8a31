//! Networking shared by relays, the control plane and the SDK.
//!
//! - [`tls`]: node identities under a cluster CA (mutual TLS between
//!   nodes), name checks, QUIC client and server configs.
//! - [`pki`]: a development CA and node certificates.
//! - [`quic`]: transport settings, and why media connections use a fixed
//!   congestion window.
//! - [`framing`]: length-prefixed frames on QUIC streams.

pub mod config;
pub mod framing;
pub mod pki;
pub mod quic;
pub mod tls;
