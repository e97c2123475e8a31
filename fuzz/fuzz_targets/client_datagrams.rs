//! Publish and delivery datagrams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay_core::wire::client::{Delivery, Publish};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Publish::decode(data) {
        assert_eq!(&Publish::encode(p.channel, p.payload)[..], data);
    }
    if let Ok(d) = Delivery::decode(data) {
        assert_eq!(&Delivery::encode(d.channel, d.source, d.payload)[..], data);
    }
});
