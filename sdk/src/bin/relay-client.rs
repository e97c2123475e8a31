//! `relay-client`: the SDK on the command line.
//!
//! ```text
//! relay-client probe --zone edge.example.com --ca pki/ca.pem --geoip GeoLite2-City.mmdb
//! relay-client join  --zone edge.example.com --ca pki/ca.pem --channel live-1 --token T --publish
//! relay-client join  --relay relay-1.relays.internal@127.0.0.1:4433 --ca pki/ca.pem --channel live-1 --token T
//! ```
//!
//! `probe` lists the candidates with distance, RTT, loss and jitter and the
//! choice with its reason. `join` joins a channel as publisher (sending
//! numbered packets at a fixed rate) or subscriber and prints, every
//! second, the link quality and what arrived; relay changes as they happen.
#![allow(clippy::disallowed_methods)] // a command-line tool reads clocks

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use relay_sdk::{
    Candidate, Client, ClientConfig, DnsConfig, Event, GeoIp, Origin, RelaySource, load_roots,
};
use serde_json::json;
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    version,
    about = "Find, probe and use edge relays from the command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Probe the candidates and show the choice.
    Probe {
        #[command(flatten)]
        source: Source,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Join a channel and print live quality.
    Join(JoinArgs),
}

#[derive(Args)]
struct Source {
    /// DNS zone relays are published under (`_relay._udp.<zone>` SRV).
    #[arg(long, conflicts_with = "relay")]
    zone: Option<String>,
    /// Name server to ask (`IP:PORT`), repeatable; default: the system's.
    #[arg(long)]
    dns: Vec<SocketAddr>,
    /// Service label of the SRV records.
    #[arg(long, default_value = "_relay._udp")]
    service: String,
    /// File keeping the last good DNS answer, used when DNS fails.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// A relay as `NAME@ADDR` (NAME is its TLS name), repeatable; instead of DNS.
    #[arg(long)]
    relay: Vec<String>,
    /// CA certificate(s) that sign relay certificates (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// GeoIP database (GeoLite2/DB-IP City or Country .mmdb).
    #[arg(long)]
    geoip: Option<PathBuf>,
    /// Our public address for GeoIP; default: as a relay observes it.
    #[arg(long)]
    public_ip: Option<IpAddr>,
    /// How many of the nearest candidates to probe.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Probes per candidate.
    #[arg(long, default_value_t = 5)]
    probes: u32,
    /// Local address to bind.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
}

