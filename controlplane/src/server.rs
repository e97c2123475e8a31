//! The control-plane node driver: one task owns the [`RaftNode`] and the
//! leader's [`RouteEngine`]; network tasks (Raft transport, relay
//! sessions, operator requests) talk to it through a queue.
//!
//! Per loop turn: a tick or an input, then `RaftNode::process` (the Ready
//! loop), then the outputs: Raft messages to the transport, completions to
//! waiting requests, granted reads to their queries, notices to relays
//! (new route tables, apps, peers).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use anyhow::Context;
use quinn::VarInt;
use relay_net::framing::{read_frame, spawn_writer};
use relay_net::quic::control_transport;
use relay_net::tls::{Identity, identity, negotiated_alpn, peer_certificate};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use topology::{RelayId, RouteSet};
use tracing::{debug, error, info, warn};

use crate::api::{
    API_ALPN, ClusterStatus, Consistency, CpToRelay, LinkView, MAX_API_FRAME, MapView, RAFT_ALPN,
    RelayToCp, RelayView, Request, Response, encode_frame,
};
use crate::config::CpConfig;
use crate::engine::{EpochPlan, LinkReport, RouteEngine};
use crate::node::{Notice, ProposeError, RaftNode, Token};
use crate::state::{ClusterState, Command, RelayInfo};
use crate::storage::SledStorage;
use crate::transport::{ForwardedReport, Incoming, Transport, serve_peer};

/// ALPN of relay sessions.
pub const RELAY_ALPN: &[u8] = b"edge-cp-relay/1";

type Query = Box<dyn FnOnce(&CoreView<'_>) -> Response + Send>;

/// What the core task reads when answering a query.
pub struct CoreView<'a> {
    /// The node.
    pub node: &'a RaftNode,
    /// The route set being served.
    pub serving: &'a Serving,
    /// Clients per relay (leader's soft state).
    pub clients: &'a HashMap<RelayId, u32>,
    /// Members' addresses as this node knows them.
    pub members: BTreeMap<u64, String>,
}

impl std::fmt::Debug for CoreView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreView")
            .field("epoch", &self.serving.epoch)
            .finish_non_exhaustive()
    }
}

/// The route set relays are served from.
#[derive(Debug, Default, Clone)]
pub struct Serving {
    /// Its epoch.
    pub epoch: u64,
    /// The routes with backups.
    pub routes: Arc<RouteSet>,
}

/// A message to the core task.
pub enum Input {
    Peer(Incoming),
    Propose(Command, oneshot::Sender<Result<(), ProposeError>>),
    Membership(
        u64,
        Option<String>,
        oneshot::Sender<Result<(), ProposeError>>,
    ),
    Query(Consistency, Query, oneshot::Sender<Response>),
    RelayHello {
        relay: RelayId,
        info: RelayInfo,
        held_epoch: u64,
        tx: mpsc::Sender<CpToRelay>,
    },
    RelayReport(ForwardedReport),
    RelayGone(RelayId),
    EpochPlanned(Option<EpochPlan>, StdInstant),
    Served(Serving),
}

enum Waiter {
    Reply(oneshot::Sender<Result<(), ProposeError>>, Instant),
    Epoch,
    Fire,
    Read(Query, oneshot::Sender<Response>),
}

/// A running node.
#[derive(Debug)]
pub struct CpHandle {
    endpoint: quinn::Endpoint,
    inputs: mpsc::Sender<Input>,
    core: JoinHandle<()>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Input")
    }
}

impl CpHandle {
    /// The QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound")
    }

    /// The core task's queue (for in-process requests).
    pub fn inputs(&self) -> &mpsc::Sender<Input> {
        &self.inputs
    }

    /// Runs a query against the node's state.
    pub async fn query(&self, consistency: Consistency, q: Query) -> Response {
        ask(&self.inputs, consistency, q).await
    }

    /// Stops the node.
    pub fn shutdown(self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
        self.core.abort();
    }
}

fn relay_views(v: &CoreView<'_>) -> Vec<RelayView> {
    v.node
        .state()
        .relays
        .values()
        .map(|r| RelayView {
            id: r.id,
            name: r.info.name.clone(),
            region: r.info.region.clone(),
            addr: r.info.addr.clone(),
            admin: r.admin,
            alive: r.alive,
            clients: v.clients.get(&r.id).copied().unwrap_or(0),
            location: r.info.location,
        })
        .collect()
}

