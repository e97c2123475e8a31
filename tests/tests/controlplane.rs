//! Black-box tests of the control plane: three real nodes on loopback,
//! `kill -9`, partitions through netshim, and relays living through a
//! control-plane outage.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blackbox_tests::*;
use controlplane::api::{Consistency, Request, Response};
use controlplane::client::{CpClient, NodeAddr};
use relay_core::wire::client::Role;

/// Three nodes dialling each other directly.
fn three_nodes(cluster: &Cluster) -> Vec<CpProc> {
    let mut specs: Vec<CpSpec> = (1..=3).map(CpSpec::new).collect();
    let members: Vec<(u64, String)> = specs.iter().map(|s| (s.id, s.addr().to_string())).collect();
    for s in &mut specs {
        s.members = members.clone();
    }
    specs
        .into_iter()
        .map(|s| CpProc::start(cluster, s))
        .collect()
}

async fn wait_leader(id: &relay_net::tls::TlsIdentity, nodes: &[SocketAddr]) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for &a in nodes {
            if let Some(s) = cp_status(id, a).await
                && s.node.role == "leader"
            {
                return (s.node.id, s.node.term);
            }
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A writer keeping one connection per node, moving to the next node
/// whenever a write fails or takes too long.
struct Writer {
    id: relay_net::tls::TlsIdentity,
    nodes: Vec<SocketAddr>,
    clients: HashMap<usize, CpClient>,
    current: usize,
}

impl Writer {
    async fn put(&mut self, key: &str) -> bool {
        let i = self.current % self.nodes.len();
        if !self.clients.contains_key(&i) {
            let node = NodeAddr {
                id: None,
                addr: self.nodes[i],
            };
            match tokio::time::timeout(
                Duration::from_millis(500),
                CpClient::connect(&node, &self.id),
            )
            .await
            {
                Ok(Ok(c)) => {
                    self.clients.insert(i, c);
                }
                _ => {
                    self.current += 1;
                    return false;
                }
            }
        }
        let req = Request::Put {
            key: key.into(),
            value: "v".into(),
        };
        let r =
            tokio::time::timeout(Duration::from_millis(700), self.clients[&i].request(&req)).await;
        match r {
            Ok(Ok(Response::Ok)) => true,
            _ => {
                self.clients.remove(&i);
                self.current += 1;
                false
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write_and_recovers_within_2s() {
    let cluster = Cluster::new(0, 3);
    let id = operator(&cluster);
    let mut nodes = three_nodes(&cluster);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.spec.addr()).collect();
    let (leader, _) = wait_leader(&id, &addrs).await;

    let mut writer = Writer {
        id: operator(&cluster),
        nodes: addrs.clone(),
        clients: HashMap::new(),
        current: 0,
    };
    let mut acked: Vec<(String, Instant)> = Vec::new();
    let start = Instant::now();
    let mut killed_at = None;
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(7) {
        if killed_at.is_none() && start.elapsed() >= Duration::from_secs(2) {
            nodes[leader as usize - 1].kill();
            killed_at = Some(Instant::now());
        }
        let key = format!("w{i:05}");
        i += 1;
        if writer.put(&key).await {
            acked.push((key, Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = killed_at.unwrap();
    let before = acked
        .iter()
        .filter(|(_, t)| *t < killed_at)
        .map(|(_, t)| *t)
        .max()
        .unwrap();
    let after = acked
        .iter()
        .filter(|(_, t)| *t > killed_at)
        .map(|(_, t)| *t)
        .min();
    let after = after.unwrap_or_else(|| panic!("no write after the kill:\n{}", nodes[0].log()));
    let gap = after.duration_since(before);
    println!(
        "leader kill: {} writes acknowledged, gap {:?} between the last before and the first after",
        acked.len(),
        gap
    );
    assert!(gap <= Duration::from_secs(2), "write gap {gap:?}");

    // Bring the killed node back; every acknowledged write is on every node.
    nodes[leader as usize - 1].restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (n, &addr) in addrs.iter().enumerate() {
        let node = NodeAddr { id: None, addr };
        let c = CpClient::connect(&node, &id).await.unwrap();
        let mut missing = Vec::new();
        for (key, _) in &acked {
            let r = c
                .request(&Request::Get {
                    key: key.clone(),
                    consistency: Consistency::Stale,
                })
                .await
                .unwrap();
            if r != (Response::Value {
                value: Some("v".into()),
            }) {
                missing.push(key.clone());
            }
        }
        assert!(
            missing.is_empty(),
            "node {} lacks acknowledged writes {missing:?}",
            n + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_stops_accepting_writes_and_terms_never_have_two_leaders() {
    let cluster = Cluster::new(0, 3);
    let id = operator(&cluster);
    let mut specs: Vec<CpSpec> = (1..=3).map(CpSpec::new).collect();
    // Every node reaches every other through its own netshim link "ij".
    let mut links = Vec::new();
    for a in &specs {
        for b in &specs {
            if a.id != b.id {
                links.push((format!("{}{}", a.id, b.id), b.addr()));
            }
        }
    }
    let link_refs: Vec<(&str, SocketAddr)> = links.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let shim = Shim::start(cluster.dir.path(), &link_refs);
    for s in &mut specs {
        let me = s.id;
        s.members = (1..=3u64)
            .map(|j| {
                let addr = if j == me {
                    s.addr()
                } else {
                    shim.links[&format!("{me}{j}")]
                };
                (j, addr.to_string())
            })
            .collect();
    }
    let addrs: Vec<SocketAddr> = specs.iter().map(|s| s.addr()).collect();
    let _nodes: Vec<CpProc> = specs
        .into_iter()
        .map(|s| CpProc::start(&cluster, s))
        .collect();
    let (old, _) = wait_leader(&id, &addrs).await;

    // Watch every node's view continuously.
    let watch = {
        let (id, addrs) = (operator(&cluster), addrs.clone());
        tokio::spawn(async move {
            let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
            let end = Instant::now() + Duration::from_secs(9);
            while Instant::now() < end {
                for &a in &addrs {
                    if let Some(s) = cp_status(&id, a).await
                        && s.node.role == "leader"
                    {
                        seen.insert((s.node.term, s.node.id));
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            seen
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let block: Vec<String> = (1..=3u64)
        .filter(|&j| j != old)
        .flat_map(|j| [format!("{old}{j}"), format!("{j}{old}")])
        .collect();
    assert_eq!(shim.command(&format!("block {}", block.join(" "))), "ok");
    let isolated_at = Instant::now();

    // Writes to the isolated leader are not acknowledged.
    let old_addr = addrs[old as usize - 1];
    let mut acked_by_old = 0;
    let mut tries = 0;
    while isolated_at.elapsed() < Duration::from_secs(4) {
        let r = cp_request(
            &id,
            old_addr,
            &Request::Put {
                key: format!("iso{tries}"),
                value: "v".into(),
            },
            Duration::from_millis(1500),
        )
        .await;
        tries += 1;
        if r == Response::Ok && isolated_at.elapsed() > Duration::from_millis(100) {
            acked_by_old += 1;
        }
    }
    assert_eq!(acked_by_old, 0, "the isolated leader acknowledged writes");
    // The majority elected a new leader and accepts writes.
    let others: Vec<SocketAddr> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != old)
        .map(|(_, a)| *a)
        .collect();
    let (new, _) = wait_leader(&id, &others).await;
    assert_ne!(new, old);
    let r = cp_request(
        &id,
        addrs[new as usize - 1],
        &Request::Put {
            key: "majority".into(),
            value: "v".into(),
        },
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(r, Response::Ok);
    let old_status = cp_status(&id, old_addr).await.unwrap();
    assert_ne!(
        old_status.node.role, "leader",
        "check-quorum: the isolated node stepped down"
    );

    // Heal: the old leader follows and has the majority's write.
    assert_eq!(shim.command(&format!("unblock {}", block.join(" "))), "ok");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = cp_request(
        &id,
        old_addr,
        &Request::Get {
            key: "majority".into(),
            consistency: Consistency::Linearizable,
        },
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        r,
        Response::Value {
            value: Some("v".into())
        }
    );
    let seen = watch.await.unwrap();
    let mut per_term: HashMap<u64, u64> = HashMap::new();
    for (term, node) in &seen {
        if let Some(other) = per_term.insert(*term, *node) {
            assert_eq!(other, *node, "two leaders in term {term}: {seen:?}");
        }
    }
    println!("leaders seen (term, node): {seen:?}; {tries} writes tried on the isolated leader");
}

/// Relays keep forwarding on their last routes while the whole control
/// plane is down, with no extra loss, and converge again when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_forward_headless_and_reconverge() {
    let cluster = Cluster::new(2, 3);
    let id = operator(&cluster);
    let mut cps = three_nodes(&cluster);
    let cp_addrs: Vec<SocketAddr> = cps.iter().map(|n| n.spec.addr()).collect();
    let nodes_toml = format!(
        "\n[control_plane]\nnodes = [{}]\nreport_interval_ms = 500\n",
        cp_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("\"{}@{a}\"", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut a = RelaySpec::new(1);
    a.extra = nodes_toml.clone();
    let mut b = RelaySpec::new(2);
    b.extra = nodes_toml;
    // No static peers: the relays learn each other from the control plane.
    let ra = RelayProc::start(&cluster, a);
    let rb = RelayProc::start(&cluster, b);
    wait_leader(&id, &cp_addrs).await;
    // Routes computed and installed on both relays.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ra.metric("relayd_route_epoch", "") < 1.0 || rb.metric("relayd_peers_connected", "") < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "relays did not get routes:\n{}",
            ra.proc.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The status page, the map and `relayctl map` show both relays.
    let http = SocketAddr::from(([127, 0, 0, 1], cps[0].spec.http_port));
    let svg = http_get(http, "/map.svg").expect("map.svg");
    assert!(
        svg.contains("<svg") && svg.contains("R1 1") && svg.contains("R2 2"),
        "{svg}"
    );
    let page = http_get(http, "/").expect("status page");
    assert!(
        page.contains("<h1>Relay network</h1>") && page.contains("<svg"),
        "{page}"
    );
    let out = std::process::Command::new(bin("relayctl"))
        .arg("--node")
        .arg(cp_addrs[0].to_string())
        .arg("--pki")
        .arg(cluster.pki())
        .args(["--operator", "test", "map"])
        .output()
        .unwrap();
    let map = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && map.starts_with("<svg") && map.contains("R2 2"),
        "{map}"
    );

    let mut sub = session(&cluster, rb.spec.addr()).await;
    let ch = sub
        .join("h", &token("h", "s", Role::Subscriber))
        .await
        .unwrap();
    let mut publisher = session(&cluster, ra.spec.addr()).await;
    publisher
        .join("h", &token("h", "p", Role::Publisher))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let received = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let rx = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(m) = sub.recv_media().await {
                received
                    .lock()
                    .unwrap()
                    .insert(u32::from_be_bytes(m.payload[..4].try_into().unwrap()));
            }
        })
    };
    let epoch_before = ra.metric("relayd_route_epoch", "");
    // 100 packets/s: 2 s with the control plane, 4 s without, 4 s after it returns.
    let start = Instant::now();
    for seq in 0u32..1000 {
        if seq == 200 {
            for n in &mut cps {
                n.kill();
            }
        }
        if seq == 600 {
            for n in &mut cps {
                n.restart();
            }
        }
        publisher.publish(ch.channel, &seq.to_be_bytes()).unwrap();
        tokio::time::sleep_until((start + Duration::from_millis(10 * u64::from(seq + 1))).into())
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.abort();
    let got = received.lock().unwrap().clone();
    let lost = |r: std::ops::Range<u32>| r.filter(|s| !got.contains(s)).count();
    println!(
        "headless: lost {} before, {} while the control plane was down, {} after",
        lost(0..200),
        lost(200..600),
        lost(600..1000)
    );
    assert_eq!(lost(200..600), 0, "loss while headless");
    assert_eq!(lost(0..1000), 0);
    // The control plane is back: relays re-registered and routes flow again.
    wait_leader(&id, &cp_addrs).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let relays = cp_request(
            &id,
            cp_addrs[0],
            &Request::Relays {
                consistency: Consistency::Linearizable,
            },
            Duration::from_secs(2),
        )
        .await;
        let alive = matches!(&relays, Response::Relays { relays } if relays.len() == 2 && relays.iter().all(|r| r.alive));
        if alive && ra.metric("relayd_route_epoch", "") >= epoch_before {
            break;
        }
        assert!(Instant::now() < deadline, "did not reconverge: {relays:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
