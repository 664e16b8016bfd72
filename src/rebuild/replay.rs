//! The replay: pages of the event store, in commit order, fed as windows to the very stages
//! the live worker runs, with "durable up to here" reported as replay positions.
//!
//! [`replay_pages`] is the replay itself, for any stores, projectors and page source (the
//! simulation drives it against its in-memory world, crashes and all); [`replay`] reads the
//! pages from PostgreSQL and writes the real stores.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::{RebuildError, RebuildOptions};
use crate::config::Config;
use crate::runtime::Window;
use crate::runtime::commit::{Committer, Registration, Tracker, TrackerMsg};
use crate::runtime::parking::ParkStore;
use crate::runtime::pipeline::{
    Projectors, RealSinks, Registered, RuntimeError, SinkFactory, StageEnv, Stages, spawn_stages_of,
};
use crate::runtime::stage::Mode;
use crate::source::window::{Arena, Item, Origin, Poison};
use crate::store::{EventStore, Pg, ReplayPosition, Replayed};

/// One page of the log, as the event store reads it.
pub type Page = Vec<Replayed>;

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
    let pg = Arc::new(Pg::from_config(&cfg.postgres));
    let (tracker_tx, tracker_rx) = mpsc::unbounded_channel();
    let env = StageEnv {
        cfg: cfg.clone(),
        shared: Default::default(),
        tracker: tracker_tx,
        control: Arc::new(crate::runtime::control::PgControl {
            pointers: None,
            retirements: Some(crate::runtime::targets::Retirements::new(
                pg.clone(),
                &cfg.deployment,
            )),
            parks: ParkStore::new(pg.clone(), &cfg.deployment),
            dlq: None,
            events: pg,
        }),
        mode: Mode::Replay {
            version: version.to_owned(),
            fresh,
        },
        only: selected.to_vec(),
        shards: cfg.worker.shard_count(),
        cache_bytes: cfg.worker.replay_cache_bytes,
        max_batch: (opts.checkpoint_every as usize).clamp(1, 200_000),
    };

    // Read ahead: pages stream in while earlier ones are written.
    let (page_tx, page_rx) = mpsc::channel(2);
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
    let replayed = replay_pages(
        env,
        tracker_rx,
        &RealSinks::replay(cfg),
        &Registered,
        from,
        page_rx,
        durable,
    )
    .await;
    // A reader that failed closed the pages early: its error is the replay's.
    match reader.await {
        Ok(Ok(())) => Ok(replayed?),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(RebuildError::Stuck(format!("the page reader failed: {e}"))),
    }
}

/// Replay `pages` (read after `from`) through the stages of `env` (its mode a replay, its
/// tracker the sender of `tracker_rx`), a window every `env.max_batch` events, until the
/// pages end and every window is settled. `durable` is called in order with (position,
/// events so far) once all events up to that position are durable. Returns the last
/// position and the count.
pub async fn replay_pages<F: SinkFactory>(
    env: StageEnv,
    tracker_rx: mpsc::UnboundedReceiver<TrackerMsg>,
    sinks: &F,
    projectors: &impl Projectors,
    from: ReplayPosition,
    mut pages: mpsc::Receiver<Page>,
    durable: &mut (dyn FnMut(ReplayPosition, u64) + Send),
) -> Result<(ReplayPosition, u64), RuntimeError> {
    let window = env.max_batch.max(1);
    let shared = env.shared.clone();
    let tracker_tx = env.tracker.clone();
    let stages = spawn_stages_of(&env, sinks, projectors)?;
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
    let Stages {
        txs,
        handles,
        stats: _,
        ..
    } = stages;
    // Dropped before the end (a caller gave up, a crash in the simulation), the replay takes
    // its stages and tracker with it, as a process that dies would.
    let mut stage_tasks = AbortOnDrop(handles);
    let mut tracker_task = AbortOnDrop(vec![tokio::spawn(async move {
        tracker.run(tracker_rx).await;
    })]);
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
    while let Some(rows) = pages.recv().await {
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
    stage_tasks.join().await;
    drop(tracker_tx);
    tracker_task.join().await;
    while let Ok(p) = pos_rx.try_recv() {
        durable(p.0, p.1);
    }
    Ok((last, total))
}

/// Tasks aborted when this is dropped (a finished task is unaffected).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Wait for every task to end.
    async fn join(&mut self) {
        for h in &mut self.0 {
            let _ = h.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
