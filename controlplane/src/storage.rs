//! Durable Raft storage on sled: log entries, hard state, conf state, and
//! the latest snapshot of the applied state.
//!
//! raft-rs reads through the [`Storage`] trait; every write goes through
//! the methods here, called from the Ready loop only (`crate::ready`).
//! Layout in one sled tree (so each Ready's writes are one atomic batch):
//!
//! | key | value |
//! | --- | --- |
//! | `e` + index (u64 BE) | `Entry` (protobuf) |
//! | `m:hs` | `HardState` |
//! | `m:cs` | `ConfState` |
//! | `m:snap` | `SnapshotMetadata` of the stored snapshot (the compaction point) |
//! | `m:snapdata` | the snapshot's data (the serialized cluster state) |
//!
//! The applied state itself is the snapshot plus the log after it: on
//! restart raft-rs re-delivers the committed entries after the snapshot.

use std::path::Path;
use std::sync::{Arc, Mutex};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// Stored bytes do not decode.
    #[error("corrupt {what}: {message}")]
    Corrupt {
        /// Which item.
        what: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// A write that raft-rs would never ask for.
    #[error("{0}")]
    Invalid(String),
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

#[derive(Debug, Clone, Default)]
struct Meta {
    hs: HardState,
    cs: ConfState,
    snap: SnapshotMetadata,
    first: u64,
    last: u64,
}

/// Raft storage backed by sled. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct SledStorage {
    db: sled::Db,
    tree: sled::Tree,
    meta: Arc<Mutex<Meta>>,
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.meta.lock().expect("meta lock");
        f.debug_struct("SledStorage")
            .field("first", &m.first)
            .field("last", &m.last)
            .field("snapshot", &m.snap.index)
            .finish()
    }
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn decode<M: protobuf::Message>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        what,
        message: e.to_string(),
    })
}

fn encode<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes()
        .expect("protobuf encoding of a valid message")
}

impl SledStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().path(dir).open()?)
    }

    /// A store that lives in memory only (tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("raft")?;
        let get = |k: &[u8]| tree.get(k);
        let hs = get(b"m:hs")?
            .map(|b| decode("hard state", &b))
            .transpose()?
            .unwrap_or_default();
        let cs = get(b"m:cs")?
            .map(|b| decode("conf state", &b))
            .transpose()?
            .unwrap_or_default();
        let snap: SnapshotMetadata = get(b"m:snap")?
            .map(|b| decode("snapshot metadata", &b))
            .transpose()?
            .unwrap_or_default();
        let first_key = tree.scan_prefix(b"e").next().transpose()?;
        let last_key = tree.scan_prefix(b"e").next_back().transpose()?;
        let index_of =
            |k: &[u8]| u64::from_be_bytes(k[1..9].try_into().expect("9-byte entry keys"));
        let first = first_key.map_or(snap.index + 1, |(k, _)| index_of(&k));
        let last = last_key.map_or(snap.index, |(k, _)| index_of(&k));
        Ok(Self {
            db,
            tree,
            meta: Arc::new(Mutex::new(Meta {
                hs,
                cs,
                snap,
                first,
                last,
            })),
        })
    }

    /// True when nothing was ever stored (a node's first start).
    pub fn is_empty(&self) -> bool {
        let m = self.meta.lock().expect("meta lock");
        m.last == 0 && m.snap.index == 0 && m.cs.voters.is_empty() && m.cs.learners.is_empty()
    }

    /// Sets the initial configuration of a bootstrapping cluster.
    pub fn bootstrap(&self, voters: &[u64]) -> Result<(), StoreError> {
        let mut cs = ConfState::default();
        cs.voters = voters.to_vec();
        self.set_conf_state(&cs)?;
        self.sync()
    }

    /// Appends entries, replacing any conflicting suffix.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first_new) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        let mut m = self.meta.lock().expect("meta lock");
        if first_new < m.first {
            return Err(StoreError::Invalid(format!(
                "append at {first_new} before the first index {}",
                m.first
            )));
        }
        let mut batch = sled::Batch::default();
        for i in first_new..=m.last {
            batch.remove(&entry_key(i));
        }
        for e in entries {
            batch.insert(&entry_key(e.index), encode(e));
        }
        self.tree.apply_batch(batch)?;
        m.last = entries.last().expect("non-empty").index;
        Ok(())
    }

    /// Persists the hard state (call [`SledStorage::sync`] when raft says so).
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        self.tree.insert(b"m:hs", encode(hs))?;
        self.meta.lock().expect("meta lock").hs = hs.clone();
        Ok(())
    }

    /// Updates the commit index of the hard state.
    pub fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.meta.lock().expect("meta lock").hs.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Persists the conf state.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        self.tree.insert(b"m:cs", encode(cs))?;
        self.meta.lock().expect("meta lock").cs = cs.clone();
        Ok(())
    }

    /// The current conf state.
    pub fn conf_state(&self) -> ConfState {
        self.meta.lock().expect("meta lock").cs.clone()
    }

    /// The current hard state.
    pub fn hard_state(&self) -> HardState {
        self.meta.lock().expect("meta lock").hs.clone()
    }

    /// Flushes to disk (fsync).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Installs a snapshot received from the leader: replaces the log.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let mut m = self.meta.lock().expect("meta lock");
        if meta.index <= m.snap.index {
            return Ok(()); // stale
        }
        let mut batch = sled::Batch::default();
        for i in m.first..=m.last {
            batch.remove(&entry_key(i));
        }
        let mut hs = m.hs.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        batch.insert(b"m:hs", encode(&hs));
        batch.insert(b"m:cs", encode(meta.get_conf_state()));
        batch.insert(b"m:snap", encode(meta));
        batch.insert(b"m:snapdata", snap.data.to_vec());
        self.tree.apply_batch(batch)?;
        m.hs = hs;
        m.cs = meta.get_conf_state().clone();
        m.snap = meta.clone();
        m.first = meta.index + 1;
        m.last = meta.index;
        Ok(())
    }

    /// Stores a snapshot of the applied state at `index` and drops log
    /// entries before `index - keep` (a tail kept for slow followers).
    pub fn snapshot_and_compact(
        &self,
        index: u64,
        data: Vec<u8>,
        keep: u64,
    ) -> Result<(), StoreError> {
        let term = Storage::term(self, index).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut m = self.meta.lock().expect("meta lock");
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(m.cs.clone());
        let mut batch = sled::Batch::default();
        batch.insert(b"m:snap", encode(&meta));
        batch.insert(b"m:snapdata", data);
        let compact_to = index.saturating_sub(keep).max(m.first);
        for i in m.first..compact_to {
            batch.remove(&entry_key(i));
        }
        self.tree.apply_batch(batch)?;
        m.snap = meta;
        m.first = compact_to;
        Ok(())
    }

    /// The stored snapshot's data, if any (to restore the state on start).
    pub fn snapshot_data(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StoreError> {
        let meta = self.meta.lock().expect("meta lock").snap.clone();
        if meta.index == 0 {
            return Ok(None);
        }
        let data = self
            .tree
            .get(b"m:snapdata")?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        Ok(Some((meta, data)))
    }

    /// First log index still stored.
    pub fn first(&self) -> u64 {
        self.meta.lock().expect("meta lock").first
    }

    /// Last log index stored.
    pub fn last(&self) -> u64 {
        self.meta.lock().expect("meta lock").last
    }
}

