//! Control-stream frames in both directions decode or fail cleanly, and
//! whatever decodes re-encodes to a frame that decodes the same.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay_core::wire::client::{ClientToRelay, RelayToClient};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = ClientToRelay::decode(data) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(ClientToRelay::decode(&b[4..]).unwrap(), f);
    }
    if let Ok(f) = RelayToClient::decode(data) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(RelayToClient::decode(&b[4..]).unwrap(), f);
    }
});