fn link_views(s: &ClusterState) -> Vec<LinkView> {
    let poor = s.policy.routing.cost.poor;
    s.links
        .iter()
        .map(|(&(from, to), q)| {
            let m = q.metrics();
            LinkView {
                from,
                to,
                rtt_ms: m.rtt_ms,
                jitter_ms: m.jitter_ms,
                loss: m.loss,
                poor: poor.is_poor(&m),
            }
        })
        .collect()
}

async fn ask(inputs: &mpsc::Sender<Input>, consistency: Consistency, q: Query) -> Response {
    let (tx, rx) = oneshot::channel();
    if inputs.send(Input::Query(consistency, q, tx)).await.is_err() {
        return Response::Error {
            message: "node is shutting down".into(),
        };
    }
    rx.await.unwrap_or(Response::Error {
        message: "node is shutting down".into(),
    })
}

/// Opens storage, binds the endpoint and starts the node.
pub async fn start(config: CpConfig) -> anyhow::Result<CpHandle> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store = SledStorage::open(&config.data_dir).context("opening the raft store")?;
    if store.is_empty() && !config.join {
        let voters: Vec<u64> = config.members.iter().map(|(id, _)| *id).collect();
        store.bootstrap(&voters)?;
        info!(?voters, "bootstrapped a new cluster");
    }
    let node = RaftNode::open(config.node.clone(), store)?;

    let transport_cfg = Arc::new(control_transport());
    let server = config
        .tls
        .quic_server(&[RAFT_ALPN, API_ALPN, RELAY_ALPN], transport_cfg.clone())?;
    let endpoint = config.tls.quic_endpoint(
        server,
        std::net::UdpSocket::bind(config.listen)
            .with_context(|| format!("binding {}", config.listen))?,
    )?;
    let client = config.tls.quic_node_client(RAFT_ALPN, transport_cfg)?;
    let mut transport = Transport::new(
        config.node.id,
        endpoint.clone(),
        client,
        config.tls.domain(),
    );
    let mut members: BTreeMap<u64, String> = config.members.iter().cloned().collect();
    members.extend(node.state().members.clone());
    transport.set_members(&members);

    let (inputs, rx) = mpsc::channel(8192);
    let (peer_tx, mut peer_rx) = mpsc::channel::<Incoming>(8192);
    {
        let inputs = inputs.clone();
        tokio::spawn(async move {
            while let Some(m) = peer_rx.recv().await {
                if inputs.send(Input::Peer(m)).await.is_err() {
                    break;
                }
            }
        });
    }
    let domain: Arc<str> = config.tls.domain().into();
    tokio::spawn(accept_loop(
        endpoint.clone(),
        inputs.clone(),
        peer_tx,
        domain,
    ));

    let core = Core {
        node,
        engine: RouteEngine::new(config.engine.clone()),
        transport,
        initial_members: config.members.iter().cloned().collect(),
        waiters: HashMap::new(),
        next_token: 1,
        subscribers: HashMap::new(),
        serving: Serving::default(),
        clients: HashMap::new(),
        was_leader: false,
        inputs: inputs.clone(),
        bootstrap_apps: config.apps.clone(),
        metrics: CpMetrics::new(),
        last_epoch_basis: None,
        sessions: HashMap::new(),
        ticks: 0,
    };
    let tick = config.tick;
    let core = tokio::spawn(core.run(rx, tick));
    info!(id = config.node.id, listen = %endpoint.local_addr()?, "control-plane node started");
    Ok(CpHandle {
        endpoint,
        inputs,
        core,
    })
}

struct CpMetrics {
    term: metrics::Gauge,
    leader: metrics::Gauge,
    is_leader: metrics::Gauge,
    leader_changes: metrics::Counter,
    commit: metrics::Gauge,
    applied: metrics::Gauge,
    proposal_latency: metrics::Histogram,
    route_compute: metrics::Histogram,
    route_changes: metrics::Counter,
    route_epoch: metrics::Gauge,
    epochs: metrics::Counter,
    relays: metrics::Gauge,
    relays_alive: metrics::Gauge,
    rejected: metrics::Gauge,
}

