//! The relay daemon: configuration, the QUIC driver of the relay core, and
//! metrics. The binary (`relayd`) parses the command line, loads the
//! config, starts a [`server::RelayHandle`] and drains it on SIGTERM.

pub mod config;
pub mod cp_client;
pub mod metrics;
pub mod server;
