//! `rebuild-projection`: replays the event store, in commit order, into a new version of a
//! read model beside the live one, with checkpoints so an interrupted rebuild resumes.
//!
//! Every write goes through the same projectors and guarded sinks as the live worker, so a
//! replayed page that was already applied before a crash changes nothing the second time.

use std::time::Instant;

use contract::Event;
use projectors::{DynProjector, StoreKind};

use crate::apply::{ApplyError, Sinks, apply_documents, apply_facts};
use crate::config::Config;
use crate::sinks::SinkError;
use crate::store::{EventStore, ReplayPosition, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("unknown projection {0:?} (known: customer360, order_view, analytics)")]
    UnknownProjection(String),
}

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// The version to build (a resumed rebuild names the one it resumes).
    pub version: String,
    pub batch: i64,
    pub checkpoint_every: u64,
}

/// Where one projection's rebuild stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub projection: String,
    pub version: String,
    pub position: ReplayPosition,
    pub events_applied: i64,
    pub status: String,
}

/// Progress after each page: (events applied so far, replay position, head when started).
pub type Progress<'a> = &'a mut dyn FnMut(u64, ReplayPosition, ReplayPosition);

/// Resolve projection names (`--all` = every registered one).
pub fn select(
    names: &[String],
    all: bool,
) -> Result<Vec<std::sync::Arc<dyn DynProjector>>, RebuildError> {
    if all {
        return Ok(projectors::all());
    }
    names
        .iter()
        .map(|n| projectors::by_name(n).ok_or_else(|| RebuildError::UnknownProjection(n.clone())))
        .collect()
}

/// The checkpoint of (projection, version), if that rebuild was started.
pub async fn load_checkpoint(
    store: &EventStore,
    projection: &str,
    version: &str,
) -> Result<Option<Checkpoint>, RebuildError> {
    let row = store
        .client()
        .query_opt(
            "SELECT transaction_id::text, position, events_applied, status FROM projection_checkpoints \
             WHERE projection = $1 AND version = $2",
            &[&projection, &version],
        )
        .await?;
    Ok(row.map(|r| Checkpoint {
        projection: projection.to_owned(),
        version: version.to_owned(),
        position: ReplayPosition {
            transaction_id: r.get::<_, String>(0).parse().unwrap_or(0),
            global_position: r.get(1),
        },
        events_applied: r.get(2),
        status: r.get(3),
    }))
}

/// Save (or create) a checkpoint. Called only after the writes it covers are acknowledged.
pub async fn save_checkpoint(store: &EventStore, c: &Checkpoint) -> Result<(), RebuildError> {
    store
        .client()
        .execute(
            "INSERT INTO projection_checkpoints (projection, version, position, transaction_id, events_applied, status) \
             VALUES ($1, $2, $3, $4::text::xid8, $5, $6) \
             ON CONFLICT (projection, version) DO UPDATE SET position = EXCLUDED.position, \
               transaction_id = EXCLUDED.transaction_id, events_applied = EXCLUDED.events_applied, \
               status = EXCLUDED.status, updated_at = now()",
            &[
                &c.projection,
                &c.version,
                &c.position.global_position,
                &c.position.transaction_id.to_string(),
                &c.events_applied,
                &c.status,
            ],
        )
        .await?;
    Ok(())
}

/// Every checkpoint, newest first (the `status` view).
pub async fn all_checkpoints(store: &EventStore) -> Result<Vec<Checkpoint>, RebuildError> {
    let rows = store
        .client()
        .query(
            "SELECT projection, version, transaction_id::text, position, events_applied, status \
             FROM projection_checkpoints ORDER BY updated_at DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Checkpoint {
            projection: r.get(0),
            version: r.get(1),
            position: ReplayPosition {
                transaction_id: r.get::<_, String>(2).parse().unwrap_or(0),
                global_position: r.get(3),
            },
            events_applied: r.get(4),
            status: r.get(5),
        })
        .collect())
}

