//! Durable stream positions: per consumer group and stream, the last sequence every stage of
//! the group has made durable. The sequencer starts a stream it sees for the first time (after
//! a restart, a reassignment of its partition, a new consumer, or once it forgot the stream)
//! from there, instead of taking its first event as it comes.
//!
//! **Recording.** For each window the sequencer tells the [`Recorder`] the highest sequence it
//! passed on per stream (filled events included). When the commit tracker finds the window
//! durable (every stage acknowledged it and every window before it: [`Positions::on_durable`]
//! is its hook), those positions become ready, and the recorder upserts them in one round trip
//! every `worker.position_flush_ms` (or sooner past [`FLUSH_STREAMS`] streams), off the hot
//! path, keeping the greatest per stream. A transient PostgreSQL error keeps them for the next
//! attempt, with backoff; a refusal drops them (see below why that is safe).
//!
//! **Why the table may lag what is durable, and must never lead it.** A position `L` claims
//! that every sequence `0..=L` of the stream is settled for the group (applied, or held by a
//! durable park). It holds by induction: the sequencer passes a stream's event `N` only after
//! `0..N-1` — from its memory of this incarnation, filled from the event store, or from a
//! recorded position (true by induction) — and a window is recorded only once it and every
//! earlier window are durable. At a first sight at `N` the sequencer fills `L+1..N-1` from the
//! event store:
//! - if the row lags (a flush not done yet, lost in a crash, dropped on a refusal, or a member
//!   that was faster), the fill only brings events the stages already applied again: the
//!   guards (per stream high-water marks) and the fact ids skip them. Cost, never divergence.
//! - if the row led (a window recorded before it was durable, then a crash), an event lost on
//!   the wire below `L` would never be filled: the next one would be applied over the hole.
//!   That is why nothing is recorded before the tracker says durable.
//!
//! No row at all means nothing of the stream was ever durable for this group: the stream
//! starts at 0 and a first sight past it fills `0..N-1`. Exact, and a one-time cost when a
//! running group is upgraded to positions (each stream's history is read once). A stream first
//! seen at sequence 0 needs no lookup: starting at 0 can hide nothing.
//!
//! Resetting a group's offsets to project again into emptied read models must delete the
//! group's rows too (or use a new group): the rows would claim what the new read models lack.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::resilience::backoff::Backoff;
use crate::store::streams::{StreamId, StreamSeq, read_positions, record_positions};
use crate::store::{Pg, StoreError};

/// Ready streams past which the recorder writes without waiting for its interval.
pub const FLUSH_STREAMS: usize = 10_000;

/// Where durable positions are kept (PostgreSQL `stream_positions` for one group in a worker;
/// memory in the unit tests and the simulation).
#[async_trait]
pub trait PositionStore: Send + Sync {
    /// The recorded position of each of `streams` that has one.
    async fn read(&self, streams: &[StreamId]) -> Result<Vec<(StreamId, i64)>, StoreError>;
    /// Record positions (at most one per stream), keeping the greatest per stream.
    async fn record(&self, positions: &[StreamSeq]) -> Result<(), StoreError>;
}

/// One consumer group's rows of `stream_positions`.
pub struct PgPositions {
    pub pg: Arc<Pg>,
    pub group: String,
}

#[async_trait]
impl PositionStore for PgPositions {
    async fn read(&self, streams: &[StreamId]) -> Result<Vec<(StreamId, i64)>, StoreError> {
        let group = self.group.as_str();
        self.pg
            .run(|c| async move { read_positions(&c, group, streams).await })
            .await
    }

    async fn record(&self, positions: &[StreamSeq]) -> Result<(), StoreError> {
        let group = self.group.as_str();
        self.pg
            .run(|c| async move { record_positions(&c, group, positions).await })
            .await
            .map(|_| ())
    }
}

/// Positions in memory, with the same greatest-wins upsert; a switch refuses every call.
#[derive(Default)]
pub struct MemoryPositions {
    rows: Mutex<HashMap<StreamId, i64>>,
    fail: AtomicBool,
    reads: AtomicU32,
    records: AtomicU32,
}

impl MemoryPositions {
    /// Refuse every call from now on (`true`), or answer again.
    pub fn fail(&self, refuse: bool) {
        self.fail.store(refuse, Ordering::Relaxed);
    }

    /// The recorded position of `stream` (`aggregate_type/aggregate_id`).
    pub fn get(&self, stream: &str) -> Option<i64> {
        let id = StreamId::parse(stream)?;
        self.rows().get(&id).copied()
    }

