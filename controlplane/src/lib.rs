//! The control plane: a Raft cluster (raft-rs `RawNode` on sled) holding
//! membership, policy, app credentials and route-table epochs, plus the
//! `relayctl` operator CLI. Filled by the control-plane issue.
