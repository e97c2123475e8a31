//! Multi-node Raft cases in memory: deterministic delivery, drops and
//! partitions, real sled storage (temporary), the real Ready loop.

use std::collections::{BTreeMap, HashMap, HashSet};

use controlplane::node::{NodeConfig, ProposeError, RaftNode, Token};
use controlplane::state::Command;
use controlplane::storage::SledStorage;
use raft::eraftpb::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Cluster {
    nodes: BTreeMap<u64, RaftNode>,
    stores: BTreeMap<u64, SledStorage>,
    inflight: Vec<Message>,
    cut: HashSet<(u64, u64)>,
    drop_rate: f64,
    rng: ChaCha8Rng,
    done: HashMap<Token, Result<(), ProposeError>>,
    next_token: Token,
    /// Every (term, leader) any node has claimed to lead.
    leaders_seen: HashSet<(u64, u64)>,
    snapshot_every: u64,
}

impl Cluster {
    fn new(n: u64, seed: u64, snapshot_every: u64) -> Cluster {
        let mut c = Cluster {
            nodes: BTreeMap::new(),
            stores: BTreeMap::new(),
            inflight: Vec::new(),
            cut: HashSet::new(),
            drop_rate: 0.0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            done: HashMap::new(),
            next_token: 1,
            leaders_seen: HashSet::new(),
            snapshot_every,
        };
        let voters: Vec<u64> = (1..=n).collect();
        for id in 1..=n {
            let store = SledStorage::temporary().unwrap();
            store.bootstrap(&voters).unwrap();
            c.start(id, store);
        }
        c
    }

    fn start(&mut self, id: u64, store: SledStorage) {
        let mut cfg = NodeConfig::new(id);
        cfg.snapshot_every = self.snapshot_every;
        cfg.keep_tail = 5;
        self.stores.insert(id, store.clone());
        self.nodes.insert(id, RaftNode::open(cfg, store).unwrap());
    }

    fn stop(&mut self, id: u64) {
        self.nodes.remove(&id);
    }

    fn process(&mut self) {
        for (id, n) in self.nodes.iter_mut() {
            n.process().unwrap();
            self.inflight.extend(n.take_messages());
            for (t, r) in n.take_completions() {
                self.done.insert(t, r);
            }
            n.take_notices();
            if n.is_leader() {
                self.leaders_seen.insert((n.status().term, *id));
            }
        }
    }

