//! One control-plane node's Raft state machine, sans I/O: ticks, messages
//! and proposals in; messages, completions, read grants and notices out.
//! The driver (`crate::server`) owns one and feeds it from the network and
//! a timer; the in-memory harness in the tests feeds several.

use std::collections::{HashMap, VecDeque};

use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, ConfChangeV2, ConfState, Entry, HardState, Message, Snapshot};
use raft::{RawNode, ReadState, StateRole, Storage};
use serde::{Deserialize, Serialize};

use crate::ready::{ReadyError, ReadyHandler, process_ready};
use crate::state::{ClusterState, Command, Effect};
use crate::storage::{SledStorage, StoreError};

/// Raft tuning of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's Raft id (> 0).
    pub id: u64,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before an election.
    pub election_ticks: usize,
    /// Elections start after `election_ticks` plus a random number of
    /// ticks below this (so nodes rarely start at the same time).
    pub election_jitter_ticks: usize,
    /// Entries applied between snapshots (log compaction).
    pub snapshot_every: u64,
    /// Entries kept before a snapshot for slow followers.
    pub keep_tail: u64,
}

impl NodeConfig {
    /// Defaults for node `id`, in ticks: with a 100 ms tick, heartbeats
    /// every 100 ms and elections after 1 s (etcd's defaults). The server
    /// uses a 10 ms tick and scales these from its config.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            heartbeat_ticks: 1,
            election_ticks: 10,
            election_jitter_ticks: 10,
            snapshot_every: 5000,
            keep_tail: 500,
        }
    }
}

/// Caller's handle for a proposal or read.
pub type Token = u64;

/// Why a proposal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    /// No leader is known (election in progress, or partitioned).
    #[error("no leader: try again")]
    NoLeader,
    /// Leadership changed before the outcome was known; the write may or
    /// may not have been applied.
    #[error("leadership changed: outcome unknown, retry")]
    LeadershipChanged,
    /// The command was applied and rejected by the state machine.
    #[error("rejected: {0}")]
    Rejected(String),
    /// raft-rs refused the proposal.
    #[error("raft: {0}")]
    Raft(String),
}

/// Something that happened while applying, for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A route epoch was applied.
    RouteEpoch(u64),
    /// Routing inputs other than links changed (relays, policy).
    RoutingInputsChanged,
    /// Apps changed.
    AppsChanged,
    /// The configuration changed.
    Membership,
    /// The whole state was replaced by a snapshot.
    Restored,
    /// This node's view of the leader changed.
    Leader {
        /// New leader (0: none known).
        leader: u64,
        /// Its term.
        term: u64,
    },
}

/// A node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub id: u64,
    /// Leader, follower, candidate, pre-candidate.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Known leader (0: none).
    pub leader: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// First stored log index (earlier ones are in the snapshot).
    pub first_index: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
}

