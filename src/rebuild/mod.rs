//! `rebuild-projection`: replays the event store, in commit order, into a new version of a
//! read model beside the live one, with checkpoints so an interrupted rebuild resumes.
//!
//! The replay feeds the very stages the live worker runs (same projectors, same guards,
//! same parking rule), so a rebuilt version equals the live one. Pages are read ahead while
//! earlier ones are written; each projection folds in its own stage; a window is as large as
//! the checkpoint interval, so each document is written once per checkpoint; the stages'
//! caches keep the views they wrote up to `worker.replay_cache_bytes`, and read back only
//! those they evicted.

mod checkpoints;
mod handover;
mod replay;

pub use checkpoints::{
    Checkpoint, all_checkpoints, load_checkpoint, orphan_hint, orphaned, save_checkpoint,
    versions_in_scope,
};
pub use handover::{SwitchReport, retire, switch};
pub use replay::{Page, Source, replay, replay_pages};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::runtime::parking::ParkStore;
use crate::sinks::SinkError;
use crate::store::{EventStore, Pg, ReplayPosition, StoreError};
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
    Runtime(#[from] crate::runtime::pipeline::RuntimeError),
    #[error("handover stopped: {0}")]
    Stuck(String),
    #[error("unknown projection {0:?} (known: {1})")]
    UnknownProjection(String, String),
    /// An invalid version name, or a retired version (never built or written again).
    #[error(transparent)]
    Version(#[from] crate::versions::VersionError),
}

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// The version to build (a resumed rebuild names the one it resumes).
    pub version: String,
    /// Events read per page.
    pub batch: i64,
    /// Save the checkpoint after this many events (and at the end).
    pub checkpoint_every: u64,
}

/// Progress after each durable window: (events applied so far, replay position, head).
pub type Progress<'a> = &'a mut (dyn FnMut(u64, ReplayPosition, ReplayPosition) + Send);

/// Resolve projection names (`all` = every registered one).
pub fn select(names: &[String], all: bool) -> Result<Vec<String>, RebuildError> {
    let known = projectors::names();
    if all {
        return Ok(known.iter().map(|s| (*s).to_owned()).collect());
    }
    for n in names {
        if !known.contains(&n.as_str()) {
            return Err(RebuildError::UnknownProjection(n.clone(), known.join(", ")));
        }
    }
    Ok(names.to_vec())
}

/// Replay into `opts.version` until the store has nothing newer (or up to `upto`); returns
/// the final checkpoints. Resumes from the earliest saved checkpoint of the selected
/// projections (a page some of them already applied is absorbed by their guards).
pub async fn rebuild(
    cfg: &Config,
    store: &EventStore,
    selected: &[String],
    opts: &RebuildOptions,
    upto: Option<ReplayPosition>,
    progress: Progress<'_>,
) -> Result<Vec<Checkpoint>, RebuildError> {
    crate::versions::validate_version(&opts.version)?;
    let mut checkpoints = Vec::with_capacity(selected.len());
    let mut fresh = true;
    for p in selected {
        let key = scope_key(cfg, p);
        let c = match load_checkpoint(store, &key, &opts.version).await? {
            Some(c) if c.status == "retired" => {
                return Err(crate::versions::VersionError::Retired {
                    projection: p.clone(),
                    version: opts.version.clone(),
                }
                .into());
            }
            Some(c) => {
                fresh = false;
                c
            }
            None => {
                // Saved before anything is written: a rebuild stopped before its first
                // checkpoint resumes as what it is, a version that holds data. Resumed
                // fresh, it would take views it wrote for absent (a fresh replay loads only
                // the views it sent writes for) and apply their finished streams again.
                let c = Checkpoint {
                    projection: key,
                    version: opts.version.clone(),
                    position: ReplayPosition::default(),
                    events_applied: 0,
                    status: "building".into(),
                };
                save_checkpoint(store, &c).await?;
                c
            }
        };
        checkpoints.push(c);
    }
    let from = checkpoints
        .iter()
        .map(|c| c.position)
        .min()
        .unwrap_or_default();
    let base = checkpoints
        .iter()
        .map(|c| c.events_applied as u64)
        .min()
        .unwrap_or(0);
    let head = match upto {
        Some(u) => u,
        None => store.committed_head().await?,
    };
    let started = Instant::now();
    tracing::info!(version = %opts.version, ?from, ?head, fresh, "rebuild starting");
    // Checkpoints are saved by a task of their own, in order, as windows become durable
    // (`Some`); `None` says the replay ended. A rebuild dropped before that (its caller gave
    // up) leaves its last "building" checkpoint, never a "caught_up" one.
    let (cp_tx, mut cp_rx) = mpsc::unbounded_channel::<Option<(ReplayPosition, u64)>>();
    let saver_cfg = cfg.clone();
    let mut saved = checkpoints.clone();
    let every = opts.checkpoint_every.max(1);
    let saver = tokio::spawn(async move {
        let store = EventStore::connect(&saver_cfg.postgres.url).await?;
        let mut since = 0u64;
        let mut last: Option<(ReplayPosition, u64)> = None;
        loop {
            let (pos, n) = match cp_rx.recv().await {
                Some(Some(durable)) => durable,
                Some(None) => break,
                None => return Ok(saved),
            };
            since += n.saturating_sub(last.map_or(0, |l| l.1));
            last = Some((pos, n));
            if since >= every {
                since = 0;
                save_all(&store, &mut saved, pos, base + n, "building").await?;
            }
        }
        if let Some((pos, n)) = last {
            save_all(&store, &mut saved, pos, base + n, "caught_up").await?;
        } else {
            let pos = saved.iter().map(|c| c.position).min().unwrap_or_default();
            save_all(&store, &mut saved, pos, base, "caught_up").await?;
        }
        Ok::<_, RebuildError>(saved)
    });
    let mut on_durable = |pos: ReplayPosition, n: u64| {
        progress(base + n, pos, head);
        let _ = cp_tx.send(Some((pos, n)));
    };
    let replayed = replay(
        cfg,
        selected,
        &opts.version,
        Source::Log { from, upto },
        fresh,
        opts,
        &mut on_durable,
    )
    .await;
    let (_, n) = replayed?;
    // The secondary indexes the replay left out, before the version is reported caught up
    // (switching readers to it requires that): a failure returns before the saver is told
    // the replay ended, which leaves the last "building" checkpoint, and resuming builds
    // them again.
    build_indexes(cfg, selected, &opts.version).await?;
    let _ = cp_tx.send(None);
    let done = saver
        .await
        .map_err(|e| RebuildError::Stuck(format!("checkpoint saver: {e}")))??;
    tracing::info!(
        version = %opts.version,
        events = n,
        seconds = started.elapsed().as_secs_f64(),
        "rebuild caught up with the event store"
    );
    Ok(done)
}

