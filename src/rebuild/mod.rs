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

pub use checkpoints::{
    Checkpoint, all_checkpoints, load_checkpoint, orphan_hint, orphaned, save_checkpoint,
    versions_in_scope,
};
pub use handover::{SwitchReport, retire, switch};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::runtime::commit::{Committer, Registration, Tracker, TrackerMsg};
use crate::runtime::parking::ParkStore;
use crate::runtime::pipeline::{RealSinks, StageEnv, Stages, spawn_stages};
use crate::runtime::stage::Mode;
use crate::runtime::{Shared, Window};
use crate::sinks::SinkError;
use crate::source::window::{Arena, Item, Origin, Poison};
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

/// Turns the tracker's "durable up to window N" into replay positions.
struct Positions {
    by_window: Arc<Mutex<HashMap<u64, (ReplayPosition, u64)>>>,
    tx: mpsc::UnboundedSender<(ReplayPosition, u64)>,
}

impl Committer for Positions {
    fn windows_durable(&mut self, upto: u64) {
        let hit = self
            .by_window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&upto);
        if let Some(p) = hit {
            let _ = self.tx.send(p);
        }
    }
}

/// What a replay reads.
#[derive(Debug, Clone)]
pub enum Source {
    /// The log in commit order after `from` (up to `upto` when given, else to the head as
    /// it moves).
    Log {
        from: ReplayPosition,
        upto: Option<ReplayPosition>,
    },
    /// One stream (`aggregate_type/aggregate_id`), in sequence.
    Stream(String),
}

