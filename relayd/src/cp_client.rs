//! The relay's session with the control plane.
//!
//! The relay connects to one control-plane node (any: followers forward
//! what the leader needs), registers, and then:
//! - receives pushes: its route table at every new epoch (installed only if
//!   newer), the apps and their secrets, and the other relays' addresses;
//! - reports its links every `report_interval`, and sooner (checked every
//!   250 ms) when a link changed meaningfully; the report is its heartbeat.
//!
//! When the node goes away it tries the next one. While none answers the
//! relay keeps forwarding on its last routes and keeps probing: the control
//! plane is needed for change, not for traffic.

use std::sync::Arc;
use std::time::Duration;

use controlplane::api::{CpToRelay, MAX_API_FRAME, RelayToCp, encode_frame};
use controlplane::engine::LinkReporter;
use controlplane::server::RELAY_ALPN;
use controlplane::state::RelayInfo;
use relay_net::framing::read_frame;
use relay_net::quic::control_transport;
use relay_net::tls::{TlsIdentity, control_plane_name};
use topology::PoorThresholds;
use tracing::{debug, info, warn};

use crate::config::{ControlPlane, Peer};
use crate::server::RelayHandle;

/// Runs the session forever (until the relay stops).
pub async fn run(relay: Arc<RelayHandle>, cp: ControlPlane, tls: TlsIdentity, info: RelayInfo) {
    let mut endpoint = match quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid")) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot open a socket for the control plane");
            return;
        }
    };
    match tls.quic_node_client(RELAY_ALPN, Arc::new(control_transport())) {
        Ok(c) => endpoint.set_default_client_config(c),
        Err(e) => {
            warn!(error = %e, "control-plane TLS");
            return;
        }
    }
    let mut i = 0usize;
    loop {
        let node = &cp.nodes[i % cp.nodes.len()];
        i += 1;
        match session(&relay, &cp, &endpoint, node, tls.domain(), &info).await {
            Ok(()) => info!(node = %node.addr, "control-plane session ended"),
            Err(e) => debug!(node = %node.addr, error = %e, "control-plane session failed"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn session(
    relay: &RelayHandle,
    cp: &ControlPlane,
    endpoint: &quinn::Endpoint,
    node: &controlplane::client::NodeAddr,
    domain: &str,
    info: &RelayInfo,
) -> anyhow::Result<()> {
    let name = control_plane_name(node.id.unwrap_or(0), domain);
    let conn =
        tokio::time::timeout(Duration::from_secs(2), endpoint.connect(node.addr, &name)?).await??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let held = relay.snapshot().await?.route_epoch;
    send.write_all(&encode_frame(&RelayToCp::Hello {
        info: info.clone(),
        route_epoch: held,
    }))
    .await?;
    info!(node = %node.addr, "control-plane session up");
    let mut reporter =
        LinkReporter::new(cp.report_interval, tokio::time::Instant::now().into_std());
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let poor = PoorThresholds::default();
    loop {
        tokio::select! {
            frame = read_frame(&mut recv, MAX_API_FRAME) => {
                let Some(frame) = frame? else { return Ok(()) };
                match serde_json::from_slice::<CpToRelay>(&frame)? {
                    CpToRelay::Routes { table } => {
                        let epoch = table.epoch();
                        if relay.set_routes(table).await? {
                            info!(epoch, "route table installed");
                        }
                    }
                    CpToRelay::Apps { apps } => {
                        let apps = apps
                            .into_iter()
                            .filter_map(|(id, s)| hex::decode(s.0).ok().map(|b| (id, b)))
                            .collect();
                        relay.set_apps(apps).await?;
                    }
                    CpToRelay::Peers { peers } => {
                        let peers: Vec<Peer> = peers.into_iter().map(|(id, addr)| Peer { id, addr }).collect();
                        relay.set_peers(&peers);
                    }
                    CpToRelay::Admin { draining } => relay.set_draining(draining).await?,
                    CpToRelay::Unavailable { reason } => anyhow::bail!("node unavailable: {reason}"),
                }
            }
            _ = check.tick() => {
                let snap = relay.snapshot().await?;
                if let Some(links) = reporter.poll(&snap.links, &poor, tokio::time::Instant::now().into_std()) {
                    let report = RelayToCp::Report { links, clients: snap.clients as u32 };
                    send.write_all(&encode_frame(&report)).await?;
                }
            }
        }
    }
}
