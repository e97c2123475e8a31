//! Relay-to-relay control frames decode or fail cleanly and round-trip.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay_core::wire::peer::PeerFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = PeerFrame::decode(data) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(PeerFrame::decode(&b[4..]).unwrap(), f);
    }
});
