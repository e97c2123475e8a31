//! Multi-relay cases of the relay core in an in-memory network.

mod harness;

use std::time::Duration;

use harness::{APP, NOW_UNIX, Net, SECRET};
use relay_core::token::Claims;
use relay_core::wire::client::{ClientToRelay, CloseCode, RelayToClient, Role};
use relay_core::wire::peer::{MediaHeader, PeerDatagram};
use relay_core::{AuthFailure, ChannelId, DropReason, RelayId};

const MS: Duration = Duration::from_millis(1);

fn line(n: u32) -> Net {
    let mut net = Net::new(7);
    for i in 1..=n {
        net.add_relay(Net::config(i));
    }
    net
}

/// Publisher on 1; subscribers on 2, 3 and 4; 1 reaches 3 and 4 through 2.
/// One datagram leaves 1 per packet, 2 delivers and fans out.
#[test]
fn fan_out_is_a_tree_and_delivers_once() {
    let mut net = line(4);
    for (a, b) in [(1, 2), (2, 3), (2, 4), (1, 3), (1, 4)] {
        net.connect(a, b, 10 * MS);
    }
    net.set_routes(
        1,
        &[
            (2, &[1, 2], None),
            (3, &[1, 2, 3], None),
            (4, &[1, 2, 4], None),
        ],
    );
    let publisher = net.client(1);
    let subs: Vec<_> = [2, 3, 4].iter().map(|&r| net.client(r)).collect();
    let ch = net.join(publisher, "live", Role::Publisher);
    for &s in &subs {
        net.join(s, "live", Role::Subscriber);
    }
    net.run_for(200 * MS); // interest propagates
    let sent_before = net.datagrams_sent.clone();
    let relayed_before = (
        net.relay(1).stats().relayed_packets,
        net.relay(2).stats().relayed_packets,
    );
    for i in 0..50u32 {
        net.publish(publisher, ch, &i.to_be_bytes());
        net.run_for(5 * MS);
    }
    net.run_for(200 * MS);
    for &s in &subs {
        let got: Vec<u32> = net
            .media(s)
            .iter()
            .map(|(c, p)| {
                assert_eq!(*c, ch);
                u32::from_be_bytes(p[..].try_into().unwrap())
            })
            .collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>(), "subscriber {s:?}");
    }
    assert!(net.media(publisher).is_empty(), "no echo to the publisher");
    // One media datagram per packet leaves 1 (to 2); 2 sends one to each of 3 and 4.
    assert_eq!(net.relay(1).stats().relayed_packets - relayed_before.0, 50);
    assert_eq!(net.relay(2).stats().relayed_packets - relayed_before.1, 100);
    let delta = |a: u32, b: u32| {
        let k = (RelayId(a), RelayId(b));
        net.datagrams_sent.get(&k).copied().unwrap_or(0) - sent_before.get(&k).copied().unwrap_or(0)
    };
    // The direct links 1->3 and 1->4 carry only probes and echoes (every 100 ms).
    assert!(
        delta(1, 3) <= 12 && delta(1, 4) <= 12,
        "direct links carried media"
    );
}

#[test]
fn interest_follows_joins_and_leaves() {
    let mut net = line(2);
    net.connect(1, 2, 20 * MS);
    let p = net.client(1);
    let ch = net.join(p, "room", Role::Publisher);
    net.publish(p, ch, b"before");
    net.run_for(100 * MS);
    let s = net.client(2);
    net.join(s, "room", Role::Subscriber);
    assert!(
        net.relay(1).interested_relays(ch).is_empty(),
        "not yet announced"
    );
    net.run_for(100 * MS);
    assert_eq!(net.relay(1).interested_relays(ch), &[RelayId(2)]);
    net.publish(p, ch, b"during");
    net.run_for(100 * MS);
    net.send_frame(s, ClientToRelay::Leave { channel: ch });
    net.run_for(100 * MS);
    assert!(net.relay(1).interested_relays(ch).is_empty());
    let relayed = net.relay(1).stats().relayed_packets;
    net.publish(p, ch, b"after");
    net.run_for(100 * MS);
    assert_eq!(
        net.relay(1).stats().relayed_packets,
        relayed,
        "nothing sent to 2 any more"
    );
    let got: Vec<_> = net.media(s).iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(got, vec![b"during".to_vec()]);
}

