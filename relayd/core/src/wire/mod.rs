//! Wire formats: the client protocol, the relay-to-relay protocol and the
//! delivery trees inside relay-to-relay media. Every decoder takes
//! untrusted bytes and returns a [`DecodeError`] rather than panicking;
//! each has a cargo-fuzz target in `fuzz/`.

pub mod client;
pub mod codec;
pub mod peer;
pub mod route;

pub use codec::DecodeError;
