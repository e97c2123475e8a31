//! Probing candidates: a QUIC connection to each, a few probe datagrams,
//! RTT, loss and jitter from the echoes. The connection of the winner is
//! kept and becomes the client's session, so choosing costs no extra
//! handshake.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use topology::{LinkMetrics, LinkMetricsConfig};

use crate::discovery::Candidate;
use crate::geoip::{GeoIp, Place};
use crate::select::{Measured, Ranked, choose, order_by_distance};
use crate::session::{Incoming, Session, Welcome};

/// How candidates are probed.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// How many of the nearest candidates are probed.
    pub top_k: usize,
    /// Probes per candidate.
    pub count: u32,
    /// Spacing of the probes.
    pub interval: Duration,
    /// Everything (handshake included) must finish within this.
    pub deadline: Duration,
    /// Zero bytes added to each probe, to measure with media-sized packets.
    pub padding: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            top_k: 3,
            count: 5,
            interval: Duration::from_millis(20),
            deadline: Duration::from_millis(1500),
            padding: 0,
        }
    }
}

/// One probed candidate.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The candidate.
    pub candidate: Candidate,
    /// Its distance from the client, when known.
    pub distance_km: Option<f64>,
    /// What was measured, or why nothing was.
    pub result: Result<Measured, String>,
    /// What the relay said about itself.
    pub welcome: Option<Welcome>,
}

/// Probes `candidate` over a new connection; returns the report and, when
/// it answered, the open session.
pub(crate) async fn probe_one(
    endpoint: &quinn::Endpoint,
    client_config: quinn::ClientConfig,
    candidate: Candidate,
    distance_km: Option<f64>,
    config: &ProbeConfig,
) -> (ProbeReport, Option<Session>) {
    let deadline = Instant::now() + config.deadline;
    let mut report = ProbeReport {
        candidate,
        distance_km,
        result: Err(String::new()),
        welcome: None,
    };
    let session = match Session::connect(
        endpoint,
        client_config,
        report.candidate.addr,
        &report.candidate.name,
        config.deadline,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            report.result = Err(e.to_string());
            return (report, None);
        }
    };
    report.welcome = Some(session.welcome().clone());
    let datagrams = session.datagrams();
    let mut metrics = LinkMetrics::new(LinkMetricsConfig {
        probe_timeout: config.deadline,
        // A handful of probes: report the plain fraction lost.
        loss_min_samples: 0,
        ..LinkMetricsConfig::default()
    });
    let (mut sent, mut received) = (0u32, 0u32);
    let mut next_send = Instant::now();
    // After the last probe, wait this long for stragglers (a few RTTs).
    let linger = (session.rtt() * 3).max(Duration::from_millis(100));
    loop {
        let now = Instant::now();
        if sent < config.count && now >= next_send {
            if session.send_probe(u64::from(sent), config.padding).is_err() {
                break;
            }
            metrics.on_probe_sent(u64::from(sent), now.into_std());
            sent += 1;
            next_send = now + config.interval;
        }
        if received == config.count {
            break;
        }
        let stop = if sent < config.count {
            next_send
        } else {
            (next_send + linger).min(deadline)
        };
        if now >= deadline || (sent == config.count && now >= stop) {
            break;
        }
        match tokio::time::timeout_at(stop.min(deadline), datagrams.recv()).await {
            Ok(Ok(Incoming::ProbeEcho(seq))) => {
                if metrics.on_echo(seq, Instant::now().into_std()).is_some() {
                    received += 1;
                }
            }
            Ok(Ok(Incoming::Media(_))) => {}
            Ok(Err(e)) => {
                report.result = Err(e.to_string());
                return (report, None);
            }
            Err(_) => {}
        }
    }
    let stats = metrics.stats(Instant::now().into_std());
    match Measured::from_stats(&stats, sent, received) {
        Some(m) => {
            report.result = Ok(m);
            (report, Some(session))
        }
        None => {
            report.result = Err(format!("no echo to {sent} probes"));
            session.close();
            (report, None)
        }
    }
}