/// Connect the sinks of `version`'s read models (created if missing).
pub async fn version_sinks(cfg: &Config, version: &str) -> Result<Sinks, SinkError> {
    let mut c = cfg.clone();
    c.views = cfg.versioned_views(version);
    crate::worker::connect_sinks(&c).await
}

/// Replay into `opts.version` until the store has nothing newer; returns the final
/// checkpoints. Resumes from the earliest saved checkpoint of the selected projections.
pub async fn rebuild(
    cfg: &Config,
    store: &EventStore,
    selected: &[std::sync::Arc<dyn DynProjector>],
    opts: &RebuildOptions,
    progress: Progress<'_>,
) -> Result<Vec<Checkpoint>, RebuildError> {
    let sinks = version_sinks(cfg, &opts.version).await?;
    let mut checkpoints = Vec::with_capacity(selected.len());
    for p in selected {
        let c = load_checkpoint(store, p.name(), &opts.version)
            .await?
            .unwrap_or(Checkpoint {
                projection: p.name().to_owned(),
                version: opts.version.clone(),
                position: ReplayPosition::default(),
                events_applied: 0,
                status: "building".into(),
            });
        checkpoints.push(c);
    }
    // One pass serves every selected projection; start where the furthest-behind one stands
    // (a page some already applied is absorbed by their guards).
    let mut cursor = checkpoints
        .iter()
        .map(|c| c.position)
        .min()
        .unwrap_or_default();
    let head = store.committed_head().await?;
    let mut applied: u64 = checkpoints
        .iter()
        .map(|c| c.events_applied as u64)
        .min()
        .unwrap_or(0);
    let mut since_checkpoint = 0u64;
    let started = Instant::now();
    tracing::info!(version = %opts.version, ?cursor, ?head, "rebuild starting");
    loop {
        let page = store.read_committed_after(cursor, opts.batch).await?;
        let Some((last, _)) = page.last() else { break };
        let last = *last;
        let events: Vec<Event> = page
            .into_iter()
            .filter_map(|(pos, env)| match env.into_event() {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(?pos, error = %e, "stored event breaks the contract; skipped");
                    None
                }
            })
            .collect();
        for p in selected {
            let mine: Vec<&Event> = events
                .iter()
                .filter(|e| e.event_type().is_some_and(|t| p.handles().contains(&t)))
                .collect();
            match p.store() {
                StoreKind::Redis => {
                    apply_documents(p.as_ref(), &sinks.redis, &mine).await?;
                }
                StoreKind::Mongo => {
                    apply_documents(p.as_ref(), &sinks.mongo, &mine).await?;
                }
                StoreKind::ClickHouse => {
                    apply_facts(p.as_ref(), &sinks.clickhouse, &mine).await?;
                }
            }
        }
        cursor = last;
        applied += events.len() as u64;
        since_checkpoint += events.len() as u64;
        if since_checkpoint >= opts.checkpoint_every {
            save_all(store, &mut checkpoints, cursor, applied, "building").await?;
            since_checkpoint = 0;
        }
        metrics::gauge!("projector_rebuild_events_applied", "version" => opts.version.clone())
            .set(applied as f64);
        progress(applied, cursor, head);
    }
    save_all(store, &mut checkpoints, cursor, applied, "caught_up").await?;
    tracing::info!(
        version = %opts.version,
        applied,
        seconds = started.elapsed().as_secs_f64(),
        "rebuild caught up with the event store"
    );
    Ok(checkpoints)
}

async fn save_all(
    store: &EventStore,
    checkpoints: &mut [Checkpoint],
    cursor: ReplayPosition,
    applied: u64,
    status: &str,
) -> Result<(), RebuildError> {
    for c in checkpoints.iter_mut() {
        if cursor > c.position {
            c.position = cursor;
            c.events_applied = applied as i64;
        }
        c.status = status.to_owned();
        save_checkpoint(store, c).await?;
    }
    Ok(())
}