#[test]
fn interest_floods_beyond_neighbours() {
    // 1 - 2 - 3 in a line: 1 learns 3's interest through 2 and reaches it
    // over its route through 2.
    let mut net = line(3);
    net.connect(1, 2, 10 * MS);
    net.connect(2, 3, 10 * MS);
    net.set_routes(1, &[(3, &[1, 2, 3], None)]);
    let s = net.client(3);
    let ch = net.join(s, "far", Role::Subscriber);
    net.run_for(100 * MS);
    assert_eq!(net.relay(1).interested_relays(ch), &[RelayId(3)]);
    let p = net.client(1);
    net.join(p, "far", Role::Publisher);
    net.publish(p, ch, b"x");
    net.run_for(100 * MS);
    assert_eq!(net.media(s).len(), 1);
}

/// The direct link 1 -> 3 loses 10 %. Relay 1 notices from the loss its
/// receiver reports and moves the stream to the backup through 2.
#[test]
fn fast_reroute_around_a_lossy_link() {
    let mut net = line(3);
    for (a, b) in [(1, 2), (2, 3), (1, 3)] {
        net.connect(a, b, 15 * MS);
    }
    net.set_routes(1, &[(3, &[1, 3], Some(&[1, 2, 3])), (2, &[1, 2], None)]);
    net.set_routes(2, &[(3, &[2, 3], None)]);
    let p = net.client(1);
    let s = net.client(3);
    let ch = net.join(p, "call", Role::Publisher);
    net.join(s, "call", Role::Subscriber);
    net.run_for(300 * MS);
    net.set_loss(1, 3, 0.10);
    // 50 packets per 100 ms (500/s) for 4 s.
    let mut sent = 0u32;
    let mut mark = None;
    for step in 0..40 {
        for _ in 0..50 {
            net.publish(p, ch, &sent.to_be_bytes());
            sent += 1;
            net.run_for(2 * MS);
        }
        if step == 20 {
            mark = Some((sent, net.media(s).len()));
        }
    }
    net.run_for(200 * MS);
    assert!(net.relay(1).stats().rerouted_packets > 0);
    let (sent_at_mark, got_at_mark) = mark.unwrap();
    let late_loss = 1.0 - (net.media(s).len() - got_at_mark) as f64 / (sent - sent_at_mark) as f64;
    assert!(late_loss < 0.01, "loss after reroute {:.3}", late_loss);
    let total_loss = 1.0 - net.media(s).len() as f64 / f64::from(sent);
    assert!(total_loss < 0.05, "overall loss {total_loss:.3}");
}

/// The packet's tree says 1 -> 2 -> 3 but 2 lost its link to 3: 2
/// repairs with its own route through 4.
#[test]
fn transit_relay_repairs_around_a_dead_next_hop() {
    let mut net = line(4);
    for (a, b) in [(1, 2), (2, 3), (2, 4), (4, 3)] {
        net.connect(a, b, 10 * MS);
    }
    net.set_routes(1, &[(3, &[1, 2, 3], None)]);
    net.set_routes(2, &[(3, &[2, 3], Some(&[2, 4, 3]))]);
    let s = net.client(3);
    let ch = net.join(s, "c", Role::Subscriber);
    let p = net.client(1);
    net.join(p, "c", Role::Publisher);
    net.run_for(200 * MS);
    net.disconnect(2, 3);
    net.publish(p, ch, b"detour");
    net.run_for(100 * MS);
    assert_eq!(net.media(s).len(), 1);
    assert!(net.relay(2).stats().rerouted_packets >= 1);
}

#[test]
fn duplicates_are_delivered_once() {
    let mut net = line(2);
    net.connect(1, 2, 10 * MS);
    let s = net.client(2);
    let ch = net.join(s, "d", Role::Subscriber);
    net.run_for(50 * MS);
    let delivery = relay_core::wire::client::Delivery::encode(ch, relay_core::SourceId(1), b"once");
    let header = MediaHeader {
        hop_limit: 4,
        origin: RelayId(1),
        epoch: 1,
        seq: 77,
        link_seq: 0,
    };
    // Relay 2 as root, delivering.
    let route = [2u8, 0x80];
    let d = PeerDatagram::media(&header, &route, &delivery);
    let now = net.now;
    for _ in 0..3 {
        net.relays
            .get_mut(&RelayId(2))
            .unwrap()
            .handle_peer_datagram(RelayId(1), &d, now);
        net.drain(RelayId(2));
    }
    assert_eq!(net.media(s).len(), 1);
    assert_eq!(net.relay(2).stats().drops(DropReason::Duplicate), 2);
}

