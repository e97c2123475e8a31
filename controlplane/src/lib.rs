//! The control plane: a Raft cluster (raft-rs `RawNode` on sled) holding
//! membership, policy, app credentials and route decisions, and the
//! `relayctl` operator CLI.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod node;
pub mod ready;
pub mod state;
pub mod storage;