impl CpMetrics {
    fn new() -> Self {
        use metrics::{counter, gauge, histogram};
        describe_metrics();
        Self {
            term: gauge!("controlplane_raft_term"),
            leader: gauge!("controlplane_raft_leader_id"),
            is_leader: gauge!("controlplane_raft_is_leader"),
            leader_changes: counter!("controlplane_raft_leader_changes_total"),
            commit: gauge!("controlplane_raft_commit_index"),
            applied: gauge!("controlplane_raft_applied_index"),
            proposal_latency: histogram!("controlplane_proposal_duration_seconds"),
            route_compute: histogram!("controlplane_route_computation_seconds"),
            route_changes: counter!("controlplane_route_changes_total"),
            route_epoch: gauge!("controlplane_route_epoch"),
            epochs: counter!("controlplane_route_epochs_total"),
            relays: gauge!("controlplane_relays"),
            relays_alive: gauge!("controlplane_relays_alive"),
            rejected: gauge!("controlplane_rejected_commands"),
        }
    }
}

/// Help text for every metric (Prometheus `# HELP`).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("controlplane_raft_term", "Current Raft term.");
    describe_gauge!(
        "controlplane_raft_leader_id",
        "The leader this node knows (0: none)."
    );
    describe_gauge!("controlplane_raft_is_leader", "1 on the leader.");
    describe_counter!(
        "controlplane_raft_leader_changes_total",
        "Leader changes this node has seen."
    );
    describe_gauge!("controlplane_raft_commit_index", "Raft commit index.");
    describe_gauge!("controlplane_raft_applied_index", "Raft applied index.");
    describe_histogram!(
        "controlplane_proposal_duration_seconds",
        Unit::Seconds,
        "Time from a proposal to its commit and apply."
    );
    describe_histogram!(
        "controlplane_route_computation_seconds",
        Unit::Seconds,
        "Time to plan a route epoch."
    );
    describe_counter!(
        "controlplane_route_changes_total",
        "Pairs whose primary path changed, summed over epochs."
    );
    describe_gauge!("controlplane_route_epoch", "The last applied route epoch.");
    describe_counter!("controlplane_route_epochs_total", "Route epochs applied.");
    describe_gauge!("controlplane_relays", "Registered relays.");
    describe_gauge!("controlplane_relays_alive", "Relays within their lease.");
    describe_gauge!(
        "controlplane_rejected_commands",
        "Commands the state machine rejected since the log began."
    );
}

struct Core {
    node: RaftNode,
    engine: RouteEngine,
    transport: Transport,
    initial_members: BTreeMap<u64, String>,
    waiters: HashMap<Token, Waiter>,
    next_token: Token,
    subscribers: HashMap<RelayId, mpsc::Sender<CpToRelay>>,
    serving: Serving,
    clients: HashMap<RelayId, u32>,
    was_leader: bool,
    inputs: mpsc::Sender<Input>,
    bootstrap_apps: Vec<(String, crate::state::Secret)>,
    metrics: CpMetrics,
    /// The basis of the last applied route epoch.
    last_epoch_basis: Option<u64>,
    /// What relays with a session here registered with.
    sessions: HashMap<RelayId, RelayInfo>,
    ticks: u64,
}

