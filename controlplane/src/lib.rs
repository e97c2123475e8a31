//! The control plane: a Raft cluster (raft-rs `RawNode` on sled) holding
//! membership, policy, app credentials and route decisions, and the
//! `relayctl` operator CLI.
#![cfg_attr(test, allow(clippy::disallowed_methods))]
// raft-rs messages are protobuf structs filled field by field.
#![allow(clippy::field_reassign_with_default)]

pub mod api;
pub mod client;
pub mod config;
pub mod engine;
pub mod http;
pub mod map;
pub mod node;
pub mod ready;
pub mod server;
pub mod state;
pub mod storage;
pub mod transport;