/// Probes candidates in parallel; reports come back in the given order.
pub(crate) async fn probe_all(
    endpoint: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    targets: Vec<(Candidate, Option<f64>)>,
    config: &ProbeConfig,
) -> Vec<(ProbeReport, Option<Session>)> {
    let mut tasks = tokio::task::JoinSet::new();
    let n = targets.len();
    for (i, (candidate, distance)) in targets.into_iter().enumerate() {
        let (endpoint, client_config, config) =
            (endpoint.clone(), client_config.clone(), config.clone());
        tasks.spawn(async move {
            let r = probe_one(&endpoint, client_config, candidate, distance, &config).await;
            (i, r)
        });
    }
    let mut out: Vec<Option<(ProbeReport, Option<Session>)>> = (0..n).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, r)) = joined {
            out[i] = Some(r);
        }
    }
    out.into_iter().flatten().collect()
}

/// Everything a probing round found out.
#[derive(Debug, Clone)]
pub struct ProbeRound {
    /// The client's public address, as given or as a relay saw it.
    pub public_ip: Option<IpAddr>,
    /// What GeoIP says about it.
    pub place: Option<Place>,
    /// Probed candidates, nearest first.
    pub probed: Vec<ProbeReport>,
    /// Candidates not probed (beyond the top k), nearest first.
    pub not_probed: Vec<(Candidate, Option<f64>)>,
    /// Index into `probed` of the choice, with the reason.
    pub choice: Option<crate::select::Choice>,
}

/// Ranks `candidates` and probes the best `top_k`; if none of them answers,
/// the next `top_k`, and so on. Returns the round and the open sessions of
/// the candidates that answered (`sessions[i]` belongs to `probed[i]`).
pub(crate) async fn probe_round(
    endpoint: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    candidates: &[Candidate],
    place: Option<&Place>,
    public_ip: Option<IpAddr>,
    config: &ProbeConfig,
) -> (ProbeRound, Vec<Option<Session>>) {
    let order: Vec<Ranked> = order_by_distance(candidates, place);
    let ranked: Vec<(Candidate, Option<f64>)> = order
        .iter()
        .map(|r| (candidates[r.index].clone(), r.distance_km))
        .collect();
    let k = config.top_k.max(1);
    let mut probed = Vec::new();
    let mut sessions = Vec::new();
    let mut next = 0;
    while next < ranked.len() {
        let batch: Vec<_> = ranked[next..(next + k).min(ranked.len())].to_vec();
        next += batch.len();
        for (report, session) in probe_all(endpoint, client_config, batch, config).await {
            probed.push(report);
            sessions.push(session);
        }
        if sessions.iter().any(Option::is_some) {
            break;
        }
    }
    let summary: Vec<_> = probed
        .iter()
        .map(|r| {
            (
                r.candidate.name.clone(),
                r.distance_km,
                r.result.as_ref().ok().copied(),
            )
        })
        .collect();
    let round = ProbeRound {
        public_ip,
        place: place.cloned(),
        choice: choose(&summary),
        probed,
        not_probed: ranked[next..].to_vec(),
    };
    (round, sessions)
}

/// Where the client is: from the given public address, or else from the
/// address the first reachable relay observed. Returns the address used.
pub(crate) async fn locate(
    endpoint: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    candidates: &[Candidate],
    geoip: Option<&Arc<GeoIp>>,
    public_ip: Option<IpAddr>,
    timeout: Duration,
) -> (Option<IpAddr>, Option<Place>) {
    let Some(geoip) = geoip else {
        return (public_ip, None);
    };
    if let Some(ip) = public_ip {
        return (Some(ip), geoip.locate(ip));
    }
    // Ask relays in DNS order until one answers: its Welcome carries our
    // address as it sees it, i.e. behind NAT our public one.
    for c in candidates.iter().take(3) {
        if let Ok(s) =
            Session::connect(endpoint, client_config.clone(), c.addr, &c.name, timeout).await
        {
            let ip = s.welcome().observed.ip();
            s.close();
            return (Some(ip), geoip.locate(ip));
        }
    }
    (None, None)
}
