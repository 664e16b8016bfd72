//! Prometheus metrics and the pod endpoints: `/metrics`, `/healthz` (alive) and `/readyz`
//! (partitions assigned and the stores answering).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// What the worker loop reports for the readiness probe.
#[derive(Debug, Default)]
pub struct Health {
    assigned: AtomicBool,
    circuit_open: AtomicBool,
}

impl Health {
    pub fn set_assigned(&self, yes: bool) {
        self.assigned.store(yes, Ordering::Relaxed);
    }
    pub fn set_circuit_open(&self, open: bool) {
        self.circuit_open.store(open, Ordering::Relaxed);
        metrics::gauge!("projector_circuit_open").set(if open { 1.0 } else { 0.0 });
    }
    pub fn ready(&self) -> bool {
        self.assigned.load(Ordering::Relaxed) && !self.circuit_open.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObservabilityError {
    #[error("installing the metrics recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("binding the HTTP endpoint {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Install the global Prometheus recorder (once per process).
pub fn install_metrics() -> Result<PrometheusHandle, ObservabilityError> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Serve the endpoints on `addr` in the background; returns the bound address.
pub async fn serve(
    addr: &str,
    metrics: PrometheusHandle,
    health: Arc<Health>,
) -> Result<std::net::SocketAddr, ObservabilityError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ObservabilityError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| ObservabilityError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.health.ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(AppState { metrics, health });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}