#[derive(Args)]
struct JoinArgs {
    #[command(flatten)]
    source: Source,
    /// Channel name.
    #[arg(long)]
    channel: String,
    /// Token for the channel (from `relayd token` or the app's backend).
    #[arg(long)]
    token: String,
    /// Publish numbered packets (the token must grant the publisher role).
    #[arg(long)]
    publish: bool,
    /// Packets per second when publishing.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Payload bytes when publishing (at least 16).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Stop after this many seconds (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

impl Source {
    fn config(&self) -> Result<ClientConfig, String> {
        let relays = match (&self.zone, self.relay.is_empty()) {
            (Some(zone), true) => {
                let mut dns = DnsConfig::new(zone);
                dns.service = self.service.clone();
                dns.nameservers = self.dns.clone();
                dns.cache = self.cache.clone();
                RelaySource::Dns(dns)
            }
            (None, false) => RelaySource::Static(
                self.relay
                    .iter()
                    .map(|r| Candidate::parse(r))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err("give either --zone or --relay".into()),
        };
        let mut config =
            ClientConfig::new(relays, load_roots(&self.ca).map_err(|e| e.to_string())?);
        if let Some(path) = &self.geoip {
            config.geoip = Some(Arc::new(GeoIp::open(path).map_err(|e| e.to_string())?));
        }
        config.public_ip = self.public_ip;
        config.probe.top_k = self.top_k.max(1);
        config.probe.count = self.probes.max(1);
        config.bind = self.bind;
        Ok(config)
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

async fn probe(source: &Source, as_json: bool) -> Result<(), String> {
    let config = source.config()?;
    let (round, origin) = relay_sdk::probe(&config).await.map_err(|e| e.to_string())?;
    if as_json {
        let rows: Vec<_> = round
            .probed
            .iter()
            .map(|r| {
                json!({
                    "name": r.candidate.name,
                    "addr": r.candidate.addr.to_string(),
                    "region": r.candidate.region,
                    "distance_km": r.distance_km.map(|d| d.round()),
                    "rtt_ms": r.result.as_ref().ok().map(|m| ms(m.rtt)),
                    "loss": r.result.as_ref().ok().map(|m| m.loss),
                    "jitter_ms": r.result.as_ref().ok().map(|m| ms(m.jitter)),
                    "score_ms": r.result.as_ref().ok().map(|m| (m.score_ms() * 10.0).round() / 10.0),
                    "error": r.result.as_ref().err(),
                })
            })
            .collect();
        let skipped: Vec<_> = round
            .not_probed
            .iter()
            .map(|(c, d)| json!({"name": c.name, "distance_km": d.map(|d| d.round())}))
            .collect();
        let out = json!({
            "source": origin_text(&origin),
            "public_ip": round.public_ip.map(|i| i.to_string()),
            "client_location": round.place.as_ref().and_then(|p| p.location),
            "client_country": round.place.as_ref().and_then(|p| p.country.clone()),
            "probed": rows,
            "not_probed": skipped,
            "choice": round.choice.as_ref().map(|c| round.probed[c.index].candidate.name.clone()),
            "reason": round.choice.as_ref().map(|c| c.reason.clone()),
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        println!("relays from {}", origin_text(&origin));
        match (&round.public_ip, &round.place) {
            (Some(ip), Some(p)) => println!(
                "client {ip}: {}{}",
                p.country.as_deref().unwrap_or("?"),
                p.location
                    .map(|(a, b)| format!(" at {a:.2},{b:.2}"))
                    .unwrap_or_default()
            ),
            (Some(ip), None) => println!("client {ip}: not in the GeoIP database"),
            _ => println!("client location unknown: probing in DNS order"),
        }
        println!(
            "{:<2} {:<32} {:<22} {:<6} {:>9} {:>9} {:>7} {:>9} {:>9}",
            "", "relay", "address", "region", "dist km", "rtt ms", "loss", "jitter", "score"
        );
        for (i, r) in round.probed.iter().enumerate() {
            let mark = if round.choice.as_ref().is_some_and(|c| c.index == i) {
                "*"
            } else {
                ""
            };
            let dist = r
                .distance_km
                .map(|d| format!("{d:.0}"))
                .unwrap_or_else(|| "-".into());
            let region = r.candidate.region.as_deref().unwrap_or("-");
            match &r.result {
                Ok(m) => println!(
                    "{mark:<2} {:<32} {:<22} {region:<6} {dist:>9} {:>9.1} {:>6.1}% {:>9.1} {:>9.1}",
                    r.candidate.name,
                    r.candidate.addr,
                    ms(m.rtt),
                    m.loss * 100.0,
                    ms(m.jitter),
                    m.score_ms()
                ),
                Err(e) => println!(
                    "{mark:<2} {:<32} {:<22} {region:<6} {dist:>9}  unreachable: {e}",
                    r.candidate.name, r.candidate.addr
                ),
            }
        }
        for (c, d) in &round.not_probed {
            let dist = d.map(|d| format!("{d:.0}")).unwrap_or_else(|| "-".into());
            println!(
                "{:<2} {:<32} {:<22} {:<6} {dist:>9}  not probed (beyond the nearest {})",
                "",
                c.name,
                c.addr,
                c.region.as_deref().unwrap_or("-"),
                config.probe.top_k
            );
        }
        match &round.choice {
            Some(c) => println!(
                "choice: {} ({})",
                round.probed[c.index].candidate.name, c.reason
            ),
            None => return Err("no relay answered".into()),
        }
    }
    Ok(())
}

fn origin_text(origin: &Origin) -> String {
    match origin {
        Origin::Dns => "DNS".into(),
        Origin::Cache { error } => format!("the cache (DNS failed: {error})"),
        Origin::Static => "the command line".into(),
    }
}

/// What a subscriber saw from one source in the last second.
#[derive(Default)]
struct SourceTrack {
    highest: Option<u64>,
    received: u64,
    expected: u64,
}

async fn join(args: &JoinArgs) -> Result<(), String> {
    if args.publish && args.size < 16 {
        return Err("--size must be at least 16 (sequence number and send time)".into());
    }
    let config = args.source.config()?;
    let started = Instant::now();
    let (client, mut media, mut events) =
        Client::connect(config).await.map_err(|e| e.to_string())?;
    let joined = client
        .join(&args.channel, &args.token)
        .await
        .map_err(|e| e.to_string())?;
    let print = |text: String, value: serde_json::Value| {
        if args.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    };
    print(
        format!(
            "joined {} as {:?} on {} (source {})",
            joined.name,
            joined.role,
            client.relay().map(|r| r.name).unwrap_or_default(),
            joined.source
        ),
        json!({"event": "joined", "channel": joined.name, "relay": client.relay().map(|r| r.name)}),
    );

    let mut publish_tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    publish_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut report_tick = tokio::time::interval(Duration::from_secs(1));
    report_tick.tick().await;
    let stop = (args.duration > 0).then(|| started + Duration::from_secs(args.duration));
    let mut seq = 0u64;
    let mut payload = vec![0u8; args.size.max(16)];
    let mut tracks: HashMap<u64, SourceTrack> = HashMap::new();
    let (mut sent, mut unsent) = (0u64, 0u64);
    let mut last_media: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    loop {
        tokio::select! {
            _ = publish_tick.tick(), if args.publish => {
                let t = started.elapsed().as_micros() as u64;
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                payload[8..16].copy_from_slice(&t.to_be_bytes());
                seq += 1;
                match client.publish(joined.channel, &payload) {
                    Ok(()) => sent += 1,
                    Err(_) => unsent += 1,
                }
            }
            m = media.recv() => {
                let Some(m) = m else { return Err("client closed".into()) };
                let now = Instant::now();
                if let Some(prev) = last_media {
                    max_gap = max_gap.max(now - prev);
                }
                last_media = Some(now);
                if m.payload.len() >= 8 {
                    let s = u64::from_be_bytes(m.payload[..8].try_into().expect("8 bytes"));
                    let t = tracks.entry(m.source.0).or_default();
                    t.received += 1;
                    match t.highest {
                        Some(h) if s > h => { t.expected += s - h; t.highest = Some(s); }
                        None => { t.expected += 1; t.highest = Some(s); }
                        _ => {}
                    }
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { return Err("client closed".into()) };
                match ev {
                    Event::RelayChanged { from, to, reason, outage } => print(
                        format!(
                            "relay changed: {} -> {} ({reason}){}",
                            from.as_ref().map(|f| f.name.as_str()).unwrap_or("-"),
                            to.name,
                            outage.map(|o| format!(", outage {:.0} ms", ms(o))).unwrap_or_default()
                        ),
                        json!({"event": "relay_changed", "from": from.map(|f| f.name), "to": to.name,
                               "reason": reason, "outage_ms": outage.map(ms)}),
                    ),
                    Event::Disconnected { reason } => print(
                        format!("disconnected: {reason}"),
                        json!({"event": "disconnected", "reason": reason}),
                    ),
                    Event::QualityChanged(q) => print(
                        format!("quality now {}", if q.poor { "poor" } else { "good" }),
                        json!({"event": "quality_changed", "poor": q.poor}),
                    ),
                    Event::Message { user, body, .. } => print(
                        format!("message from {user}: {}", String::from_utf8_lossy(&body)),
                        json!({"event": "message", "user": user, "bytes": body.len()}),
                    ),
                    Event::ChannelLost { channel, reason } => {
                        print(
                            format!("channel {channel} lost: {reason}"),
                            json!({"event": "channel_lost", "channel": channel, "reason": reason}),
                        );
                        return Err(format!("channel {channel} lost"));
                    }
                }
            }
            _ = report_tick.tick() => {
                let q = client.quality();
                let (rx, expected): (u64, u64) = tracks
                    .values()
                    .fold((0, 0), |(r, e), t| (r + t.received, e + t.expected));
                let media_loss = if expected > 0 {
                    1.0 - (rx.min(expected) as f64 / expected as f64)
                } else { 0.0 };
                let relay = q.relay.as_ref().map(|r| format!("{} ({})", r.name, r.region)).unwrap_or("-".into());
                print(
                    format!(
                        "t={:>5.1}s relay={relay} rtt={} loss={:.1}% jitter={:.1}ms | sent={sent} unsent={unsent} recv={rx} media-loss={:.1}% max-gap={:.0}ms",
                        started.elapsed().as_secs_f64(),
                        q.rtt.map(|r| format!("{:.1}ms", ms(r))).unwrap_or("-".into()),
                        q.loss * 100.0,
                        ms(q.jitter),
                        media_loss * 100.0,
                        ms(max_gap),
                    ),
                    json!({"event": "report", "t": started.elapsed().as_secs_f64(),
                           "relay": q.relay.as_ref().map(|r| r.name.clone()),
                           "rtt_ms": q.rtt.map(ms), "loss": q.loss, "jitter_ms": ms(q.jitter),
                           "sent": sent, "unsent": unsent, "received": rx,
                           "media_loss": media_loss, "max_gap_ms": ms(max_gap)}),
                );
                tracks.clear();
                (sent, unsent) = (0, 0);
                max_gap = Duration::ZERO;
                if stop.is_some_and(|s| Instant::now() >= s) {
                    client.close();
                    return Ok(());
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Probe { source, json } => probe(source, *json).await,
        Command::Join(args) => join(args).await,
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-client: {e}");
            ExitCode::FAILURE
        }
    }
}
