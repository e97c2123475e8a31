//! Prometheus metrics of a relay. The core keeps plain counters; once a
//! second the driver copies them into these handles.

use std::collections::HashMap;
use std::time::Instant;

use metrics::{Counter, Gauge, counter, gauge};
use relay_core::{AuthFailure, DropReason, Relay, RelayId};

/// Metric handles of one relay, registered once.
pub struct RelayMetrics {
    forwarded_client_packets: Counter,
    forwarded_relay_packets: Counter,
    forwarded_client_bytes: Counter,
    forwarded_relay_bytes: Counter,
    received_packets: Counter,
    received_bytes: Counter,
    client_probes: Counter,
    rerouted_packets: Counter,
    messages: Counter,
    drops: Vec<(DropReason, Counter)>,
    auth_failures: Vec<(AuthFailure, Counter)>,
    clients: Gauge,
    channels: Gauge,
    peers_connected: Gauge,
    route_epoch: Gauge,
    links: HashMap<RelayId, LinkGauges>,
}

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMetrics")
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

struct LinkGauges {
    rtt: Gauge,
    jitter: Gauge,
    loss: Gauge,
    up: Gauge,
    connected: Gauge,
}

impl RelayMetrics {
    /// Registers the relay's metrics (and an info metric with its labels).
    pub fn new(id: RelayId, name: &str, region: &str) -> Self {
        describe();
        gauge!("relayd_info", "relay" => id.0.to_string(), "name" => name.to_owned(), "region" => region.to_owned())
            .set(1.0);
        Self {
            forwarded_client_packets: counter!("relayd_forwarded_packets_total", "to" => "client"),
            forwarded_relay_packets: counter!("relayd_forwarded_packets_total", "to" => "relay"),
            forwarded_client_bytes: counter!("relayd_forwarded_bytes_total", "to" => "client"),
            forwarded_relay_bytes: counter!("relayd_forwarded_bytes_total", "to" => "relay"),
            received_packets: counter!("relayd_client_received_packets_total"),
            received_bytes: counter!("relayd_client_received_bytes_total"),
            client_probes: counter!("relayd_client_probes_total"),
            rerouted_packets: counter!("relayd_rerouted_packets_total"),
            messages: counter!("relayd_messages_delivered_total"),
            drops: DropReason::ALL
                .iter()
                .map(|&r| {
                    (
                        r,
                        counter!("relayd_dropped_packets_total", "reason" => r.as_str()),
                    )
                })
                .collect(),
            auth_failures: AuthFailure::ALL
                .iter()
                .map(|&f| {
                    (
                        f,
                        counter!("relayd_auth_failures_total", "reason" => f.as_str()),
                    )
                })
                .collect(),
            clients: gauge!("relayd_clients"),
            channels: gauge!("relayd_channels"),
            peers_connected: gauge!("relayd_peers_connected"),
            route_epoch: gauge!("relayd_route_epoch"),
            links: HashMap::new(),
        }
    }

    /// Copies the core's counters and link estimates into the metrics.
    pub fn publish(&mut self, relay: &Relay, now: Instant) {
        let s = relay.stats();
        self.forwarded_client_packets.absolute(s.delivered_packets);
        self.forwarded_relay_packets.absolute(s.relayed_packets);
        self.forwarded_client_bytes.absolute(s.delivered_bytes);
        self.forwarded_relay_bytes.absolute(s.relayed_bytes);
        self.received_packets.absolute(s.client_packets_in);
        self.received_bytes.absolute(s.client_bytes_in);
        self.client_probes.absolute(s.client_probes);
        self.rerouted_packets.absolute(s.rerouted_packets);
        self.messages.absolute(s.messages_delivered);
        for (r, c) in &self.drops {
            c.absolute(s.drops(*r));
        }
        for (f, c) in &self.auth_failures {
            c.absolute(s.auth_failures(*f));
        }
        self.clients.set(relay.client_count() as f64);
        self.channels.set(relay.channel_count() as f64);
        self.route_epoch.set(relay.route_table().epoch() as f64);
        let links = relay.links(now);
        self.peers_connected
            .set(links.iter().filter(|l| l.connected).count() as f64);
        for l in links {
            let g = self.links.entry(l.peer).or_insert_with(|| {
                let peer = l.peer.0.to_string();
                LinkGauges {
                    rtt: gauge!("relayd_link_rtt_seconds", "peer" => peer.clone()),
                    jitter: gauge!("relayd_link_jitter_seconds", "peer" => peer.clone()),
                    loss: gauge!("relayd_link_loss_ratio", "peer" => peer.clone()),
                    up: gauge!("relayd_link_usable", "peer" => peer.clone()),
                    connected: gauge!("relayd_link_connected", "peer" => peer),
                }
            });
            if let Some(rtt) = l.stats.rtt {
                g.rtt.set(rtt.as_secs_f64());
            }
            g.jitter.set(l.stats.jitter.as_secs_f64());
            g.loss.set(l.stats.loss);
            g.up.set(if l.usable { 1.0 } else { 0.0 });
            g.connected.set(if l.connected { 1.0 } else { 0.0 });
        }
    }
}

/// Help text for every metric (Prometheus `# HELP`; `promtool check
/// metrics` requires it).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        "relayd_info",
        "Relay identity: id, name and region labels; always 1."
    );
    describe_counter!(
        "relayd_forwarded_packets_total",
        "Media datagrams sent, to local clients or to peer relays."
    );
    describe_counter!(
        "relayd_forwarded_bytes_total",
        Unit::Bytes,
        "Media bytes sent, to local clients or to peer relays."
    );
    describe_counter!(
        "relayd_client_received_packets_total",
        "Media datagrams received from local publishers."
    );
    describe_counter!(
        "relayd_client_received_bytes_total",
        Unit::Bytes,
        "Media bytes received from local publishers."
    );
    describe_counter!(
        "relayd_client_probes_total",
        "Client probe datagrams echoed (relay selection by the SDK)."
    );
    describe_counter!(
        "relayd_rerouted_packets_total",
        "Media datagrams sent on a backup path or repaired locally (fast reroute)."
    );
    describe_counter!(
        "relayd_messages_delivered_total",
        "Reliable messages delivered to local clients."
    );
    describe_counter!(
        "relayd_dropped_packets_total",
        "Datagrams dropped, by reason."
    );
    describe_counter!(
        "relayd_auth_failures_total",
        "Clients refused, by reason (forged, expired, wrong channel, unknown app)."
    );
    describe_gauge!("relayd_clients", "Connected clients.");
    describe_gauge!("relayd_channels", "Channels with local members.");
    describe_gauge!(
        "relayd_peers_connected",
        "Peer relays with a live connection."
    );
    describe_gauge!(
        "relayd_route_epoch",
        "Epoch of the installed route table (0: static routes from the config)."
    );
    describe_gauge!(
        "relayd_link_rtt_seconds",
        Unit::Seconds,
        "Smoothed RTT to a peer, from probes."
    );
    describe_gauge!(
        "relayd_link_jitter_seconds",
        Unit::Seconds,
        "RFC 3550 interarrival jitter of the RTT samples to a peer."
    );
    describe_gauge!(
        "relayd_link_loss_ratio",
        "Loss to a peer over the loss window, probes and media."
    );
    describe_gauge!(
        "relayd_link_usable",
        "1 when forwarding may use the link to a peer, 0 under fast reroute."
    );
    describe_gauge!(
        "relayd_link_connected",
        "1 while the connection to a peer is up."
    );
}
