//! The tokio + quinn driver of the relay core.
//!
//! One QUIC endpoint serves two ALPNs: clients (`edge-relay/1`, token
//! authentication) and peer relays (`edge-relay-peer/1`, mutual TLS under
//! the cluster CA). The connection tasks read frames and datagrams and hand
//! each to the [`Relay`] core themselves, under a lock, then carry out the
//! core's actions on the connections at once: a datagram is forwarded by
//! the task that read it, with no queue and no task switch between reading
//! and sending. One more task runs the core's timers. Peers with a higher
//! id are dialled (with backoff); lower ids dial us, so each pair has one
//! connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use quinn::VarInt;
use relay_core::links::LinkReport;
use relay_core::wire::client::{CLIENT_ALPN, CloseCode, MAX_FRAME_LEN};
use relay_core::wire::peer::{MAX_PEER_FRAME_LEN, PEER_ALPN, PeerFrame};
use relay_core::{Action, ClientId, Relay, RelayId, Stats};
use relay_net::framing::{FrameError, read_frame, spawn_writer};
use relay_net::quic::{bind_udp, media_transport};
use relay_net::tls::{check_name, negotiated_alpn, peer_certificate, relay_name};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use topology::RouteTable;
use tracing::{debug, info, warn};

use crate::config::{Config, Peer};
use crate::metrics::RelayMetrics;

/// Frames queued per connection before a slow reader is closed.
const WRITER_QUEUE: usize = 1024;
/// How long a new connection may take to open its control stream.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one dial attempt may take before it is retried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// What connection tasks tell the core.
#[derive(Debug)]
enum Input {
    ClientConnected {
        id: ClientId,
        conn: quinn::Connection,
        writer: mpsc::Sender<Bytes>,
    },
    ClientFrame(ClientId, Bytes),
    ClientDatagram(ClientId, Bytes),
    ClientViolation(ClientId, CloseCode, String),
    ClientDisconnected(ClientId),
    PeerConnected {
        peer: RelayId,
        conn: quinn::Connection,
        writer: mpsc::Sender<Bytes>,
    },
    PeerFrame(RelayId, usize, Bytes),
    PeerDatagram(RelayId, usize, Bytes),
    PeerDisconnected(RelayId, usize),
}

/// A point-in-time view of the relay for status and tests.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Counters.
    pub stats: Stats,
    /// Peer links.
    pub links: Vec<LinkReport>,
    /// Connected clients.
    pub clients: usize,
    /// Channels with local members.
    pub channels: usize,
    /// Epoch of the installed route table.
    pub route_epoch: u64,
}

/// A running relay. Dropping it leaves the tasks running until the
/// endpoint closes; call [`RelayHandle::drain_and_stop`] to stop cleanly.
#[derive(Debug)]
pub struct RelayHandle {
    endpoint: quinn::Endpoint,
    core: CoreRef,
    timers: JoinHandle<()>,
    id: RelayId,
    peers: Arc<PeerRegistry>,
}

/// The relays this one keeps connections with: from the config, plus
/// those the control plane announces. Relays with a higher id are dialled.
#[derive(Debug)]
pub struct PeerRegistry {
    me: RelayId,
    epoch: u32,
    endpoint: quinn::Endpoint,
    core: CoreRef,
    domain: Arc<str>,
    static_peers: HashMap<RelayId, Peer>,
    known: std::sync::RwLock<HashMap<RelayId, Peer>>,
}

impl PeerRegistry {
    fn get(&self, id: RelayId) -> Option<Peer> {
        self.known.read().expect("peers lock").get(&id).cloned()
    }

    /// Replaces the announced peers (static ones stay) and dials new ones.
    pub fn set(self: &Arc<Self>, announced: &[Peer]) {
        let mut next = self.static_peers.clone();
        for p in announced {
            if p.id != self.me {
                next.entry(p.id).or_insert_with(|| p.clone());
            }
        }
        let added: Vec<Peer> = {
            let mut known = self.known.write().expect("peers lock");
            let added = next
                .values()
                .filter(|p| known.get(&p.id) != Some(p))
                .cloned()
                .collect();
            *known = next;
            added
        };
        for p in added.into_iter().filter(|p| p.id > self.me) {
            tokio::spawn(dial_loop(self.clone(), p));
        }
    }
}

