//! The SDK against real relays: discovery from a real DNS server
//! (hickory-server on loopback), a GeoIP database written here, paths
//! impaired by the netshim, relays killed mid-stream.
//!
//! The world: a client in Manila (GeoIP maps loopback there) and relays in
//! Singapore (relay 1, nearest), Tokyo (relay 2) and Frankfurt (relay 3).
//! Clients reach each relay through its own netshim link, so each relay
//! has its own client RTT.
#![allow(clippy::disallowed_methods)] // tests measure wall-clock time

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blackbox_tests::*;
use relay_core::wire::client::Role;
use relay_sdk::{
    Client, ClientConfig, DnsConfig, Event, GeoIp, MediaStream, Origin, RelaySource, Session,
};

const SITES: [(&str, f64, f64, &str); 3] = [
    ("sin", 1.35, 103.82, "SG"),
    ("tyo", 35.68, 139.69, "JP"),
    ("fra", 50.11, 8.68, "DE"),
];

struct World {
    cluster: Cluster,
    relays: Vec<RelayProc>,
    shim: Shim,
    dns: Option<DnsServer>,
    geoip: std::path::PathBuf,
}

impl World {
    /// Three meshed relays, each behind a shim link with `one_way_ms`
    /// delay each way for clients, a zone listing them, and the GeoIP file.
    async fn start(one_way_ms: [u32; 3]) -> World {
        let cluster = Cluster::new(3, 0);
        let specs: Vec<RelaySpec> = (1..=3).map(RelaySpec::new).collect();
        let mut relays = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut spec = spec.clone();
            spec.peers = specs
                .iter()
                .filter(|s| s.id != spec.id)
                .map(|s| (s.id, s.addr().to_string()))
                .collect();
            spec.extra = format!("\n# site {}\n", SITES[i].0);
            relays.push(RelayProc::start(&cluster, spec));
        }
        let links: Vec<(String, SocketAddr)> = specs
            .iter()
            .map(|s| (format!("r{}", s.id), s.addr()))
            .collect();
        let link_refs: Vec<(&str, SocketAddr)> =
            links.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let shim = Shim::start(cluster.dir.path(), &link_refs);
        for (i, d) in one_way_ms.iter().enumerate() {
            assert_eq!(
                shim.command(&format!("set r{} both delay_ms={d}", i + 1)),
                "ok"
            );
        }
        let mut zone = String::new();
        for (i, (region, lat, lon, country)) in SITES.iter().enumerate() {
            let id = i + 1;
            let port = shim.links[&format!("r{id}")].port();
            zone += &format!(
                "_relay._udp IN SRV 10 1 {port} relay-{id}.relays.internal.\n\
                 relay-{id} IN A 127.0.0.1\n\
                 relay-{id} IN TXT \"region={region}\" \"loc={lat},{lon}\" \"country={country}\"\n"
            );
        }
        let dns = DnsServer::start(cluster.dir.path(), "relays.internal.", &zone).await;
        let geoip = cluster.dir.path().join("GeoLite2-City.mmdb");
        write_geoip(&geoip, &[("127.0.0.0/8", 14.6, 121.0, "PH")]);
        World {
            cluster,
            relays,
            shim,
            dns: Some(dns),
            geoip,
        }
    }

    fn dns_config(&self) -> DnsConfig {
        let mut dns = DnsConfig::new("relays.internal");
        dns.nameservers = vec![self.dns.as_ref().expect("DNS running").addr];
        dns.timeout = Duration::from_millis(500);
        dns.attempts = 1;
        dns
    }

    fn config(&self, dns: DnsConfig) -> ClientConfig {
        let mut c = ClientConfig::new(RelaySource::Dns(dns), self.cluster.roots());
        c.geoip = Some(Arc::new(GeoIp::open(&self.geoip).unwrap()));
        c.bind = "127.0.0.1:0".parse().unwrap();
        c.probe.top_k = 2;
        c
    }

    /// Waits until every relay sees its two peers.
    async fn wait_for_mesh(&self) {
        let end = Instant::now() + Duration::from_secs(15);
        for r in &self.relays {
            while r.metric("relayd_peers_connected", "") < 2.0 {
                assert!(Instant::now() < end, "mesh did not form:\n{}", r.proc.log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn name(id: u32) -> String {
    format!("relay-{id}.relays.internal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_orders_by_distance_and_chooses_by_measured_rtt() {
    let world = World::start([10, 25, 90]).await;
    let config = world.config(world.dns_config());
    let (round, origin) = relay_sdk::probe(&config).await.unwrap();
    assert_eq!(origin, Origin::Dns);
    // The client's place comes from the address the relay observed.
    assert_eq!(round.public_ip, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(round.place.as_ref().unwrap().country.as_deref(), Some("PH"));
    // The two nearest are probed, the farthest is not.
    let probed: Vec<&str> = round
        .probed
        .iter()
        .map(|r| r.candidate.name.as_str())
        .collect();
    assert_eq!(probed, [name(1), name(2)]);
    assert_eq!(round.not_probed.len(), 1);
    assert_eq!(round.not_probed[0].0.name, name(3));
    let d: Vec<f64> = round
        .probed
        .iter()
        .map(|r| r.distance_km.unwrap())
        .collect();
    assert!(d[0] < d[1], "{d:?}");
    assert_eq!(round.probed[0].candidate.region.as_deref(), Some("sin"));
    let choice = round.choice.unwrap();
    assert_eq!(choice.index, 0, "{}", choice.reason);
    let rtt = round.probed[0].result.as_ref().unwrap().rtt;
    assert!(
        rtt >= Duration::from_millis(19) && rtt < Duration::from_millis(60),
        "{rtt:?}"
    );
    let rtt2 = round.probed[1].result.as_ref().unwrap().rtt;
    assert!(rtt2 >= Duration::from_millis(49), "{rtt2:?}");

    // The command-line client says the same.
    let out = std::process::Command::new(bin("relay-client"))
        .args([
            "probe",
            "--json",
            "--zone",
            "relays.internal",
            "--top-k",
            "3",
        ])
        .arg("--dns")
        .arg(world.dns.as_ref().unwrap().addr.to_string())
        .arg("--ca")
        .arg(world.cluster.pki().join("ca.pem"))
        .arg("--geoip")
        .arg(&world.geoip)
        .args(["--bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["choice"], name(1), "{v}");
    assert_eq!(v["probed"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["probed"][2]["region"], "fra", "{v}");
    assert!(v["probed"][2]["rtt_ms"].as_f64().unwrap() >= 179.0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_nearest_relay_made_slow_loses_to_a_farther_fast_one() {
    let world = World::start([10, 25, 90]).await;
    // Singapore's path turns bad: 200 ms RTT.
    assert_eq!(world.shim.command("set r1 both delay_ms=100"), "ok");
    let config = world.config(world.dns_config());
    let (round, _) = relay_sdk::probe(&config).await.unwrap();
    let choice = round.choice.clone().unwrap();
    assert_eq!(round.probed[choice.index].candidate.name, name(2));
    assert!(
        choice
            .reason
            .contains(&format!("geo-nearest {} scored", name(1))),
        "{}",
        choice.reason
    );
    // And a client connects there.
    let (client, _media, mut events) = Client::connect(config).await.unwrap();
    assert_eq!(client.relay().unwrap().name, name(2));
    match events.recv().await {
        Some(Event::RelayChanged { from: None, to, .. }) => assert_eq!(to.name, name(2)),
        other => panic!("{other:?}"),
    }
    let q = client
        .quality_updates()
        .wait_for(|q| q.rtt.is_some())
        .await
        .unwrap()
        .clone();
    assert!(q.rtt.unwrap() >= Duration::from_millis(49), "{q:?}");
    assert_eq!(q.standby.as_ref().unwrap().0.name, name(1), "{q:?}");
}

/// Receives media until `deadline`; returns how many packets came and the
/// longest time without media, counted from `since`.
async fn watch_media(
    media: &mut MediaStream,
    since: Instant,
    deadline: Instant,
) -> (u64, Duration) {
    let (mut last, mut gap, mut n) = (since, Duration::ZERO, 0);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline.into(), media.recv()).await {
        let now = Instant::now();
        gap = gap.max(now - last);
        last = now;
        n += 1;
    }
    (n, gap.max(deadline - last))
}

/// Publishes a packet every 10 ms until dropped.
fn spawn_publisher(publish: impl Fn(&[u8]) + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            publish(&seq.to_be_bytes());
            seq += 1;
        }
    })
}

/// A publisher on relay `index` with a plain session (not the SDK client),
/// publishing on `channel` every 10 ms; keep the session alive while it runs.
async fn plain_publisher(
    world: &World,
    index: usize,
    channel: &str,
) -> (Session, tokio::task::JoinHandle<()>) {
    let (endpoint, qc) = client_endpoint(&world.cluster);
    let mut publisher = Session::connect(
        &endpoint,
        qc,
        world.relays[index].spec.addr(),
        "localhost",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let ch = publisher
        .join(channel, &token(channel, "seller", Role::Publisher))
        .await
        .unwrap()
        .channel;
    let sender = publisher.media_sender();
    let task = spawn_publisher(move |p| {
        let _ = sender.publish(ch, p);
    });
    (publisher, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_fails_over_and_media_resumes_within_a_second() {
    let mut world = World::start([5, 10, 20]).await;
    world.wait_for_mesh().await;
    let config = world.config(world.dns_config());

    // A subscriber through the SDK (on relay 1, standby relay 2) and a
    // publisher on relay 3 with a plain session.
    let (sub, mut media, mut events) = Client::connect(config.clone()).await.unwrap();
    assert_eq!(sub.relay().unwrap().name, name(1));
    sub.join("live", &token("live", "buyer", Role::Subscriber))
        .await
        .unwrap();
    let (_publisher, pub_task) = plain_publisher(&world, 2, "live").await;
    // Media flows, and the standby is ready.
    let t = Instant::now();
    let (n, _) = watch_media(&mut media, t, t + Duration::from_millis(1500)).await;
    assert!(n > 50, "media before the kill: {n}");
    assert!(sub.quality().standby.is_some(), "{:?}", sub.quality());

    // Kill relay 1 (SIGKILL: no goodbye).
    let killed = Instant::now();
    let _ = world.relays[0].proc.child.kill();
    let (n, gap) = watch_media(&mut media, killed, killed + Duration::from_secs(2)).await;
    let (outage, to) = loop {
        match events.recv().await {
            Some(Event::RelayChanged {
                from: Some(_),
                to,
                outage,
                ..
            }) => break (outage.unwrap(), to),
            Some(_) => continue,
            None => panic!("client ended"),
        }
    };
    println!(
        "subscriber failover: longest media gap {:.0} ms after the kill (client-measured outage {:.0} ms), now on {}",
        gap.as_secs_f64() * 1e3,
        outage.as_secs_f64() * 1e3,
        to.name
    );
    assert_eq!(to.name, name(2));
    assert!(n > 100, "media after the failover: {n}");
    assert!(gap < Duration::from_secs(1), "gap {gap:?}");
    assert_eq!(sub.stats().relay_changes, 1);
    pub_task.abort();

    // Now the publisher side: an SDK publisher on relay 2 (relay 1 is
    // gone and penalized), a plain subscriber on relay 3; kill relay 2.
    let (publ, _m, _e) = Client::connect(config).await.unwrap();
    assert_eq!(publ.relay().unwrap().name, name(2));
    let pj = publ
        .join("live2", &token("live2", "seller", Role::Publisher))
        .await
        .unwrap();
    let (endpoint, qc) = client_endpoint(&world.cluster);
    let mut subscriber = Session::connect(
        &endpoint,
        qc,
        world.relays[2].spec.addr(),
        "localhost",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    subscriber
        .join("live2", &token("live2", "buyer", Role::Subscriber))
        .await
        .unwrap();
    let p2 = publ.clone();
    let pub_task = spawn_publisher(move |p| {
        let _ = p2.publish(pj.channel, p);
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let recv_task = tokio::spawn(async move {
        while let Ok(m) = subscriber.recv_media().await {
            if tx.send((Instant::now(), m)).await.is_err() {
                break;
            }
        }
    });
    // Steady flow first.
    let mut before = 0;
    let end = Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(_)) = tokio::time::timeout_at(end.into(), rx.recv()).await {
        before += 1;
    }
    assert!(before > 50, "media before the kill: {before}");
    let killed = Instant::now();
    let _ = world.relays[1].proc.child.kill();
    let (mut last, mut gap, mut after) = (killed, Duration::ZERO, 0);
    let end = killed + Duration::from_secs(2);
    while let Ok(Some((at, _))) = tokio::time::timeout_at(end.into(), rx.recv()).await {
        gap = gap.max(at - last);
        last = at;
        after += 1;
    }
    let gap = gap.max(end - last);
    println!(
        "publisher failover: longest media gap {:.0} ms after the kill, now on {}",
        gap.as_secs_f64() * 1e3,
        publ.relay().map(|r| r.name).unwrap_or_default()
    );
    assert!(after > 100, "media after the failover: {after}");
    assert!(gap < Duration::from_secs(1), "gap {gap:?}");
    assert_eq!(publ.relay().unwrap().name, name(3));
    pub_task.abort();
    recv_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_down_at_start_uses_the_cached_list() {
    let mut world = World::start([10, 25, 90]).await;
    let cache = world.cluster.dir.path().join("cache/relays.json");
    let mut dns = world.dns_config();
    dns.cache = Some(cache.clone());
    let config = world.config(dns.clone());
    let (_, origin) = relay_sdk::probe(&config).await.unwrap();
    assert_eq!(origin, Origin::Dns);
    assert!(cache.is_file());

    world.dns.take().unwrap().stop().await;
    let (round, origin) = relay_sdk::probe(&config).await.unwrap();
    let Origin::Cache { error } = origin else {
        panic!("{origin:?}")
    };
    assert!(error.contains("_relay._udp.relays.internal."), "{error}");
    assert_eq!(
        round.probed[round.choice.unwrap().index].candidate.name,
        name(1)
    );
    // A client connects and joins from the cached list.
    let (client, _m, _e) = Client::connect(config).await.unwrap();
    client
        .join("c", &token("c", "u", Role::Subscriber))
        .await
        .unwrap();
    assert_eq!(client.relay().unwrap().name, name(1));

    // Without a cache, the error says what failed and that nothing was
    // cached.
    let mut no_cache = dns;
    no_cache.cache = Some(world.cluster.dir.path().join("missing.json"));
    let e = Client::connect(world.config(no_cache)).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("DNS lookup of _relay._udp.relays.internal. failed"),
        "{text}"
    );
    assert!(text.contains("no cached list"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_relay_is_left_for_the_standby_before_breaking() {
    let world = World::start([5, 10, 20]).await;
    world.wait_for_mesh().await;
    let mut config = world.config(world.dns_config());
    config.monitor.hold = Duration::from_secs(1);
    let (sub, mut media, mut events) = Client::connect(config).await.unwrap();
    assert_eq!(sub.relay().unwrap().name, name(1));
    sub.join("live", &token("live", "buyer", Role::Subscriber))
        .await
        .unwrap();
    let (_publisher, pub_task) = plain_publisher(&world, 2, "live").await;
    let t = Instant::now();
    let (n, _) = watch_media(&mut media, t, t + Duration::from_millis(1500)).await;
    assert!(n > 50, "media before: {n}");

    // Record arrivals from now on, to see the move's effect on media.
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let times = times.clone();
        tokio::spawn(async move {
            while let Some(_m) = media.recv().await {
                times.lock().unwrap().push(Instant::now());
            }
        })
    };
    // Singapore's path degrades to 160 ms RTT: over 2/3 worse than Tokyo's
    // 20 ms standby, but it still works.
    assert_eq!(world.shim.command("set r1 both delay_ms=80"), "ok");
    let degraded = Instant::now();
    let (reason, outage) = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::RelayChanged {
                from: Some(from),
                to,
                reason,
                outage,
            })) => {
                assert_eq!((from.name, to.name), (name(1), name(2)));
                break (reason, outage);
            }
            Ok(Some(_)) => continue,
            other => panic!("no move: {other:?}"),
        }
    };
    let moved_after = degraded.elapsed();
    assert!(reason.contains("standby scores"), "{reason}");
    assert_eq!(outage, None, "a quality move has no outage");
    tokio::time::sleep(Duration::from_secs(1)).await;
    recorder.abort();
    let times = times.lock().unwrap().clone();
    let gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "quality move {:.1} s after the degradation ({reason}); longest media gap across it {:.0} ms",
        moved_after.as_secs_f64(),
        gap.as_secs_f64() * 1e3
    );
    // Make before break: the new relay delivers before the old one stops,
    // so nothing waits for a failure deadline.
    assert!(gap < Duration::from_millis(300), "gap {gap:?}");
    let after = times
        .iter()
        .filter(|t| **t > degraded + moved_after)
        .count();
    assert!(after > 50, "media after the move: {after}");
    // The old relay is kept as the standby.
    assert_eq!(sub.quality().standby.unwrap().0.name, name(1));
    pub_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_client_publishes_and_subscribes() {
    let cluster = Cluster::new(1, 0);
    let relay = RelayProc::start(&cluster, RelaySpec::new(1));
    let run = |role: Role, extra: &[&str]| {
        let user = format!("{role:?}");
        let mut cmd = std::process::Command::new(bin("relay-client"));
        cmd.args(["join", "--json", "--channel", "cli", "--duration", "3"])
            .arg("--relay")
            .arg(format!("localhost@{}", relay.spec.addr()))
            .arg("--ca")
            .arg(cluster.pki().join("ca.pem"))
            .args(["--bind", "127.0.0.1:0", "--token"])
            .arg(token("cli", &user, role))
            .args(extra);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let sub = run(Role::Subscriber, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publ = run(Role::Publisher, &["--publish", "--rate", "100"]);
    let sub = sub.wait_with_output().unwrap();
    let publ = publ.wait_with_output().unwrap();
    assert!(
        publ.status.success(),
        "{}",
        String::from_utf8_lossy(&publ.stderr)
    );
    assert!(
        sub.status.success(),
        "{}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let lines = |o: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let sub = lines(&sub);
    assert_eq!(sub[0]["event"], "joined", "{sub:?}");
    let received: u64 = sub
        .iter()
        .filter(|v| v["event"] == "report")
        .map(|v| v["received"].as_u64().unwrap())
        .sum();
    assert!(received > 100, "{sub:?}");
    let report = sub.iter().rev().find(|v| v["event"] == "report").unwrap();
    assert!(report["rtt_ms"].as_f64().is_some(), "{report}");
    assert_eq!(report["media_loss"].as_f64().unwrap(), 0.0, "{report}");
    let sent: u64 = lines(&publ)
        .iter()
        .filter(|v| v["event"] == "report")
        .map(|v| v["sent"].as_u64().unwrap())
        .sum();
    assert!(sent > 200, "sent {sent}");
}
