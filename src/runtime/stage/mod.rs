//! What every projector stage shares: its batches of windows, its context (live feed or
//! replay), acknowledgements, dead letters and parks, each retried until durable.

pub mod driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use contract::Event;
use tokio::sync::mpsc;

use super::Shared;
use super::commit::TrackerMsg;
use super::control::Control;
use super::parking::ParkRecord;
use super::retry::Retry;
use super::targets::{Check, PointerError, Target};
use crate::resilience::dead_letter::DeadLetter;
use crate::sinks::SinkError;
use crate::source::window::{Item, Window};
use crate::versions::{LIVE, VersionError};

/// Opens the store of a read-model version (creating its collection or table).
pub type OpenFn<S> = std::sync::Arc<
    dyn Fn(String) -> futures::future::BoxFuture<'static, Result<S, SinkError>> + Send + Sync,
>;

/// An event of a batch: (window index in the batch, item index in the window).
pub type EventRef = (u32, u32);

/// Consecutive windows handled as one unit (a stage that fell behind takes what is queued).
pub struct Batch {
    pub windows: Vec<Arc<Window>>,
    /// Open until the batch is durable and acknowledged (see [`super::spans`]).
    pub span: tracing::Span,
}

impl Batch {
    pub fn item(&self, r: EventRef) -> &Item {
        &self.windows[r.0 as usize].items[r.1 as usize]
    }

    /// The event behind a reference (only references to decoded events are ever made).
    pub fn event(&self, r: EventRef) -> &Event {
        match &self.item(r).decoded {
            Ok(e) => e,
            Err(_) => unreachable!("event references point at decoded events only"),
        }
    }

    pub fn letter(
        &self,
        r: EventRef,
        kind: &str,
        reason: String,
        projector: &'static str,
    ) -> Option<DeadLetter> {
        let w = &self.windows[r.0 as usize];
        DeadLetter::of(w, &w.items[r.1 as usize], kind, reason, Some(projector))
    }

    pub fn messages(&self) -> usize {
        self.windows.iter().map(|w| w.items.len()).sum()
    }
}

/// Where a stage's input comes from and what it answers to.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// The live feed: writes the version the pointers name, verifies them before
    /// acknowledging, sends dead letters.
    Live,
    /// A replay of the event store into one version (rebuild). `fresh`: the version was
    /// empty when the replay began, so a key never seen is absent (no load).
    Replay { version: String, fresh: bool },
}

/// Counters of one stage, read for the run report and metrics.
#[derive(Debug, Default)]
pub struct StageStats {
    pub events: AtomicU64,
    pub writes: AtomicU64,
    pub duplicates: AtomicU64,
    pub conflicts: AtomicU64,
    pub letters: AtomicU64,
    pub loads: AtomicU64,
    pub write_nanos: AtomicU64,
}

pub struct StageCtx {
    pub name: &'static str,
    pub store: &'static str,
    pub shared: Arc<Shared>,
    pub tracker: mpsc::UnboundedSender<TrackerMsg>,
    pub participant: usize,
    pub mode: Mode,
    /// Pointers, retired versions, parks and dead letters.
    pub control: Arc<dyn Control>,
    pub stats: Arc<StageStats>,
    /// The largest batch (in messages) a stage takes at once when windows queue up.
    pub max_batch: usize,
}

impl StageCtx {
    /// The next batch: one window, plus whatever else is already queued (up to `max_batch`
    /// messages). `None` when the input is closed.
    pub async fn recv(&self, rx: &mut mpsc::Receiver<Arc<Window>>) -> Option<Batch> {
        let first = rx.recv().await?;
        Some(self.coalesce(first, rx))
    }

    /// `first`, plus whatever else is already queued (up to `max_batch` messages).
    pub fn coalesce(&self, first: Arc<Window>, rx: &mut mpsc::Receiver<Arc<Window>>) -> Batch {
        let mut n = first.items.len();
        let mut windows = vec![first];
        while n < self.max_batch {
            match rx.try_recv() {
                Ok(w) => {
                    n += w.items.len();
                    windows.push(w);
                }
                Err(_) => break,
            }
        }
        let span = super::spans::stage(self.name, self.store, &windows);
        Batch { windows, span }
    }

    pub fn ack(&self, batch: &Batch) {
        for w in &batch.windows {
            let _ = self.tracker.send(TrackerMsg::Ack {
                id: w.id,
                participant: self.participant,
            });
        }
    }

