//! Relay-to-relay datagrams (probes, echoes, media with their trees).
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_core::wire::client::Delivery;
use relay_core::wire::peer::PeerDatagram;
use relay_core::wire::route::RouteTree;

fuzz_target!(|data: &[u8]| {
    let d = Bytes::copy_from_slice(data);
    if let Ok(PeerDatagram::Media { route, delivery, .. }) = PeerDatagram::decode(&d) {
        if let Ok(t) = RouteTree::decode(&route) {
            for i in 0..t.nodes().len() {
                let _ = RouteTree::decode(&route[t.span(i)]);
                let _ = t.children(i).count();
            }
        }
        let _ = Delivery::decode(&delivery);
    }
});
