//! [`Client`]: discovery, ranking, one relay in use plus a warm standby,
//! continuous probing, and failover that rejoins channels by itself.
//!
//! A driver task owns the relay sessions. The [`Client`] handle talks to it
//! over a channel, except for publishing, which goes straight to the
//! current session's QUIC connection (no task hop on the media path).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use relay_core::wire::client::{CloseCode, RelayToClient};
use relay_core::{ChannelId, RelayId, SourceId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use topology::LinkStats;

use crate::discovery::{Candidate, DiscoveryError, Origin, RelaySource, discover};
use crate::geoip::{GeoIp, Place};
use crate::probe::{ProbeConfig, ProbeRound, locate, probe_round};
use crate::select::{Decision, Measured, Monitor, MonitorConfig, Slot};
use crate::session::{Incoming, Joined, Media, MediaSender, Session, SessionError, client_config};

/// Everything a [`Client`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where relays are listed.
    pub relays: RelaySource,
    /// CAs that sign relay certificates.
    pub roots: Arc<rustls::RootCertStore>,
    /// GeoIP database for ordering relays by distance; without one, the
    /// top candidates in DNS order are probed.
    pub geoip: Option<Arc<GeoIp>>,
    /// The client's public address, if known; otherwise the address a relay
    /// observes is used.
    pub public_ip: Option<IpAddr>,
    /// How candidates are probed.
    pub probe: ProbeConfig,
    /// Probing of the relay in use and when to leave it.
    pub monitor: MonitorConfig,
    /// Keep a second relay connected to move to at once.
    pub standby: bool,
    /// Time allowed for a join to be answered.
    pub request_timeout: Duration,
    /// A relay that failed is not tried again for this long.
    pub failed_relay_penalty: Duration,
    /// Local address of the QUIC endpoint.
    pub bind: SocketAddr,
}

impl ClientConfig {
    /// Defaults for the given relays and roots.
    pub fn new(relays: RelaySource, roots: Arc<rustls::RootCertStore>) -> Self {
        ClientConfig {
            relays,
            roots,
            geoip: None,
            public_ip: None,
            probe: ProbeConfig::default(),
            monitor: MonitorConfig::default(),
            standby: true,
            request_timeout: Duration::from_secs(3),
            failed_relay_penalty: Duration::from_secs(30),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No relay list.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// Relays were listed but none answered.
    #[error("no relay answered: {0}")]
    NoRelay(String),
    /// Bad configuration (endpoint, TLS).
    #[error("configuration: {0}")]
    Config(String),
    /// The relay refused (bad or expired token, unknown app...).
    #[error("refused by the relay: {code:?} {reason}")]
    Refused {
        /// The relay's close code.
        code: Option<CloseCode>,
        /// Its reason.
        reason: String,
    },
    /// Between relays: try again shortly.
    #[error("not connected to a relay right now")]
    NotConnected,
    /// The channel is not joined.
    #[error("channel {0} is not joined")]
    NotJoined(String),
    /// A session error.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// A relay as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// Host name (the TLS name).
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Its id.
    pub id: RelayId,
    /// Its region.
    pub region: String,
}

/// Link quality to the relay in use, as the client measures it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Quality {
    /// The relay.
    pub relay: Option<RelayInfo>,
    /// Smoothed RTT.
    pub rtt: Option<Duration>,
    /// RFC 3550 jitter.
    pub jitter: Duration,
    /// Probe loss over the monitor's window.
    pub loss: f64,
    /// Fails the quality bar (RTT, loss or jitter).
    pub poor: bool,
    /// The standby, if any, and its RTT.
    pub standby: Option<(RelayInfo, Option<Duration>)>,
}

/// Things that happen to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The client moved to another relay (or reconnected) and rejoined its
    /// channels.
    RelayChanged {
        /// The relay left, if any.
        from: Option<RelayInfo>,
        /// The relay now in use.
        to: RelayInfo,
        /// Why.
        reason: String,
        /// Time without a working relay: from the last echo of a failed
        /// relay (or the drain notice) to the rejoin on the new one. `None`
        /// for quality moves, which join the new relay before leaving.
        outage: Option<Duration>,
    },
    /// No relay answers; the client keeps trying.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The relay in use crossed the quality bar (either way).
    QualityChanged(Quality),
    /// A reliable message from another member.
    Message {
        /// The channel.
        channel: ChannelId,
        /// Sender's source id.
        source: SourceId,
        /// Sender's user id.
        user: String,
        /// Body.
        body: Bytes,
    },
    /// A channel could not be rejoined (e.g. its token expired) or the
    /// relay removed us; join it again with a fresh token.
    ChannelLost {
        /// Channel name.
        channel: String,
        /// Why.
        reason: String,
    },
}