    /// (reads, records) answered so far.
    pub fn calls(&self) -> (u32, u32) {
        (
            self.reads.load(Ordering::Relaxed),
            self.records.load(Ordering::Relaxed),
        )
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, i64>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refused(&self) -> Result<(), StoreError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable("refused".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl PositionStore for MemoryPositions {
    async fn read(&self, streams: &[StreamId]) -> Result<Vec<(StreamId, i64)>, StoreError> {
        self.refused()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let rows = self.rows();
        Ok(streams
            .iter()
            .filter_map(|s| Some((s.clone(), *rows.get(s)?)))
            .collect())
    }

    async fn record(&self, positions: &[StreamSeq]) -> Result<(), StoreError> {
        self.refused()?;
        self.records.fetch_add(1, Ordering::Relaxed);
        let mut rows = self.rows();
        for p in positions {
            let at = rows
                .entry(StreamId {
                    aggregate_type: p.aggregate_type,
                    aggregate_id: p.aggregate_id.clone(),
                })
                .or_insert(p.sequence);
            *at = (*at).max(p.sequence);
        }
        Ok(())
    }
}

/// The pure bookkeeping of the recorder: positions passed on per window until the window is
/// durable, then the greatest per stream until recorded.
#[derive(Debug, Default)]
pub struct PositionBook {
    /// Window id → the highest sequence passed on per stream in it.
    passed: BTreeMap<u64, Vec<StreamSeq>>,
    /// Durable and not recorded yet: the greatest per stream.
    ready: HashMap<StreamId, i64>,
}

impl PositionBook {
    /// Window `window` passed these streams on up to these sequences.
    pub fn passed(&mut self, window: u64, positions: Vec<StreamSeq>) {
        if !positions.is_empty() {
            self.passed.entry(window).or_default().extend(positions);
        }
    }

    /// Window `window` is durable, and so is every window before it (the tracker completes
    /// windows in order).
    pub fn durable(&mut self, window: u64) {
        let later = self.passed.split_off(&(window + 1));
        for p in std::mem::replace(&mut self.passed, later)
            .into_values()
            .flatten()
        {
            self.ready(p);
        }
    }

    /// Streams ready to record.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Windows whose positions wait for durability.
    pub fn waiting(&self) -> usize {
        self.passed.len()
    }

    /// Everything ready, one position per stream (it is no longer in the book).
    pub fn take(&mut self) -> Vec<StreamSeq> {
        let mut out: Vec<StreamSeq> = self
            .ready
            .drain()
            .map(|(s, sequence)| StreamSeq {
                aggregate_type: s.aggregate_type,
                aggregate_id: s.aggregate_id,
                sequence,
            })
            .collect();
        out.sort_by(|a, b| {
            (a.aggregate_type.as_str(), &a.aggregate_id)
                .cmp(&(b.aggregate_type.as_str(), &b.aggregate_id))
        });
        out
    }

    /// A batch that could not be recorded goes back (keeping the greatest per stream).
    pub fn restore(&mut self, batch: Vec<StreamSeq>) {
        for p in batch {
            self.ready(p);
        }
    }

    fn ready(&mut self, p: StreamSeq) {
        let at = self
            .ready
            .entry(StreamId {
                aggregate_type: p.aggregate_type,
                aggregate_id: p.aggregate_id,
            })
            .or_insert(p.sequence);
        *at = (*at).max(p.sequence);
    }
}

/// What the recorder is told.
#[derive(Debug)]
enum Note {
    Passed {
        window: u64,
        positions: Vec<StreamSeq>,
    },
    Durable(u64),
}

/// The sequencer's and the tracker's handle on the recorder, and the store it reads.
#[derive(Clone)]
pub struct Positions {
    store: Arc<dyn PositionStore>,
    tx: mpsc::UnboundedSender<Note>,
}

impl Positions {
    /// Start the recorder (a task that ends, after a last write, once every handle and every
    /// [`Positions::on_durable`] hook is dropped). Must run inside a Tokio runtime.
    pub fn start(store: Arc<dyn PositionStore>, every: Duration) -> (Positions, JoinHandle<()>) {
        for name in [
            "projector_position_flushes_total",
            "projector_position_flush_failures_total",
            "projector_first_sight_lookups_total",
            "projector_first_sight_fills_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let recorder = Recorder {
            store: store.clone(),
            every: every.max(Duration::from_millis(1)),
            book: PositionBook::default(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
        };
        (Positions { store, tx }, tokio::spawn(recorder.run(rx)))
    }

    /// The commit tracker's hook: called with each window once it is durable.
    pub fn on_durable(&self) -> Box<dyn FnMut(u64) + Send> {
        let tx = self.tx.clone();
        Box::new(move |window| {
            let _ = tx.send(Note::Durable(window));
        })
    }

    /// Window `window` passed these streams on up to these sequences (not durable yet).
    pub fn passed(&self, window: u64, positions: Vec<StreamSeq>) {
        if !positions.is_empty() {
            let _ = self.tx.send(Note::Passed { window, positions });
        }
    }

    pub fn store(&self) -> &Arc<dyn PositionStore> {
        &self.store
    }
}

/// The background writer of durable positions.
struct Recorder {
    store: Arc<dyn PositionStore>,
    every: Duration,
    book: PositionBook,
    backoff: Backoff,
}

impl Recorder {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Note>) {
        let mut next = tokio::time::Instant::now() + self.every;
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                note = rx.recv() => match note {
                    Some(Note::Passed { window, positions }) => self.book.passed(window, positions),
                    Some(Note::Durable(window)) => {
                        self.book.durable(window);
                        if !failing && self.book.ready_len() >= FLUSH_STREAMS {
                            next = tokio::time::Instant::now();
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(next) => {
                    failing = !self.flush().await;
                    let wait = if failing { self.backoff.next_delay() } else { self.every };
                    next = tokio::time::Instant::now() + wait;
                }
            }
        }
        // Shutting down: what is durable is recorded if PostgreSQL answers soon; if not, the
        // next first sight refills a little more.
        for _ in 0..3 {
            if self.flush().await {
                return;
            }
            tokio::time::sleep(self.backoff.next_delay()).await;
        }
    }

    /// Record what is ready; false after a transient failure (kept for the next attempt).
    async fn flush(&mut self) -> bool {
        let batch = self.book.take();
        if batch.is_empty() {
            return true;
        }
        let started = std::time::Instant::now();
        match self.store.record(&batch).await {
            Ok(()) => {
                self.backoff.reset();
                metrics::counter!("projector_position_flushes_total").increment(1);
                metrics::histogram!("projector_position_flush_streams").record(batch.len() as f64);
                metrics::histogram!("projector_position_flush_seconds")
                    .record(started.elapsed().as_secs_f64());
                true
            }
            Err(e) => {
                metrics::counter!("projector_position_flush_failures_total").increment(1);
                metrics::counter!("projector_store_errors_total", "store" => "postgres")
                    .increment(1);
                if e.is_transient() {
                    tracing::warn!(error = %e, streams = batch.len(),
                        "stream positions not recorded; retrying with backoff");
                    self.book.restore(batch);
                    false
                } else {
                    // Safe to drop: a lagging position only refills what the guards skip.
                    tracing::error!(error = %e, streams = batch.len(),
                        "stream positions refused; dropped (their streams refill once more)");
                    true
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use contract::AggregateType;

    use super::*;

    fn at(id: &str, sequence: i64) -> StreamSeq {
        StreamSeq {
            aggregate_type: AggregateType::Customer,
            aggregate_id: id.into(),
            sequence,
        }
    }

    #[test]
    fn positions_wait_for_their_window_to_be_durable() {
        let mut b = PositionBook::default();
        b.passed(1, vec![at("a", 3), at("b", 0)]);
        b.passed(2, vec![at("a", 5)]);
        b.passed(4, vec![at("c", 9)]);
        assert_eq!(b.ready_len(), 0, "nothing durable yet");
        b.durable(1);
        assert_eq!(b.take(), vec![at("a", 3), at("b", 0)]);
        assert_eq!(b.take(), vec![], "taken");
        // Window 3 passed nothing; its durability makes 2 durable too.
        b.durable(3);
        assert_eq!(b.take(), vec![at("a", 5)]);
        assert_eq!(b.waiting(), 1, "window 4 still waits");
        b.durable(4);
        assert_eq!(b.take(), vec![at("c", 9)]);
        assert_eq!(b.waiting(), 0);
    }

    #[test]
    fn the_greatest_position_per_stream_is_kept() {
        let mut b = PositionBook::default();
        b.passed(1, vec![at("a", 7)]);
        b.passed(2, vec![at("a", 4), at("a", 6)]);
        b.durable(2);
        assert_eq!(b.ready_len(), 1);
        let batch = b.take();
        assert_eq!(batch, vec![at("a", 7)]);
        // A failed write goes back, merged with what became ready meanwhile.
        b.passed(3, vec![at("a", 9), at("b", 1)]);
        b.durable(3);
        b.restore(batch);
        assert_eq!(b.take(), vec![at("a", 9), at("b", 1)]);
        b.restore(vec![at("a", 2)]);
        assert_eq!(
            b.take(),
            vec![at("a", 2)],
            "lower than recorded: the store keeps 9"
        );
    }

    #[test]
    fn a_window_passed_after_its_durability_waits_for_the_next() {
        // Never ahead of durability: a late note waits for a later window's durability.
        let mut b = PositionBook::default();
        b.durable(5);
        b.passed(5, vec![at("a", 1)]);
        assert_eq!(b.ready_len(), 0);
        b.durable(6);
        assert_eq!(b.take(), vec![at("a", 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_recorder_writes_durable_positions_only_and_retries_transient_failures() {
        let store = Arc::new(MemoryPositions::default());
        let (p, task) = Positions::start(store.clone(), Duration::from_secs(1));
        let mut durable = p.on_durable();
        p.passed(1, vec![at("a", 3)]);
        p.passed(2, vec![at("a", 4), at("b", 2)]);
        durable(1);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(store.get("customer/a"), Some(3));
        assert_eq!(store.get("customer/b"), None, "window 2 is not durable");
        store.fail(true);
        durable(2);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(store.get("customer/a"), Some(3), "refused meanwhile");
        store.fail(false);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(store.get("customer/a"), Some(4), "retried");
        assert_eq!(store.get("customer/b"), Some(2));
        // Dropping every handle ends it after a last write.
        p.passed(3, vec![at("c", 0)]);
        durable(3);
        drop((p, durable));
        task.await.unwrap();
        assert_eq!(store.get("customer/c"), Some(0));
    }
}
