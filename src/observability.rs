//! Prometheus metrics and the pod endpoints: `/metrics`, `/healthz` (alive: not stalled with
//! work waiting) and `/readyz` (partitions assigned, not paused, every circuit closed).

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::Shared;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// What the probes answer from: the worker's shared state and the stall limit.
#[derive(Debug, Clone)]
pub struct Health {
    pub shared: Arc<Shared>,
    pub stall: Duration,
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
    health: Health,
}

/// Serve the endpoints on `addr` in the background; returns the bound address.
pub async fn serve(
    addr: &str,
    metrics: PrometheusHandle,
    health: Health,
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
        .route(
            "/healthz",
            get(|State(s): State<AppState>| async move {
                if s.health.shared.live(s.health.stall) {
                    (StatusCode::OK, "ok")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stalled: work waits and nothing was committed",
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.health.shared.ready() {
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

/// Export the deployment's rebuilds (from their checkpoints) from every worker, so a
/// dashboard shows their progress and an alert sees one stall: events applied, position, and
/// when the checkpoint last moved, per projection and version being built.
pub fn watch_rebuilds(cfg: &crate::config::Config, pg: Arc<crate::store::Pg>) {
    let scope = crate::versions::scope_key(cfg, "");
    tokio::spawn(async move {
        let mut seen: Vec<(String, String)> = Vec::new();
        loop {
            let q = scope.clone();
            let rows = pg
                .run(|c| async move {
                    c.query(
                        "SELECT projection, version, events_applied, position, \
                         extract(epoch FROM updated_at)::float8 FROM projection_checkpoints \
                         WHERE starts_with(projection, $1) AND status = 'building'",
                        &[&q],
                    )
                    .await
                })
                .await;
            if let Ok(rows) = rows {
                let mut now = Vec::new();
                for r in rows {
                    let p: String = r.get(0);
                    let p = p.strip_prefix(&scope).unwrap_or(&p).to_owned();
                    let v: String = r.get(1);
                    let labels = [("projection", p.clone()), ("version", v.clone())];
                    metrics::gauge!("projector_rebuild_checkpoint_events", &labels)
                        .set(r.get::<_, i64>(2) as f64);
                    metrics::gauge!("projector_rebuild_checkpoint_position", &labels)
                        .set(r.get::<_, i64>(3) as f64);
                    metrics::gauge!("projector_rebuild_checkpoint_timestamp_seconds", &labels)
                        .set(r.get::<_, f64>(4));
                    now.push((p, v));
                }
                // A rebuild that finished (or was dropped) leaves no stale series behind.
                for (p, v) in seen.iter().filter(|k| !now.contains(k)) {
                    let labels = [("projection", p.clone()), ("version", v.clone())];
                    for name in [
                        "projector_rebuild_checkpoint_events",
                        "projector_rebuild_checkpoint_position",
                        "projector_rebuild_checkpoint_timestamp_seconds",
                    ] {
                        metrics::gauge!(name, &labels).set(f64::NAN);
                    }
                }
                seen = now;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}