impl Core {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, tick: Duration) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if self.node.state().epoch > 0 {
            self.recompute_serving();
        }
        let mut batch = Vec::with_capacity(64);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.node.tick();
                    self.ticks += 1;
                    if self.ticks.is_multiple_of(100) {
                        self.register_sessions();
                    }
                    self.leader_duties();
                }
                n = rx.recv_many(&mut batch, 64) => {
                    if n == 0 {
                        return;
                    }
                    for input in batch.drain(..) {
                        self.handle(input);
                    }
                }
            }
            if let Err(e) = self.node.process() {
                // Storage failure: a node that cannot persist must stop.
                error!(error = %e, "raft storage failed; stopping the node");
                std::process::exit(2);
            }
            self.outputs();
        }
    }

    fn token(&mut self, w: Waiter) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        self.waiters.insert(t, w);
        t
    }

    fn propose(&mut self, cmd: &Command, w: Waiter) {
        let t = self.token(w);
        if let Err(e) = self.node.propose(cmd, t) {
            self.complete(t, Err(e));
        }
    }

    fn complete(&mut self, t: Token, r: Result<(), ProposeError>) {
        match self.waiters.remove(&t) {
            Some(Waiter::Reply(tx, started)) => {
                self.metrics
                    .proposal_latency
                    .record(started.elapsed().as_secs_f64());
                let _ = tx.send(r);
            }
            Some(Waiter::Epoch) => {
                if let Err(e) = &r {
                    debug!(error = %e, "route epoch not applied");
                }
                self.engine.epoch_finished();
            }
            Some(Waiter::Read(_, tx)) => {
                let _ = tx.send(Response::Error {
                    message: r.err().map(|e| e.to_string()).unwrap_or_default(),
                });
            }
            Some(Waiter::Fire) | None => {}
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Peer(Incoming::Raft(m)) => {
                let from = m.from;
                if let Err(e) = self.node.step(m) {
                    debug!(from, error = %e, "raft step");
                }
            }
            Input::Peer(Incoming::Report(r)) => self.relay_report(r),
            Input::Propose(cmd, tx) => self.propose(&cmd, Waiter::Reply(tx, Instant::now())),
            Input::Membership(id, addr, tx) => {
                let t = self.token(Waiter::Reply(tx, Instant::now()));
                if let Err(e) = self.node.propose_membership(id, addr, t) {
                    self.complete(t, Err(e));
                }
            }
            Input::Query(Consistency::Stale, q, tx) => {
                let _ = tx.send(q(&self.view()));
            }
            Input::Query(Consistency::Linearizable, q, tx) => {
                let t = self.token(Waiter::Read(q, tx));
                self.node.read_index(t);
            }
            Input::RelayHello {
                relay,
                info,
                held_epoch,
                tx,
            } => {
                self.sessions.insert(relay, info);
                self.register_sessions();
                self.engine.on_heartbeat(relay, Instant::now().into_std());
                let _ = tx.try_send(CpToRelay::Apps {
                    apps: self.node.state().apps.clone().into_iter().collect(),
                });
                let _ = tx.try_send(CpToRelay::Peers {
                    peers: self.peers(),
                });
                let draining = self
                    .node
                    .state()
                    .relays
                    .get(&relay)
                    .is_some_and(|r| r.admin == crate::state::Admin::Draining);
                let _ = tx.try_send(CpToRelay::Admin { draining });
                if self.serving.epoch > held_epoch
                    && let Some(t) = self.serving.routes.table(relay)
                {
                    let mut table = t.clone();
                    table.set_epoch(self.serving.epoch);
                    let _ = tx.try_send(CpToRelay::Routes { table });
                }
                self.subscribers.insert(relay, tx);
            }
            Input::RelayReport(r) => self.relay_report(r),
            Input::RelayGone(relay) => {
                self.subscribers
                    .retain(|r, tx| *r != relay || !tx.is_closed());
                if !self.subscribers.contains_key(&relay) {
                    self.sessions.remove(&relay);
                }
            }
            Input::EpochPlanned(plan, started) => {
                self.metrics
                    .route_compute
                    .record(started.elapsed().as_secs_f64());
                match plan {
                    Some(plan) if self.node.is_leader() => {
                        self.metrics
                            .route_changes
                            .increment(plan.route_changes as u64);
                        debug!(
                            links = plan.link_changes,
                            routes = plan.route_changes,
                            "proposing a route epoch"
                        );
                        self.propose(&plan.command, Waiter::Epoch);
                    }
                    _ => self.engine.epoch_finished(),
                }
            }
            Input::Served(s) => {
                self.serving = s;
                self.push_routes();
            }
        }
    }

    /// Proposes the registration of relays with a session here until the
    /// replicated state shows it (a proposal made without a leader is lost).
    fn register_sessions(&mut self) {
        if self.node.leader() == 0 {
            return;
        }
        let missing: Vec<(RelayId, RelayInfo)> = self
            .sessions
            .iter()
            .filter(|(id, info)| {
                self.node
                    .state()
                    .relays
                    .get(id)
                    .is_none_or(|r| &r.info != *info)
            })
            .map(|(id, info)| (*id, info.clone()))
            .collect();
        for (id, info) in missing {
            self.propose(&Command::RegisterRelay { id, info }, Waiter::Fire);
        }
    }

    fn relay_report(&mut self, r: ForwardedReport) {
        self.clients.insert(r.relay, r.clients);
        if self.node.is_leader() {
            self.engine
                .on_report(r.relay, &r.links, Instant::now().into_std());
        } else if self.node.leader() != 0 {
            self.transport.forward_report(self.node.leader(), &r);
        }
    }

    fn view(&self) -> CoreView<'_> {
        let mut members = self.initial_members.clone();
        members.extend(self.node.state().members.clone());
        let status = self.node.status();
        members.retain(|id, _| status.voters.contains(id) || status.learners.contains(id));
        CoreView {
            node: &self.node,
            serving: &self.serving,
            clients: &self.clients,
            members,
        }
    }

    fn peers(&self) -> Vec<(RelayId, String)> {
        self.node
            .state()
            .relays
            .values()
            .map(|r| (r.id, r.info.addr.clone()))
            .collect()
    }

    fn leader_duties(&mut self) {
        let now = Instant::now().into_std();
        let leader = self.node.is_leader();
        if leader && !self.was_leader {
            self.engine.became_leader(now);
            for (id, secret) in self.bootstrap_apps.clone() {
                if !self.node.state().apps.contains_key(&id) {
                    self.propose(&Command::PutApp { id, secret }, Waiter::Fire);
                }
            }
        } else if !leader && self.was_leader {
            self.engine.lost_leadership();
        }
        self.was_leader = leader;
        if !leader {
            return;
        }
        let (liveness, epoch) = self
            .engine
            .tick(self.node.state(), self.routed_basis(), now);
        for cmd in liveness {
            self.propose(&cmd, Waiter::Fire);
        }
        if let Some(start) = epoch {
            let state: ClusterState = self.node.state().clone();
            let inputs = self.inputs.clone();
            tokio::task::spawn_blocking(move || {
                let plan = RouteEngine::plan(&state, start.links, start.force);
                let _ = inputs.blocking_send(Input::EpochPlanned(plan, now));
            });
        }
    }

    /// The basis the last applied epoch was computed on.
    fn routed_basis(&self) -> Option<u64> {
        self.last_epoch_basis
    }

    fn outputs(&mut self) {
        for m in self.node.take_messages() {
            let to = m.to;
            if !self.transport.send(&m) {
                self.node.report_unreachable(to);
            }
        }
        for (t, r) in self.node.take_completions() {
            self.complete(t, r);
        }
        for t in self.node.take_reads() {
            if let Some(Waiter::Read(q, tx)) = self.waiters.remove(&t) {
                let _ = tx.send(q(&self.view()));
            }
        }
        for n in self.node.take_notices() {
            match n {
                Notice::RouteEpoch(epoch) => {
                    self.metrics.epochs.increment(1);
                    self.metrics.route_epoch.set(epoch as f64);
                    self.last_epoch_basis = Some(self.node.state().basis);
                    self.recompute_serving();
                }
                Notice::Restored => {
                    self.last_epoch_basis = Some(self.node.state().basis);
                    self.recompute_serving();
                    self.update_members();
                }
                Notice::AppsChanged => {
                    let apps: Vec<_> = self.node.state().apps.clone().into_iter().collect();
                    for tx in self.subscribers.values() {
                        let _ = tx.try_send(CpToRelay::Apps { apps: apps.clone() });
                    }
                }
                Notice::RoutingInputsChanged => {
                    let peers = self.peers();
                    let state = self.node.state();
                    for (relay, tx) in &self.subscribers {
                        let _ = tx.try_send(CpToRelay::Peers {
                            peers: peers.clone(),
                        });
                        let draining = state
                            .relays
                            .get(relay)
                            .is_some_and(|r| r.admin == crate::state::Admin::Draining);
                        let _ = tx.try_send(CpToRelay::Admin { draining });
                    }
                }
                Notice::Membership => self.update_members(),
                Notice::Leader { leader, term } => {
                    info!(leader, term, "leader changed");
                    self.metrics.leader_changes.increment(1);
                    self.metrics.leader.set(leader as f64);
                }
            }
        }
        let status = self.node.status();
        self.metrics.term.set(status.term as f64);
        self.metrics.commit.set(status.commit as f64);
        self.metrics.applied.set(status.applied as f64);
        self.metrics
            .is_leader
            .set(if self.node.is_leader() { 1.0 } else { 0.0 });
        let state = self.node.state();
        self.metrics.relays.set(state.relays.len() as f64);
        self.metrics
            .relays_alive
            .set(state.relays.values().filter(|r| r.alive).count() as f64);
        self.metrics.rejected.set(state.rejected as f64);
    }

    fn update_members(&mut self) {
        let mut members = self.initial_members.clone();
        members.extend(self.node.state().members.clone());
        let voters = self.node.status().voters;
        let learners = self.node.status().learners;
        members
            .retain(|id, _| voters.contains(id) || learners.contains(id) || *id == self.node.id());
        self.transport.set_members(&members);
    }

    fn recompute_serving(&mut self) {
        let state = self.node.state().clone();
        let inputs = self.inputs.clone();
        tokio::task::spawn_blocking(move || {
            let routes =
                RouteSet::with_backups(&state.graph(), &state.policy.routing, &state.primary_set());
            let _ = inputs.blocking_send(Input::Served(Serving {
                epoch: state.epoch,
                routes: Arc::new(routes),
            }));
        });
    }

    fn push_routes(&mut self) {
        let epoch = self.serving.epoch;
        self.subscribers.retain(|_, tx| !tx.is_closed());
        for (relay, tx) in &self.subscribers {
            let mut table = self
                .serving
                .routes
                .table(*relay)
                .cloned()
                .unwrap_or_else(|| topology::RouteTable::empty(*relay));
            table.set_epoch(epoch);
            let _ = tx.try_send(CpToRelay::Routes { table });
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    inputs: mpsc::Sender<Input>,
    peers: mpsc::Sender<Incoming>,
    domain: Arc<str>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (inputs, peers, domain) = (inputs.clone(), peers.clone(), domain.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            match negotiated_alpn(&conn).as_deref() {
                Some(RAFT_ALPN) => serve_peer(conn, &domain, peers).await,
                Some(RELAY_ALPN) => serve_relay(conn, &domain, inputs).await,
                Some(API_ALPN) => serve_operator(conn, &domain, inputs).await,
                _ => conn.close(VarInt::from_u32(1), b"unknown ALPN"),
            }
        });
    }
}