impl RelayHandle {
    /// Where the QUIC endpoint listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// This relay's id.
    pub fn id(&self) -> RelayId {
        self.id
    }

    /// Counters, links and gauges.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let core = self.core.lock_running()?;
        let now = Instant::now().into_std();
        Ok(Snapshot {
            stats: core.relay.stats().clone(),
            links: core.relay.links(now),
            clients: core.relay.client_count(),
            channels: core.relay.channel_count(),
            route_epoch: core.relay.route_table().epoch(),
        })
    }

    /// Replaces the apps from the control plane (the config's stay).
    pub async fn set_apps(&self, mut apps: HashMap<String, Vec<u8>>) -> anyhow::Result<()> {
        let mut core = self.core.lock_running()?;
        for (id, secret) in &core.static_apps {
            apps.entry(id.clone()).or_insert_with(|| secret.clone());
        }
        core.relay.set_apps(apps);
        Ok(())
    }

    /// Starts (or ends) a drain ordered by the control plane.
    pub async fn set_draining(&self, draining: bool) -> anyhow::Result<()> {
        self.core.act(|core, now| {
            if draining && !core.relay.is_draining() {
                info!("drained by the control plane: telling clients to move");
                core.relay.begin_drain(now);
            } else if !draining && core.relay.is_draining() {
                info!("undrained by the control plane");
                core.relay.end_drain();
            }
        })
    }

    /// Adds the peers the control plane announces (config peers stay).
    pub fn set_peers(&self, peers: &[Peer]) {
        self.peers.set(peers);
    }

    /// Installs a route table if it is newer than the current one.
    pub async fn set_routes(&self, table: RouteTable) -> anyhow::Result<bool> {
        let mut installed = false;
        self.core.act(|core, _| {
            let epoch = table.epoch();
            installed = core.relay.set_route_table(table);
            if installed {
                debug!(epoch, "route table installed");
            }
        })?;
        Ok(installed)
    }

    /// Tells clients to move, waits until they left or the drain deadline
    /// passed, then closes everything.
    pub async fn drain_and_stop(&self) {
        let (tx, rx) = oneshot::channel();
        let begun = self.core.act(|core, now| {
            info!("draining");
            core.relay.begin_drain(now);
            core.drain_waiters.push(tx);
        });
        if begun.is_ok() {
            let _ = rx.await;
        }
        self.core.stop();
        self.endpoint.close(
            VarInt::from_u32(CloseCode::Draining.code()),
            b"relay shut down",
        );
        self.timers.abort();
        // Give the close frames a moment to leave.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Stops at once, without draining (tests).
    pub fn abort(&self) {
        self.core.stop();
        self.endpoint.close(VarInt::from_u32(0), b"relay aborted");
        self.timers.abort();
    }
}