/// Counters of a client.
#[derive(Debug, Default)]
struct Counters {
    media_received: AtomicU64,
    media_dropped: AtomicU64,
    published: AtomicU64,
    publish_dropped: AtomicU64,
    relay_changes: AtomicU64,
}

/// Totals since the client started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    /// Media datagrams handed to the application.
    pub media_received: u64,
    /// Media dropped because the application did not read fast enough.
    pub media_dropped: u64,
    /// Media published.
    pub published: u64,
    /// Media not published because no relay was connected.
    pub publish_dropped: u64,
    /// Moves between relays.
    pub relay_changes: u64,
}

#[derive(Debug, Default)]
struct Shared {
    sender: RwLock<Option<MediaSender>>,
    /// Generation of the session whose media reaches the application.
    active_gen: AtomicU64,
    relay: RwLock<Option<RelayInfo>>,
    counters: Counters,
}

enum Command {
    Join {
        channel: String,
        token: String,
        reply: oneshot::Sender<Result<Joined, ClientError>>,
    },
    Leave {
        channel: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Message {
        channel: ChannelId,
        body: Bytes,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
}

/// The stream of received media.
#[derive(Debug)]
pub struct MediaStream(mpsc::Receiver<Media>);

impl MediaStream {
    /// The next media datagram; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Media> {
        self.0.recv().await
    }
}

impl futures_core::Stream for MediaStream {
    type Item = Media;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Media>> {
        self.0.poll_recv(cx)
    }
}

/// The stream of [`Event`]s.
#[derive(Debug)]
pub struct EventStream(mpsc::UnboundedReceiver<Event>);

impl EventStream {
    /// The next event; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

impl futures_core::Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.0.poll_recv(cx)
    }
}

/// A connection to the relay network.
///
/// ```no_run
/// # async fn example(roots: std::sync::Arc<rustls::RootCertStore>, token: String)
/// # -> Result<(), relay_sdk::ClientError> {
/// use relay_sdk::{Client, ClientConfig, DnsConfig, RelaySource};
///
/// let config = ClientConfig::new(RelaySource::Dns(DnsConfig::new("edge.example.com")), roots);
/// let (client, mut media, mut events) = Client::connect(config).await?;
/// let joined = client.join("shop-42/live", &token).await?;
/// client.publish(joined.channel, b"an encoded video frame")?;
/// tokio::spawn(async move {
///     while let Some(event) = events.recv().await {
///         println!("{event:?}");
///     }
/// });
/// while let Some(m) = media.recv().await {
///     println!("{} bytes from {}", m.payload.len(), m.source);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    quality: watch::Receiver<Quality>,
    joined: Arc<RwLock<HashMap<ChannelId, String>>>,
    driver: Arc<DriverGuard>,
}