/// MongoDB's secondary indexes on `version` of the selected Mongo projections (a replay
/// writes without them).
async fn build_indexes(
    cfg: &Config,
    selected: &[String],
    version: &str,
) -> Result<(), RebuildError> {
    let mongo = selected.iter().any(|p| {
        projectors::registry::info(p).map(|i| i.store) == Some(projectors::StoreKind::Mongo)
    });
    if !mongo {
        return Ok(());
    }
    let views = crate::versions::views_for(cfg, version);
    let started = Instant::now();
    crate::sinks::mongo::MongoSink::connect_unindexed(&cfg.mongo, &views.mongo_collection)
        .await?
        .build_indexes(INDEX_BUILD_LIMIT)
        .await?;
    tracing::info!(
        collection = %views.mongo_collection,
        seconds = started.elapsed().as_secs_f64(),
        "secondary indexes built"
    );
    Ok(())
}

/// How long building the secondary indexes may take (about 40 µs per order view here).
const INDEX_BUILD_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

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

/// Connect the stores of `version`'s read models (created if missing).
pub async fn version_sinks(
    cfg: &Config,
    version: &str,
) -> Result<crate::versions::VersionSinks, SinkError> {
    crate::versions::VersionSinks::connect(cfg, version).await
}

/// Let a parked stream flow again (after its cause was fixed): forget the park, and replay
/// the stream from the event store into the version the projection's readers use — then
/// again once every worker has read the parks afresh, for events held meanwhile. The guards
/// skip whatever is applied already. Returns the events replayed the second time.
pub async fn unpark_and_replay(
    cfg: &Config,
    projections: &[String],
    stream: &str,
) -> Result<u64, RebuildError> {
    let store = EventStore::connect(&cfg.postgres.url).await?;
    let live = crate::versions::live_versions(&store, cfg).await?;
    let pg = Arc::new(Pg::from_config(&cfg.postgres));
    let parks = ParkStore::new(pg, &cfg.deployment);
    // Projections that share a version replay together.
    let mut by_version: HashMap<String, Vec<String>> = HashMap::new();
    for p in projections {
        let version = live.of(p).to_owned();
        let was = parks.unpark(p, &version, stream).await?;
        tracing::info!(projection = %p, stream, %version, was_parked = was, "unparked: replaying the stream");
        by_version.entry(version).or_default().push(p.clone());
    }
    let source = Source::Stream(stream.to_owned());
    let run = || {
        let (by_version, source) = (by_version.clone(), source.clone());
        async move {
            let mut n = 0;
            for (version, selected) in &by_version {
                let opts = RebuildOptions {
                    version: version.clone(),
                    batch: 10_000,
                    checkpoint_every: 10_000,
                };
                let (_, k) = replay(
                    cfg,
                    selected,
                    version,
                    source.clone(),
                    false,
                    &opts,
                    &mut |_, _| {},
                )
                .await?;
                n += k;
            }
            Ok::<_, RebuildError>(n)
        }
    };
    run().await?;
    tokio::time::sleep(
        crate::runtime::documents::PARKS_REFRESH + std::time::Duration::from_secs(2),
    )
    .await;
    run().await
}
