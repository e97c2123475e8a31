//! The node's HTTP endpoint: Prometheus metrics, a JSON status, the
//! status page (`/`) and the network map (`/map.svg`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::{Consistency, MapView, Request, Response};
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
        .route("/", get(status_page))
        .route("/map.svg", get(map_svg))
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

/// The map's data from this node's state (stale reads: the page must show
/// something even without a leader).
async fn map_view(s: &Http) -> Option<MapView> {
    let request = Request::Map {
        consistency: Consistency::Stale,
    };
    match crate::server::handle_request(request, s.node.inputs()).await {
        Response::Map(m) => Some(m),
        _ => None,
    }
}

async fn status_page(State(s): State<Arc<Http>>) -> impl IntoResponse {
    let status = match crate::server::handle_request(Request::Status, s.node.inputs()).await {
        Response::Status(st) => Some(st),
        _ => None,
    };
    let body = match map_view(&s).await {
        Some(m) => crate::map::page(status.as_ref(), &m),
        None => "<!doctype html><p>node unavailable</p>".to_string(),
    };
    axum::response::Html(body)
}

async fn map_svg(State(s): State<Arc<Http>>) -> axum::response::Response {
    match map_view(&s).await {
        Some(m) => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            crate::map::svg(&m),
        )
            .into_response(),
        None => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "node unavailable",
        )
            .into_response(),
    }
}
