//! Client SDK: what applications embed to talk over the relay network.
//!
//! - [`session`]: one QUIC connection to one relay speaking the client
//!   protocol (join, publish, receive, messages).
//!
//! Discovery, ranking and failover are added by the SDK issue.

pub mod session;

pub use session::{Joined, Media, Session, SessionError, Welcome};
