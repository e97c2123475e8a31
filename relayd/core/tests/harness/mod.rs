//! An in-memory network of relay cores: virtual time, per-link delay and
//! seeded loss, clients as inboxes. Deterministic for a given seed.

#![allow(dead_code, unreachable_pub, clippy::disallowed_methods)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use relay_core::token::Claims;
use relay_core::wire::client::{
    ClientProbe, ClientToRelay, CloseCode, Delivery, Publish, RelayToClient, Role,
};
use relay_core::{Action, ChannelId, ClientId, Relay, RelayConfig, RelayId};
use topology::{Metrics, Route, RouteEntry, RouteTable};

pub const APP: &str = "shop";
pub const SECRET: &[u8] = b"test-secret-0123456789abcdef";
pub const NOW_UNIX: u64 = 1_700_000_000;

/// `(destination, primary path, backup path)`.
pub type StaticRoute<'a> = (u32, &'a [u32], Option<&'a [u32]>);

#[derive(Debug)]
enum Event {
    PeerDatagram {
        from: RelayId,
        to: RelayId,
        data: Bytes,
    },
    PeerFrame {
        from: RelayId,
        to: RelayId,
        data: Bytes,
    },
}

#[derive(Debug, Default)]
pub struct Inbox {
    pub frames: Vec<RelayToClient>,
    pub media: Vec<(ChannelId, Vec<u8>)>,
    pub probe_echoes: Vec<u64>,
    pub closed: Option<(CloseCode, String)>,
}

pub struct Net {
    pub now: Instant,
    pub relays: BTreeMap<RelayId, Relay>,
    events: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    payloads: HashMap<usize, Event>,
    seq: u64,
    next_event: usize,
    delay: HashMap<(RelayId, RelayId), Duration>,
    loss: HashMap<(RelayId, RelayId), f64>,
    connected: HashMap<(RelayId, RelayId), bool>,
    rng: ChaCha8Rng,
    clients: HashMap<ClientId, RelayId>,
    pub inbox: HashMap<ClientId, Inbox>,
    next_client: u64,
    pub datagrams_sent: HashMap<(RelayId, RelayId), u64>,
}

impl Net {
    pub fn new(seed: u64) -> Self {
        Self {
            now: Instant::now(),
            relays: BTreeMap::new(),
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            seq: 0,
            next_event: 0,
            delay: HashMap::new(),
            loss: HashMap::new(),
            connected: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            clients: HashMap::new(),
            inbox: HashMap::new(),
            next_client: 1,
            datagrams_sent: HashMap::new(),
        }
    }

    pub fn config(id: u32) -> RelayConfig {
        let mut c = RelayConfig::new(RelayId(id));
        c.region = format!("R{id}");
        c.apps.insert(APP.into(), SECRET.to_vec());
        c.link.probe_interval = Duration::from_millis(100);
        c.link.recover_after = Duration::from_secs(2);
        c
    }

    pub fn add_relay(&mut self, config: RelayConfig) {
        self.relays.insert(config.id, Relay::new(config));
    }

    pub fn relay(&self, id: u32) -> &Relay {
        &self.relays[&RelayId(id)]
    }

    /// Connects two relays both ways with a one-way delay.
    pub fn connect(&mut self, a: u32, b: u32, one_way: Duration) {
        let (a, b) = (RelayId(a), RelayId(b));
        self.delay.insert((a, b), one_way);
        self.delay.insert((b, a), one_way);
        self.connected.insert((a, b), true);
        self.connected.insert((b, a), true);
        let now = self.now;
        self.relays
            .get_mut(&a)
            .unwrap()
            .handle_peer_connected(b, now);
        self.relays
            .get_mut(&b)
            .unwrap()
            .handle_peer_connected(a, now);
        self.drain(a);
        self.drain(b);
    }