/// Binds the endpoint, dials peers and starts serving.
pub async fn start(config: Config) -> anyhow::Result<RelayHandle> {
    let transport = Arc::new(media_transport());
    let server = config
        .tls
        .quic_server(&[CLIENT_ALPN, PEER_ALPN], transport.clone())
        .context("TLS server config")?;
    let (socket, buffers) = bind_udp(config.listen, config.socket_buffer_bytes)
        .with_context(|| format!("binding UDP {}", config.listen))?;
    if buffers.capped() {
        warn!(
            requested = buffers.requested,
            recv = buffers.recv,
            send = buffers.send,
            "the kernel capped the UDP socket buffers: bursts beyond them are dropped before \
             QUIC sees them; raise net.core.rmem_max and net.core.wmem_max"
        );
    }
    let mut endpoint = config
        .tls
        .quic_endpoint(server, socket)
        .with_context(|| format!("starting the QUIC endpoint on {}", config.listen))?;
    let peer_client = config
        .tls
        .quic_node_client(PEER_ALPN, transport)
        .context("TLS client config")?;
    endpoint.set_default_client_config(peer_client);

    let mut core_config = config.core.clone();
    #[allow(clippy::disallowed_methods)] // the epoch is the start time
    let start_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    core_config.epoch = start_secs as u32;
    let id = core_config.id;
    let epoch = core_config.epoch;
    let mut relay = Relay::new(core_config);
    relay.set_route_table(config.routes.clone());

    let metrics = RelayMetrics::new(id, &config.name, &config.core.region);
    let core = CoreRef(Arc::new(Shared {
        core: Mutex::new(Core {
            static_apps: relay.config().apps.clone(),
            relay,
            clients: HashMap::new(),
            peers: HashMap::new(),
            metrics,
            drain_waiters: Vec::new(),
            stopped: false,
            armed: None,
        }),
        timer_moved: Notify::new(),
    }));
    let timers = tokio::spawn(run_timers(core.clone()));

    let static_peers: HashMap<RelayId, Peer> =
        config.peers.iter().map(|p| (p.id, p.clone())).collect();
    let peers = Arc::new(PeerRegistry {
        me: id,
        epoch,
        endpoint: endpoint.clone(),
        core: core.clone(),
        domain: config.tls.domain().into(),
        known: std::sync::RwLock::new(HashMap::new()),
        static_peers,
    });
    peers.set(&[]);
    let next_client = Arc::new(AtomicU64::new(1));
    tokio::spawn(accept_loop(peers.clone(), next_client));
    info!(relay = id.0, listen = %endpoint.local_addr()?, peers = config.peers.len(), "relay started");
    Ok(RelayHandle {
        endpoint,
        core,
        timers,
        id,
        peers,
    })
}

fn unix_now() -> u64 {
    #[allow(clippy::disallowed_methods)] // token expiry is wall-clock time
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

struct ClientConn {
    conn: quinn::Connection,
    writer: mpsc::Sender<Bytes>,
}

struct PeerConn {
    conn: quinn::Connection,
    writer: mpsc::Sender<Bytes>,
}

/// The relay core and the connections it acts on.
struct Core {
    relay: Relay,
    /// Apps from the config: they stay whatever the control plane says,
    /// as static peers do (a control plane that has not replicated its
    /// apps yet must not lock clients out).
    static_apps: HashMap<String, Vec<u8>>,
    clients: HashMap<ClientId, ClientConn>,
    peers: HashMap<RelayId, PeerConn>,
    metrics: RelayMetrics,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// Set when the relay stops: connection tasks then end.
    stopped: bool,
    /// The deadline the timer task sleeps until.
    armed: Option<std::time::Instant>,
}

struct Shared {
    core: Mutex<Core>,
    /// Wakes the timer task when the core's next deadline came earlier
    /// than the one it sleeps until.
    timer_moved: Notify,
}

/// The core, shared by the connection tasks and the timer task. The lock
/// is never held across an await.
#[derive(Clone)]
struct CoreRef(Arc<Shared>);

impl std::fmt::Debug for CoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreRef")
    }
}

impl CoreRef {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic under the lock (a bug) ends the task it happened in;
        // the other tasks carry on with the state as the core left it
        // rather than panic in turn.
        self.0
            .core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_running(&self) -> anyhow::Result<MutexGuard<'_, Core>> {
        let core = self.lock();
        anyhow::ensure!(!core.stopped, "relay stopped");
        Ok(core)
    }

    /// Runs `f` on the core, then carries out what the core decided.
    /// Fails once the relay has stopped.
    fn act(&self, f: impl FnOnce(&mut Core, std::time::Instant)) -> anyhow::Result<()> {
        let mut core = self.lock_running()?;
        f(&mut core, Instant::now().into_std());
        core.execute();
        core.check_drain();
        let next = core.relay.poll_timeout();
        let earlier = match (next, core.armed) {
            (Some(next), Some(armed)) => next < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        drop(core);
        if earlier {
            self.0.timer_moved.notify_one();
        }
        Ok(())
    }

    /// Hands the core what a connection task saw. False once the relay
    /// has stopped: the task should end.
    fn input(&self, input: Input) -> bool {
        self.act(|core, now| core.handle(input, now)).is_ok()
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.0.timer_moved.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.lock().stopped
    }
}