/// A control-plane node.
pub struct RaftNode {
    config: NodeConfig,
    raw: RawNode<SledStorage>,
    store: SledStorage,
    state: ClusterState,
    applied: u64,
    last_snapshot: u64,
    next_proposal: u64,
    pending: HashMap<Vec<u8>, Token>,
    reads_pending: HashMap<Vec<u8>, Token>,
    reads_waiting: VecDeque<(u64, Token)>,
    messages: Vec<Message>,
    completions: Vec<(Token, Result<(), ProposeError>)>,
    reads_ready: Vec<Token>,
    notices: Vec<Notice>,
    leader: u64,
    term: u64,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn logger() -> slog::Logger {
    use slog::Drain as _;
    slog::Logger::root(slog_stdlog::StdLog.fuse(), slog::o!())
}

/// Errors opening a node.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// raft-rs refused the configuration or state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The stored snapshot does not decode.
    #[error("snapshot state: {0}")]
    Snapshot(#[from] serde_json::Error),
}

impl RaftNode {
    /// Opens a node on `store`. A new store must have been bootstrapped
    /// (initial members) or be joining (empty; it learns everything from
    /// the leader once added).
    pub fn open(config: NodeConfig, store: SledStorage) -> Result<Self, OpenError> {
        let (state, applied) = match store.snapshot_data()? {
            Some((meta, data)) => (serde_json::from_slice(&data)?, meta.index),
            None => (ClusterState::default(), 0),
        };
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config.election_ticks + config.election_jitter_ticks.max(1),
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let raw = RawNode::new(&raft_config, store.clone(), &logger())?;
        Ok(Self {
            config,
            raw,
            store,
            state,
            applied,
            last_snapshot: applied,
            next_proposal: 0,
            pending: HashMap::new(),
            reads_pending: HashMap::new(),
            reads_waiting: VecDeque::new(),
            messages: Vec::new(),
            completions: Vec::new(),
            reads_ready: Vec::new(),
            notices: Vec::new(),
            leader: 0,
            term: 0,
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The applied state.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// True while this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this node knows (0: none).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// Status for operators.
    pub fn status(&self) -> NodeStatus {
        let cs = self.store.conf_state();
        NodeStatus {
            id: self.config.id,
            role: format!("{:?}", self.raw.raft.state).to_lowercase(),
            term: self.raw.raft.term,
            leader: self.raw.raft.leader_id,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            first_index: self.store.first(),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        }
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from a peer (already authenticated by the transport).
    pub fn step(&mut self, msg: Message) -> Result<(), raft::Error> {
        self.raw.step(msg)
    }

    fn proposal_id(&mut self) -> Vec<u8> {
        self.next_proposal += 1;
        let mut ctx = self.config.id.to_be_bytes().to_vec();
        ctx.extend_from_slice(&self.next_proposal.to_be_bytes());
        ctx
    }

    /// Proposes a command; its outcome comes back as a completion for
    /// `token`. Proposals on a follower are forwarded to the leader.
    pub fn propose(&mut self, cmd: &Command, token: Token) -> Result<(), ProposeError> {
        let data = serde_json::to_vec(cmd).map_err(|e| ProposeError::Raft(e.to_string()))?;
        let ctx = self.proposal_id();
        match self.raw.propose(ctx.clone(), data) {
            Ok(()) => {
                self.pending.insert(ctx, token);
                Ok(())
            }
            Err(raft::Error::ProposalDropped) => Err(ProposeError::NoLeader),
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// Proposes adding (with its address) or removing a member.
    pub fn propose_membership(
        &mut self,
        node: u64,
        addr: Option<String>,
        token: Token,
    ) -> Result<(), ProposeError> {
        let mut cc = ConfChangeV2::default();
        let mut single = raft::eraftpb::ConfChangeSingle::default();
        single.node_id = node;
        single.set_change_type(if addr.is_some() {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        cc.mut_changes().push(single);
        cc.context = serde_json::to_vec(&addr).expect("serialisable").into();
        let ctx = self.proposal_id();
        match self.raw.propose_conf_change(ctx.clone(), cc) {
            Ok(()) => {
                self.pending.insert(ctx, token);
                Ok(())
            }
            Err(raft::Error::ProposalDropped) => Err(ProposeError::NoLeader),
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// Asks for a linearizable read: `token` comes back from
    /// [`RaftNode::take_reads`] once this node has applied everything the
    /// leader had committed when the read was confirmed (ReadIndex).
    pub fn read_index(&mut self, token: Token) {
        let ctx = self.proposal_id();
        self.reads_pending.insert(ctx.clone(), token);
        self.raw.read_index(ctx);
    }

    /// Processes everything ready: persists, applies, collects outputs.
    pub fn process(&mut self) -> Result<(), ReadyError> {
        loop {
            let mut handler = Apply {
                store: &self.store,
                state: &mut self.state,
                applied: &mut self.applied,
                pending: &mut self.pending,
                reads_pending: &mut self.reads_pending,
                reads_waiting: &mut self.reads_waiting,
                messages: &mut self.messages,
                completions: &mut self.completions,
                notices: &mut self.notices,
            };
            if !process_ready(&mut self.raw, &mut handler)? {
                break;
            }
        }
        while let Some(&(index, token)) = self.reads_waiting.front() {
            if index > self.applied {
                break;
            }
            self.reads_waiting.pop_front();
            self.reads_ready.push(token);
        }
        let (leader, term) = (self.raw.raft.leader_id, self.raw.raft.term);
        if (leader, term) != (self.leader, self.term) {
            // A new leader or term: proposals in flight may be lost (the
            // old leader died with them) or may still commit. Tell the
            // callers the outcome is unknown rather than leave them
            // waiting; they retry.
            for (_, token) in self.pending.drain() {
                self.completions
                    .push((token, Err(ProposeError::LeadershipChanged)));
            }
            for (_, token) in self.reads_pending.drain() {
                self.completions
                    .push((token, Err(ProposeError::LeadershipChanged)));
            }
            self.leader = leader;
            self.term = term;
            self.notices.push(Notice::Leader { leader, term });
        }
        // A member added after the stored snapshot would refuse it (it is
        // not in its configuration), so snapshot again after conf changes.
        let conf_changed = self.notices.contains(&Notice::Membership);
        if self.applied > self.last_snapshot
            && (conf_changed || self.applied >= self.last_snapshot + self.config.snapshot_every)
        {
            let data = serde_json::to_vec(&self.state).expect("state serialises");
            self.store
                .snapshot_and_compact(self.applied, data, self.config.keep_tail)?;
            self.last_snapshot = self.applied;
        }
        Ok(())
    }

    /// Messages to send to peers.
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.messages)
    }

    /// Outcomes of proposals (and failed reads).
    pub fn take_completions(&mut self) -> Vec<(Token, Result<(), ProposeError>)> {
        std::mem::take(&mut self.completions)
    }

    /// Linearizable reads that may now be served from [`RaftNode::state`].
    pub fn take_reads(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.reads_ready)
    }

    /// What happened while applying (take them after every
    /// [`RaftNode::process`]).
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Tells raft a peer could not be reached (stop sending eagerly).
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Hands leadership to another voter.
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }
}

/// The Ready loop's view of the node.
struct Apply<'a> {
    store: &'a SledStorage,
    state: &'a mut ClusterState,
    applied: &'a mut u64,
    pending: &'a mut HashMap<Vec<u8>, Token>,
    reads_pending: &'a mut HashMap<Vec<u8>, Token>,
    reads_waiting: &'a mut VecDeque<(u64, Token)>,
    messages: &'a mut Vec<Message>,
    completions: &'a mut Vec<(Token, Result<(), ProposeError>)>,
    notices: &'a mut Vec<Notice>,
}

impl Apply<'_> {
    fn notice_effect(&mut self, e: &Effect) {
        if e.new_epoch {
            self.notices.push(Notice::RouteEpoch(self.state.epoch));
        }
        if e.routing_inputs_changed {
            self.notices.push(Notice::RoutingInputsChanged);
        }
        if e.apps_changed {
            self.notices.push(Notice::AppsChanged);
        }
    }
}

impl ReadyHandler for Apply<'_> {
    fn send(&mut self, msgs: Vec<Message>) {
        self.messages.extend(msgs);
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        let state: ClusterState =
            serde_json::from_slice(&snap.data).map_err(|e| StoreError::Corrupt {
                what: "snapshot state",
                message: e.to_string(),
            })?;
        self.store.apply_snapshot(snap)?;
        *self.state = state;
        *self.applied = snap.get_metadata().index;
        self.notices.push(Notice::Restored);
        Ok(())
    }

    fn apply_entry(&mut self, entry: &Entry) {
        *self.applied = entry.index;
        if entry.data.is_empty() {
            return; // a new leader's empty entry
        }
        let outcome = match serde_json::from_slice::<Command>(&entry.data) {
            Ok(cmd) => match self.state.apply(&cmd) {
                Ok(effect) => {
                    self.notice_effect(&effect);
                    Ok(())
                }
                Err(why) => Err(ProposeError::Rejected(why)),
            },
            Err(e) => {
                // Only our own leaders write the log, so this is a bug or
                // corruption; every node rejects it the same way.
                self.state.rejected += 1;
                Err(ProposeError::Rejected(format!("undecodable entry: {e}")))
            }
        };
        if let Some(token) = self.pending.remove(&entry.context[..]) {
            self.completions.push((token, outcome));
        }
    }

    fn conf_changed(
        &mut self,
        entry: &Entry,
        change: &ConfChangeV2,
        cs: &ConfState,
    ) -> Result<(), StoreError> {
        *self.applied = entry.index;
        self.store.set_conf_state(cs)?;
        let addr: Option<String> = serde_json::from_slice(&change.context).unwrap_or(None);
        for c in change.get_changes() {
            match c.get_change_type() {
                ConfChangeType::RemoveNode => {
                    self.state.members.remove(&c.node_id);
                }
                _ => {
                    if let Some(a) = &addr {
                        self.state.members.insert(c.node_id, a.clone());
                    }
                }
            }
        }
        self.notices.push(Notice::Membership);
        if let Some(token) = self.pending.remove(&entry.context[..]) {
            self.completions.push((token, Ok(())));
        }
        Ok(())
    }

    fn read_states(&mut self, states: Vec<ReadState>) {
        for rs in states {
            if let Some(token) = self.reads_pending.remove(&rs.request_ctx[..]) {
                self.reads_waiting.push_back((rs.index, token));
            }
        }
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.store.append(entries)
    }

    fn persist_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.store.set_hard_state(hs)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.store.sync()
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        self.store.set_commit(commit)
    }
}

/// Encodes a Raft message for the wire.
pub fn encode_message(m: &Message) -> Vec<u8> {
    m.write_to_bytes().expect("raft messages encode")
}

/// Decodes a Raft message from an authenticated peer.
pub fn decode_message(bytes: &[u8]) -> Result<Message, protobuf::ProtobufError> {
    Message::parse_from_bytes(bytes)
}

/// The stored conf state's voters (for status before the node runs).
pub fn voters(store: &SledStorage) -> Vec<u64> {
    store
        .initial_state()
        .map(|s| s.conf_state.voters)
        .unwrap_or_default()
}
