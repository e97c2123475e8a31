//! The control plane's API (ALPN `edge-cp/1`), used by relays and by
//! `relayctl`. Frames are a `u32` length and a JSON document; both sides
//! authenticate with certificates under the cluster CA. A relay's
//! certificate (`relay-<id>`) gives it a relay session; an operator's
//! (`operator-<name>`) or a node's (`cp-<id>`) the operator requests.

use serde::{Deserialize, Serialize};
use topology::{RelayId, RouteEntry, RouteTable};

use crate::engine::LinkReport;
use crate::node::NodeStatus;
use crate::state::{Admin, Policy, RelayInfo, Secret};

/// ALPN of the API.
pub const API_ALPN: &[u8] = b"edge-cp/1";
/// ALPN between control-plane nodes (Raft messages).
pub const RAFT_ALPN: &[u8] = b"edge-cp-raft/1";
/// Largest API frame.
pub const MAX_API_FRAME: usize = 64 * 1024 * 1024;
/// Largest Raft message (snapshots included).
pub const MAX_RAFT_FRAME: usize = 256 * 1024 * 1024;

/// What a relay sends on its session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RelayToCp {
    /// First message: what the relay is (its id comes from its certificate).
    Hello {
        /// Registration data.
        info: RelayInfo,
        /// Epoch of the route table it holds (it only wants newer).
        route_epoch: u64,
    },
    /// Link measurements and load; also the heartbeat.
    Report {
        /// Outgoing links.
        links: Vec<LinkReport>,
        /// Connected clients.
        clients: u32,
    },
}

/// What the control plane pushes to a relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum CpToRelay {
    /// The relay's route table for a new epoch.
    Routes {
        /// The table (its epoch inside).
        table: RouteTable,
    },
    /// The apps and their secrets (full set).
    Apps {
        /// `(app id, hex secret)`.
        apps: Vec<(String, Secret)>,
    },
    /// Other relays and where to reach them (full set).
    Peers {
        /// `(relay, address)`.
        peers: Vec<(RelayId, String)>,
    },
    /// The relay's admin state: draining relays tell their clients to move.
    Admin {
        /// Draining or not.
        draining: bool,
    },
    /// The node is not serving (no state yet); try another.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Linearizable: confirmed with the leader (ReadIndex) before answering.
    #[default]
    Linearizable,
    /// This node's applied state, which may lag the leader.
    Stale,
}

/// An operator request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Request {
    /// This node's Raft status.
    Status,
    /// Registered relays.
    Relays {
        /// Read consistency.
        consistency: Consistency,
    },
    /// Replicated link metrics.
    Links {
        /// Read consistency.
        consistency: Consistency,
    },
    /// Everything the network map shows: relays, links and the primary
    /// paths in force.
    Map {
        /// Read consistency.
        consistency: Consistency,
    },
    /// The routes of one pair.
    Route {
        /// Source relay.
        from: RelayId,
        /// Destination relay.
        to: RelayId,
    },
    /// Drain or undrain a relay.
    SetAdmin {
        /// The relay.
        relay: RelayId,
        /// New state.
        admin: Admin,
    },
    /// Removes a relay.
    RemoveRelay {
        /// The relay.
        relay: RelayId,
    },
    /// Adds a control-plane member.
    AddMember {
        /// Its Raft id.
        id: u64,
        /// Its address.
        addr: String,
    },
    /// Removes a control-plane member.
    RemoveMember {
        /// Its Raft id.
        id: u64,
    },
    /// Adds or replaces an app.
    PutApp {
        /// App id.
        id: String,
        /// Hex secret.
        secret: Secret,
    },
    /// Removes an app.
    DeleteApp {
        /// App id.
        id: String,
    },
    /// App ids (never secrets).
    Apps,
    /// Replaces the policy.
    SetPolicy {
        /// The policy.
        policy: Policy,
    },
    /// The policy.
    GetPolicy,
    /// Writes a test key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Reads a test key.
    Get {
        /// Key.
        key: String,
        /// Read consistency.
        consistency: Consistency,
    },
}

/// A relay as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayView {
    /// Id.
    pub id: RelayId,
    /// Name.
    pub name: String,
    /// Region.
    pub region: String,
    /// Address.
    pub addr: String,
    /// Admin state.
    pub admin: Admin,
    /// Alive per lease.
    pub alive: bool,
    /// Clients at last report (soft state of the leader; 0 elsewhere).
    pub clients: u32,
    /// Coordinates.
    pub location: Option<(f64, f64)>,
}

/// A link as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    /// From.
    pub from: RelayId,
    /// To.
    pub to: RelayId,
    /// RTT, ms.
    pub rtt_ms: f64,
    /// Jitter, ms.
    pub jitter_ms: f64,
    /// Loss fraction.
    pub loss: f64,
    /// Fails the quality bar.
    pub poor: bool,
}

/// What the network map shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapView {
    /// Route epoch.
    pub epoch: u64,
    /// Relays.
    pub relays: Vec<RelayView>,
    /// Links.
    pub links: Vec<LinkView>,
    /// Primary paths in force, one per pair.
    pub primaries: Vec<Vec<RelayId>>,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's Raft status.
    pub node: NodeStatus,
    /// Members and their addresses.
    pub members: Vec<(u64, String)>,
    /// Last route epoch.
    pub route_epoch: u64,
    /// Registered relays.
    pub relays: usize,
    /// Commands rejected by the state machine.
    pub rejected: u64,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Response {
    /// Done.
    Ok,
    /// Failed.
    Error {
        /// Why.
        message: String,
    },
    /// Status.
    Status(ClusterStatus),
    /// Relays.
    Relays {
        /// The relays.
        relays: Vec<RelayView>,
    },
    /// Links.
    Links {
        /// The links.
        links: Vec<LinkView>,
        /// Epoch they belong to.
        epoch: u64,
    },
    /// The network map's data.
    Map(MapView),
    /// A pair's routes.
    Route {
        /// Epoch.
        epoch: u64,
        /// The entry, if the pair has routes.
        entry: Option<RouteEntry>,
    },
    /// App ids.
    Apps {
        /// Ids.
        apps: Vec<String>,
    },
    /// The policy.
    Policy {
        /// It.
        policy: Policy,
    },
    /// A test value.
    Value {
        /// It, if set.
        value: Option<String>,
    },
}

/// Encodes a frame: length prefix and JSON.
pub fn encode_frame<T: Serialize>(msg: &T) -> bytes::Bytes {
    let json = serde_json::to_vec(msg).expect("API messages serialise");
    let mut b = Vec::with_capacity(4 + json.len());
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(&json);
    b.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_length_prefixed_json() {
        let f = encode_frame(&Request::Get {
            key: "k".into(),
            consistency: Consistency::Stale,
        });
        let len = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 4);
        let back: Request = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(
            back,
            Request::Get {
                key: "k".into(),
                consistency: Consistency::Stale
            }
        );
        // Secrets serialise (they must reach relays) but never print.
        let apps = CpToRelay::Apps {
            apps: vec![("a".into(), Secret("00ff".into()))],
        };
        assert!(serde_json::to_string(&apps).unwrap().contains("00ff"));
        assert!(!format!("{apps:?}").contains("00ff"));
    }
}