    /// Cuts the connection between two relays (both notice at once).
    pub fn disconnect(&mut self, a: u32, b: u32) {
        let (a, b) = (RelayId(a), RelayId(b));
        self.connected.insert((a, b), false);
        self.connected.insert((b, a), false);
        let now = self.now;
        self.relays
            .get_mut(&a)
            .unwrap()
            .handle_peer_disconnected(b, now);
        self.relays
            .get_mut(&b)
            .unwrap()
            .handle_peer_disconnected(a, now);
    }

    /// Loss on datagrams from `a` to `b` (frames are reliable).
    pub fn set_loss(&mut self, a: u32, b: u32, loss: f64) {
        self.loss.insert((RelayId(a), RelayId(b)), loss);
    }

    /// Installs a route table: `(destination, primary, backup)` per entry.
    pub fn set_routes(&mut self, source: u32, routes: &[StaticRoute<'_>]) {
        let route = |h: &[u32]| Route {
            hops: h.iter().map(|&i| RelayId(i)).collect(),
            metrics: Metrics::default(),
            cost: 0.0,
            poor: false,
        };
        let mut entries: Vec<RouteEntry> = routes
            .iter()
            .map(|(d, p, b)| RouteEntry {
                destination: RelayId(*d),
                primary: route(p),
                backup: b.map(route),
            })
            .collect();
        entries.sort_by_key(|e| e.destination);
        let relay = self.relays.get_mut(&RelayId(source)).unwrap();
        let epoch = relay.route_table().epoch() + 1;
        // (epoch 0 is for config routes; tests install as a control plane would)
        let table = RouteTable::new(RelayId(source), epoch, entries).unwrap();
        assert!(relay.set_route_table(table));
    }

    pub fn token(channel: &str, user: &str, role: Role) -> String {
        Claims {
            app: APP.into(),
            channel: channel.into(),
            user: user.into(),
            role,
            expires: NOW_UNIX + 3600,
        }
        .sign(SECRET)
    }

    pub fn client(&mut self, relay: u32) -> ClientId {
        let id = ClientId(self.next_client);
        self.next_client += 1;
        self.clients.insert(id, RelayId(relay));
        self.inbox.insert(id, Inbox::default());
        let r = self.relays.get_mut(&RelayId(relay)).unwrap();
        r.handle_client_connected(id, "198.51.100.7:40000".parse().unwrap());
        self.drain(RelayId(relay));
        id
    }

    pub fn send_frame(&mut self, client: ClientId, frame: ClientToRelay) {
        let mut b = BytesMut::new();
        frame.encode(&mut b);
        let (relay, now) = (self.clients[&client], self.now);
        self.relays
            .get_mut(&relay)
            .unwrap()
            .handle_client_frame(client, &b[4..], now, NOW_UNIX);
        self.drain(relay);
    }

    pub fn join(&mut self, client: ClientId, channel: &str, role: Role) -> ChannelId {
        let token = Self::token(channel, &format!("user{}", client.0), role);
        self.send_frame(
            client,
            ClientToRelay::Join {
                token,
                channel: channel.into(),
            },
        );
        ChannelId::derive(APP, channel)
    }

    pub fn publish(&mut self, client: ClientId, channel: ChannelId, payload: &[u8]) {
        let relay = self.clients[&client];
        let d = Publish::encode(channel, payload);
        let now = self.now;
        self.relays
            .get_mut(&relay)
            .unwrap()
            .handle_client_datagram(client, &d, now);
        self.drain(relay);
    }

    /// Sends a probe datagram with `padding` bytes after its header.
    pub fn probe(&mut self, client: ClientId, seq: u64, padding: usize) {
        let relay = self.clients[&client];
        let d = ClientProbe::encode(seq, padding);
        let now = self.now;
        self.relays
            .get_mut(&relay)
            .unwrap()
            .handle_client_datagram(client, &d, now);
        self.drain(relay);
    }

    pub fn disconnect_client(&mut self, client: ClientId) {
        let relay = self.clients[&client];
        self.relays
            .get_mut(&relay)
            .unwrap()
            .handle_client_disconnected(client);
        self.drain(relay);
    }

    pub fn media(&self, client: ClientId) -> &[(ChannelId, Vec<u8>)] {
        &self.inbox[&client].media
    }

    fn schedule(&mut self, at: Instant, ev: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.seq += 1;
        self.payloads.insert(id, ev);
        self.events.push(Reverse((at, self.seq, id)));
    }

    /// Executes a relay's pending actions.
    pub fn drain(&mut self, relay: RelayId) {
        while let Some(a) = self.relays.get_mut(&relay).unwrap().poll_action() {
            match a {
                Action::PeerDatagram { peer, datagram } => {
                    *self.datagrams_sent.entry((relay, peer)).or_default() += 1;
                    if !self.connected.get(&(relay, peer)).copied().unwrap_or(false) {
                        continue;
                    }
                    let loss = self.loss.get(&(relay, peer)).copied().unwrap_or(0.0);
                    if loss > 0.0 && self.rng.random_bool(loss) {
                        continue;
                    }
                    let at = self.now + self.delay[&(relay, peer)];
                    self.schedule(
                        at,
                        Event::PeerDatagram {
                            from: relay,
                            to: peer,
                            data: datagram,
                        },
                    );
                }
                Action::PeerFrame { peer, frame } => {
                    if !self.connected.get(&(relay, peer)).copied().unwrap_or(false) {
                        continue;
                    }
                    let at = self.now + self.delay[&(relay, peer)];
                    self.schedule(
                        at,
                        Event::PeerFrame {
                            from: relay,
                            to: peer,
                            data: frame,
                        },
                    );
                }
                Action::ClientFrame { client, frame } => {
                    let f = RelayToClient::decode(&frame[4..]).expect("relays send valid frames");
                    self.inbox.get_mut(&client).unwrap().frames.push(f);
                }
                Action::ClientDatagram { client, datagram } => {
                    if let Ok(p) = ClientProbe::decode(&datagram) {
                        assert!(p.echo, "relays send echoes, not probes");
                        self.inbox
                            .get_mut(&client)
                            .unwrap()
                            .probe_echoes
                            .push(p.seq);
                        continue;
                    }
                    let d = Delivery::decode(&datagram).expect("relays send valid datagrams");
                    self.inbox
                        .get_mut(&client)
                        .unwrap()
                        .media
                        .push((d.channel, d.payload.to_vec()));
                }
                Action::CloseClient {
                    client,
                    code,
                    reason,
                } => {
                    self.inbox.get_mut(&client).unwrap().closed = Some((code, reason));
                    self.relays
                        .get_mut(&relay)
                        .unwrap()
                        .handle_client_disconnected(client);
                }
            }
        }
    }

    /// Runs events and timers until `until`.
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let next_event = self.events.peek().map(|Reverse((t, _, _))| *t);
            let next_timer = self.relays.values().filter_map(|r| r.poll_timeout()).min();
            let next = [next_event, next_timer].into_iter().flatten().min();
            let Some(t) = next.filter(|&t| t <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(t);
            if next_event == Some(t) {
                let Reverse((_, _, id)) = self.events.pop().unwrap();
                match self.payloads.remove(&id).unwrap() {
                    Event::PeerDatagram { from, to, data } => {
                        let now = self.now;
                        self.relays
                            .get_mut(&to)
                            .unwrap()
                            .handle_peer_datagram(from, &data, now);
                        self.drain(to);
                    }
                    Event::PeerFrame { from, to, data } => {
                        if self.connected.get(&(from, to)).copied().unwrap_or(false) {
                            let now = self.now;
                            let r = self.relays.get_mut(&to).unwrap();
                            r.handle_peer_frame(from, &data[4..], now)
                                .expect("relays send valid frames");
                            self.drain(to);
                        }
                    }
                }
            } else {
                let ids: Vec<RelayId> = self
                    .relays
                    .iter()
                    .filter(|(_, r)| r.poll_timeout().is_some_and(|x| x <= t))
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    let now = self.now;
                    self.relays.get_mut(&id).unwrap().handle_timeout(now);
                    self.drain(id);
                }
            }
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }
}
