//! Publish, delivery and probe datagrams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay_core::wire::client::{ClientProbe, Delivery, Publish};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Publish::decode(data) {
        assert_eq!(&Publish::encode(p.channel, p.payload)[..], data);
    }
    if let Ok(d) = Delivery::decode(data) {
        assert_eq!(&Delivery::encode(d.channel, d.source, d.payload)[..], data);
    }
    if let Ok(p) = ClientProbe::decode(data) {
        // Only probes are echoed, and an echo keeps the probe's length and
        // sequence number.
        match ClientProbe::echo_of(data) {
            Some(e) => {
                assert!(!p.echo);
                assert_eq!(e.len(), data.len());
                assert_eq!(ClientProbe::decode(&e).unwrap().seq, p.seq);
            }
            None => assert!(p.echo),
        }
    }
});