#[test]
fn hop_limit_and_misrouted_trees_are_dropped() {
    let mut net = line(3);
    net.connect(1, 2, 10 * MS);
    net.connect(2, 3, 10 * MS);
    let delivery =
        relay_core::wire::client::Delivery::encode(ChannelId(1), relay_core::SourceId(1), b"x");
    let mut header = MediaHeader {
        hop_limit: 1,
        origin: RelayId(1),
        epoch: 1,
        seq: 1,
        link_seq: 0,
    };
    let now = net.now;
    // Tree 2 -> 3 with no hops left.
    let d = PeerDatagram::media(&header, &[2, 1, 3, 0x80], &delivery);
    net.relays
        .get_mut(&RelayId(2))
        .unwrap()
        .handle_peer_datagram(RelayId(1), &d, now);
    assert_eq!(net.relay(2).stats().drops(DropReason::HopLimit), 1);
    // Tree rooted at someone else.
    header.hop_limit = 5;
    let d = PeerDatagram::media(&header, &[3, 0x80], &delivery);
    net.relays
        .get_mut(&RelayId(2))
        .unwrap()
        .handle_peer_datagram(RelayId(1), &d, now);
    assert_eq!(net.relay(2).stats().drops(DropReason::Misrouted), 1);
    // Garbage.
    net.relays
        .get_mut(&RelayId(2))
        .unwrap()
        .handle_peer_datagram(RelayId(1), &bytes::Bytes::from_static(&[1, 0x22, 9]), now);
    assert_eq!(net.relay(2).stats().drops(DropReason::Malformed), 1);
}

#[test]
fn bad_tokens_are_refused_with_reasons_and_counted() {
    let mut net = line(1);
    let cases: Vec<(String, &str, CloseCode, AuthFailure)> = vec![
        (
            "garbage!".into(),
            "c",
            CloseCode::InvalidToken,
            AuthFailure::Malformed,
        ),
        (
            Claims {
                app: APP.into(),
                channel: "c".into(),
                user: "u".into(),
                role: Role::Publisher,
                expires: NOW_UNIX + 60,
            }
            .sign(b"forged-secret-forged-secret"),
            "c",
            CloseCode::InvalidToken,
            AuthFailure::BadSignature,
        ),
        (
            Claims {
                app: APP.into(),
                channel: "c".into(),
                user: "u".into(),
                role: Role::Publisher,
                expires: NOW_UNIX - 1,
            }
            .sign(SECRET),
            "c",
            CloseCode::TokenExpired,
            AuthFailure::Expired,
        ),
        (
            Net::token("other", "u", Role::Publisher),
            "c",
            CloseCode::WrongChannel,
            AuthFailure::WrongChannel,
        ),
        (
            Claims {
                app: "nope".into(),
                channel: "c".into(),
                user: "u".into(),
                role: Role::Publisher,
                expires: NOW_UNIX + 60,
            }
            .sign(SECRET),
            "c",
            CloseCode::UnknownApp,
            AuthFailure::UnknownApp,
        ),
    ];
    let good = net.client(1);
    let ch = net.join(good, "c", Role::Subscriber);
    for (token, channel, code, failure) in cases {
        let c = net.client(1);
        // Media before joining goes nowhere.
        net.publish(c, ch, b"sneaky");
        net.send_frame(
            c,
            ClientToRelay::Join {
                token,
                channel: channel.into(),
            },
        );
        let closed = net.inbox[&c].closed.clone().expect("closed");
        assert_eq!(closed.0, code, "{}", closed.1);
        assert_eq!(net.relay(1).stats().auth_failures(failure), 1);
        net.publish(c, ch, b"sneaky");
    }
    assert!(
        net.media(good).is_empty(),
        "nothing from unauthenticated clients"
    );
    assert_eq!(net.relay(1).stats().drops(DropReason::NotJoined), 10);
    // The good client is unharmed.
    let p = net.client(1);
    net.join(p, "c", Role::Publisher);
    net.publish(p, ch, b"ok");
    assert_eq!(net.media(good).len(), 1);
}