async fn serve_relay(conn: quinn::Connection, domain: &str, inputs: mpsc::Sender<Input>) {
    let Some(Identity::Relay(relay)) = peer_certificate(&conn).and_then(|c| identity(&c, domain))
    else {
        conn.close(VarInt::from_u32(1), b"relay certificate required");
        return;
    };
    let Ok((send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let writer = spawn_writer(send, 256);
    let (tx, mut rx) = mpsc::channel::<CpToRelay>(256);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if writer.send(encode_frame(&m)).await.is_err() {
                break;
            }
        }
    });
    let mut tx = Some(tx);
    while let Ok(Some(frame)) = read_frame(&mut recv, MAX_API_FRAME).await {
        let Ok(msg) = serde_json::from_slice::<RelayToCp>(&frame) else {
            warn!(relay = relay.0, "undecodable relay message; closing");
            break;
        };
        let input = match msg {
            RelayToCp::Hello { info, route_epoch } => match tx.take() {
                Some(tx) => Input::RelayHello {
                    relay,
                    info,
                    held_epoch: route_epoch,
                    tx,
                },
                None => continue,
            },
            RelayToCp::Report { links, clients } => Input::RelayReport(ForwardedReport {
                relay,
                links,
                clients,
            }),
        };
        if inputs.send(input).await.is_err() {
            break;
        }
    }
    conn.close(VarInt::from_u32(0), b"session ended");
    let _ = inputs.send(Input::RelayGone(relay)).await;
}