    fn deliver(&mut self) {
        for _ in 0..50 {
            self.process();
            let msgs = std::mem::take(&mut self.inflight);
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if self.cut.contains(&(m.from, m.to)) || self.rng.random_bool(self.drop_rate) {
                    continue;
                }
                if let Some(n) = self.nodes.get_mut(&m.to) {
                    let _ = n.step(m);
                }
            }
        }
    }

    fn run(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for n in self.nodes.values_mut() {
                n.tick();
            }
            self.deliver();
        }
    }

    /// Runs until some node leads (elections are randomised by raft-rs).
    fn elect(&mut self) -> u64 {
        for _ in 0..300 {
            self.run(1);
            if let Some(l) = self.leader() {
                self.run(3);
                return self.leader().unwrap_or(l);
            }
        }
        panic!("no leader elected in 300 ticks");
    }

    fn leader(&self) -> Option<u64> {
        self.nodes.values().find(|n| n.is_leader()).map(|n| n.id())
    }

    fn propose(&mut self, node: u64, cmd: Command) -> Result<Token, ProposeError> {
        let t = self.next_token;
        self.next_token += 1;
        self.nodes.get_mut(&node).unwrap().propose(&cmd, t)?;
        Ok(t)
    }

    fn put(&mut self, node: u64, key: &str) -> Result<Token, ProposeError> {
        self.propose(
            node,
            Command::Put {
                key: key.into(),
                value: "v".into(),
            },
        )
    }

    fn isolate(&mut self, id: u64) {
        let others: Vec<u64> = self.nodes.keys().copied().filter(|&o| o != id).collect();
        for o in others {
            self.cut.insert((id, o));
            self.cut.insert((o, id));
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn assert_one_leader_per_term(&self) {
        let mut by_term: HashMap<u64, u64> = HashMap::new();
        for &(term, leader) in &self.leaders_seen {
            if let Some(other) = by_term.insert(term, leader) {
                assert_eq!(other, leader, "two leaders in term {term}");
            }
        }
    }

    fn assert_converged(&self) {
        let states: Vec<_> = self.nodes.values().map(|n| n.state().clone()).collect();
        for s in &states[1..] {
            assert_eq!(s, &states[0], "states differ");
        }
    }
}

#[test]
fn elects_a_leader_and_replicates_writes_sent_to_any_node() {
    let mut c = Cluster::new(3, 1, 1000);
    let leader = c.elect();
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let t1 = c.put(leader, "a").unwrap();
    let t2 = c.put(follower, "b").unwrap(); // forwarded to the leader
    c.run(5);
    assert_eq!(c.done[&t1], Ok(()));
    assert_eq!(c.done[&t2], Ok(()), "a follower's write reaches the leader");
    c.assert_converged();
    assert_eq!(c.nodes[&3].state().kv.len(), 2);
    c.assert_one_leader_per_term();
}

#[test]
fn isolated_leader_cannot_commit_and_majority_moves_on() {
    for seed in 0..5 {
        let mut c = Cluster::new(3, seed, 1000);
        let old = c.elect();
        c.isolate(old);
        let stale = c.put(old, "lost").unwrap();
        c.run(40);
        let new = c
            .nodes
            .values()
            .find(|n| n.is_leader() && n.id() != old)
            .map(|n| n.id());
        let new = new.expect("majority elects a new leader");
        // check_quorum: the isolated leader steps down.
        assert!(
            !c.nodes[&old].is_leader(),
            "seed {seed}: isolated node still leads"
        );
        let t = c.put(new, "kept").unwrap();
        c.run(5);
        assert_eq!(c.done[&t], Ok(()));
        assert!(
            !matches!(c.done.get(&stale), Some(Ok(()))),
            "seed {seed}: isolated write acknowledged"
        );
        c.heal();
        c.run(30);
        c.assert_converged();
        let kv = &c.nodes[&old].state().kv;
        assert!(
            kv.contains_key("kept") && !kv.contains_key("lost"),
            "seed {seed}"
        );
        c.assert_one_leader_per_term();
    }
}

#[test]
fn lossy_network_still_converges() {
    let mut c = Cluster::new(5, 7, 1000);
    c.drop_rate = 0.2;
    c.run(60);
    let mut acked = Vec::new();
    for i in 0..50 {
        if let Some(l) = c.leader()
            && let Ok(t) = c.put(l, &format!("k{i}"))
        {
            acked.push((t, format!("k{i}")));
        }
        c.run(2);
    }
    c.drop_rate = 0.0;
    c.run(50);
    c.assert_converged();
    let kv = &c.nodes[&1].state().kv;
    for (t, k) in acked {
        if c.done.get(&t) == Some(&Ok(())) {
            assert!(kv.contains_key(&k), "acknowledged {k} lost");
        }
    }
    c.assert_one_leader_per_term();
}

#[test]
fn lagging_node_catches_up_from_a_snapshot() {
    let mut c = Cluster::new(3, 3, 20);
    let leader = c.elect();
    let lagging = (1..=3).find(|&i| i != leader).unwrap();
    c.isolate(lagging);
    for i in 0..100 {
        c.put(leader, &format!("k{i}")).unwrap();
        c.run(1);
    }
    // The leader compacted its log past what the lagging node has.
    assert!(c.stores[&leader].first() > 10, "log was compacted");
    c.heal();
    c.run(30);
    c.assert_converged();
    assert_eq!(c.nodes[&lagging].state().kv.len(), 100);
}

#[test]
fn restart_restores_applied_state_from_sled() {
    let mut c = Cluster::new(3, 4, 10);
    let leader = c.elect();
    for i in 0..35 {
        c.put(leader, &format!("k{i}")).unwrap();
        c.run(1);
    }
    c.run(5);
    let victim = (1..=3).find(|&i| i != leader).unwrap();
    let store = c.stores[&victim].clone();
    c.stop(victim);
    c.put(leader, "while-down").unwrap();
    c.run(5);
    c.start(victim, store);
    c.run(20);
    c.assert_converged();
    assert_eq!(c.nodes[&victim].state().kv.len(), 36);
}

#[test]
fn members_join_and_leave_through_conf_changes() {
    let mut c = Cluster::new(3, 5, 20);
    let leader = c.elect();
    for i in 0..30 {
        c.put(leader, &format!("k{i}")).unwrap();
        c.run(1);
    }
    // Node 4 starts empty and joins.
    c.start(4, SledStorage::temporary().unwrap());
    let t = c.next_token;
    c.next_token += 1;
    c.nodes
        .get_mut(&leader)
        .unwrap()
        .propose_membership(4, Some("127.0.0.1:7004".into()), t)
        .unwrap();
    c.run(30);
    assert_eq!(c.done[&t], Ok(()));
    assert!(c.nodes[&leader].status().voters.contains(&4));
    assert_eq!(c.nodes[&4].state().kv.len(), 30, "new member caught up");
    assert_eq!(
        c.nodes[&4].state().members.get(&4).map(String::as_str),
        Some("127.0.0.1:7004")
    );
    // Remove a follower.
    let gone = (1..=3).find(|&i| i != leader).unwrap();
    let t = c.next_token;
    c.next_token += 1;
    c.nodes
        .get_mut(&leader)
        .unwrap()
        .propose_membership(gone, None, t)
        .unwrap();
    c.run(20);
    assert_eq!(c.done[&t], Ok(()));
    assert!(!c.nodes[&leader].status().voters.contains(&gone));
    c.stop(gone);
    let t = c.put(leader, "after").unwrap();
    c.run(10);
    assert_eq!(c.done[&t], Ok(()));
}

#[test]
fn read_index_is_served_after_apply() {
    let mut c = Cluster::new(3, 6, 1000);
    let leader = c.elect();
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    c.put(leader, "x").unwrap();
    c.nodes.get_mut(&follower).unwrap().read_index(99);
    let mut served = false;
    for _ in 0..10 {
        c.run(1);
        if c.nodes
            .get_mut(&follower)
            .unwrap()
            .take_reads()
            .contains(&99)
        {
            served = true;
            break;
        }
    }
    assert!(served);
    assert!(
        c.nodes[&follower].state().kv.contains_key("x"),
        "the read sees the earlier write"
    );
}