    /// Which version to write now (holding while a handover runs).
    pub async fn target(&self, fresh: bool) -> Target {
        match &self.mode {
            Mode::Replay { version, .. } => Target {
                version: version.clone(),
                epoch: 0,
            },
            Mode::Live => {
                let mut retry = Retry::new(&self.shared, "postgres", "reading version pointers");
                let mut holding = None;
                let mut fresh = fresh;
                loop {
                    match self.control.check(self.name, fresh).await {
                        Ok(Check::Write(t)) => return t,
                        Ok(Check::Hold) => {
                            if holding.is_none() {
                                tracing::info!(
                                    projection = self.name,
                                    "handover in progress: holding"
                                );
                                holding = Some(self.shared.waiting());
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => retry.failed(&e).await,
                    }
                    fresh = true;
                }
            }
        }
    }

    /// `Err` when `target` must never be written: the deployment retired it (or its name is
    /// invalid). Asked of PostgreSQL, retried until it answers.
    pub async fn admit(&self, target: &Target) -> Result<(), VersionError> {
        let mut retry = Retry::new(&self.shared, "postgres", "checking retired versions");
        loop {
            match self.control.admit(self.name, &target.version).await {
                Ok(()) => return Ok(()),
                Err(PointerError::Version(e)) => return Err(e),
                Err(e) => retry.failed(&e).await,
            }
        }
    }

    /// Open the store of `target`, never of a retired version: a live stage that finds its
    /// target retired reads the pointers again and opens the version they name instead.
    /// Returns the target opened and its store.
    pub async fn open<S>(&self, mut target: Target, open: &OpenFn<S>) -> (Target, S) {
        let mut refused = Retry::new(&self.shared, self.store, "opening a retired version");
        let mut retry = Retry::new(&self.shared, self.store, "opening the read model");
        loop {
            if let Err(e) = self.admit(&target).await {
                match &self.mode {
                    Mode::Live => {
                        tracing::warn!(projection = self.name, error = %e,
                            "target retired: reading the version pointers again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        target = self.target(true).await;
                    }
                    // A replay is never into a retired version (the rebuild refuses one at
                    // its start): if it was retired meanwhile, stop writing, say why.
                    Mode::Replay { .. } => refused.failed(&e).await,
                }
                continue;
            }
            // Asked again after every failed attempt: the version may be retired while the
            // store is down, and opening it then would create it again.
            match open(target.version.clone()).await {
                Ok(s) => return (target, s),
                Err(e) => retry.failed(&e).await,
            }
        }
    }

    pub fn version_of(target: &Target) -> &str {
        if target.version.is_empty() {
            LIVE
        } else {
            &target.version
        }
    }

    /// Send dead letters, retrying until the broker has them.
    pub async fn send_letters(&self, letters: Vec<DeadLetter>) {
        if self.mode != Mode::Live || letters.is_empty() {
            return;
        }
        let mut retry = Retry::new(&self.shared, "dead-letter topic", "sending dead letters");
        let mut letters = letters;
        let mut bare = false;
        loop {
            match self.control.send_letters(&letters).await {
                Ok(()) => break,
                Err(e) if e.is_transient() => retry.failed(&e).await,
                Err(e) if !bare => {
                    // Fitted to `dlq_max_bytes`, yet refused: the broker's limit is lower.
                    tracing::error!(error = %e, "the dead-letter topic refused letters: sending their coordinates and reasons only");
                    letters = letters.iter().map(DeadLetter::bare).collect();
                    bare = true;
                }
                Err(e) => {
                    // Never retried: nothing would change. The originals stay in their source
                    // topics and the parks in PostgreSQL; the metric and the log say so.
                    tracing::error!(error = %e, letters = letters.len(),
                        "the dead-letter topic refused even bare letters: they are lost");
                    metrics::counter!("projector_dead_letters_lost_total", "projector" => self.name)
                        .increment(letters.len() as u64);
                    return;
                }
            }
        }
        self.stats
            .letters
            .fetch_add(letters.len() as u64, Ordering::Relaxed);
        for l in &letters {
            metrics::counter!("projector_dead_letters_total", "kind" => l.kind.clone(),
                "projector" => self.name)
            .increment(1);
        }
    }

    /// Record parks, retrying until PostgreSQL has them.
    pub async fn save_parks(&self, records: &[ParkRecord]) {
        if records.is_empty() {
            return;
        }
        Retry::new(&self.shared, "postgres", "recording parked streams")
            .until_ok(|| self.control.save_parks(records))
            .await;
        failpoint("after_parks_saved");
        for r in records {
            tracing::warn!(projection = %r.projection, version = %r.version, stream = %r.stream,
                from = ?r.from, reason = %r.reason, "stream parked: its later events are held");
            metrics::counter!("projector_parked_streams_total", "projector" => self.name)
                .increment(1);
        }
    }

    /// Streams unparked lately (see [`super::parking::ParkStore::released`]), retried until
    /// PostgreSQL answers; read before the parks. Only a live stage holds events of a parked
    /// stream that a release must bring back: a replay reads none.
    pub async fn released(&self) -> Vec<(String, i64)> {
        if !matches!(self.mode, Mode::Live) {
            return Vec::new();
        }
        Retry::new(&self.shared, "postgres", "loading released streams")
            .until_ok(|| self.control.released())
            .await
    }

    /// A stream's stored events before `before`, retried until PostgreSQL answers.
    pub async fn history(&self, stream: &str, before: i64) -> Vec<crate::store::Typed> {
        Retry::new(&self.shared, "postgres", "reading a released stream")
            .until_ok(|| self.control.history(stream, before))
            .await
    }

    /// The parked streams of `version`, retried until PostgreSQL answers.
    pub async fn load_parks(&self, version: &str) -> projectors::Parked {
        Retry::new(&self.shared, "postgres", "loading parked streams")
            .until_ok(|| self.control.load_parks(self.name, version))
            .await
    }
}

/// The failpoint a test armed (`PROJECTOR_FAILPOINT`), read once: the hooks sit on hot
/// paths (every batch, every idle pause).
fn armed(name: &str) -> bool {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("PROJECTOR_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

/// Test hook: with `PROJECTOR_FAILPOINT=<name>`, true the first time the process reaches the
/// named point, so a test can inject a fault there (rather than a crash, [`failpoint`]).
pub fn fault_once(name: &str) -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    armed(name) && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
}

/// Test hook: `PROJECTOR_FAILPOINT=<name>` makes the process die (as kill -9 would) when it
/// reaches the named point, so a test can land a crash exactly there.
pub fn failpoint(name: &str) {
    if armed(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