/// Stops the driver when the last handle goes.
#[derive(Debug)]
struct DriverGuard(JoinHandle<()>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a probing round without connecting: what `relay-client probe`
/// prints.
pub async fn probe(config: &ClientConfig) -> Result<(ProbeRound, Origin), ClientError> {
    let (endpoint, qc) = endpoint(config)?;
    let discovered = discover(&config.relays).await?;
    let (ip, place) = locate(
        &endpoint,
        &qc,
        &discovered.candidates,
        config.geoip.as_ref(),
        config.public_ip,
        config.probe.deadline,
    )
    .await;
    let (round, sessions) = probe_round(
        &endpoint,
        &qc,
        &discovered.candidates,
        place.as_ref(),
        ip,
        &config.probe,
    )
    .await;
    for s in sessions.into_iter().flatten() {
        s.close();
    }
    endpoint.wait_idle().await;
    Ok((round, discovered.origin))
}

fn endpoint(config: &ClientConfig) -> Result<(quinn::Endpoint, quinn::ClientConfig), ClientError> {
    let endpoint =
        quinn::Endpoint::client(config.bind).map_err(|e| ClientError::Config(e.to_string()))?;
    let qc = client_config(config.roots.clone()).map_err(ClientError::Session)?;
    Ok((endpoint, qc))
}

impl Client {
    /// Discovers relays, probes the nearest, connects to the best (keeping
    /// the runner-up as standby) and starts watching them.
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Client, MediaStream, EventStream), ClientError> {
        let (endpoint, qc) = endpoint(&config)?;
        let discovered = discover(&config.relays).await?;
        let (public_ip, place) = locate(
            &endpoint,
            &qc,
            &discovered.candidates,
            config.geoip.as_ref(),
            config.public_ip,
            config.probe.deadline,
        )
        .await;
        let (round, mut sessions) = probe_round(
            &endpoint,
            &qc,
            &discovered.candidates,
            place.as_ref(),
            public_ip,
            &config.probe,
        )
        .await;
        let Some(choice) = round.choice.clone() else {
            return Err(ClientError::NoRelay(describe_failures(&round)));
        };
        tracing::info!(
            "relay {} chosen: {}",
            round.probed[choice.index].candidate.name,
            choice.reason
        );
        let active = sessions[choice.index].take().expect("the choice answered");
        // The standby: the best of the rest.
        let standby = round
            .probed
            .iter()
            .enumerate()
            .filter(|(i, _)| sessions[*i].is_some())
            .filter_map(|(i, r)| r.result.as_ref().ok().map(|m| (i, m.score_ms())))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        let standby = match standby {
            Some(i) if config.standby => Some((
                round.probed[i].candidate.clone(),
                sessions[i].take().expect("it answered"),
            )),
            _ => None,
        };
        for s in sessions.into_iter().flatten() {
            s.close();
        }

        let (commands_tx, commands) = mpsc::channel(64);
        let (media_tx, media_rx) = mpsc::channel(4096);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let (quality_tx, quality_rx) = watch::channel(Quality::default());
        let shared = Arc::new(Shared::default());
        let joined = Arc::new(RwLock::new(HashMap::new()));
        let now = Instant::now();
        let mut driver = Driver {
            endpoint,
            client_config: qc,
            candidates: discovered.candidates,
            place,
            public_ip,
            active: None,
            standby: None,
            monitor: Monitor::new(config.monitor.clone(), now.into_std()),
            channels: BTreeMap::new(),
            joined: joined.clone(),
            shared: shared.clone(),
            commands,
            internal,
            internal_tx,
            events: events_tx,
            media: media_tx,
            quality: quality_tx,
            next_gen: 1,
            penalties: HashMap::new(),
            standby_search: None,
            retry_at: None,
            was_poor: false,
            config,
        };
        let relay = round.probed[choice.index].candidate.clone();
        let conn = driver.adopt(relay, active);
        driver.install_active(conn);
        let _ = driver.events.send(Event::RelayChanged {
            from: None,
            to: driver.active.as_ref().expect("installed").info(),
            reason: choice.reason,
            outage: None,
        });
        if let Some((c, s)) = standby {
            let conn = driver.adopt(c, s);
            driver.monitor.set_standby(now.into_std());
            driver.standby = Some(conn);
        }
        let task = tokio::spawn(driver.run());
        Ok((
            Client {
                commands: commands_tx,
                shared,
                quality: quality_rx,
                joined,
                driver: Arc::new(DriverGuard(task)),
            },
            MediaStream(media_rx),
            EventStream(events_rx),
        ))
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ClientError>>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Joins a channel with a token for it. The client rejoins it by itself
    /// after moving to another relay.
    pub async fn join(&self, channel: &str, token: &str) -> Result<Joined, ClientError> {
        let (channel, token) = (channel.to_owned(), token.to_owned());
        self.request(|reply| Command::Join {
            channel,
            token,
            reply,
        })
        .await
    }

    /// Leaves a channel.
    pub async fn leave(&self, channel: &str) -> Result<(), ClientError> {
        let channel = channel.to_owned();
        self.request(|reply| Command::Leave { channel, reply })
            .await
    }

    /// Sends a reliable message to the channel's other members.
    pub async fn send_message(&self, channel: ChannelId, body: Bytes) -> Result<(), ClientError> {
        self.request(|reply| Command::Message {
            channel,
            body,
            reply,
        })
        .await
    }

    /// Publishes media on a joined channel (unreliable datagram). Between
    /// relays (a failover in progress) the payload is dropped and
    /// [`ClientError::NotConnected`] returned: media is real-time and the
    /// application should just carry on.
    pub fn publish(&self, channel: ChannelId, payload: &[u8]) -> Result<(), ClientError> {
        let counters = &self.shared.counters;
        if !self
            .joined
            .read()
            .expect("not poisoned")
            .contains_key(&channel)
        {
            return Err(ClientError::NotJoined(channel.to_string()));
        }
        let sender = self.shared.sender.read().expect("not poisoned").clone();
        let Some(sender) = sender else {
            counters.publish_dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ClientError::NotConnected);
        };
        match sender.publish(channel, payload) {
            Ok(()) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e @ SessionError::TooLarge { .. }) => Err(e.into()),
            Err(_) => {
                // The connection just died; the driver is moving.
                counters.publish_dropped.fetch_add(1, Ordering::Relaxed);
                Err(ClientError::NotConnected)
            }
        }
    }

    /// The relay in use.
    pub fn relay(&self) -> Option<RelayInfo> {
        self.shared.relay.read().expect("not poisoned").clone()
    }

    /// Latest link quality (updated with every probe echo).
    pub fn quality(&self) -> Quality {
        self.quality.borrow().clone()
    }

    /// A receiver that sees every quality update.
    pub fn quality_updates(&self) -> watch::Receiver<Quality> {
        self.quality.clone()
    }

    /// Totals since the client started.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared.counters;
        ClientStats {
            media_received: c.media_received.load(Ordering::Relaxed),
            media_dropped: c.media_dropped.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            publish_dropped: c.publish_dropped.load(Ordering::Relaxed),
            relay_changes: c.relay_changes.load(Ordering::Relaxed),
        }
    }

    /// Closes the relay connections and stops the client.
    pub fn close(&self) {
        self.driver.0.abort();
        if let Some(s) = self.shared.sender.write().expect("not poisoned").take() {
            drop(s);
        }
    }
}

