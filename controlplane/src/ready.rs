//! The Ready loop, in one place, in the order raft-rs documents
//! ("Processing the Ready State" in raft-rs `src/lib.rs`):
//!
//! 1. send `messages()` (a leader may send before it persists);
//! 2. apply the snapshot, if any;
//! 3. apply committed entries (conf changes go through
//!    `RawNode::apply_conf_change`);
//! 4. append new entries to the log;
//! 5. persist the HardState, fsyncing when `must_sync()`;
//! 6. only then send `persisted_messages()`;
//! 7. `advance()`, and from the `LightReady`: update the commit index,
//!    send its messages, apply its committed entries;
//! 8. `advance_apply()`.
//!
//! The outside world is a [`ReadyHandler`]; a test drives the loop with a
//! recording handler and checks this order.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot,
};
use raft::{RawNode, ReadState, Storage};
use raft_proto::ConfChangeI as _;

use crate::storage::StoreError;

/// What the Ready loop needs from the node around it.
pub trait ReadyHandler {
    /// Sends messages to peers (steps 1, 6 and 7).
    fn send(&mut self, msgs: Vec<Message>);
    /// Installs a snapshot in storage and the state machine (step 2).
    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError>;
    /// Applies a normal committed entry (steps 3 and 7).
    fn apply_entry(&mut self, entry: &Entry);
    /// A committed conf change took effect with this configuration.
    fn conf_changed(
        &mut self,
        entry: &Entry,
        change: &ConfChangeV2,
        cs: &ConfState,
    ) -> Result<(), StoreError>;
    /// Read-index answers (linearizable reads may proceed once applied).
    fn read_states(&mut self, states: Vec<ReadState>);
    /// Appends entries to the log (step 4).
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    /// Persists the hard state (step 5).
    fn persist_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError>;
    /// fsync, when raft requires it before acknowledging (step 5).
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Records a new commit index from the `LightReady` (step 7).
    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError>;
}

