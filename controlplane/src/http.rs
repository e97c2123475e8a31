//! The node's HTTP endpoint: Prometheus metrics and a JSON status.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::Request;
use crate::server::CpHandle;

struct Http {
    node: Arc<CpHandle>,
    metrics: PrometheusHandle,
}

/// Serves `/metrics` and `/status` on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    node: Arc<CpHandle>,
    metrics: PrometheusHandle,
) -> anyhow::Result<()> {
    let state = Arc::new(Http { node, metrics });
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/status", get(status))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn metrics_page(State(s): State<Arc<Http>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn status(State(s): State<Arc<Http>>) -> impl IntoResponse {
    axum::Json(crate::server::handle_request(Request::Status, s.node.inputs()).await)
}