/// Runs the core's timers (probes, link timeouts, the drain deadline) and
/// publishes its metrics, until the relay stops.
async fn run_timers(core: CoreRef) {
    let mut publish = tokio::time::interval(Duration::from_secs(1));
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = {
            let mut core = core.lock();
            if core.stopped {
                return;
            }
            core.armed = core.relay.poll_timeout();
            core.armed
        };
        tokio::select! {
            _ = sleep_until(deadline.map(Instant::from_std)) => {
                let _ = core.act(|core, now| core.relay.handle_timeout(now));
            }
            _ = core.0.timer_moved.notified() => {}
            _ = publish.tick() => {
                let mut core = core.lock();
                let now = Instant::now().into_std();
                let Core { metrics, relay, .. } = &mut *core;
                metrics.publish(relay, now);
            }
        }
    }
}

impl Core {
    fn handle(&mut self, input: Input, now: std::time::Instant) {
        match input {
            Input::ClientConnected { id, conn, writer } => {
                let observed = conn.remote_address();
                self.clients.insert(id, ClientConn { conn, writer });
                self.relay.handle_client_connected(id, observed);
            }
            Input::ClientFrame(id, frame) => {
                self.relay.handle_client_frame(id, &frame, now, unix_now())
            }
            Input::ClientDatagram(id, d) => self.relay.handle_client_datagram(id, &d, now),
            Input::ClientViolation(id, code, reason) => {
                self.relay.handle_client_violation(id, code, reason)
            }
            Input::ClientDisconnected(id) => {
                self.clients.remove(&id);
                self.relay.handle_client_disconnected(id);
            }
            Input::PeerConnected { peer, conn, writer } => {
                if let Some(old) = self.peers.insert(peer, PeerConn { conn, writer }) {
                    old.conn
                        .close(VarInt::from_u32(0), b"replaced by a newer connection");
                }
                info!(peer = peer.0, "peer connected");
                self.relay.handle_peer_connected(peer, now);
            }
            Input::PeerFrame(peer, conn_id, frame) => {
                if !self.is_current(peer, conn_id) {
                    return;
                }
                if let Err(e) = self.relay.handle_peer_frame(peer, &frame, now) {
                    warn!(peer = peer.0, error = %e, "closing peer after a bad frame");
                    if let Some(p) = self.peers.remove(&peer) {
                        p.conn.close(
                            VarInt::from_u32(CloseCode::ProtocolViolation.code()),
                            b"bad frame",
                        );
                    }
                    self.relay.handle_peer_disconnected(peer, now);
                }
            }
            Input::PeerDatagram(peer, conn_id, d) => {
                if self.is_current(peer, conn_id) {
                    self.relay.handle_peer_datagram(peer, &d, now);
                }
            }
            Input::PeerDisconnected(peer, conn_id) => {
                if self.is_current(peer, conn_id) {
                    self.peers.remove(&peer);
                    info!(peer = peer.0, "peer disconnected");
                    self.relay.handle_peer_disconnected(peer, now);
                }
            }
        }
    }

