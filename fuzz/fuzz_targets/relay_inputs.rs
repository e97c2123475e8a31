//! A relay core fed arbitrary client frames, client datagrams, peer frames
//! and peer datagrams never panics (network input must never crash a
//! daemon), and keeps answering.
#![no_main]
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_core::{ClientId, Relay, RelayConfig, RelayId};

fuzz_target!(|data: &[u8]| {
    let mut cfg = RelayConfig::new(RelayId(1));
    cfg.apps.insert("app".into(), b"fuzz-secret-0123456789abcdef".to_vec());
    let mut relay = Relay::new(cfg);
    let t0 = Instant::now();
    relay.handle_client_connected(ClientId(1), "127.0.0.1:1".parse().unwrap());
    relay.handle_client_connected(ClientId(2), "127.0.0.1:2".parse().unwrap());
    relay.handle_peer_connected(RelayId(2), t0);
    // Each chunk: kind byte, length byte, bytes.
    let mut rest = data;
    let mut now = t0;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        rest = &rest[2..];
        let chunk = &rest[..len.min(rest.len())];
        rest = &rest[chunk.len()..];
        now += Duration::from_millis(u64::from(kind >> 4));
        match kind % 5 {
            0 => relay.handle_client_frame(ClientId(1 + u64::from(kind >> 7)), chunk, now, 0),
            1 => relay.handle_client_datagram(ClientId(1), chunk, now),
            2 => {
                let _ = relay.handle_peer_frame(RelayId(2), chunk, now);
            }
            3 => relay.handle_peer_datagram(RelayId(2), &Bytes::copy_from_slice(chunk), now),
            _ => relay.handle_timeout(now),
        }
        while relay.poll_action().is_some() {}
    }
});