async fn serve_operator(conn: quinn::Connection, domain: &str, inputs: mpsc::Sender<Input>) {
    match peer_certificate(&conn).and_then(|c| identity(&c, domain)) {
        Some(Identity::Operator(_) | Identity::ControlPlane(_)) => {}
        _ => {
            conn.close(VarInt::from_u32(1), b"operator certificate required");
            return;
        }
    }
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let response = match read_frame(&mut recv, MAX_API_FRAME).await {
                Ok(Some(f)) => match serde_json::from_slice::<Request>(&f) {
                    Ok(req) => handle_request(req, &inputs).await,
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                },
                _ => return,
            };
            let _ = send.write_all(&encode_frame(&response)).await;
            let _ = send.finish();
        });
    }
}

async fn propose(inputs: &mpsc::Sender<Input>, cmd: Command) -> Response {
    submit(
        inputs,
        |tx| Input::Propose(cmd, tx),
        "no answer in time (no quorum?)",
    )
    .await
}

/// Hands the core a write and waits (10 s at most) for its outcome.
async fn submit(
    inputs: &mpsc::Sender<Input>,
    input: impl FnOnce(oneshot::Sender<Result<(), ProposeError>>) -> Input,
    timeout_message: &str,
) -> Response {
    let (tx, rx) = oneshot::channel();
    if inputs.send(input(tx)).await.is_err() {
        return Response::Error {
            message: "node is shutting down".into(),
        };
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(()))) => Response::Ok,
        Ok(Ok(Err(e))) => Response::Error {
            message: e.to_string(),
        },
        _ => Response::Error {
            message: timeout_message.into(),
        },
    }
}