    fn is_current(&self, peer: RelayId, conn_id: usize) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.conn.stable_id() == conn_id)
    }

    fn execute(&mut self) {
        while let Some((peer, usable)) = self.relay.poll_link_change() {
            let now = Instant::now().into_std();
            let link = self.relay.links(now).into_iter().find(|l| l.peer == peer);
            let (loss, rtt) = link.map_or((0.0, None), |l| (l.stats.loss, l.stats.rtt));
            if usable {
                info!(peer = peer.0, loss, ?rtt, "link usable again");
            } else {
                warn!(
                    peer = peer.0,
                    loss,
                    ?rtt,
                    "link unusable: rerouting around it"
                );
            }
        }
        while let Some(action) = self.relay.poll_action() {
            match action {
                Action::ClientDatagram { client, datagram } => {
                    if let Some(c) = self.clients.get(&client) {
                        let _ = c.conn.send_datagram(datagram);
                    }
                }
                Action::ClientFrame { client, frame } => {
                    if let Some(c) = self.clients.get(&client)
                        && c.writer.try_send(frame).is_err()
                    {
                        c.conn.close(
                            VarInt::from_u32(CloseCode::Overloaded.code()),
                            b"control stream not read",
                        );
                    }
                }
                Action::CloseClient {
                    client,
                    code,
                    reason,
                } => {
                    if let Some(c) = self.clients.get(&client) {
                        debug!(client = client.0, ?code, %reason, "closing client");
                        c.conn
                            .close(VarInt::from_u32(code.code()), reason.as_bytes());
                    }
                }
                Action::PeerDatagram { peer, datagram } => {
                    if let Some(p) = self.peers.get(&peer) {
                        let _ = p.conn.send_datagram(datagram);
                    }
                }
                Action::PeerFrame { peer, frame } => {
                    if let Some(p) = self.peers.get(&peer)
                        && p.writer.try_send(frame).is_err()
                    {
                        warn!(peer = peer.0, "peer control stream backed up; closing");
                        p.conn.close(
                            VarInt::from_u32(CloseCode::Overloaded.code()),
                            b"control stream not read",
                        );
                    }
                }
            }
        }
    }

    fn check_drain(&mut self) {
        if self.drain_waiters.is_empty() {
            return;
        }
        if self.relay.client_count() == 0 || self.relay.drain_finished() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(peers: Arc<PeerRegistry>, next_client: Arc<AtomicU64>) {
    let endpoint = peers.endpoint.clone();
    while let Some(incoming) = endpoint.accept().await {
        let (peers, next_client) = (peers.clone(), next_client.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(%remote, error = %e, "handshake failed");
                    return;
                }
            };
            match negotiated_alpn(&conn).as_deref() {
                Some(CLIENT_ALPN) => {
                    let id = ClientId(next_client.fetch_add(1, Ordering::Relaxed));
                    serve_client(conn, id, peers.core.clone()).await;
                }
                Some(PEER_ALPN) => {
                    if let Err(e) = accept_peer(conn, &peers).await {
                        warn!(%remote, error = %e, "refused peer");
                    }
                }
                _ => conn.close(
                    VarInt::from_u32(CloseCode::ProtocolViolation.code()),
                    b"unknown ALPN",
                ),
            }
        });
    }
}

async fn serve_client(conn: quinn::Connection, id: ClientId, core: CoreRef) {
    let (send, mut recv) = match tokio::time::timeout(STREAM_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(
                VarInt::from_u32(CloseCode::ProtocolViolation.code()),
                b"no control stream",
            );
            return;
        }
    };
    let writer = spawn_writer(send, WRITER_QUEUE);
    if !core.input(Input::ClientConnected {
        id,
        conn: conn.clone(),
        writer,
    }) {
        return;
    }
    let datagrams = {
        let (conn, core) = (conn.clone(), core.clone());
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                if !core.input(Input::ClientDatagram(id, d)) {
                    break;
                }
            }
        })
    };
    loop {
        match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(frame)) => {
                if !core.input(Input::ClientFrame(id, frame)) {
                    break;
                }
            }
            Ok(None) => break,
            Err(FrameError::Read(_)) => break,
            Err(e @ (FrameError::TooLarge(_) | FrameError::TooShort(_))) => {
                let code = if matches!(e, FrameError::TooLarge(_)) {
                    CloseCode::FrameTooLarge
                } else {
                    CloseCode::ProtocolViolation
                };
                conn.close(VarInt::from_u32(code.code()), e.to_string().as_bytes());
                core.input(Input::ClientViolation(id, code, e.to_string()));
                break;
            }
        }
    }
    // The control stream ended: so does the client.
    conn.close(
        VarInt::from_u32(CloseCode::Normal.code()),
        b"control stream ended",
    );
    let _ = datagrams.await;
    core.input(Input::ClientDisconnected(id));
}