/// Errors of the Ready loop: storage failures are fatal for the node.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// raft-rs refused a conf change entry.
    #[error("conf change: {0}")]
    Raft(#[from] raft::Error),
    /// A conf change entry does not decode.
    #[error("bad conf change entry: {0}")]
    Decode(#[from] protobuf::ProtobufError),
}

fn apply_committed<S: Storage>(
    rn: &mut RawNode<S>,
    entries: Vec<Entry>,
    h: &mut impl ReadyHandler,
) -> Result<(), ReadyError> {
    for entry in entries {
        match entry.get_entry_type() {
            EntryType::EntryNormal => h.apply_entry(&entry),
            EntryType::EntryConfChange => {
                let cc = ConfChange::parse_from_bytes(&entry.data)?;
                let v2 = cc.clone().into_v2();
                let cs = rn.apply_conf_change(&cc)?;
                h.conf_changed(&entry, &v2, &cs)?;
            }
            EntryType::EntryConfChangeV2 => {
                let cc = ConfChangeV2::parse_from_bytes(&entry.data)?;
                let cs = rn.apply_conf_change(&cc)?;
                h.conf_changed(&entry, &cc, &cs)?;
            }
        }
    }
    Ok(())
}

/// Processes one Ready if there is one. Returns whether there was.
pub fn process_ready<S: Storage>(
    rn: &mut RawNode<S>,
    h: &mut impl ReadyHandler,
) -> Result<bool, ReadyError> {
    if !rn.has_ready() {
        return Ok(false);
    }
    let mut ready = rn.ready();
    // 1. Messages that need no persistence first.
    if !ready.messages().is_empty() {
        h.send(ready.take_messages());
    }
    // 2. Snapshot.
    if !ready.snapshot().is_empty() {
        h.apply_snapshot(ready.snapshot())?;
    }
    // 3. Committed entries (and read states, served once applied).
    apply_committed(rn, ready.take_committed_entries(), h)?;
    if !ready.read_states().is_empty() {
        h.read_states(ready.take_read_states());
    }
    // 4. New entries.
    if !ready.entries().is_empty() {
        h.append(ready.entries())?;
    }
    // 5. Hard state, durably when required.
    if let Some(hs) = ready.hs() {
        h.persist_hard_state(hs)?;
    }
    if ready.must_sync() {
        h.sync()?;
    }
    // 6. Messages that must follow persistence.
    if !ready.persisted_messages().is_empty() {
        h.send(ready.take_persisted_messages());
    }
    // 7. Advance and handle the LightReady.
    let mut light = rn.advance(ready);
    if let Some(commit) = light.commit_index() {
        h.set_commit(commit)?;
    }
    if !light.messages().is_empty() {
        h.send(light.take_messages());
    }
    apply_committed(rn, light.take_committed_entries(), h)?;
    // 8. Done applying.
    rn.advance_apply();
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SledStorage;

    /// Records the order of calls and performs the storage effects.
    struct Recorder {
        store: SledStorage,
        calls: Vec<String>,
    }

    impl ReadyHandler for Recorder {
        fn send(&mut self, msgs: Vec<Message>) {
            let persisted = msgs
                .iter()
                .any(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgAppendResponse);
            self.calls.push(
                if persisted {
                    "send-after-persist"
                } else {
                    "send"
                }
                .into(),
            );
        }
        fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
            self.calls.push("snapshot".into());
            self.store.apply_snapshot(snap)
        }
        fn apply_entry(&mut self, _entry: &Entry) {
            self.calls.push("apply".into());
        }
        fn conf_changed(
            &mut self,
            _e: &Entry,
            _c: &ConfChangeV2,
            cs: &ConfState,
        ) -> Result<(), StoreError> {
            self.calls.push("conf".into());
            self.store.set_conf_state(cs)
        }
        fn read_states(&mut self, _states: Vec<ReadState>) {
            self.calls.push("read".into());
        }
        fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
            self.calls.push("append".into());
            self.store.append(entries)
        }
        fn persist_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
            self.calls.push("hardstate".into());
            self.store.set_hard_state(hs)
        }
        fn sync(&mut self) -> Result<(), StoreError> {
            self.calls.push("sync".into());
            self.store.sync()
        }
        fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
            self.calls.push("commit".into());
            self.store.set_commit(commit)
        }
    }

    fn position(calls: &[String], name: &str) -> Option<usize> {
        calls.iter().position(|c| c == name)
    }

    #[test]
    fn single_node_ready_follows_the_documented_order() {
        let store = SledStorage::temporary().unwrap();
        store.bootstrap(&[1]).unwrap();
        let mut cfg = raft::Config::new(1);
        cfg.election_tick = 10;
        cfg.heartbeat_tick = 1;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut rn = RawNode::new(&cfg, store.clone(), &logger).unwrap();
        let mut h = Recorder {
            store: store.clone(),
            calls: Vec::new(),
        };
        rn.campaign().unwrap();
        while process_ready(&mut rn, &mut h).unwrap() {}
        h.calls.clear();
        rn.propose(vec![], b"hello".to_vec()).unwrap();
        while process_ready(&mut rn, &mut h).unwrap() {}
        let c = &h.calls;
        // The entry is appended and the hard state synced before it applies
        // (single node: it commits on persistence, applied from the LightReady
        // or the next Ready).
        let append = position(c, "append").expect("append");
        let sync = position(c, "sync").expect("sync");
        let apply = position(c, "apply").expect("apply");
        assert!(append < sync && sync < apply, "{c:?}");
        assert_eq!(store.last(), 2, "election no-op and the proposal");
    }

    #[test]
    fn three_node_leader_sends_before_persisting_and_acks_after() {
        // Node 1 leader with two followers; drive messages by hand.
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut nodes: Vec<(RawNode<SledStorage>, Recorder)> = (1..=3)
            .map(|id| {
                let store = SledStorage::temporary().unwrap();
                store.bootstrap(&[1, 2, 3]).unwrap();
                let mut cfg = raft::Config::new(id);
                cfg.election_tick = 10;
                cfg.heartbeat_tick = 1;
                let rn = RawNode::new(&cfg, store.clone(), &logger).unwrap();
                (
                    rn,
                    Recorder {
                        store,
                        calls: Vec::new(),
                    },
                )
            })
            .collect();
        let mut mailbox: Vec<Message> = Vec::new();
        struct Capture<'a>(&'a mut Recorder, &'a mut Vec<Message>);
        impl ReadyHandler for Capture<'_> {
            fn send(&mut self, msgs: Vec<Message>) {
                self.0.send(msgs.clone());
                self.1.extend(msgs);
            }
            fn apply_snapshot(&mut self, s: &Snapshot) -> Result<(), StoreError> {
                self.0.apply_snapshot(s)
            }
            fn apply_entry(&mut self, e: &Entry) {
                self.0.apply_entry(e)
            }
            fn conf_changed(
                &mut self,
                e: &Entry,
                c: &ConfChangeV2,
                cs: &ConfState,
            ) -> Result<(), StoreError> {
                self.0.conf_changed(e, c, cs)
            }
            fn read_states(&mut self, s: Vec<ReadState>) {
                self.0.read_states(s)
            }
            fn append(&mut self, e: &[Entry]) -> Result<(), StoreError> {
                self.0.append(e)
            }
            fn persist_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
                self.0.persist_hard_state(hs)
            }
            fn sync(&mut self) -> Result<(), StoreError> {
                self.0.sync()
            }
            fn set_commit(&mut self, c: u64) -> Result<(), StoreError> {
                self.0.set_commit(c)
            }
        }
        nodes[0].0.campaign().unwrap();
        for _ in 0..20 {
            for (rn, rec) in nodes.iter_mut() {
                while process_ready(rn, &mut Capture(rec, &mut mailbox)).unwrap() {}
            }
            for m in std::mem::take(&mut mailbox) {
                let to = m.to as usize - 1;
                nodes[to].0.step(m).unwrap();
            }
        }
        assert_eq!(nodes[0].0.raft.state, raft::StateRole::Leader);
        for (_, rec) in nodes.iter_mut() {
            rec.calls.clear();
        }
        nodes[0].0.propose(vec![], b"x".to_vec()).unwrap();
        for _ in 0..10 {
            for (rn, rec) in nodes.iter_mut() {
                while process_ready(rn, &mut Capture(rec, &mut mailbox)).unwrap() {}
            }
            for m in std::mem::take(&mut mailbox) {
                let to = m.to as usize - 1;
                nodes[to].0.step(m).unwrap();
            }
        }
        // Leader: replicates (send) before its own append and sync.
        let leader = &nodes[0].1.calls;
        let send = position(leader, "send").unwrap();
        let append = position(leader, "append").unwrap();
        assert!(send < append, "{leader:?}");
        // Follower: acknowledges only after appending and syncing.
        let f = &nodes[1].1.calls;
        let append = position(f, "append").unwrap();
        let sync = position(f, "sync").unwrap();
        let ack = position(f, "send-after-persist").unwrap();
        assert!(append < sync && sync < ack, "{f:?}");
        // Everyone applied it.
        for (_, rec) in &nodes {
            assert!(rec.calls.contains(&"apply".to_string()), "{:?}", rec.calls);
        }
    }
}
