//! `rebuild-projection`: replays the event store, in commit order, into a new version of a
//! read model beside the live one, with checkpoints so an interrupted rebuild resumes.
//!
//! Every write goes through the same projectors and guarded sinks as the live worker, so a
//! replayed page that was already applied before a crash changes nothing the second time.

use std::time::Instant;

use contract::Event;
use projectors::DynProjector;

use crate::apply::{ApplyError, Sinks, apply_projector};
use crate::config::Config;
use crate::sinks::SinkError;
use crate::store::{EventStore, ReplayPosition, StoreError};
use crate::versions::scope_key;

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
    #[error("handover stopped: {0}")]
    Stuck(String),
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
    c.views = crate::versions::views_for(cfg, version);
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
        let key = scope_key(cfg, p.name());
        let c = load_checkpoint(store, &key, &opts.version)
            .await?
            .unwrap_or(Checkpoint {
                projection: key,
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
            apply_projector(p.as_ref(), &sinks, &mine).await?;
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

/// What a handover did.
#[derive(Debug, Clone)]
pub struct SwitchReport {
    /// Flag raised → pointer moved: how long live workers held their batches.
    pub switch_time: std::time::Duration,
    /// (projection, version it replaced).
    pub replaced: Vec<(String, String)>,
    pub final_catch_up_events: u64,
}

/// Hand the rebuilt `opts.version` over to readers and live workers, with no gap and no
/// duplicate:
/// 1. raise `switching`: live workers hold their next batch (one already applying goes to
///    the old version, which is harmless);
/// 2. wait until every transaction that began before that has finished, so everything a
///    worker may already have consumed is readable;
/// 3. replay the rest into the new version, alone (its guards skip what it has);
/// 4. move the pointers and lower the flag in one transaction. From their next batch on,
///    workers write the new version; what they hold is newer than, or already in, it.
pub async fn switch(
    cfg: &Config,
    store: &mut EventStore,
    selected: &[std::sync::Arc<dyn DynProjector>],
    opts: &RebuildOptions,
    progress: Progress<'_>,
) -> Result<SwitchReport, RebuildError> {
    let started = Instant::now();
    for p in selected {
        store
            .client()
            .execute(
                "INSERT INTO projection_versions (projection, live_version, switching) VALUES ($1, $2, true) \
                 ON CONFLICT (projection) DO UPDATE SET switching = true",
                &[&scope_key(cfg, p.name()), &crate::versions::LIVE],
            )
            .await?;
    }
    let result = finish_switch(cfg, store, selected, opts, progress).await;
    if result.is_err() {
        // Never leave the live workers holding: lower the flag, keep the old pointers.
        let names: Vec<String> = selected.iter().map(|p| scope_key(cfg, p.name())).collect();
        let _ = store
            .client()
            .execute(
                "UPDATE projection_versions SET switching = false WHERE projection = ANY($1)",
                &[&names],
            )
            .await;
    }
    let (replaced, final_catch_up_events) = result?;
    Ok(SwitchReport {
        switch_time: started.elapsed(),
        replaced,
        final_catch_up_events,
    })
}

async fn finish_switch(
    cfg: &Config,
    store: &mut EventStore,
    selected: &[std::sync::Arc<dyn DynProjector>],
    opts: &RebuildOptions,
    progress: Progress<'_>,
) -> Result<(Vec<(String, String)>, u64), RebuildError> {
    let fence: String = store
        .client()
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await?
        .get(0);
    let mut waited = 0;
    while !store
        .client()
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8",
            &[&fence],
        )
        .await?
        .get::<_, bool>(0)
    {
        waited += 1;
        if waited > 6_000 {
            return Err(RebuildError::Stuck(
                "a transaction older than the handover stayed open for 5 minutes".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let done = rebuild(cfg, store, selected, opts, progress).await?;
    let final_events = done
        .iter()
        .map(|c| c.events_applied as u64)
        .max()
        .unwrap_or(0);
    let tx = store.client_mut().transaction().await?;
    let mut replaced = Vec::new();
    for p in selected {
        let key = scope_key(cfg, p.name());
        let old: String = tx
            .query_one(
                "SELECT live_version FROM projection_versions WHERE projection = $1 FOR UPDATE",
                &[&key],
            )
            .await?
            .get(0);
        tx.execute(
            "UPDATE projection_versions SET previous_version = live_version, live_version = $2, \
             switching = false, switched_at = now() WHERE projection = $1",
            &[&key, &opts.version],
        )
        .await?;
        tx.execute(
            "UPDATE projection_checkpoints SET status = 'live', updated_at = now() WHERE projection = $1 AND version = $2",
            &[&key, &opts.version],
        )
        .await?;
        if old != opts.version {
            replaced.push((p.name().to_owned(), old));
        }
    }
    tx.commit().await?;
    Ok((replaced, final_events))
}

/// Delete a replaced version of a projection's read model (after the grace period).
pub async fn retire(
    cfg: &Config,
    store: &EventStore,
    projection: &std::sync::Arc<dyn DynProjector>,
    version: &str,
) -> Result<(), RebuildError> {
    let sinks = version_sinks(cfg, version).await?;
    match projection.store() {
        projectors::StoreKind::Redis => sinks.redis.delete_all().await?,
        projectors::StoreKind::Mongo => sinks
            .mongo
            .collection()
            .drop()
            .await
            .map_err(SinkError::from)?,
        projectors::StoreKind::ClickHouse => sinks.clickhouse.drop_table().await?,
    }
    store
        .client()
        .execute(
            "INSERT INTO projection_checkpoints (projection, version, status) VALUES ($1, $2, 'retired') \
             ON CONFLICT (projection, version) DO UPDATE SET status = 'retired', updated_at = now()",
            &[&scope_key(cfg, projection.name()), &version],
        )
        .await?;
    tracing::info!(
        projection = projection.name(),
        version,
        "old version retired"
    );
    Ok(())
}
