//! The relay state machine: events in, actions out.
//!
//! The driver calls the `handle_*` methods as things happen, then drains
//! [`Relay::poll_action`] and sleeps until [`Relay::poll_timeout`], calling
//! [`Relay::handle_timeout`] when it passes. Nothing here blocks, spawns or
//! reads a clock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use topology::RouteTable;

use crate::arena::{Arena, BLOCK};
use crate::channels::{Channels, Member};
use crate::dedup::{DedupWindows, Verdict};
use crate::forwarding::{Chosen, Forwarding, LinkState, LinkView};
use crate::ids::{ChannelId, ClientId, RelayId, SourceId};
use crate::links::{LinkConfig, LinkReport, PeerLink};
use crate::stats::{AuthFailure, DropReason, Stats};
use crate::token::{Claims, TokenError};
use crate::wire::client::{
    Alternative, ClientProbe, ClientToRelay, CloseCode, DELIVERY_HEADER_LEN, Delivery, ErrorCode,
    PUBLISH_HEADER_LEN, Publish, RelayToClient, Role,
};
use crate::wire::peer::{MediaHeader, PeerDatagram, PeerFrame};
use crate::wire::route::RouteTree;

/// Settings of a relay core.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// This relay.
    pub id: RelayId,
    /// Its region code, told to clients.
    pub region: String,
    /// Changes on every restart (start time in seconds): media sequence
    /// numbers and interest versions restart with it.
    pub epoch: u32,
    /// Relay hops a media packet may take.
    pub hop_limit: u8,
    /// Largest media payload accepted from clients.
    pub max_payload: u16,
    /// Channels one client connection may join.
    pub max_channels_per_client: usize,
    /// Probing and link health.
    pub link: LinkConfig,
    /// App id to token secret.
    pub apps: HashMap<String, Vec<u8>>,
    /// Relays suggested to clients when this one drains.
    pub alternatives: Vec<Alternative>,
    /// How long draining clients get to move.
    pub drain_deadline: Duration,
}

impl RelayConfig {
    /// Defaults for relay `id`, with no apps.
    pub fn new(id: RelayId) -> Self {
        Self {
            id,
            region: String::new(),
            epoch: 1,
            hop_limit: 8,
            max_payload: 1100,
            max_channels_per_client: 16,
            link: LinkConfig::default(),
            apps: HashMap::new(),
            alternatives: Vec::new(),
            drain_deadline: Duration::from_secs(10),
        }
    }
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write an encoded frame (length prefix included) on a client's
    /// control stream.
    ClientFrame {
        /// The client.
        client: ClientId,
        /// The frame.
        frame: Bytes,
    },
    /// Send a datagram to a client.
    ClientDatagram {
        /// The client.
        client: ClientId,
        /// The datagram.
        datagram: Bytes,
    },
    /// Close a client connection.
    CloseClient {
        /// The client.
        client: ClientId,
        /// Application close code.
        code: CloseCode,
        /// Human reason.
        reason: String,
    },
    /// Write an encoded frame on a peer's control stream.
    PeerFrame {
        /// The peer.
        peer: RelayId,
        /// The frame.
        frame: Bytes,
    },
    /// Send a datagram to a peer.
    PeerDatagram {
        /// The peer.
        peer: RelayId,
        /// The datagram.
        datagram: Bytes,
    },
}

#[derive(Debug, Clone)]
struct ClientState {
    /// Joined channels.
    channels: SmallVec<[ChannelId; 2]>,
    closing: bool,
}

/// The relay core.
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    channels: Channels,
    /// Keyed by authenticated peers (no untrusted keys): a fast hash.
    links: FxHashMap<RelayId, PeerLink>,
    /// Every link's timer and usability, kept beside the map: the driver
    /// asks after every event, and this short array is far cheaper to scan
    /// than the links.
    index: LinkIndex,
    forwarding: Forwarding,
    dedup: DedupWindows,
    clients: HashMap<ClientId, ClientState>,
    interest_counter: u32,
    interest_dirty: bool,
    next_seq: u32,
    draining_until: Option<Instant>,
    drain_finished: bool,
    actions: VecDeque<Action>,
    /// Where outgoing media datagrams are written.
    arena: Arena,
    stats: Stats,
}

impl Relay {
    /// A relay with no clients, peers or routes.
    pub fn new(config: RelayConfig) -> Self {
        let forwarding = Forwarding::new(config.id);
        Self {
            config,
            channels: Channels::new(),
            links: FxHashMap::default(),
            index: LinkIndex::default(),
            forwarding,
            dedup: DedupWindows::new(),
            clients: HashMap::new(),
            interest_counter: 0,
            interest_dirty: false,
            next_seq: 0,
            draining_until: None,
            drain_finished: false,
            actions: VecDeque::new(),
            arena: Arena::new(),
            stats: Stats::default(),
        }
    }

