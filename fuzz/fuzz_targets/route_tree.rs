//! Delivery trees: decoding validates, and every subtree span decodes to a
//! tree rooted at that node with the same destinations.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relay_core::wire::route::RouteTree;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = RouteTree::decode(data) {
        for i in 0..t.nodes().len() {
            let sub = RouteTree::decode(&data[t.span(i)]).expect("subtrees decode");
            assert_eq!(sub.root().relay, t.nodes()[i].relay);
            assert!(sub.destinations(0).eq(t.destinations(i)));
        }
    }
});