#[test]
fn subscribers_cannot_publish_and_oversized_media_is_dropped() {
    let mut net = line(1);
    let a = net.client(1);
    let b = net.client(1);
    let ch = net.join(a, "c", Role::Subscriber);
    net.join(b, "c", Role::Publisher);
    net.publish(a, ch, b"x");
    assert_eq!(net.relay(1).stats().drops(DropReason::NotPublisher), 1);
    net.publish(b, ch, &vec![0u8; 1101]);
    assert_eq!(net.relay(1).stats().drops(DropReason::TooLarge), 1);
    assert!(net.media(a).is_empty());
    // A malformed frame closes only that client.
    let (relay, now) = (RelayId(1), net.now);
    net.relays
        .get_mut(&relay)
        .unwrap()
        .handle_client_frame(b, &[1, 0x7f], now, NOW_UNIX);
    net.drain(relay);
    assert_eq!(
        net.inbox[&b].closed.as_ref().unwrap().0,
        CloseCode::ProtocolViolation
    );
    assert!(net.inbox[&a].closed.is_none());
}

#[test]
fn messages_cross_relays_reliably() {
    let mut net = line(3);
    net.connect(1, 2, 10 * MS);
    net.connect(2, 3, 10 * MS);
    net.set_routes(1, &[(3, &[1, 2, 3], None)]);
    let a = net.client(1);
    let b = net.client(3);
    let c = net.client(1);
    let ch = net.join(a, "chat", Role::Subscriber);
    net.join(b, "chat", Role::Subscriber);
    net.join(c, "chat", Role::Subscriber);
    net.run_for(100 * MS);
    net.send_frame(
        a,
        ClientToRelay::Message {
            channel: ch,
            body: bytes::Bytes::from_static(b"hello"),
        },
    );
    net.run_for(100 * MS);
    for who in [b, c] {
        let got = net.inbox[&who]
            .frames
            .iter()
            .filter(|f| matches!(f, RelayToClient::Message { body, .. } if &body[..] == b"hello"))
            .count();
        assert_eq!(got, 1, "{who:?}");
    }
    let own = net.inbox[&a]
        .frames
        .iter()
        .filter(|f| matches!(f, RelayToClient::Message { .. }))
        .count();
    assert_eq!(own, 0);
}

#[test]
fn draining_tells_clients_to_move_and_refuses_joins() {
    let mut net = line(1);
    let a = net.client(1);
    net.join(a, "c", Role::Subscriber);
    let now = net.now;
    net.relays.get_mut(&RelayId(1)).unwrap().begin_drain(now);
    net.drain(RelayId(1));
    assert!(net.inbox[&a].frames.iter().any(|f| matches!(
        f,
        RelayToClient::Drain {
            deadline_ms: 10_000,
            ..
        }
    )));
    let b = net.client(1);
    net.join(b, "c", Role::Subscriber);
    assert_eq!(
        net.inbox[&b].closed.as_ref().unwrap().0,
        CloseCode::Draining
    );
    net.run_for(Duration::from_secs(11));
    assert_eq!(
        net.inbox[&a].closed.as_ref().unwrap().0,
        CloseCode::Draining
    );
    assert_eq!(net.relay(1).client_count(), 0);
}

#[test]
fn welcome_carries_the_observed_address() {
    let mut net = line(1);
    let a = net.client(1);
    match &net.inbox[&a].frames[0] {
        RelayToClient::Welcome {
            relay, observed, ..
        } => {
            assert_eq!(*relay, RelayId(1));
            assert_eq!(observed.to_string(), "198.51.100.7:40000");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn probes_are_echoed_before_joining_and_bounded_by_the_media_size() {
    let mut net = line(1);
    let a = net.client(1);
    net.probe(a, 7, 0);
    net.probe(a, 8, 1100);
    assert_eq!(net.inbox[&a].probe_echoes, vec![7, 8]);
    // Larger than a publish datagram may be: dropped, not echoed.
    net.probe(a, 9, 1101);
    assert_eq!(net.inbox[&a].probe_echoes, vec![7, 8]);
    assert_eq!(net.relay(1).stats().drops(DropReason::TooLarge), 1);
    assert_eq!(net.relay(1).stats().client_probes, 2);
    // Probes are not media.
    assert_eq!(net.relay(1).stats().client_packets_in, 0);
}
