//! Counters the core keeps; the driver exports them as metrics.

/// Why a packet or frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Did not decode.
    Malformed,
    /// Media or message for a channel the client has not joined (this is
    /// what an unauthenticated client gets: nothing is forwarded).
    NotJoined,
    /// Media from a subscriber.
    NotPublisher,
    /// Payload above the limit.
    TooLarge,
    /// No path to any interested relay.
    NoRoute,
    /// The hop limit ran out.
    HopLimit,
    /// Already delivered.
    Duplicate,
    /// A delivery tree not rooted at this relay.
    Misrouted,
    /// A datagram from a relay that is not a peer.
    UnknownPeer,
    /// Media for a channel with no members here.
    NoSubscribers,
}

impl DropReason {
    /// Every reason, for exporting.
    pub const ALL: [DropReason; 10] = [
        DropReason::Malformed,
        DropReason::NotJoined,
        DropReason::NotPublisher,
        DropReason::TooLarge,
        DropReason::NoRoute,
        DropReason::HopLimit,
        DropReason::Duplicate,
        DropReason::Misrouted,
        DropReason::UnknownPeer,
        DropReason::NoSubscribers,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotJoined => "not_joined",
            DropReason::NotPublisher => "not_publisher",
            DropReason::TooLarge => "too_large",
            DropReason::NoRoute => "no_route",
            DropReason::HopLimit => "hop_limit",
            DropReason::Duplicate => "duplicate",
            DropReason::Misrouted => "misrouted",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NoSubscribers => "no_subscribers",
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// Not a token.
    Malformed,
    /// Signature does not verify.
    BadSignature,
    /// App not configured.
    UnknownApp,
    /// Past its expiry.
    Expired,
    /// For another channel.
    WrongChannel,
}

impl AuthFailure {
    /// Every failure, for exporting.
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::Malformed,
        AuthFailure::BadSignature,
        AuthFailure::UnknownApp,
        AuthFailure::Expired,
        AuthFailure::WrongChannel,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::UnknownApp => "unknown_app",
            AuthFailure::Expired => "expired",
            AuthFailure::WrongChannel => "wrong_channel",
        }
    }
}

/// Counters since the relay started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Media datagrams received from clients.
    pub client_packets_in: u64,
    /// Their bytes.
    pub client_bytes_in: u64,
    /// Probe datagrams from clients, echoed.
    pub client_probes: u64,
    /// Media datagrams sent to local clients.
    pub delivered_packets: u64,
    /// Their bytes.
    pub delivered_bytes: u64,
    /// Media datagrams sent to other relays.
    pub relayed_packets: u64,
    /// Their bytes.
    pub relayed_bytes: u64,
    /// Packets sent on a backup path or locally repaired.
    pub rerouted_packets: u64,
    /// Reliable messages delivered to local clients.
    pub messages_delivered: u64,
    drops: [u64; DropReason::ALL.len()],
    auth_failures: [u64; AuthFailure::ALL.len()],
}

impl Stats {
    /// Counts a drop.
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Drops for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Counts a refused token.
    pub fn auth_failure(&mut self, f: AuthFailure) {
        self.auth_failures[f as usize] += 1;
    }

    /// Refused tokens for one reason.
    pub fn auth_failures(&self, f: AuthFailure) -> u64 {
        self.auth_failures[f as usize]
    }

    /// Media datagrams forwarded (to clients and relays).
    pub fn forwarded_packets(&self) -> u64 {
        self.delivered_packets + self.relayed_packets
    }

    /// Their bytes.
    pub fn forwarded_bytes(&self) -> u64 {
        self.delivered_bytes + self.relayed_bytes
    }
}