    /// This relay's id.
    pub fn id(&self) -> RelayId {
        self.config.id
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Channels with local members.
    pub fn channel_count(&self) -> usize {
        self.channels.local_channel_count()
    }

    /// Members of a channel here.
    pub fn members(&self, channel: ChannelId) -> &[Member] {
        self.channels.members(channel)
    }

    /// Other relays with members of `channel`, as far as this one knows.
    pub fn interested_relays(&self, channel: ChannelId) -> &[RelayId] {
        self.channels.interested_relays(channel)
    }

    /// The installed route table.
    pub fn route_table(&self) -> &RouteTable {
        self.forwarding.table()
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        self.draining_until.is_some()
    }

    /// True once the drain deadline passed and the remaining clients were
    /// closed.
    pub fn drain_finished(&self) -> bool {
        self.drain_finished
    }

    /// Every peer link with its estimates.
    pub fn links(&self, now: Instant) -> Vec<LinkReport> {
        let mut v: Vec<LinkReport> = self
            .links
            .iter()
            .map(|(&peer, l)| LinkReport {
                peer,
                connected: l.is_connected(),
                usable: l.is_usable(),
                stats: l.stats(now),
            })
            .collect();
        v.sort_by_key(|r| r.peer);
        v
    }

    /// The path a packet to `destination` would take from here at `now`:
    /// the primary, or the backup when fast reroute applies. For reports
    /// and the simulator; forwarding itself caches per channel.
    pub fn path_to(&self, destination: RelayId, now: Instant) -> Option<Chosen> {
        let view = Links {
            links: &self.links,
            config: &self.config.link,
            now,
        };
        self.forwarding.path_to(destination, &view)
    }

    /// True when the link to `peer` is usable for forwarding.
    pub fn link_usable(&self, peer: RelayId) -> bool {
        self.links.get(&peer).is_some_and(PeerLink::is_usable)
    }

    /// The next change of a link's usability for forwarding
    /// (`(peer, usable)`), for logs and metrics.
    pub fn poll_link_change(&mut self) -> Option<(RelayId, bool)> {
        self.index.changes.pop_front()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Relay::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let links = self.index.slots.iter().filter_map(|s| s.timer);
        let drain = self.draining_until.filter(|_| !self.drain_finished);
        links.chain(drain).min()
    }

    /// True when some peer link is not usable for forwarding. Only then
    /// (or when a primary's next hop is no peer at all, see
    /// [`Relay::may_use_backups`]) can a route's backup be chosen.
    pub fn has_unusable_link(&self) -> bool {
        self.index.unusable > 0
    }

    /// True when forwarding could choose a backup path now: a link is not
    /// usable, or a primary route's next hop is not a known peer. A driver
    /// that adds backups to the installed table only when they can matter
    /// (the simulator) checks this when a table arrives and
    /// [`Relay::has_unusable_link`] after each event.
    pub fn may_use_backups(&self) -> bool {
        self.has_unusable_link()
            || self
                .forwarding
                .table()
                .entries()
                .iter()
                .any(|e| !self.links.contains_key(&e.primary.next_hop()))
    }

    /// Replaces the installed table by `table` if it is this relay's table
    /// of the same epoch (the same routes with their backups added).
    /// Returns whether it was installed.
    pub fn complete_route_table(&mut self, table: RouteTable) -> bool {
        if table.source() != self.config.id || table.epoch() != self.forwarding.table().epoch() {
            return false;
        }
        self.forwarding.set_table(table);
        true
    }

    /// Installs a route table if its epoch is newer than the current
    /// one's. Epoch 0 marks static routes from the config, which any
    /// control-plane epoch replaces. Returns whether it was installed.
    pub fn set_route_table(&mut self, table: RouteTable) -> bool {
        if table.source() != self.config.id {
            return false;
        }
        let current = self.forwarding.table().epoch();
        if table.epoch() != 0 && table.epoch() <= current {
            return false;
        }
        self.forwarding.set_table(table);
        true
    }

    /// Replaces the apps (from the control plane). Joined members stay.
    pub fn set_apps(&mut self, apps: HashMap<String, Vec<u8>>) {
        self.config.apps = apps;
    }

    // ----- clients -----------------------------------------------------

    /// A client connected from `observed` (its address as we see it).
    pub fn handle_client_connected(&mut self, client: ClientId, observed: SocketAddr) {
        self.clients.insert(
            client,
            ClientState {
                channels: SmallVec::new(),
                closing: false,
            },
        );
        self.send_client(
            client,
            &RelayToClient::Welcome {
                relay: self.config.id,
                region: self.config.region.clone(),
                observed,
                max_payload: self.config.max_payload,
            },
        );
        if let Some(until) = self.draining_until {
            self.send_drain(client, until, until);
        }
    }

    /// A client's connection ended.
    pub fn handle_client_disconnected(&mut self, client: ClientId) {
        if let Some(state) = self.clients.remove(&client) {
            for c in state.channels {
                if self.channels.leave(c, client) {
                    self.interest_dirty = true;
                }
            }
        }
        self.flush_interest();
    }

    /// A frame (without its length prefix) arrived on a client's control
    /// stream. `unix_now` is wall-clock seconds, for token expiry.
    pub fn handle_client_frame(
        &mut self,
        client: ClientId,
        frame: &[u8],
        now: Instant,
        unix_now: u64,
    ) {
        if self.clients.get(&client).is_none_or(|c| c.closing) {
            return;
        }
        let frame = match ClientToRelay::decode(frame) {
            Ok(f) => f,
            Err(e) => {
                self.stats.drop(DropReason::Malformed);
                self.close_client(
                    client,
                    CloseCode::ProtocolViolation,
                    format!("bad frame: {e}"),
                );
                return;
            }
        };
        match frame {
            ClientToRelay::Join { token, channel } => self.join(client, &token, &channel, unix_now),
            ClientToRelay::Leave { channel } => {
                let state = self.clients.get_mut(&client).expect("checked above");
                state.channels.retain(|c| *c != channel);
                if self.channels.leave(channel, client) {
                    self.interest_dirty = true;
                }
                self.send_client(client, &RelayToClient::Left { channel });
            }
            ClientToRelay::Message { channel, body } => {
                self.client_message(client, channel, body, now)
            }
            ClientToRelay::Ping { nonce } => {
                self.send_client(client, &RelayToClient::Pong { nonce })
            }
        }
        self.flush_interest();
    }

    /// The control stream sent something unreadable (over-long frame,
    /// stream reset): close the client.
    pub fn handle_client_violation(&mut self, client: ClientId, code: CloseCode, reason: String) {
        self.stats.drop(DropReason::Malformed);
        self.close_client(client, code, reason);
    }

    fn join(&mut self, client: ClientId, token: &str, channel: &str, unix_now: u64) {
        if self.draining_until.is_some() {
            self.close_client(client, CloseCode::Draining, "relay is draining".into());
            return;
        }
        let apps = &self.config.apps;
        let claims = match Claims::verify(token, channel, unix_now, |app| {
            apps.get(app).map(Vec::as_slice)
        }) {
            Ok(c) => c,
            Err(e) => {
                let (failure, code) = match &e {
                    TokenError::Malformed => (AuthFailure::Malformed, CloseCode::InvalidToken),
                    TokenError::BadSignature => {
                        (AuthFailure::BadSignature, CloseCode::InvalidToken)
                    }
                    TokenError::UnknownApp(_) => (AuthFailure::UnknownApp, CloseCode::UnknownApp),
                    TokenError::Expired => (AuthFailure::Expired, CloseCode::TokenExpired),
                    TokenError::WrongChannel => {
                        (AuthFailure::WrongChannel, CloseCode::WrongChannel)
                    }
                };
                self.stats.auth_failure(failure);
                self.close_client(client, code, e.to_string());
                return;
            }
        };
        let id = ChannelId::derive(&claims.app, &claims.channel);
        let state = self.clients.get_mut(&client).expect("checked by caller");
        if !state.channels.contains(&id) {
            if state.channels.len() >= self.config.max_channels_per_client {
                self.close_client(
                    client,
                    CloseCode::TooManyChannels,
                    "too many channels".into(),
                );
                return;
            }
            state.channels.push(id);
        }
        let source = SourceId::derive(&claims.app, &claims.user);
        let member = Member {
            client,
            role: claims.role,
            source,
            user: claims.user,
        };
        if self.channels.join(id, member) {
            self.interest_dirty = true;
        }
        self.send_client(
            client,
            &RelayToClient::Joined {
                channel: id,
                name: claims.channel,
                role: claims.role,
                source,
            },
        );
    }

    fn client_message(&mut self, client: ClientId, channel: ChannelId, body: Bytes, now: Instant) {
        let Some(m) = self.channels.member(channel, client).cloned() else {
            self.stats.drop(DropReason::NotJoined);
            self.send_error(client, ErrorCode::NotJoined, "not a member of that channel");
            return;
        };
        self.deliver_message(channel, m.source, &m.user, &body, Some(client));
        let remote: SmallVec<[RelayId; 8]> = self
            .channels
            .interested_relays(channel)
            .iter()
            .copied()
            .collect();
        for to in remote {
            self.send_peer_message(
                PeerFrame::Message {
                    to,
                    origin: self.config.id,
                    hop_limit: self.config.hop_limit,
                    channel,
                    source: m.source,
                    user: m.user.clone(),
                    body: body.clone(),
                },
                now,
            );
        }
    }

    fn deliver_message(
        &mut self,
        channel: ChannelId,
        source: SourceId,
        user: &str,
        body: &Bytes,
        except: Option<ClientId>,
    ) {
        let frame = encode_client(&RelayToClient::Message {
            channel,
            source,
            user: user.to_owned(),
            body: body.clone(),
        });
        for m in self.channels.members(channel) {
            if Some(m.client) != except {
                self.actions.push_back(Action::ClientFrame {
                    client: m.client,
                    frame: frame.clone(),
                });
                self.stats.messages_delivered += 1;
            }
        }
    }

    /// A datagram arrived from a client.
    pub fn handle_client_datagram(&mut self, client: ClientId, datagram: &[u8], now: Instant) {
        if let Some(echo) = ClientProbe::echo_of(datagram) {
            // Probes are answered before joining: clients choose a relay
            // with them. Bounded by the media size so they amplify nothing.
            if datagram.len() > PUBLISH_HEADER_LEN + self.config.max_payload as usize {
                return self.stats.drop(DropReason::TooLarge);
            }
            self.stats.client_probes += 1;
            self.actions.push_back(Action::ClientDatagram {
                client,
                datagram: echo,
            });
            return;
        }
        self.stats.client_packets_in += 1;
        self.stats.client_bytes_in += datagram.len() as u64;
        let p = match Publish::decode(datagram) {
            Ok(p) => p,
            Err(_) => return self.stats.drop(DropReason::Malformed),
        };
        let Some(member) = self.channels.member(p.channel, client) else {
            return self.stats.drop(DropReason::NotJoined);
        };
        if member.role != Role::Publisher {
            return self.stats.drop(DropReason::NotPublisher);
        }
        if p.payload.len() > self.config.max_payload as usize {
            return self.stats.drop(DropReason::TooLarge);
        }
        let source = member.source;
        // The delivery and the media datagrams carrying it to other relays
        // are cut from one block, renewed (in place, once its earlier
        // datagrams are gone) before it is half full.
        self.arena.make_room(BLOCK / 2);
        let delivery = self
            .arena
            .datagram(DELIVERY_HEADER_LEN + p.payload.len(), |b| {
                Delivery::write(b, p.channel, source, p.payload)
            });
        self.deliver_local(p.channel, &delivery, Some(client));
        self.send_remote(p.channel, &delivery, now);
    }

    fn deliver_local(&mut self, channel: ChannelId, delivery: &Bytes, except: Option<ClientId>) {
        for m in self.channels.members(channel) {
            if Some(m.client) != except {
                self.actions.push_back(Action::ClientDatagram {
                    client: m.client,
                    datagram: delivery.clone(),
                });
                self.stats.delivered_packets += 1;
                self.stats.delivered_bytes += delivery.len() as u64;
            }
        }
    }

    fn send_remote(&mut self, channel: ChannelId, delivery: &Bytes, now: Instant) {
        let dests = self.channels.interested_relays(channel);
        if dests.is_empty() {
            return;
        }
        let view = Links {
            links: &self.links,
            config: &self.config.link,
            now,
        };
        let (hops, rerouted) = self.forwarding.plan(channel, dests, &view);
        if hops.is_empty() {
            return self.stats.drop(DropReason::NoRoute);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        for (peer, route) in hops {
            let Some(link) = self.links.get_mut(peer) else {
                continue;
            };
            let header = MediaHeader {
                hop_limit: self.config.hop_limit,
                origin: self.config.id,
                epoch: self.config.epoch,
                seq,
                link_seq: link.take_link_seq(),
            };
            let datagram = self
                .arena
                .datagram(PeerDatagram::media_len(route, delivery), |b| {
                    PeerDatagram::write_media(b, &header, route, delivery)
                });
            self.stats.relayed_packets += 1;
            self.stats.relayed_bytes += datagram.len() as u64;
            self.actions.push_back(Action::PeerDatagram {
                peer: *peer,
                datagram,
            });
        }
        if rerouted {
            self.stats.rerouted_packets += 1;
        }
    }

    // ----- peers -------------------------------------------------------

    /// A peer connection is up and its identity checked. `now` starts
    /// probing.
    pub fn handle_peer_connected(&mut self, peer: RelayId, now: Instant) {
        let link = self
            .links
            .entry(peer)
            .or_insert_with(|| PeerLink::new(&self.config.link));
        link.on_connected(now);
        link.update(now, &self.config.link);
        self.index.note(peer, link);
        self.forwarding.invalidate();
        // Tell the newcomer everything we know about interest.
        let own = self.own_interest();
        self.send_peer_frame(peer, &own);
        for origin in self.channels.known_origins() {
            if origin == peer {
                continue;
            }
            if let Some((version, channels)) = self.channels.interest_of(origin) {
                self.send_peer_frame(
                    peer,
                    &PeerFrame::Interest {
                        origin,
                        version,
                        channels,
                    },
                );
            }
        }
        self.handle_timeout(now);
    }

    /// A peer connection ended.
    pub fn handle_peer_disconnected(&mut self, peer: RelayId, now: Instant) {
        if let Some(l) = self.links.get_mut(&peer) {
            l.on_disconnected(now);
            self.index.note(peer, l);
            self.forwarding.invalidate();
        }
    }

    /// A frame (without its length prefix) arrived on a peer's control
    /// stream. Returns an error for a frame that does not decode; the
    /// driver closes that connection.
    pub fn handle_peer_frame(
        &mut self,
        from: RelayId,
        frame: &[u8],
        now: Instant,
    ) -> Result<(), crate::wire::DecodeError> {
        let frame =
            PeerFrame::decode(frame).inspect_err(|_| self.stats.drop(DropReason::Malformed))?;
        match frame {
            PeerFrame::Hello { .. } => {} // handled by the driver's handshake
            PeerFrame::Interest {
                origin,
                version,
                channels,
            } => {
                if origin != self.config.id
                    && self.channels.apply_interest(origin, version, &channels)
                {
                    self.forwarding.invalidate();
                    let frame = encode_peer(&PeerFrame::Interest {
                        origin,
                        version,
                        channels,
                    });
                    let peers: Vec<RelayId> = self
                        .connected_peers()
                        .filter(|&p| p != from && p != origin)
                        .collect();
                    for p in peers {
                        self.actions.push_back(Action::PeerFrame {
                            peer: p,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            PeerFrame::Message {
                to,
                origin,
                hop_limit,
                channel,
                source,
                user,
                body,
            } => {
                if to == self.config.id {
                    self.deliver_message(channel, source, &user, &body, None);
                } else if hop_limit > 1 {
                    self.send_peer_message(
                        PeerFrame::Message {
                            to,
                            origin,
                            hop_limit: hop_limit - 1,
                            channel,
                            source,
                            user,
                            body,
                        },
                        now,
                    );
                } else {
                    self.stats.drop(DropReason::HopLimit);
                }
            }
        }
        Ok(())
    }

    /// A datagram arrived from a peer.
    pub fn handle_peer_datagram(&mut self, from: RelayId, datagram: &Bytes, now: Instant) {
        let d = match PeerDatagram::decode(datagram) {
            Ok(d) => d,
            Err(_) => return self.stats.drop(DropReason::Malformed),
        };
        let Some(link) = self.links.get_mut(&from) else {
            return self.stats.drop(DropReason::UnknownPeer);
        };
        match d {
            PeerDatagram::Probe { seq } => {
                let echo = link.echo_for(seq);
                self.actions.push_back(Action::PeerDatagram {
                    peer: from,
                    datagram: echo,
                });
            }
            PeerDatagram::Echo { seq, report } => {
                link.on_echo(seq, report, now);
                link.update(now, &self.config.link);
                if self.index.note(from, link) {
                    self.forwarding.invalidate();
                }
            }
            PeerDatagram::Media {
                header,
                route,
                delivery,
            } => {
                link.on_media_received(header.link_seq);
                self.transit(header, &route, delivery, now);
            }
        }
    }

    fn transit(&mut self, header: MediaHeader, route: &Bytes, delivery: Bytes, now: Instant) {
        let Ok(tree) = RouteTree::decode(route) else {
            return self.stats.drop(DropReason::Malformed);
        };
        if tree.root().relay != self.config.id {
            return self.stats.drop(DropReason::Misrouted);
        }
        if tree.root().deliver {
            match self.dedup.check(header.origin, header.epoch, header.seq) {
                Verdict::Fresh => match Delivery::decode(&delivery) {
                    Ok(d) => {
                        if self.channels.members(d.channel).is_empty() {
                            self.stats.drop(DropReason::NoSubscribers);
                        }
                        self.deliver_local(d.channel, &delivery, None);
                    }
                    Err(_) => self.stats.drop(DropReason::Malformed),
                },
                Verdict::Duplicate | Verdict::TooOld => self.stats.drop(DropReason::Duplicate),
            }
        }
        let children: SmallVec<[usize; 4]> = tree.children(0).collect();
        if children.is_empty() {
            return;
        }
        if header.hop_limit <= 1 {
            return self.stats.drop(DropReason::HopLimit);
        }
        let mut next = MediaHeader {
            hop_limit: header.hop_limit - 1,
            ..header
        };
        let mut repair: SmallVec<[RelayId; 8]> = SmallVec::new();
        // This datagram's copies for the next hops from one block (see
        // `handle_client_datagram`).
        self.arena.make_room(BLOCK / 2);
        for c in children {
            let peer = tree.nodes()[c].relay;
            if self.links.get(&peer).is_some_and(PeerLink::is_usable) {
                let link = self.links.get_mut(&peer).expect("checked");
                next.link_seq = link.take_link_seq();
                let route = &route[tree.span(c)];
                let datagram = self
                    .arena
                    .datagram(PeerDatagram::media_len(route, &delivery), |b| {
                        PeerDatagram::write_media(b, &next, route, &delivery)
                    });
                self.stats.relayed_packets += 1;
                self.stats.relayed_bytes += datagram.len() as u64;
                self.actions
                    .push_back(Action::PeerDatagram { peer, datagram });
            } else {
                // Local repair: our own routes to that subtree's destinations.
                repair.extend(tree.destinations(c));
            }
        }
        if repair.is_empty() {
            return;
        }
        let view = Links {
            links: &self.links,
            config: &self.config.link,
            now,
        };
        let (hops, _) = self.forwarding.build(repair.iter().copied(), &view);
        if hops.is_empty() {
            return self.stats.drop(DropReason::NoRoute);
        }
        self.stats.rerouted_packets += 1;
        for (peer, sub) in hops {
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            next.link_seq = link.take_link_seq();
            let datagram = self
                .arena
                .datagram(PeerDatagram::media_len(&sub, &delivery), |b| {
                    PeerDatagram::write_media(b, &next, &sub, &delivery)
                });
            self.stats.relayed_packets += 1;
            self.stats.relayed_bytes += datagram.len() as u64;
            self.actions
                .push_back(Action::PeerDatagram { peer, datagram });
        }
    }

    // ----- time and lifecycle -------------------------------------------

    /// Sends due probes, expires old ones, re-evaluates link health and
    /// ends the drain when its deadline passes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut changed = false;
        for i in 0..self.index.slots.len() {
            // Links change state on their own only at their timeouts (probe
            // due, probe expired); echoes update them as they arrive.
            let LinkSlot { peer, timer, .. } = self.index.slots[i];
            if timer.is_some_and(|t| t > now) {
                continue;
            }
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            while let Some(probe) = link.poll_probe(now, &self.config.link) {
                self.actions.push_back(Action::PeerDatagram {
                    peer,
                    datagram: probe,
                });
            }
            // A silent peer's link dies here, at its probes' timeouts.
            link.update(now, &self.config.link);
            changed |= self.index.note_at(i, link);
        }
        if changed {
            self.forwarding.invalidate();
        }
        if !self.drain_finished && self.draining_until.is_some_and(|d| now >= d) {
            self.drain_finished = true;
            let clients: Vec<ClientId> = self.clients.keys().copied().collect();
            for c in clients {
                self.close_client(c, CloseCode::Draining, "relay shut down".into());
            }
        }
    }

    /// Starts draining: clients are told to move within the deadline, new
    /// joins are refused, and the remaining clients are closed at the end.
    pub fn begin_drain(&mut self, now: Instant) {
        if self.draining_until.is_some() {
            return;
        }
        let until = now + self.config.drain_deadline;
        self.draining_until = Some(until);
        let clients: Vec<ClientId> = self.clients.keys().copied().collect();
        for c in clients {
            self.send_drain(c, now, until);
        }
    }

    /// Ends a drain: joins are accepted again.
    pub fn end_drain(&mut self) {
        self.draining_until = None;
        self.drain_finished = false;
    }

    fn send_drain(&mut self, client: ClientId, now: Instant, until: Instant) {
        let frame = RelayToClient::Drain {
            reason: "relay is draining".into(),
            deadline_ms: until
                .saturating_duration_since(now)
                .as_millis()
                .min(u128::from(u32::MAX)) as u32,
            alternatives: self.config.alternatives.clone(),
        };
        self.send_client(client, &frame);
    }

    // ----- helpers ------------------------------------------------------

    fn connected_peers(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.links
            .iter()
            .filter(|(_, l)| l.is_connected())
            .map(|(&p, _)| p)
    }

    fn own_interest(&self) -> PeerFrame {
        PeerFrame::Interest {
            origin: self.config.id,
            version: (u64::from(self.config.epoch) << 32) | u64::from(self.interest_counter),
            channels: self.channels.local_channels(),
        }
    }

    fn flush_interest(&mut self) {
        if !self.interest_dirty {
            return;
        }
        self.interest_dirty = false;
        self.interest_counter += 1;
        let frame = encode_peer(&self.own_interest());
        let peers: Vec<RelayId> = self.connected_peers().collect();
        for peer in peers {
            self.actions.push_back(Action::PeerFrame {
                peer,
                frame: frame.clone(),
            });
        }
    }

    fn send_peer_message(&mut self, msg: PeerFrame, now: Instant) {
        let PeerFrame::Message { to, .. } = &msg else {
            return;
        };
        let view = Links {
            links: &self.links,
            config: &self.config.link,
            now,
        };
        match self.forwarding.path_to(*to, &view) {
            Some(c) => {
                let peer = c.hops[1];
                self.send_peer_frame(peer, &msg);
            }
            None => self.stats.drop(DropReason::NoRoute),
        }
    }

    fn send_peer_frame(&mut self, peer: RelayId, frame: &PeerFrame) {
        self.actions.push_back(Action::PeerFrame {
            peer,
            frame: encode_peer(frame),
        });
    }

    fn send_client(&mut self, client: ClientId, frame: &RelayToClient) {
        self.actions.push_back(Action::ClientFrame {
            client,
            frame: encode_client(frame),
        });
    }

    fn send_error(&mut self, client: ClientId, code: ErrorCode, message: &str) {
        self.send_client(
            client,
            &RelayToClient::Error {
                code: code as u16,
                message: message.into(),
            },
        );
    }

    fn close_client(&mut self, client: ClientId, code: CloseCode, reason: String) {
        if let Some(state) = self.clients.get_mut(&client) {
            if state.closing {
                return;
            }
            state.closing = true;
            let channels = std::mem::take(&mut state.channels);
            for c in channels {
                if self.channels.leave(c, client) {
                    self.interest_dirty = true;
                }
            }
        }
        self.actions.push_back(Action::CloseClient {
            client,
            code,
            reason,
        });
        self.flush_interest();
    }
}

/// What the driver asks of every link after each event, noted after
/// every change to a link (connect, disconnect, echo, timer): its next
/// timer and its usability, whose changes are queued here for
/// [`Relay::poll_link_change`].
#[derive(Debug, Default)]
struct LinkIndex {
    slots: Vec<LinkSlot>,
    /// Slots whose link is not usable.
    unusable: usize,
    changes: VecDeque<(RelayId, bool)>,
}

#[derive(Debug, Clone, Copy)]
struct LinkSlot {
    peer: RelayId,
    timer: Option<Instant>,
    usable: bool,
}

impl LinkIndex {
    /// Records `peer`'s link as it is now (a new peer's link was
    /// unusable before, as [`PeerLink::new`] makes it). Returns whether its
    /// usability changed since the last note.
    fn note(&mut self, peer: RelayId, link: &PeerLink) -> bool {
        let i = match self.slots.iter().position(|s| s.peer == peer) {
            Some(i) => i,
            None => {
                self.slots.push(LinkSlot {
                    peer,
                    timer: None,
                    usable: false,
                });
                self.unusable += 1;
                self.slots.len() - 1
            }
        };
        self.note_at(i, link)
    }

    fn note_at(&mut self, i: usize, link: &PeerLink) -> bool {
        let slot = &mut self.slots[i];
        slot.timer = link.next_timeout();
        let usable = link.is_usable();
        if slot.usable == usable {
            return false;
        }
        slot.usable = usable;
        if usable {
            self.unusable -= 1;
        } else {
            self.unusable += 1;
        }
        self.changes.push_back((slot.peer, usable));
        true
    }
}

/// The forwarder's view of this relay's links at one instant.
struct Links<'a> {
    links: &'a FxHashMap<RelayId, PeerLink>,
    config: &'a LinkConfig,
    now: Instant,
}

impl LinkView for Links<'_> {
    fn state(&self, peer: RelayId) -> LinkState {
        self.links
            .get(&peer)
            .map_or(LinkState::Down, |l| l.state(self.now, self.config))
    }
}

fn encode_client(frame: &RelayToClient) -> Bytes {
    let mut b = BytesMut::new();
    frame.encode(&mut b);
    b.freeze()
}

fn encode_peer(frame: &PeerFrame) -> Bytes {
    let mut b = BytesMut::new();
    frame.encode(&mut b);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timer array must always equal what the links themselves say.
    fn assert_timers_match(relay: &Relay) {
        assert_eq!(relay.index.slots.len(), relay.links.len());
        for slot in &relay.index.slots {
            let link = &relay.links[&slot.peer];
            assert_eq!(slot.timer, link.next_timeout(), "peer {:?}", slot.peer);
            assert_eq!(slot.usable, link.is_usable(), "peer {:?}", slot.peer);
        }
        let unusable = relay.links.values().filter(|l| !l.is_usable()).count();
        assert_eq!(relay.has_unusable_link(), unusable > 0);
        assert_eq!(relay.index.unusable, unusable);
        let earliest = relay
            .links
            .values()
            .filter_map(PeerLink::next_timeout)
            .min();
        assert_eq!(relay.poll_timeout(), earliest);
    }

    #[test]
    fn timers_track_every_link_through_probes_echoes_and_disconnects() {
        let start = Instant::now();
        // An adaptive probe timeout shorter than the probe interval: then
        // each echo moves the link's next timer (from the probe's expiry to
        // the next probe), and each probe moves it back.
        let mut config = RelayConfig::new(RelayId(0));
        config.link.metrics.adaptive_timeout = true;
        config.link.probe_interval = Duration::from_millis(50);
        let mut hub = Relay::new(config);
        let mut peers: Vec<Relay> = (1..=5)
            .map(|i| Relay::new(RelayConfig::new(RelayId(i))))
            .collect();
        for p in &mut peers {
            hub.handle_peer_connected(p.id(), start);
            p.handle_peer_connected(hub.id(), start);
            assert_timers_match(&hub);
        }
        let mut now = start;
        // Echoes arrive one step (7 ms) after their probe left.
        let mut in_flight: Vec<(RelayId, Bytes)> = Vec::new();
        let mut changes = Vec::new();
        for step in 0u32..600 {
            now += Duration::from_millis(7);
            for (from, echo) in std::mem::take(&mut in_flight) {
                hub.handle_peer_datagram(from, &echo, now);
                assert_timers_match(&hub);
            }
            if hub.poll_timeout().is_some_and(|t| t <= now) {
                hub.handle_timeout(now);
            }
            assert_timers_match(&hub);
            // Lose some probes (every third to peer 2, all of peer 4's for
            // a while, and peer 5 falls silent at step 400) so that probes
            // also expire.
            while let Some(action) = hub.poll_action() {
                let Action::PeerDatagram { peer, datagram } = action else {
                    continue;
                };
                let lost = match peer.0 {
                    2 => step % 3 == 0,
                    4 => step < 200,
                    5 => step >= 400,
                    _ => false,
                };
                if lost {
                    continue;
                }
                let p = &mut peers[peer.0 as usize - 1];
                p.handle_peer_datagram(hub.id(), &datagram, now);
                while let Some(reply) = p.poll_action() {
                    if let Action::PeerDatagram { datagram, .. } = reply {
                        in_flight.push((p.id(), datagram));
                    }
                }
            }
            match step {
                100 => hub.handle_peer_disconnected(RelayId(3), now),
                250 => hub.handle_peer_connected(RelayId(3), now),
                _ => {}
            }
            assert_timers_match(&hub);
            while let Some((peer, usable)) = hub.poll_link_change() {
                changes.push((step, peer.0, usable));
            }
        }
        // Peer 5's link dies at its probes' timeouts (no echo comes to
        // notice it), peer 3's with its connection: both are reported.
        let died = |p, after| {
            changes
                .iter()
                .any(|&(step, peer, usable)| peer == p && step >= after && !usable)
        };
        assert!(died(5, 400), "{changes:?}");
        assert!(changes.contains(&(100, 3, false)), "{changes:?}");
        assert!(hub.links.values().all(PeerLink::is_connected));
        assert!(hub.link_usable(RelayId(1)));
        assert!(hub.links[&RelayId(1)].stats(now).samples > 50);
    }
}
