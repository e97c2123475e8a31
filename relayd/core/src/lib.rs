//! Sans-I/O core of the relay daemon.
//!
//! Everything a relay decides, with no sockets, tasks or clock: the driver
//! (`relayd`) feeds [`Relay`] connection events, frames, datagrams and the
//! current time, executes the [`Action`]s it returns and wakes it at
//! [`Relay::poll_timeout`]. The simulator drives the same type in virtual
//! time, and `tests/` drives several in memory.
//!
//! - [`wire`]: the client and relay-to-relay protocols (`docs/protocol.md`).
//! - [`token`]: signed client tokens.
//! - [`links`]: probing and link health per peer, fast-reroute verdicts.
//! - [`forwarding`]: route table, backups, delivery trees.
//! - [`channels`]: local members and other relays' interest.
//! - [`dedup`]: duplicate suppression.
//! - [`relay`]: the state machine tying them together.
//! - [`arena`]: outgoing datagrams without an allocation each.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod arena;
pub mod channels;
pub mod dedup;
pub mod forwarding;
pub mod ids;
pub mod links;
pub mod relay;
pub mod stats;
pub mod token;
pub mod wire;

pub use ids::{ChannelId, ClientId, RelayId, SourceId};
pub use relay::{Action, Relay, RelayConfig};
pub use stats::{AuthFailure, DropReason, Stats};