impl Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let m = self.meta.lock().expect("meta lock");
        Ok(RaftState::new(m.hs.clone(), m.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let (first, last) = {
            let m = self.meta.lock().expect("meta lock");
            (m.first, m.last)
        };
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        for kv in self.tree.range(entry_key(low)..entry_key(high)) {
            let (_, v) = kv.map_err(StoreError::from)?;
            out.push(decode::<Entry>("entry", &v)?);
        }
        if out.len() as u64 != high - low {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snap, first, last) = {
            let m = self.meta.lock().expect("meta lock");
            (m.snap.clone(), m.first, m.last)
        };
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let v = self
            .tree
            .get(entry_key(idx))
            .map_err(StoreError::from)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        Ok(decode::<Entry>("entry", &v)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        match self.snapshot_data()? {
            Some((meta, data)) => {
                let mut s = Snapshot::default();
                s.set_metadata(meta);
                s.data = data.into();
                Ok(s)
            }
            None => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = format!("e{index}").into_bytes().into();
        e
    }

    #[test]
    fn append_truncates_conflicts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            assert!(s.is_empty());
            s.bootstrap(&[1, 2, 3]).unwrap();
            s.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
            // A new leader overwrites 4 and 5.
            s.append(&[entry(4, 2)]).unwrap();
            assert_eq!(s.last(), 4);
            let mut hs = HardState::default();
            hs.term = 2;
            hs.commit = 3;
            s.set_hard_state(&hs).unwrap();
            s.sync().unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert!(!s.is_empty());
        assert_eq!((s.first(), s.last()), (1, 4));
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 3);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        let got = s
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(matches!(
            s.entries(1, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
    }

    #[test]
    fn snapshots_compact_the_log_and_install() {
        let s = SledStorage::temporary().unwrap();
        s.bootstrap(&[1]).unwrap();
        s.append(&(1..=100).map(|i| entry(i, 3)).collect::<Vec<_>>())
            .unwrap();
        s.snapshot_and_compact(90, b"state@90".to_vec(), 10)
            .unwrap();
        assert_eq!(s.first(), 80);
        assert!(matches!(
            s.term(10),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.term(90).unwrap(), 3);
        let snap = Storage::snapshot(&s, 0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 90);
        assert_eq!(&snap.data[..], b"state@90");
        // A follower far behind installs it.
        let f = SledStorage::temporary().unwrap();
        f.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        f.apply_snapshot(&snap).unwrap();
        assert_eq!((f.first(), f.last()), (91, 90));
        assert_eq!(f.hard_state().commit, 90);
        assert_eq!(f.snapshot_data().unwrap().unwrap().1, b"state@90");
    }
}
