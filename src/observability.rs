//! Prometheus metrics and the pod endpoints: `/metrics`, `/healthz` (alive: not stalled with
//! work waiting) and `/readyz` (partitions assigned, not paused, every circuit closed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
                        "stalled: work waits and nothing was committed, or a partition this \
                         member is responsible for has not moved",
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
/// dashboard shows their progress and an alert sees one stall: events applied, position, when
/// the checkpoint last moved, and the rate and time to the event store's head over the last
/// poll, per projection and version being built. Also the streams parked right now in this
/// deployment, per projector (`*`: a message nobody could read).
pub fn watch_rebuilds(cfg: &crate::config::Config, pg: Arc<crate::store::Pg>) {
    const GAUGES: [&str; 5] = [
        "projector_rebuild_checkpoint_events",
        "projector_rebuild_checkpoint_position",
        "projector_rebuild_checkpoint_timestamp_seconds",
        "projector_rebuild_events_per_second",
        "projector_rebuild_eta_seconds",
    ];
    let scope = crate::versions::scope_key(cfg, "");
    // Parks are the deployment's, whichever consumer group this worker is in.
    let deployment = cfg.deployment.clone();
    tokio::spawn(async move {
        let mut parked_seen: Vec<String> = Vec::new();
        // (projection, version) → (events applied, position, when seen) at the last poll.
        let mut seen: HashMap<(String, String), (i64, i64, Instant)> = HashMap::new();
        loop {
            let q = scope.clone();
            let rows = pg
                .run(|c| async move {
                    c.query(
                        "SELECT projection, version, events_applied, position, \
                         extract(epoch FROM updated_at)::float8, \
                         (SELECT coalesce(max(global_position), 0) FROM events) \
                         FROM projection_checkpoints \
                         WHERE starts_with(projection, $1) AND status = 'building'",
                        &[&q],
                    )
                    .await
                })
                .await;
            if let Ok(rows) = rows {
                let mut now = HashMap::new();
                let at = Instant::now();
                for r in rows {
                    let p: String = r.get(0);
                    let p = p.strip_prefix(&scope).unwrap_or(&p).to_owned();
                    let v: String = r.get(1);
                    let (events, position, head) =
                        (r.get::<_, i64>(2), r.get::<_, i64>(3), r.get::<_, i64>(5));
                    let labels = [("projection", p.clone()), ("version", v.clone())];
                    metrics::gauge!(GAUGES[0], &labels).set(events as f64);
                    metrics::gauge!(GAUGES[1], &labels).set(position as f64);
                    metrics::gauge!(GAUGES[2], &labels).set(r.get::<_, f64>(4));
                    if let Some((e0, p0, t0)) = seen.get(&(p.clone(), v.clone())) {
                        let dt = at.duration_since(*t0).as_secs_f64().max(1e-3);
                        metrics::gauge!(GAUGES[3], &labels).set((events - e0) as f64 / dt);
                        // Positions are dense: the head's distance over the position's
                        // speed. No speed, no estimate (NaN; the stall alert covers it).
                        let speed = (position - p0) as f64 / dt;
                        let eta = if speed > 0.0 {
                            (head - position).max(0) as f64 / speed
                        } else {
                            f64::NAN
                        };
                        metrics::gauge!(GAUGES[4], &labels).set(eta);
                    }
                    now.insert((p, v), (events, position, at));
                }
                // A rebuild that finished (or was dropped) leaves no stale series behind.
                for (p, v) in seen.keys().filter(|k| !now.contains_key(*k)) {
                    let labels = [("projection", p.clone()), ("version", v.clone())];
                    for name in GAUGES {
                        metrics::gauge!(name, &labels).set(f64::NAN);
                    }
                }
                seen = now;
            }
            let g = deployment.clone();
            let parked = pg
                .run(|c| async move {
                    c.query(
                        "SELECT projection, count(*) FROM parked_streams WHERE scope = $1 \
                         GROUP BY projection",
                        &[&g],
                    )
                    .await
                })
                .await;
            if let Ok(rows) = parked {
                let now: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                // Every projector has a series (0 when none is parked), so alerts can use it.
                let mut names: Vec<String> =
                    projectors::names().into_iter().map(str::to_owned).collect();
                names.extend(parked_seen.iter().cloned());
                names.extend(now.iter().map(|(p, _)| p.clone()));
                names.sort();
                names.dedup();
                for p in &names {
                    let n = now.iter().find(|(q, _)| q == p).map_or(0, |(_, n)| *n);
                    metrics::gauge!("projector_parked_streams", "projector" => p.clone())
                        .set(n as f64);
                }
                parked_seen = now.into_iter().map(|(p, _)| p).collect();
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}
