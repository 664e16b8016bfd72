//! The pipelined runtime:
//!
//! ```text
//! source (one thread: poll, window, pause) ──► decode (every core) ──┬─► poison: dead letters, parks
//!                                                                    ├─► documents stage × shards ─► Redis / MongoDB
//!                                                                    └─► facts stage ──────────────► ClickHouse
//!                       commit tracker ◄── acknowledgements of durable windows ──┘
//! ```
//!
//! Bounded queues between the stages give backpressure; a stage writes one batch while it
//! folds the next; the tracker alone decides what may be committed. The same stages, fed by
//! a replay of the event store instead of the source, rebuild a read model.

pub mod budget;
pub mod commit;
pub mod control;
pub mod documents;
pub mod facts;
pub mod parking;
pub mod pipeline;
pub mod poison;
pub mod retry;
pub mod spans;
pub mod stage;
pub mod targets;

pub use crate::source::window::Window;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use pipeline::{RunOptions, RunReport, run};

/// State every part of a running worker can see (lock-free).
#[derive(Debug)]
pub struct Shared {
    /// Messages polled and not yet committed (or dropped).
    pub in_flight: AtomicUsize,
    /// Bytes of those messages (keys, values, headers), live only.
    pub in_flight_bytes: AtomicUsize,
    /// Stages waiting right now (a store down, a handover, a dead-letter retry): while any
    /// waits, the source pauses its partitions.
    pub waiting: AtomicUsize,
    /// Bumped by every rebalance: stages drop cached views and reload parked streams.
    pub assignment_gen: AtomicU64,
    /// The consumer failed for good: the source re-creates it.
    pub recreate: AtomicBool,
    pub shutdown: AtomicBool,
    pub paused: AtomicBool,
    pub assigned: AtomicBool,
    /// Stores whose circuit is open (consecutive failures).
    pub open_circuits: AtomicUsize,
    /// Total consumer lag (high watermark − committed), from the client's statistics.
    pub lag_messages: AtomicI64,
    /// Create time (ms) of the newest message done per (topic, partition): the lag in
    /// seconds of a partition with messages waiting is the age of its newest done message.
    pub newest_done: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
    pub consumer_restarts: AtomicU64,
    /// The largest fetch response seen, bounded above from the client's statistics
    /// (`projector_fetch_response_bytes_max`), and the most bytes its fetch queues held.
    pub fetch_response_bytes_max: AtomicU64,
    pub fetch_queue_bytes_max: AtomicU64,
    /// The newest window whose unreadable messages' parks are in PostgreSQL (the poison
    /// stage records them in window order): stages drop their own copies of those parks when
    /// they next read the table, so an operator's unpark sticks.
    pub poison_saved: AtomicU64,
    /// What this member consumes (its client id and assignment), for the group watch.
    belief: std::sync::Mutex<Option<crate::source::group::Belief>>,
    /// From the group watch: every partition of the group has lag 0 (false until observed).
    pub group_caught_up: AtomicBool,
    /// From the group watch: the longest time, in ms, a partition this member is responsible
    /// for has had messages waiting and a commit that did not move.
    pub group_stall_ms: AtomicU64,
    started: Instant,
    /// Milliseconds since `started` of the last commit (or of the start).
    last_commit_ms: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            in_flight: AtomicUsize::new(0),
            in_flight_bytes: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            assignment_gen: AtomicU64::new(0),
            recreate: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            open_circuits: AtomicUsize::new(0),
            lag_messages: AtomicI64::new(0),
            newest_done: Default::default(),
            consumer_restarts: AtomicU64::new(0),
            fetch_response_bytes_max: AtomicU64::new(0),
            fetch_queue_bytes_max: AtomicU64::new(0),
            poison_saved: AtomicU64::new(0),
            belief: Default::default(),
            group_caught_up: AtomicBool::new(false),
            group_stall_ms: AtomicU64::new(0),
            started: Instant::now(),
            last_commit_ms: AtomicU64::new(0),
        }
    }
}

impl Shared {
    pub fn note_commit(&self) {
        self.last_commit_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!("projector_last_commit_timestamp_seconds")
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    }

    pub fn since_last_commit(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_commit_ms.load(Ordering::Relaxed)))
    }

    /// Ready for traffic: partitions assigned, not paused, every circuit closed.
    pub fn ready(&self) -> bool {
        self.assigned.load(Ordering::Relaxed)
            && !self.paused.load(Ordering::Relaxed)
            && self.open_circuits.load(Ordering::Relaxed) == 0
    }

    /// Alive means making progress: unhealthy when work waits (messages in flight or
    /// consumer lag) and nothing has been committed for `stall`, or when a partition this
    /// member is responsible for (it consumes it, or the coordinator says it owns it) has had
    /// messages waiting and a commit that did not move for `stall`.
    pub fn live(&self, stall: Duration) -> bool {
        let work = self.in_flight.load(Ordering::Relaxed) > 0
            || self.lag_messages.load(Ordering::Relaxed) > 0;
        let mine_stalled =
            Duration::from_millis(self.group_stall_ms.load(Ordering::Relaxed)) >= stall;
        (!work || self.since_last_commit() < stall) && !mine_stalled
    }

    /// What this member consumes, as the source last saw it.
    pub fn belief(&self) -> Option<crate::source::group::Belief> {
        self.belief
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The source's side: a new consumer (`Some`, nothing assigned yet), its assignment, or
    /// no consumer (`None`).
    pub fn set_belief(&self, b: Option<crate::source::group::Belief>) {
        *self.belief.lock().unwrap_or_else(|e| e.into_inner()) = b;
    }

    /// The group watch's side.
    pub fn note_group(&self, v: &crate::source::group::Verdict) {
        self.group_caught_up.store(v.caught_up, Ordering::Relaxed);
        self.group_stall_ms
            .store(v.my_longest_stall.as_millis() as u64, Ordering::Relaxed);
    }

    /// Mark a stage as waiting for as long as the guard lives.
    pub fn waiting(self: &std::sync::Arc<Self>) -> WaitGuard {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitGuard(self.clone())
    }
}

pub struct WaitGuard(std::sync::Arc<Shared>);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}