fn describe_failures(round: &ProbeRound) -> String {
    round
        .probed
        .iter()
        .map(|r| {
            format!(
                "{} ({}): {}",
                r.candidate.name,
                r.candidate.addr,
                r.result.as_ref().err().map(String::as_str).unwrap_or("ok")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One relay connection the driver holds.
struct Conn {
    generation: u64,
    candidate: Candidate,
    session: Session,
    pump: JoinHandle<()>,
}

impl Conn {
    fn info(&self) -> RelayInfo {
        let w = self.session.welcome();
        RelayInfo {
            name: self.candidate.name.clone(),
            addr: self.candidate.addr,
            id: w.relay,
            region: w.region.clone(),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pump.abort();
        self.session.close();
    }
}

enum Internal {
    Echo {
        generation: u64,
        seq: u64,
        at: Instant,
    },
    Closed {
        generation: u64,
        error: SessionError,
    },
}

struct ChannelState {
    token: String,
    joined: Joined,
}

struct Driver {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    candidates: Vec<Candidate>,
    place: Option<Place>,
    public_ip: Option<IpAddr>,
    active: Option<Conn>,
    standby: Option<Conn>,
    monitor: Monitor,
    channels: BTreeMap<String, ChannelState>,
    joined: Arc<RwLock<HashMap<ChannelId, String>>>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    internal: mpsc::UnboundedReceiver<Internal>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    events: mpsc::UnboundedSender<Event>,
    media: mpsc::Sender<Media>,
    quality: watch::Sender<Quality>,
    next_gen: u64,
    /// Relays that failed recently, by name, until when.
    penalties: HashMap<String, Instant>,
    standby_search: Option<JoinHandle<Option<(Candidate, Session)>>>,
    /// With no relay: when to try again.
    retry_at: Option<Instant>,
    was_poor: bool,
}

async fn next_frame(conn: &mut Option<Conn>) -> (u64, Result<RelayToClient, SessionError>) {
    match conn {
        Some(c) => (c.generation, c.session.next_event().await),
        None => std::future::pending().await,
    }
}

async fn search_done(
    search: &mut Option<JoinHandle<Option<(Candidate, Session)>>>,
) -> Option<(Candidate, Session)> {
    match search {
        Some(h) => {
            let r = h.await.ok().flatten();
            *search = None;
            r
        }
        None => std::future::pending().await,
    }
}

impl Driver {
    /// Wraps a session: a pump task forwards its media (while it is the
    /// active one) and its probe echoes.
    fn adopt(&mut self, candidate: Candidate, session: Session) -> Conn {
        let generation = self.next_gen;
        self.next_gen += 1;
        let datagrams = session.datagrams();
        let (internal, media, shared) = (
            self.internal_tx.clone(),
            self.media.clone(),
            self.shared.clone(),
        );
        let pump = tokio::spawn(async move {
            loop {
                match datagrams.recv().await {
                    Ok(Incoming::Media(m)) => {
                        if shared.active_gen.load(Ordering::Relaxed) != generation {
                            continue;
                        }
                        let c = &shared.counters;
                        match media.try_send(m) {
                            Ok(()) => c.media_received.fetch_add(1, Ordering::Relaxed),
                            Err(_) => c.media_dropped.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    Ok(Incoming::ProbeEcho(seq)) => {
                        let at = Instant::now();
                        if internal
                            .send(Internal::Echo {
                                generation,
                                seq,
                                at,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(error) => {
                        let _ = internal.send(Internal::Closed { generation, error });
                        return;
                    }
                }
            }
        });
        Conn {
            generation,
            candidate,
            session,
            pump,
        }
    }

    fn install_active(&mut self, conn: Conn) {
        self.shared
            .active_gen
            .store(conn.generation, Ordering::Relaxed);
        *self.shared.sender.write().expect("not poisoned") = Some(conn.session.media_sender());
        *self.shared.relay.write().expect("not poisoned") = Some(conn.info());
        self.active = Some(conn);
        self.retry_at = None;
    }

    fn clear_active(&mut self) -> Option<Conn> {
        self.shared.active_gen.store(0, Ordering::Relaxed);
        *self.shared.sender.write().expect("not poisoned") = None;
        *self.shared.relay.write().expect("not poisoned") = None;
        self.active.take()
    }

    fn slot_of(&self, generation: u64) -> Option<Slot> {
        if self
            .active
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
            Some(Slot::Active)
        } else if self
            .standby
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
            Some(Slot::Standby)
        } else {
            None
        }
    }

    async fn run(mut self) {
        loop {
            let now = Instant::now();
            let wake = if self.active.is_some() {
                Instant::from_std(self.monitor.next_wakeup(now.into_std()))
            } else {
                self.retry_at.unwrap_or(now + Duration::from_secs(1))
            };
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => return,
                },
                Some(ev) = self.internal.recv() => self.internal(ev).await,
                (generation, frame) = next_frame(&mut self.active) => self.frame(generation, frame).await,
                (generation, frame) = next_frame(&mut self.standby) => self.frame(generation, frame).await,
                found = search_done(&mut self.standby_search) => self.standby_found(found),
                _ = tokio::time::sleep_until(wake) => {}
            }
            self.tick().await;
        }
    }

    /// Probes due, decisions, retries, quality.
    async fn tick(&mut self) {
        let now = Instant::now();
        if self.active.is_none() {
            if self.retry_at.is_some_and(|t| t <= now) {
                self.reconnect("retrying").await;
            }
            return;
        }
        while let Some((slot, seq)) = self.monitor.poll_probe(now.into_std()) {
            let conn = match slot {
                Slot::Active => self.active.as_ref(),
                Slot::Standby => self.standby.as_ref(),
            };
            if let Some(c) = conn {
                let _ = c.session.send_probe(seq, self.config.probe.padding);
            }
        }
        while let Some(d) = self.monitor.poll_decision(now.into_std()) {
            match d {
                Decision::ActiveFailed { reason } => {
                    self.fail_over(format!("relay failed: {reason}"), true)
                        .await;
                    break;
                }
                Decision::SwitchToStandby { reason } => {
                    self.switch_to_standby(reason).await;
                    break;
                }
                Decision::StandbyFailed { reason } => {
                    if let Some(c) = self.standby.take() {
                        tracing::info!("standby {} failed: {reason}", c.candidate.name);
                        self.penalize(&c.candidate.name);
                    }
                    self.monitor.clear_standby();
                }
            }
        }
        if self.config.standby && self.standby.is_none() && self.standby_search.is_none() {
            self.start_standby_search();
        }
        self.publish_quality(now);
    }

    fn publish_quality(&mut self, now: Instant) {
        let Some(active) = &self.active else { return };
        let stats: LinkStats = self
            .monitor
            .stats(Slot::Active, now.into_std())
            .expect("there is always an active slot");
        let poor = stats
            .metrics()
            .is_some_and(|m| stats.samples >= 5 && self.config.monitor.cost.is_poor(&m));
        let q = Quality {
            relay: Some(active.info()),
            rtt: stats.rtt,
            jitter: stats.jitter,
            loss: stats.loss,
            poor,
            standby: self.standby.as_ref().map(|s| {
                let rtt = self
                    .monitor
                    .stats(Slot::Standby, now.into_std())
                    .and_then(|st| st.rtt);
                (s.info(), rtt)
            }),
        };
        if poor != self.was_poor {
            self.was_poor = poor;
            let _ = self.events.send(Event::QualityChanged(q.clone()));
        }
        self.quality.send_if_modified(|cur| {
            if *cur != q {
                *cur = q;
                true
            } else {
                false
            }
        });
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Join {
                channel,
                token,
                reply,
            } => {
                let r = self.join(&channel, &token).await;
                let _ = reply.send(r);
            }
            Command::Leave { channel, reply } => {
                let r = match self.channels.remove(&channel) {
                    None => Err(ClientError::NotJoined(channel)),
                    Some(state) => {
                        self.joined
                            .write()
                            .expect("not poisoned")
                            .remove(&state.joined.channel);
                        match &self.active {
                            Some(c) => c
                                .session
                                .leave(state.joined.channel)
                                .await
                                .map_err(ClientError::from),
                            None => Ok(()),
                        }
                    }
                };
                let _ = reply.send(r);
            }
            Command::Message {
                channel,
                body,
                reply,
            } => {
                let r = match &self.active {
                    None => Err(ClientError::NotConnected),
                    Some(c) => c
                        .session
                        .send_message(channel, body)
                        .await
                        .map_err(ClientError::from),
                };
                let _ = reply.send(r);
            }
        }
    }

    async fn join(&mut self, channel: &str, token: &str) -> Result<Joined, ClientError> {
        let timeout = self.config.request_timeout;
        let Some(active) = self.active.as_mut() else {
            return Err(ClientError::NotConnected);
        };
        let r = tokio::time::timeout(timeout, active.session.join(channel, token)).await;
        match r {
            Ok(Ok(joined)) => {
                self.joined
                    .write()
                    .expect("not poisoned")
                    .insert(joined.channel, channel.to_owned());
                self.channels.insert(
                    channel.to_owned(),
                    ChannelState {
                        token: token.to_owned(),
                        joined: joined.clone(),
                    },
                );
                Ok(joined)
            }
            Ok(Err(SessionError::Closed { code, reason })) if is_refusal(code) => {
                // The relay refuses a bad token by closing the connection;
                // it is healthy, so reconnect to it and rejoin the rest.
                let relay = self.clear_active().map(|c| c.candidate.clone());
                if let Some(relay) = relay {
                    self.reconnect_to(relay, "reconnecting after a refused join")
                        .await;
                }
                Err(ClientError::Refused { code, reason })
            }
            Ok(Err(e)) => {
                self.fail_over(format!("join failed: {e}"), true).await;
                Err(e.into())
            }
            Err(_) => {
                self.fail_over("join timed out".into(), true).await;
                Err(ClientError::Session(SessionError::Timeout))
            }
        }
    }

    async fn internal(&mut self, ev: Internal) {
        match ev {
            Internal::Echo {
                generation,
                seq,
                at,
            } => {
                if let Some(slot) = self.slot_of(generation) {
                    self.monitor.on_echo(slot, seq, at.into_std());
                }
            }
            Internal::Closed { generation, error } => match self.slot_of(generation) {
                Some(Slot::Active) => {
                    self.fail_over(format!("connection lost: {error}"), true)
                        .await
                }
                Some(Slot::Standby) => {
                    self.standby = None;
                    self.monitor.clear_standby();
                }
                None => {}
            },
        }
    }

    async fn frame(&mut self, generation: u64, frame: Result<RelayToClient, SessionError>) {
        let slot = self.slot_of(generation);
        match (slot, frame) {
            (
                Some(Slot::Active),
                Ok(RelayToClient::Message {
                    channel,
                    source,
                    user,
                    body,
                }),
            ) => {
                let _ = self.events.send(Event::Message {
                    channel,
                    source,
                    user,
                    body,
                });
            }
            (Some(Slot::Active), Ok(RelayToClient::Drain { reason, .. })) => {
                self.fail_over(format!("relay draining: {reason}"), false)
                    .await;
            }
            (Some(Slot::Active), Ok(RelayToClient::Left { channel })) => {
                let name = self
                    .channels
                    .iter()
                    .find(|(_, s)| s.joined.channel == channel)
                    .map(|(n, _)| n.clone());
                if let Some(name) = name {
                    self.channels.remove(&name);
                    self.joined.write().expect("not poisoned").remove(&channel);
                    let _ = self.events.send(Event::ChannelLost {
                        channel: name,
                        reason: "removed by the relay".into(),
                    });
                }
            }
            (Some(Slot::Active), Ok(RelayToClient::Error { code, message })) => {
                tracing::debug!("relay error {code}: {message}");
            }
            (Some(Slot::Active), Err(e)) => {
                self.fail_over(format!("connection lost: {e}"), true).await;
            }
            (Some(Slot::Standby), Ok(RelayToClient::Drain { .. }) | Err(_)) => {
                self.standby = None;
                self.monitor.clear_standby();
            }
            _ => {}
        }
    }

    fn penalize(&mut self, name: &str) {
        self.penalties.insert(
            name.to_owned(),
            Instant::now() + self.config.failed_relay_penalty,
        );
    }

    /// Candidates worth trying: not in use, not failed recently.
    fn eligible(&mut self) -> Vec<Candidate> {
        let now = Instant::now();
        self.penalties.retain(|_, until| *until > now);
        let busy: Vec<&str> = [&self.active, &self.standby]
            .into_iter()
            .flatten()
            .map(|c| c.candidate.name.as_str())
            .collect();
        self.candidates
            .iter()
            .filter(|c| !busy.contains(&c.name.as_str()) && !self.penalties.contains_key(&c.name))
            .cloned()
            .collect()
    }

    fn start_standby_search(&mut self) {
        let candidates = self.eligible();
        if candidates.is_empty() {
            return;
        }
        let (endpoint, qc, place, ip, config) = (
            self.endpoint.clone(),
            self.client_config.clone(),
            self.place.clone(),
            self.public_ip,
            self.config.probe.clone(),
        );
        self.standby_search = Some(tokio::spawn(async move {
            let (round, mut sessions) =
                probe_round(&endpoint, &qc, &candidates, place.as_ref(), ip, &config).await;
            let choice = round.choice?;
            let session = sessions[choice.index].take()?;
            for s in sessions.into_iter().flatten() {
                s.close();
            }
            Some((round.probed[choice.index].candidate.clone(), session))
        }));
    }

    fn standby_found(&mut self, found: Option<(Candidate, Session)>) {
        match found {
            Some((candidate, session)) if self.active.is_some() && self.standby.is_none() => {
                let in_use = self
                    .active
                    .as_ref()
                    .is_some_and(|a| a.candidate.name == candidate.name);
                if !in_use {
                    let conn = self.adopt(candidate, session);
                    self.monitor.set_standby(Instant::now().into_std());
                    self.standby = Some(conn);
                }
            }
            Some((_, session)) => session.close(),
            None => {
                // Nothing to stand by with now: look again later, not in a
                // tight loop.
                let retry = Instant::now() + Duration::from_secs(5);
                self.standby_search = Some(tokio::spawn(async move {
                    tokio::time::sleep_until(retry).await;
                    None
                }));
            }
        }
    }

    /// Joins every channel on `conn`. Channels whose token is refused are
    /// dropped (reported as lost), and the join is retried on a new
    /// connection to the same relay, since a refusal closes it.
    async fn rejoin(&mut self, mut conn: Conn) -> Result<Conn, String> {
        for _ in 0..=self.channels.len() {
            let wanted: Vec<(String, String)> = self
                .channels
                .iter()
                .map(|(n, s)| (n.clone(), s.token.clone()))
                .collect();
            if wanted.is_empty() {
                return Ok(conn);
            }
            let r =
                tokio::time::timeout(self.config.request_timeout, conn.session.join_many(&wanted))
                    .await;
            match r {
                Ok(Ok(joined)) => {
                    for j in joined {
                        if let Some(s) = self.channels.get_mut(&j.name) {
                            s.joined = j;
                        }
                    }
                    return Ok(conn);
                }
                Ok(Err((ok, SessionError::Closed { code, reason }))) if is_refusal(code) => {
                    let refused = wanted[ok.len()].0.clone();
                    if let Some(s) = self.channels.remove(&refused) {
                        self.joined
                            .write()
                            .expect("not poisoned")
                            .remove(&s.joined.channel);
                    }
                    let _ = self.events.send(Event::ChannelLost {
                        channel: refused,
                        reason: format!("rejoin refused: {code:?} {reason}"),
                    });
                    let candidate = conn.candidate.clone();
                    drop(conn);
                    let session = Session::connect(
                        &self.endpoint,
                        self.client_config.clone(),
                        candidate.addr,
                        &candidate.name,
                        self.config.probe.deadline,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    conn = self.adopt(candidate, session);
                }
                Ok(Err((_, e))) => return Err(e.to_string()),
                Err(_) => return Err("rejoin timed out".into()),
            }
        }
        Err("every channel was refused".into())
    }

    /// Leaves the relay in use: to the standby if it works, else to the
    /// best other candidate. `failed` relays are avoided for a while.
    async fn fail_over(&mut self, reason: String, failed: bool) {
        let now = Instant::now();
        let silent = self
            .monitor
            .stats(Slot::Active, now.into_std())
            .and_then(|s| s.age);
        let Some(old) = self.clear_active() else {
            return;
        };
        // The outage began with the last echo when the relay failed, now
        // when it asked us to leave.
        let silent_before = if failed {
            silent.unwrap_or_default()
        } else {
            Duration::ZERO
        };
        let from = old.info();
        tracing::warn!("leaving relay {}: {reason}", from.name);
        if failed {
            self.penalize(&old.candidate.name);
        }
        drop(old);
        if let Some(standby) = self.standby.take() {
            match self.rejoin(standby).await {
                Ok(conn) => {
                    let done = Instant::now();
                    self.monitor.promote_standby(done.into_std());
                    let outage = silent_before + done.duration_since(now);
                    self.moved(Some(from), conn, reason, Some(outage));
                    return;
                }
                Err(e) => {
                    tracing::warn!("standby could not take over: {e}");
                    self.monitor.clear_standby();
                }
            }
        }
        let silent_before = silent_before + now.elapsed();
        self.reconnect_from(Some(from), &reason, Some(silent_before))
            .await;
    }

    /// Installs a new active relay and tells the application.
    fn moved(
        &mut self,
        from: Option<RelayInfo>,
        conn: Conn,
        reason: String,
        outage: Option<Duration>,
    ) {
        self.install_active(conn);
        self.shared
            .counters
            .relay_changes
            .fetch_add(1, Ordering::Relaxed);
        let to = self.active.as_ref().expect("installed").info();
        tracing::info!("now on relay {} ({reason})", to.name);
        let _ = self.events.send(Event::RelayChanged {
            from,
            to,
            reason,
            outage,
        });
    }

    /// A planned move to the standby: join there first, then leave the old
    /// relay, which stays connected as the new standby.
    async fn switch_to_standby(&mut self, reason: String) {
        let Some(standby) = self.standby.take() else {
            return;
        };
        let conn = match self.rejoin(standby).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("standby could not take over: {e}");
                self.monitor.clear_standby();
                return;
            }
        };
        let old = self.clear_active().expect("a move needs a relay in use");
        for s in self.channels.values() {
            let _ = old.session.leave(s.joined.channel).await;
        }
        let from = old.info();
        self.standby = Some(old);
        self.monitor.swap(Instant::now().into_std());
        self.moved(Some(from), conn, reason, None);
    }

    async fn reconnect(&mut self, reason: &str) {
        self.reconnect_from(None, reason, None).await;
    }

    async fn reconnect_to(&mut self, relay: Candidate, reason: &str) {
        let session = Session::connect(
            &self.endpoint,
            self.client_config.clone(),
            relay.addr,
            &relay.name,
            self.config.probe.deadline,
        )
        .await;
        if let Ok(session) = session {
            let conn = self.adopt(relay, session);
            if let Ok(conn) = self.rejoin(conn).await {
                let now = Instant::now();
                self.monitor.replace_active(now.into_std());
                self.moved(None, conn, reason.to_owned(), None);
                return;
            }
        }
        self.reconnect(reason).await;
    }

    /// Probes the eligible candidates and moves to the best; with none
    /// answering, reports it and tries again later (re-reading DNS).
    async fn reconnect_from(
        &mut self,
        from: Option<RelayInfo>,
        reason: &str,
        silent: Option<Duration>,
    ) {
        let started = Instant::now();
        let mut candidates = self.eligible();
        if candidates.is_empty() {
            // Everything is penalized: better a recently failed relay than
            // none.
            self.penalties.clear();
            candidates = self.eligible();
        }
        let (round, mut sessions) = probe_round(
            &self.endpoint,
            &self.client_config,
            &candidates,
            self.place.as_ref(),
            self.public_ip,
            &self.config.probe,
        )
        .await;
        if let Some(choice) = &round.choice {
            let session = sessions[choice.index].take().expect("the choice answered");
            for s in sessions.into_iter().flatten() {
                s.close();
            }
            let candidate = round.probed[choice.index].candidate.clone();
            let conn = self.adopt(candidate, session);
            match self.rejoin(conn).await {
                Ok(conn) => {
                    let now = Instant::now();
                    self.monitor.replace_active(now.into_std());
                    let outage = silent.map(|s| s + now.duration_since(started));
                    self.moved(from, conn, format!("{reason}; {}", choice.reason), outage);
                    return;
                }
                Err(e) => tracing::warn!("rejoin failed: {e}"),
            }
        }
        let why = format!("{reason}; no relay answered: {}", describe_failures(&round));
        let _ = self.events.send(Event::Disconnected {
            reason: why.clone(),
        });
        tracing::warn!("{why}");
        self.retry_at = Some(Instant::now() + Duration::from_secs(1));
        // The list itself may be stale.
        if let Ok(d) = discover(&self.config.relays).await {
            self.candidates = d.candidates;
        }
    }
}

fn is_refusal(code: Option<CloseCode>) -> bool {
    matches!(
        code,
        Some(
            CloseCode::InvalidToken
                | CloseCode::TokenExpired
                | CloseCode::WrongChannel
                | CloseCode::UnknownApp
                | CloseCode::TooManyChannels
        )
    )
}

/// What a probe measured, for displays.
pub fn describe(m: &Measured) -> String {
    format!(
        "rtt {:.1} ms, loss {:.1} %, jitter {:.1} ms, score {:.1} ms",
        m.rtt.as_secs_f64() * 1e3,
        m.loss * 100.0,
        m.jitter.as_secs_f64() * 1e3,
        m.score_ms()
    )
}