/// Exchanges Hello frames on a new peer control stream.
async fn hello(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    me: RelayId,
    epoch: u32,
) -> anyhow::Result<RelayId> {
    let mut buf = bytes::BytesMut::new();
    PeerFrame::Hello { relay: me, epoch }.encode(&mut buf);
    send.write_all(&buf).await?;
    let frame = tokio::time::timeout(STREAM_TIMEOUT, read_frame(recv, MAX_PEER_FRAME_LEN))
        .await
        .context("no hello")??
        .context("stream ended before hello")?;
    match PeerFrame::decode(&frame)? {
        PeerFrame::Hello { relay, .. } => Ok(relay),
        _ => anyhow::bail!("first frame is not a hello"),
    }
}

async fn accept_peer(conn: quinn::Connection, peers: &PeerRegistry) -> anyhow::Result<()> {
    let refuse = |why: &'static str| {
        conn.close(
            VarInt::from_u32(CloseCode::ProtocolViolation.code()),
            why.as_bytes(),
        );
        anyhow::anyhow!(why)
    };
    let Some(cert) = peer_certificate(&conn) else {
        return Err(refuse("peer connections need a client certificate"));
    };
    let (mut send, mut recv) = tokio::time::timeout(STREAM_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| refuse("no control stream"))??;
    let claimed = hello(&mut send, &mut recv, peers.me, peers.epoch).await?;
    if peers.get(claimed).is_none() || claimed == peers.me {
        return Err(refuse("unknown relay id"));
    }
    if check_name(&cert, &relay_name(claimed, &peers.domain)).is_err() {
        return Err(refuse("certificate does not match the relay id"));
    }
    run_peer(conn, send, recv, claimed, peers.core.clone()).await;
    Ok(())
}

async fn dial_loop(peers: Arc<PeerRegistry>, peer: Peer) {
    let mut backoff = Duration::from_millis(100);
    // Runs while the registry still lists this peer at this address.
    while peers.get(peer.id).as_ref() == Some(&peer) {
        let dial = dial_once(&peers.endpoint, peers.me, peers.epoch, &peer, &peers.domain);
        match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
            Ok(Ok((conn, send, recv))) => {
                backoff = Duration::from_millis(100);
                run_peer(conn, send, recv, peer.id, peers.core.clone()).await;
            }
            Ok(Err(e)) => debug!(peer = peer.id.0, error = %e, "dial failed"),
            Err(_) => debug!(peer = peer.id.0, "dial timed out"),
        }
        if peers.core.is_stopped() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn dial_once(
    endpoint: &quinn::Endpoint,
    me: RelayId,
    epoch: u32,
    peer: &Peer,
    domain: &str,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let addr = tokio::net::lookup_host(&peer.addr)
        .await?
        .next()
        .with_context(|| format!("{} does not resolve", peer.addr))?;
    // The server name proves the peer's identity: its certificate must be
    // for relay-<id>.<domain>.
    let conn = endpoint
        .connect(addr, &relay_name(peer.id, domain))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let claimed = hello(&mut send, &mut recv, me, epoch).await?;
    anyhow::ensure!(claimed == peer.id, "peer says it is relay {claimed}");
    Ok((conn, send, recv))
}

async fn run_peer(
    conn: quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: RelayId,
    core: CoreRef,
) {
    let conn_id = conn.stable_id();
    let writer = spawn_writer(send, WRITER_QUEUE);
    if !core.input(Input::PeerConnected {
        peer,
        conn: conn.clone(),
        writer,
    }) {
        return;
    }
    let datagrams = {
        let (conn, core) = (conn.clone(), core.clone());
        tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                if !core.input(Input::PeerDatagram(peer, conn_id, d)) {
                    break;
                }
            }
        })
    };
    while let Ok(Some(frame)) = read_frame(&mut recv, MAX_PEER_FRAME_LEN).await {
        if !core.input(Input::PeerFrame(peer, conn_id, frame)) {
            break;
        }
    }
    conn.close(VarInt::from_u32(0), b"control stream ended");
    let _ = datagrams.await;
    core.input(Input::PeerDisconnected(peer, conn_id));
}
