//! A client of the control plane's operator API (`relayctl`, tests,
//! benchmarks): one QUIC connection per node, one stream per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use relay_net::framing::read_frame;
use relay_net::quic::control_transport;
use relay_net::tls::{TlsIdentity, control_plane_name};

use crate::api::{API_ALPN, MAX_API_FRAME, Request, Response, encode_frame};

/// Where a node is: `ID@ADDR` (its certificate must name `cp-ID`) or
/// `ADDR` (its certificate must carry `localhost`, as development
/// certificates do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// Raft id, when known.
    pub id: Option<u64>,
    /// Address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for NodeAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = match s.split_once('@') {
            Some((id, a)) => (
                Some(id.parse().map_err(|_| format!("bad node id in {s:?}"))?),
                a,
            ),
            None => (None, s),
        };
        Ok(NodeAddr {
            id,
            addr: addr.parse().map_err(|e| format!("{s:?}: {e}"))?,
        })
    }
}

/// A connection to one control-plane node.
#[derive(Debug)]
pub struct CpClient {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl CpClient {
    /// Connects to `node` as the operator (or node) of `identity`.
    pub async fn connect(node: &NodeAddr, identity: &TlsIdentity) -> anyhow::Result<CpClient> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?;
        endpoint.set_default_client_config(
            identity.quic_node_client(API_ALPN, Arc::new(control_transport()))?,
        );
        let name = node.id.map_or_else(
            || "localhost".to_owned(),
            |id| control_plane_name(id, identity.domain()),
        );
        let conn =
            tokio::time::timeout(Duration::from_secs(3), endpoint.connect(node.addr, &name)?)
                .await
                .with_context(|| format!("connecting to {} timed out", node.addr))?
                .with_context(|| format!("connecting to {}", node.addr))?;
        Ok(CpClient {
            conn,
            _endpoint: endpoint,
        })
    }

    /// Sends a request and waits for the answer.
    pub async fn request(&self, req: &Request) -> anyhow::Result<Response> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(&encode_frame(req)).await?;
        send.finish()?;
        let frame = tokio::time::timeout(
            Duration::from_secs(15),
            read_frame(&mut recv, MAX_API_FRAME),
        )
        .await
        .context("no answer in time")??
        .context("the node closed the stream")?;
        Ok(serde_json::from_slice(&frame)?)
    }
}
