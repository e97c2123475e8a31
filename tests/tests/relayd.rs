//! Black-box tests of `relayd`: config checking, forwarding between real
//! processes through the netshim impairment proxy, refusal of bad clients,
//! a stalled subscriber, draining on SIGTERM, and the metrics endpoint.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use blackbox_tests::*;
use bytes::Bytes;
use relay_core::wire::client::{CloseCode, RelayToClient, Role};
use relay_sdk::SessionError;

/// Waits until a relay reports `n` connected peers (metrics publish once a second).
async fn wait_for_peers(relay: &RelayProc, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.metric("relayd_peers_connected", "") < n as f64 {
        assert!(
            Instant::now() < deadline,
            "peers did not connect:\n{}",
            relay.proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_config(cluster: &Cluster, text: &str) -> (bool, String) {
    let path = cluster.dir.path().join("check.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(bin("relayd"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_valid_and_explains_invalid() {
    let cluster = Cluster::new(3, 0);
    let mut spec = RelaySpec::new(1);
    spec.peers = vec![(2, "127.0.0.1:5002".into()), (3, "127.0.0.1:5003".into())];
    spec.routes = vec![(3, vec![3], Some(vec![2, 3]))];
    let good = spec.toml(&cluster.pki());
    let (ok, out) = check_config(&cluster, &good);
    assert!(ok, "{out}");
    assert!(
        out.contains("config OK") && out.contains("2 peers"),
        "{out}"
    );

    // Fast failure detection settings are accepted.
    let fast = good.replace(
        "[probe]\n",
        "[probe]\nadaptive_timeout = true\ndead_after_losses = 2\n",
    );
    let (ok, out) = check_config(&cluster, &fast);
    assert!(ok, "{out}");

    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("[probe]\n", "[probe]\ndead_after_losses = 0\n"),
            "probe.dead_after_losses",
        ),
        (
            good.replace("[relay]", "[relay]\nbogus = 1"),
            "unknown field `bogus`",
        ),
        (good.replace("path = [3]", "path = [4]"), "routes[0].path"),
        (good.replace(APP_SECRET_HEX, "0011"), "apps[0].secret"),
        (good.replace(APP_SECRET_HEX, "zz"), "is not hex"),
        (
            good.replace("relay-1.pem", "relay-2.pem")
                .replace("relay-1.key", "relay-2.key"),
            "not valid for relay-1",
        ),
        (
            good.replace("relay-1.key", "relay-2.key"),
            "keys may not be consistent",
        ),
        (good.replace("relay-1.key", "missing.key"), "missing.key"),
        (
            good.replace("interval_ms = 100", "interval_ms = 1"),
            "probe.interval_ms",
        ),
        (good.replace("id = 2\n", "id = 1\n"), "peers[0].id"),
        (
            good.replace("[relay]", "[relay]\nsocket_buffer_bytes = 1000"),
            "relay.socket_buffer_bytes",
        ),
        ("this is not toml".into(), "check.toml"),
    ];
    for (text, expect) in cases {
        let (ok, out) = check_config(&cluster, &text);
        assert!(!ok, "accepted:\n{text}");
        assert!(out.contains(expect), "expected {expect:?} in: {out}");
        assert!(!out.contains(APP_SECRET_HEX), "secret leaked: {out}");
    }
}

#[test]
fn the_example_config_is_valid() {
    // `relayd/relay.example.toml` documents every key with its default: it
    // must pass the check once the files it names exist.
    let cluster = Cluster::new(3, 0);
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../relayd/relay.example.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let secrets = cluster.dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("shop.hex"), APP_SECRET_HEX).unwrap();
    let (ok, out) = check_config(&cluster, &text);
    assert!(ok, "{out}");
    assert!(out.contains("relay 1") && out.contains("2 peers"), "{out}");
}

/// Three relays; the direct link 1 -> 3 goes through netshim and gets 10 %
/// loss mid-stream. Relay 1 moves the stream to its backup through 2 within
/// a few probe intervals, and the subscriber on 3 sees under 1 % loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_direct_link_is_routed_around_through_a_third_relay() {
    let cluster = Cluster::new(3, 0);
    let (mut a, mut b, c) = (RelaySpec::new(1), RelaySpec::new(2), RelaySpec::new(3));
    let shim = Shim::start(cluster.dir.path(), &[("ac", c.addr())]);
    let via_shim = shim.links["ac"];
    a.peers = vec![(2, b.addr().to_string()), (3, via_shim.to_string())];
    a.routes = vec![(3, vec![3], Some(vec![2, 3])), (2, vec![2], None)];
    b.peers = vec![(1, a.addr().to_string()), (3, c.addr().to_string())];
    b.routes = vec![(3, vec![3], None)];
    let mut c = c;
    c.peers = vec![(1, a.addr().to_string()), (2, b.addr().to_string())];
    let ra = RelayProc::start(&cluster, a);
    let rb = RelayProc::start(&cluster, b);
    let rc = RelayProc::start(&cluster, c);

    let mut sub = session(&cluster, rc.spec.addr()).await;
    let joined = sub
        .join("call", &token("call", "buyer", Role::Subscriber))
        .await
        .unwrap();
    let mut publisher = session(&cluster, ra.spec.addr()).await;
    publisher
        .join("call", &token("call", "seller", Role::Publisher))
        .await
        .unwrap();

    // Wait for both peers of relay 1 and for the interest to arrive.
    wait_for_peers(&ra, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u32, Instant)>::new()));
    let rx = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(m) = sub.recv_media().await {
                assert_eq!(m.channel, joined.channel);
                let seq = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                received.lock().unwrap().push((seq, Instant::now()));
            }
        })
    };

    // 200 packets/s of 200 bytes: 2 s clean, then 6 s with 10 % loss on 1->3.
    let mut sent_at = Vec::new();
    let mut payload = vec![0u8; 200];
    let start = Instant::now();
    let mut degraded_at = None;
    for seq in 0u32..1600 {
        if seq == 400 {
            assert_eq!(shim.command("set ac both loss=0.10"), "ok");
            degraded_at = Some(Instant::now());
        }
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        publisher.publish(joined.channel, &payload).unwrap();
        sent_at.push(Instant::now());
        let next = start + Duration::from_millis(5 * u64::from(seq + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    rx.abort();
    let degraded_at = degraded_at.unwrap();
    let got: BTreeSet<u32> = received.lock().unwrap().iter().map(|r| r.0).collect();

    // Loss per phase.
    let lost = |range: std::ops::Range<u32>| range.clone().filter(|s| !got.contains(s)).count();
    let clean_loss = lost(0..400);
    assert_eq!(clean_loss, 0, "losses before the impairment");
    // The last lost packet tells when the reroute took effect.
    let last_lost = (400..1600u32).filter(|s| !got.contains(s)).max();
    let reroute_ms = last_lost.map_or(0, |s| {
        sent_at[s as usize].duration_since(degraded_at).as_millis()
    });
    let steady_loss = lost(800..1600) as f64 / 800.0;
    let overall = lost(400..1600) as f64 / 1200.0;
    println!(
        "lossy link: lost {} of 1200 while degraded ({:.2} %), last loss {} ms after the impairment, \
         steady-state loss {:.2} %",
        lost(400..1600),
        100.0 * overall,
        reroute_ms,
        100.0 * steady_loss
    );
    let missing: Vec<u32> = (400..1600u32).filter(|s| !got.contains(s)).collect();
    assert!(
        steady_loss < 0.01,
        "steady-state loss {steady_loss}, missing {missing:?}\nrelay 1:\n{}\nrelay 3:\n{}",
        ra.proc.log(),
        rc.proc.log()
    );
    assert!(overall < 0.01, "loss while degraded {overall}");
    assert!(
        reroute_ms < 1500,
        "reroute took {reroute_ms} ms (probe interval 100 ms), missing {missing:?}\nrelay 1:\n{}",
        ra.proc.log()
    );
    // The traffic really went through relay 2.
    assert!(rb.metric("relayd_forwarded_packets_total", "to=\"relay\"") > 500.0);
    assert!(ra.metric("relayd_rerouted_packets_total", "") > 500.0);
    let shim_stats = shim.command("show");
    assert!(shim_stats.contains("\"lost\""), "{shim_stats}");
    drop((ra, rb, rc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_refused_without_harming_others() {
    let cluster = Cluster::new(1, 0);
    let relay = RelayProc::start(&cluster, RelaySpec::new(1));
    let addr = relay.spec.addr();

    let mut sub = session(&cluster, addr).await;
    let ch = sub
        .join("room", &token("room", "good-sub", Role::Subscriber))
        .await
        .unwrap();
    let mut publisher = session(&cluster, addr).await;
    publisher
        .join("room", &token("room", "good-pub", Role::Publisher))
        .await
        .unwrap();

    let forged = token_with(
        "room",
        "mallory",
        Role::Publisher,
        60,
        b"not-the-app-secret-at-all-123456",
    );
    let expired = token_with("room", "late", Role::Publisher, -10, &hex_secret());
    let wrong = token("other-room", "eve", Role::Publisher);
    for (tok, code) in [
        (forged, CloseCode::InvalidToken),
        (expired, CloseCode::TokenExpired),
        (wrong, CloseCode::WrongChannel),
        ("not a token".to_owned(), CloseCode::InvalidToken),
    ] {
        let mut bad = session(&cluster, addr).await;
        // Media before joining must go nowhere.
        bad.publish(ch.channel, b"unauthenticated").unwrap();
        match bad.join("room", &tok).await {
            Err(SessionError::Closed {
                code: Some(c),
                reason,
            }) => {
                assert_eq!(c, code, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("expected a close with {code:?}, got {other:?}"),
        }
    }

    // Malformed datagrams and an oversized control frame from a joined client.
    let raw = {
        let (endpoint, config) = client_endpoint(&cluster);
        let conn = endpoint
            .connect_with(config, addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        for junk in [&b""[..], &[1u8][..], &[9, 9, 9][..], &[1, 0x10, 0, 0][..]] {
            let _ = conn.send_datagram(Bytes::copy_from_slice(junk));
        }
        send.write_all(&(10_000_000u32).to_be_bytes())
            .await
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap();
        (endpoint, reason)
    };
    match raw.1 {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(CloseCode::FrameTooLarge.code())
            );
        }
        other => panic!("oversized frame: {other:?}"),
    }

    // The good pair still works.
    publisher.publish(ch.channel, b"still here").unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), sub.recv_media())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"still here");
    // Only the good payload arrived.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.recv_media())
            .await
            .is_err()
    );

    tokio::time::sleep(Duration::from_millis(1200)).await; // metrics publish every second
    assert_eq!(
        relay.metric("relayd_auth_failures_total", "reason=\"bad_signature\""),
        1.0
    );
    assert_eq!(
        relay.metric("relayd_auth_failures_total", "reason=\"expired\""),
        1.0
    );
    assert_eq!(
        relay.metric("relayd_auth_failures_total", "reason=\"wrong_channel\""),
        1.0
    );
    assert_eq!(
        relay.metric("relayd_auth_failures_total", "reason=\"malformed\""),
        1.0
    );
    assert!(relay.metric("relayd_dropped_packets_total", "reason=\"not_joined\"") >= 4.0);
    assert!(relay.metric("relayd_dropped_packets_total", "reason=\"malformed\"") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_then_exits() {
    let cluster = Cluster::new(2, 0);
    let mut spec = RelaySpec::new(1);
    spec.peers = vec![(2, "127.0.0.1:9".into())];
    spec.drain_deadline_ms = 2000;
    let mut relay = RelayProc::start(&cluster, spec);
    let mut s = session(&cluster, relay.spec.addr()).await;
    s.join("c", &token("c", "u", Role::Subscriber))
        .await
        .unwrap();
    relay.proc.terminate();
    let started = Instant::now();
    let drain = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.next_event())
            .await
            .unwrap()
        {
            Ok(RelayToClient::Drain {
                alternatives,
                deadline_ms,
                ..
            }) => break (alternatives, deadline_ms),
            Ok(_) => continue,
            Err(e) => panic!("no drain notice: {e}"),
        }
    };
    assert_eq!(drain.0.len(), 1, "suggests its peers");
    assert!(drain.1 <= 2000);
    // We stay; the relay closes us at the deadline and exits.
    let closed = s.closed().await;
    assert!(
        matches!(
            closed,
            SessionError::Closed {
                code: Some(CloseCode::Draining),
                ..
            }
        ),
        "{closed:?}"
    );
    let status = relay
        .proc
        .wait_timeout(Duration::from_secs(10))
        .expect("relayd exits");
    assert!(status.success(), "{}", relay.proc.log());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_links_forwarding_and_gauges() {
    let cluster = Cluster::new(2, 0);
    let (mut a, mut b) = (RelaySpec::new(1), RelaySpec::new(2));
    a.peers = vec![(2, b.addr().to_string())];
    b.peers = vec![(1, a.addr().to_string())];
    let ra = RelayProc::start(&cluster, a);
    let rb = RelayProc::start(&cluster, b);
    let mut sub = session(&cluster, rb.spec.addr()).await;
    let ch = sub
        .join("m", &token("m", "s", Role::Subscriber))
        .await
        .unwrap();
    let mut p = session(&cluster, ra.spec.addr()).await;
    p.join("m", &token("m", "p", Role::Publisher))
        .await
        .unwrap();
    wait_for_peers(&ra, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        p.publish(ch.channel, &[7u8; 100]).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(2), sub.recv_media())
            .await
            .unwrap()
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let page = ra.scrape().unwrap();
    for name in [
        "relayd_link_rtt_seconds",
        "relayd_link_jitter_seconds",
        "relayd_link_loss_ratio",
        "relayd_forwarded_packets_total",
        "relayd_forwarded_bytes_total",
        "relayd_dropped_packets_total",
        "relayd_auth_failures_total",
        "relayd_clients",
        "relayd_channels",
    ] {
        assert!(page.contains(name), "{name} missing from:\n{page}");
    }
    let rtt = metric_value(&page, "relayd_link_rtt_seconds", "peer=\"2\"");
    assert!(rtt > 0.0 && rtt < 0.05, "loopback rtt {rtt}");
    assert_eq!(
        metric_value(&page, "relayd_forwarded_packets_total", "to=\"relay\""),
        20.0
    );
    assert_eq!(metric_value(&page, "relayd_clients", ""), 1.0);
    assert_eq!(
        rb.metric("relayd_forwarded_packets_total", "to=\"client\""),
        20.0
    );
}

/// Resident memory of a process, bytes (`VmRSS` in `/proc/<pid>/status`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// A subscriber that stops reading (its process hangs: no reads, no ACKs,
/// no keep-alives) costs the others nothing: the relay keeps sending its
/// datagrams, which are lost at its full socket rather than queued in the
/// relay, a healthy subscriber of the same channel receives everything, and
/// the relay closes the stalled connection at its 5 s idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_is_dropped_without_harming_others() {
    let cluster = Cluster::new(1, 0);
    let relay = RelayProc::start(&cluster, RelaySpec::new(1));
    let addr = relay.spec.addr();

    let mut good = session(&cluster, addr).await;
    let ch = good
        .join("live", &token("live", "good", Role::Subscriber))
        .await
        .unwrap();
    let mut publisher = session(&cluster, addr).await;
    publisher
        .join("live", &token("live", "seller", Role::Publisher))
        .await
        .unwrap();

    // The stalled subscriber runs on a runtime of its own, on its own
    // thread, which it then blocks: nothing reads its socket any more.
    let (joined_tx, joined_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let stalled = {
        let roots = cluster.roots();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut s = session_trusting(roots, addr).await;
                s.join("live", &token("live", "stalled", Role::Subscriber))
                    .await
                    .unwrap();
                joined_tx.send(()).unwrap();
                // Stall: block the runtime's only thread until told.
                let _ = resume_rx.recv();
                // Back: the relay has given up on us.
                tokio::time::timeout(Duration::from_secs(5), s.closed())
                    .await
                    .expect("the stalled session learns it was closed")
            })
        })
    };
    joined_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await; // metrics publish every second
    assert_eq!(relay.metric("relayd_clients", ""), 3.0);
    let rss_before = rss_bytes(relay.proc.child.id());

    // 2,000 datagrams/s for 8 s: the stall outlasts the idle timeout.
    let received = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::<u32>::new()));
    let rx = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(m) = good.recv_media().await {
                let seq = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                assert!(received.lock().unwrap().insert(seq), "duplicate {seq}");
            }
        })
    };
    // A watcher thread samples the relay's RSS and client gauge (blocking
    // reads) off the publishing loop, until the stream has ended and the
    // relay closed the stalled client, or 14 s (the 8 s stream and more
    // than the idle timeout again) have passed.
    let start = Instant::now();
    let streaming = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (streaming, pid, metrics) = (
            streaming.clone(),
            relay.proc.child.id(),
            relay.spec.metrics_addr(),
        );
        std::thread::spawn(move || {
            let mut rss_max = rss_before;
            let mut dropped_after = None;
            let give_up = start + Duration::from_secs(14);
            loop {
                rss_max = rss_max.max(rss_bytes(pid));
                let page = http_get(metrics, "/metrics").unwrap_or_default();
                if dropped_after.is_none() && metric_value(&page, "relayd_clients", "") == 2.0 {
                    dropped_after = Some(start.elapsed());
                }
                let done = dropped_after.is_some()
                    && !streaming.load(std::sync::atomic::Ordering::Relaxed);
                if done || Instant::now() > give_up {
                    return (rss_max, dropped_after);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut payload = vec![0u8; 200];
    const SENT: u32 = 16_000;
    for seq in 0..SENT {
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        publisher.publish(ch.channel, &payload).unwrap();
        let next = start + Duration::from_micros(500 * u64::from(seq + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    rx.abort();
    streaming.store(false, std::sync::atomic::Ordering::Relaxed);
    let (rss_max, dropped_after) = watcher.join().unwrap();
    resume_tx.send(()).unwrap();
    let why = stalled.join().unwrap();

    let got = received.lock().unwrap().len() as u32;
    let grew = rss_max.saturating_sub(rss_before);
    println!(
        "stalled subscriber: closed by the relay {dropped_after:?} after the stream began; \
         the healthy one got {got} of {SENT}; relay RSS grew {} KB; the stalled session saw {why}",
        grew / 1024
    );
    assert_eq!(got, SENT, "the healthy subscriber lost datagrams");
    let dropped_after = dropped_after.expect("the relay never closed the stalled client");
    assert!(
        dropped_after < Duration::from_secs(9),
        "closed only after {dropped_after:?}"
    );
    // What the relay holds for a stalled client is bounded by the rate
    // times the idle timeout, not by how long it stays stalled.
    assert!(grew < 32 << 20, "relay RSS grew by {grew} bytes");
}