/// Replay `source` into `version` of `selected`. `durable` is called in order with
/// (position, events) once all events up to that position are durable. Returns the last
/// position and the count.
pub async fn replay(
    cfg: &Config,
    selected: &[String],
    version: &str,
    source: Source,
    fresh: bool,
    opts: &RebuildOptions,
    durable: &mut (dyn FnMut(ReplayPosition, u64) + Send),
) -> Result<(ReplayPosition, u64), RebuildError> {
    crate::versions::validate_version(version)?;
    let from = match &source {
        Source::Log { from, .. } => *from,
        Source::Stream(_) => ReplayPosition::default(),
    };
    let shared = Arc::new(Shared::default());
    let pg = Arc::new(Pg::from_config(&cfg.postgres));
    let (tracker_tx, tracker_rx) = mpsc::unbounded_channel();
    let v = version.to_owned();
    let window = (opts.checkpoint_every as usize).clamp(1, 200_000);
    let env = StageEnv {
        cfg: cfg.clone(),
        shared: shared.clone(),
        tracker: tracker_tx.clone(),
        control: Arc::new(crate::runtime::control::PgControl {
            pointers: None,
            retirements: Some(crate::runtime::targets::Retirements::new(
                pg.clone(),
                &cfg.deployment,
            )),
            parks: ParkStore::new(pg, &cfg.deployment),
            dlq: None,
        }),
        mode: Mode::Replay { version: v, fresh },
        only: selected.to_vec(),
        shards: cfg.worker.shard_count(),
        cache_bytes: cfg.worker.replay_cache_bytes,
        max_batch: window,
    };
    let stages = spawn_stages(&env, &RealSinks::replay(cfg))?;
    drop(env);
    let by_window = Arc::new(Mutex::new(HashMap::new()));
    let (pos_tx, mut pos_rx) = mpsc::unbounded_channel();
    let committer = Positions {
        by_window: by_window.clone(),
        tx: pos_tx,
    };
    let tracker = Tracker::new(
        stages.participants,
        shared.clone(),
        Arc::new(Vec::new()),
        Some(Box::new(committer)),
    );
    let tracker = tokio::spawn(tracker.run(tracker_rx));

    // Read ahead: pages stream in while earlier ones are written.
    let (page_tx, mut page_rx) = mpsc::channel(2);
    let reader_cfg = cfg.clone();
    let page = opts.batch.max(1);
    let reader = tokio::spawn(async move {
        let store = EventStore::connect(&reader_cfg.postgres.url).await?;
        match source {
            Source::Log { from, upto } => {
                let mut cursor = from;
                loop {
                    let rows = store.read_events_after(cursor, upto, page).await?;
                    let Some((last, _)) = rows.last() else { break };
                    cursor = *last;
                    if page_tx.send(rows).await.is_err() {
                        break;
                    }
                }
            }
            Source::Stream(stream) => {
                let rows = store.read_stream(&stream).await?;
                if !rows.is_empty() {
                    let _ = page_tx.send(rows).await;
                }
            }
        }
        Ok::<_, RebuildError>(())
    });

    let Stages {
        txs,
        handles,
        stats: _,
        ..
    } = stages;
    let mut items: Vec<Item> = Vec::with_capacity(window);
    let mut last = from;
    let mut next_id = 1u64;
    let mut total = 0u64;
    let topics = Arc::new(Vec::new());
    let send = async |items: Vec<Item>, last: ReplayPosition, total: u64, next_id: &mut u64| {
        let id = *next_id;
        *next_id += 1;
        by_window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (last, total));
        shared.in_flight.fetch_add(items.len(), Ordering::Relaxed);
        let _ = tracker_tx.send(TrackerMsg::Register(Registration {
            id,
            generation: 0,
            offsets: Vec::new(),
            newest: Vec::new(),
            messages: items.len(),
            bytes: 0,
            timestamps: Vec::new(),
        }));
        let w = Arc::new(
            Window {
                id,
                generation: 0,
                items,
                arena: Arena::default(),
                topics: topics.clone(),
                opened: Instant::now(),
                span: tracing::Span::none(),
            }
            .traced(),
        );
        for tx in &txs {
            let _ = tx.send(w.clone()).await;
        }
    };
    while let Some(rows) = page_rx.recv().await {
        for (position, decoded) in rows {
            last = position;
            total += 1;
            items.push(Item {
                origin: Origin::Replay { position },
                decoded: decoded.map_err(|(stream, seq, error)| {
                    tracing::warn!(%stream, seq, %error, "stored event breaks the contract: parked");
                    Poison {
                        error,
                        stream: Some(stream),
                        sequence: Some(seq),
                    }
                }),
                raw: Default::default(),
            });
            if items.len() >= window {
                send(std::mem::take(&mut items), last, total, &mut next_id).await;
            }
        }
        while let Ok(p) = pos_rx.try_recv() {
            durable(p.0, p.1);
        }
    }
    if !items.is_empty() {
        send(std::mem::take(&mut items), last, total, &mut next_id).await;
    }
    drop(txs);
    let read = reader.await;
    for h in handles {
        let _ = h.await;
    }
    drop(tracker_tx);
    let _ = tracker.await;
    while let Ok(p) = pos_rx.try_recv() {
        durable(p.0, p.1);
    }
    match read {
        Ok(Ok(())) => Ok((last, total)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(RebuildError::Stuck(format!("the page reader failed: {e}"))),
    }
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
            None => Checkpoint {
                projection: key,
                version: opts.version.clone(),
                position: ReplayPosition::default(),
                events_applied: 0,
                status: "building".into(),
            },
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
    // Checkpoints are saved by a task of their own, in order, as windows become durable.
    let (cp_tx, mut cp_rx) = mpsc::unbounded_channel::<(ReplayPosition, u64)>();
    let saver_cfg = cfg.clone();
    let mut saved = checkpoints.clone();
    let every = opts.checkpoint_every.max(1);
    let saver = tokio::spawn(async move {
        let store = EventStore::connect(&saver_cfg.postgres.url).await?;
        let mut since = 0u64;
        let mut last: Option<(ReplayPosition, u64)> = None;
        while let Some((pos, n)) = cp_rx.recv().await {
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
        let _ = cp_tx.send((pos, n));
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
    // The secondary indexes the replay left out, before the version is reported caught up
    // (switching readers to it requires that): a failure leaves the last "building"
    // checkpoint, and resuming builds them again.
    if replayed.is_ok()
        && let Err(e) = build_indexes(cfg, selected, &opts.version).await
    {
        saver.abort();
        return Err(e);
    }
    drop(cp_tx);
    let (_, n) = replayed?;
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
    let run = |second: bool| {
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
            let _ = second;
            Ok::<_, RebuildError>(n)
        }
    };
    run(false).await?;
    tokio::time::sleep(
        crate::runtime::documents::PARKS_REFRESH + std::time::Duration::from_secs(2),
    )
    .await;
    run(true).await
}