/// Answers an operator request.
pub async fn handle_request(req: Request, inputs: &mpsc::Sender<Input>) -> Response {
    match req {
        Request::Status => {
            ask(
                inputs,
                Consistency::Stale,
                Box::new(|v| {
                    let s = v.node.state();
                    let members = v.members.clone();
                    Response::Status(ClusterStatus {
                        node: v.node.status(),
                        members: members.into_iter().collect(),
                        route_epoch: s.epoch,
                        relays: s.relays.len(),
                        rejected: s.rejected,
                    })
                }),
            )
            .await
        }
        Request::Relays { consistency } => {
            ask(
                inputs,
                consistency,
                Box::new(|v| Response::Relays {
                    relays: relay_views(v),
                }),
            )
            .await
        }
        Request::Links { consistency } => {
            ask(
                inputs,
                consistency,
                Box::new(|v| Response::Links {
                    epoch: v.node.state().epoch,
                    links: link_views(v.node.state()),
                }),
            )
            .await
        }
        Request::Map { consistency } => {
            ask(
                inputs,
                consistency,
                Box::new(|v| {
                    let s = v.node.state();
                    Response::Map(MapView {
                        epoch: s.epoch,
                        relays: relay_views(v),
                        links: link_views(s),
                        primaries: s.primaries.values().cloned().collect(),
                    })
                }),
            )
            .await
        }
        Request::Route { from, to } => {
            ask(
                inputs,
                Consistency::Stale,
                Box::new(move |v| Response::Route {
                    epoch: v.serving.epoch,
                    entry: v.serving.routes.route(from, to).cloned(),
                }),
            )
            .await
        }
        Request::SetAdmin { relay, admin } => {
            propose(inputs, Command::SetAdmin { id: relay, admin }).await
        }
        Request::RemoveRelay { relay } => propose(inputs, Command::RemoveRelay { id: relay }).await,
        Request::AddMember { id, addr } => membership(inputs, id, Some(addr)).await,
        Request::RemoveMember { id } => membership(inputs, id, None).await,
        Request::PutApp { id, secret } => propose(inputs, Command::PutApp { id, secret }).await,
        Request::DeleteApp { id } => propose(inputs, Command::DeleteApp { id }).await,
        Request::Apps => {
            ask(
                inputs,
                Consistency::Linearizable,
                Box::new(|v| Response::Apps {
                    apps: v.node.state().apps.keys().cloned().collect(),
                }),
            )
            .await
        }
        Request::SetPolicy { policy } => propose(inputs, Command::SetPolicy { policy }).await,
        Request::GetPolicy => {
            ask(
                inputs,
                Consistency::Linearizable,
                Box::new(|v| Response::Policy {
                    policy: v.node.state().policy.clone(),
                }),
            )
            .await
        }
        Request::Put { key, value } => propose(inputs, Command::Put { key, value }).await,
        Request::Get { key, consistency } => {
            ask(
                inputs,
                consistency,
                Box::new(move |v| Response::Value {
                    value: v.node.state().kv.get(&key).cloned(),
                }),
            )
            .await
        }
    }
}

async fn membership(inputs: &mpsc::Sender<Input>, id: u64, addr: Option<String>) -> Response {
    if let Some(a) = &addr
        && a.parse::<SocketAddr>().is_err()
    {
        return Response::Error {
            message: format!("{a:?} is not an address"),
        };
    }
    submit(
        inputs,
        |tx| Input::Membership(id, addr, tx),
        "no answer in time",
    )
    .await
}

impl LinkReport {
    /// A report of a link measured with `stats`, `None` metrics when the
    /// link is dead or unmeasured.
    pub fn from_stats(peer: RelayId, stats: &topology::LinkStats) -> LinkReport {
        LinkReport {
            peer,
            metrics: stats.metrics(),
        }
    }
}
