//! The Kafka source: one thread that owns the consumer and never stops polling.
//!
//! It cuts the polled messages into windows (by size and by time), registers each with the
//! commit tracker and hands it to the pipeline. However slow or dead a store is, this thread
//! keeps calling `poll`, so the member stays in its group; when the pipeline is full or a
//! stage waits (store failure, handover, dead-letter retry) it *pauses* its partitions
//! instead of buffering more. A revoked partition is drained (its windows written and
//! committed) before it is let go, and a consumer that failed for good (fenced, fatal) is
//! replaced by a new one under the same identity.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::consumer::{
    RebalanceHandler, SourceConsumer, SourceContext, create_consumer, is_fatal, member_id,
    unique_client_id,
};
use super::group::Belief;
use super::pace::Pacer;
use crate::config::Config;
use crate::runtime::Shared;
use crate::runtime::commit::{Tp, TrackerMsg};

mod fetch;
mod rebalance;
mod windows;

use fetch::RESUME_WAKE_EVERY;
use windows::Builder;
pub use windows::RawWindow;

/// An error a poll returned: a fatal one is logged and ends the consumer (true); a
/// partition's end is no error; any other is logged.
fn poll_failed(e: &KafkaError) -> bool {
    if is_fatal(e) {
        tracing::error!(error = %e, "the consumer failed for good: re-creating it");
        return true;
    }
    if !matches!(e, KafkaError::PartitionEOF(_)) {
        tracing::warn!(error = %e, "consumer error");
    }
    false
}

struct State {
    builder: Builder,
    /// Closed windows the pipeline has not taken yet.
    ready: VecDeque<RawWindow>,
    owned: HashMap<Tp, Owned>,
    next_epoch: u32,
    generation: u64,
    next_window: u64,
    last_registered: Option<u64>,
    /// Partitions assigned / revoked since the poll loop last looked (it owns their queues).
    added: Vec<Tp>,
    removed: Vec<Tp>,
}

/// An owned partition: its epoch (a partition assigned again, or whose log went back, gets a
/// new one) and the next offset it should deliver in it.
#[derive(Debug, Clone, Copy)]
struct Owned {
    epoch: u32,
    next: Option<i64>,
}

impl State {
    /// Start a new epoch of `tp`, `next` the offset it should deliver next (if known).
    fn new_epoch(&mut self, tp: Tp, next: Option<i64>) -> u32 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.owned.insert(tp, Owned { epoch, next });
        epoch
    }
}

pub struct KafkaSource {
    cfg: Config,
    shared: Arc<Shared>,
    tracker: mpsc::UnboundedSender<TrackerMsg>,
    /// Taken at shutdown: the decode step ends when it is gone, whatever still holds the
    /// source (a close that hangs inside a rebalance callback does).
    windows: Mutex<Option<mpsc::Sender<RawWindow>>>,
    topics: Arc<Vec<String>>,
    topic_index: HashMap<String, u16>,
    state: Mutex<State>,
    /// This consumer's final commit at shutdown is made: the revoke its close brings only
    /// lets the partitions go (a commit there could hang the close with the broker).
    final_commit_made: std::sync::atomic::AtomicBool,
}

impl KafkaSource {
    pub fn new(
        cfg: &Config,
        shared: Arc<Shared>,
        tracker: mpsc::UnboundedSender<TrackerMsg>,
        windows: mpsc::Sender<RawWindow>,
        topics: Arc<Vec<String>>,
    ) -> Arc<KafkaSource> {
        let topic_index = topics
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u16))
            .collect();
        Arc::new(KafkaSource {
            cfg: cfg.clone(),
            shared,
            tracker,
            windows: Mutex::new(Some(windows)),
            topics,
            topic_index,
            state: Mutex::new(State {
                builder: Builder::new(),
                ready: VecDeque::new(),
                owned: HashMap::new(),
                next_epoch: 1,
                generation: 0,
                next_window: 1,
                last_registered: None,
                added: Vec::new(),
                removed: Vec::new(),
            }),
            final_commit_made: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tp_of(&self, topic: &str, partition: i32) -> Option<Tp> {
        self.topic_index.get(topic).map(|t| (*t, partition))
    }

    /// A list of partitions, each with the offset to commit (none: to pause or resume).
    fn tpl(&self, parts: impl IntoIterator<Item = (Tp, Option<i64>)>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), offset) in parts {
            let Some(topic) = self.topics.get(t as usize) else {
                continue;
            };
            match offset {
                Some(o) => {
                    let _ = tpl.add_partition_offset(topic, p, Offset::Offset(o));
                }
                None => {
                    tpl.add_partition(topic, p);
                }
            }
        }
        tpl
    }

    /// The source thread: poll, window, pause, re-create a failed consumer; returns at
    /// shutdown once everything polled is written and committed (or the deadline passed).
    pub fn run(self: Arc<Self>, topics: Vec<String>, stop_when_idle: Option<Duration>) {
        let mut backoff = crate::resilience::backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(10),
        );
        loop {
            let generation = {
                let mut st = self.state();
                st.generation += 1;
                st.owned.clear();
                st.generation
            };
            let handler: Arc<dyn RebalanceHandler> = self.clone();
            let ctx = SourceContext::new(self.shared.clone(), Arc::downgrade(&handler));
            let client_id = unique_client_id(&self.cfg.kafka);
            let consumer = match create_consumer(&self.cfg.kafka, &client_id, ctx).and_then(|c| {
                c.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
                Ok(c)
            }) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    tracing::error!(error = %e, "could not create the consumer; retrying");
                    std::thread::sleep(backoff.next_delay());
                    continue;
                }
            };
            backoff.reset();
            self.final_commit_made.store(false, Ordering::Relaxed);
            self.shared.set_belief(Some(Belief {
                client_id,
                member_id: None,
                assignment: Default::default(),
            }));
            // Whatever the old consumer reported is history now.
            self.shared.recreate.store(false, Ordering::Relaxed);
            let _ = self.tracker.send(TrackerMsg::Consumer {
                generation,
                consumer: consumer.clone(),
            });
            let finished = self.poll_loop(&consumer, stop_when_idle);
            // Hand over what this consumer polled (written, not committed if re-created).
            let last = self.flush(Instant::now() + Duration::from_secs(30));
            if finished {
                tracing::info!("shutdown: polling stopped; waiting for the windows in flight");
                self.wait_until_written(&consumer);
                let parts: Vec<Tp> = self.state().owned.keys().copied().collect();
                tracing::info!(partitions = parts.len(), "shutdown: committing");
                self.drain_and_commit(&consumer, parts, last, self.drain_deadline());
                self.final_commit_made.store(true, Ordering::Relaxed);
                tracing::info!("shutdown: committed; closing the consumer");
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let _ = self.tracker.send(TrackerMsg::Release { reply: tx });
            let _ = rx.recv_timeout(Duration::from_secs(5));
            self.shared.assigned.store(false, Ordering::Relaxed);
            self.shared.set_belief(None);
            if finished {
                self.windows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                self.close_at_shutdown(consumer);
                return;
            }
            // (Synchronously: the old consumer's last revoke must not run beside the new
            // consumer's rebalances.)
            drop(consumer);
            self.shared.assignment_gen.fetch_add(1, Ordering::Relaxed);
            self.shared
                .consumer_restarts
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("projector_consumer_restarts_total").increment(1);
            tracing::warn!(
                generation,
                "consumer re-created after a fatal error; rejoining under the same identity"
            );
        }
    }

    /// Close the consumer (a dynamic member leaves the group; a static one only closes),
    /// waiting a bounded time. librdkafka can hang a close for good: the revoke it delivers
    /// while closing makes rust-rdkafka ask `rd_kafka_rebalance_protocol()`, whose request
    /// to a group that has terminated meanwhile is never answered (librdkafka issue 4041;
    /// seen here once in `parking::parks_are_per_projector_and_survive_a_rebalance`). By now
    /// everything polled is written and committed, so a close that hangs is left behind and
    /// the process exits.
    fn close_at_shutdown(&self, consumer: Arc<SourceConsumer>) {
        let limit =
            Duration::from_millis(self.cfg.worker.drain_timeout_ms) + Duration::from_secs(5);
        let (tx, rx) = std::sync::mpsc::channel();
        let closing = std::thread::Builder::new()
            .name("consumer-close".into())
            .spawn(move || {
                if crate::runtime::stage::fault_once("hang_close") {
                    // Test hook: the close hangs as librdkafka's can.
                    loop {
                        std::thread::park();
                    }
                }
                drop(consumer);
                let _ = tx.send(());
            });
        if closing.is_ok() && rx.recv_timeout(limit).is_err() {
            metrics::counter!("projector_consumer_close_hangs_total").increment(1);
            tracing::warn!(
                seconds = limit.as_secs(),
                "closing the consumer hangs in librdkafka: leaving it (everything is committed)"
            );
        }
    }

    /// Poll until shutdown (true) or until the consumer must be re-created (false).
    ///
    /// Each owned partition's messages come through a queue of its own, read only while the
    /// pipeline has room: when it has none, librdkafka's bounded prefetch fills and fetching
    /// stops by itself. (Pausing would drop the prefetched messages and fetch them again at
    /// every resume.) The main queue carries the group's events and is polled every turn.
    fn poll_loop(&self, consumer: &Arc<SourceConsumer>, stop_when_idle: Option<Duration>) -> bool {
        let mut queues: Vec<(Tp, PartitionQueue<SourceContext>)> = Vec::new();
        let mut pacer = Pacer::default();
        let idle_pause = Duration::from_millis(self.cfg.kafka.idle_pause_ms);
        // Since when the partitions are resumed with no fetch answered yet.
        let mut resumed: Option<Instant> = None;
        let mut next = 0usize;
        let mut last_activity = Instant::now();
        let mut last_check = Instant::now();
        let mut held = false;
        let max_in_flight = self.cfg.worker.max_in_flight.max(1);
        let max_in_flight_bytes = self.cfg.worker.max_in_flight_bytes.max(1);
        // Room for more while both bounds hold (a message past the byte bound still comes
        // whole: the bound can be passed by one message).
        let below_bounds = || {
            self.shared.in_flight.load(Ordering::Relaxed) < max_in_flight
                && self.shared.in_flight_bytes.load(Ordering::Relaxed) < max_in_flight_bytes
        };
        loop {
            if self.shared.shutdown.load(Ordering::Relaxed) {
                return true;
            }
            if self.shared.recreate.swap(false, Ordering::Relaxed) {
                return false;
            }
            // Partition queues follow the assignment.
            let (added, removed) = {
                let mut st = self.state();
                (
                    std::mem::take(&mut st.added),
                    std::mem::take(&mut st.removed),
                )
            };
            queues.retain(|(tp, _)| !removed.contains(tp));
            for tp in &removed {
                pacer.revoked(*tp);
            }
            let mut split = false;
            for tp in added {
                pacer.assigned(tp, Instant::now());
                if let Some(topic) = self.topics.get(tp.0 as usize)
                    && let Some(q) = consumer.split_partition_queue(topic, tp.1)
                {
                    // A pause this member set before the partition was revoked must not
                    // outlive its return.
                    if !idle_pause.is_zero() {
                        let _ = consumer.resume(&self.tpl([(tp, None)]));
                    }
                    queues.retain(|(t, _)| *t != tp);
                    queues.push((tp, q));
                    split = true;
                }
            }
            let waiting = self.shared.waiting.load(Ordering::Relaxed) > 0;
            let room = self.state().ready.is_empty() && below_bounds() && !waiting;
            if waiting != held {
                held = waiting;
                self.shared.paused.store(held, Ordering::Relaxed);
                metrics::gauge!("projector_paused").set(if held { 1.0 } else { 0.0 });
            }
            // The main queue: group events, and messages fetched before their partition got a
            // queue of its own (all of them first, so a partition's order holds).
            let mut wait = if room && !queues.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_millis(20)
            };
            // A poll that served an event (a rebalance, statistics, a commit's answer) also
            // returns nothing: after a split, only a few such in a row mean the queue is empty.
            let mut empty_polls = 0;
            loop {
                match consumer.poll(wait) {
                    Some(Ok(m)) => {
                        self.push(&m);
                        last_activity = Instant::now();
                        empty_polls = 0;
                    }
                    // (Ends of partitions not split off yet: their queues report them again.)
                    Some(Err(e)) if poll_failed(&e) => return false,
                    Some(Err(_)) => {}
                    None if split && empty_polls < 3 => empty_polls += 1,
                    None => break,
                }
                if !split {
                    break;
                }
                wait = Duration::ZERO;
            }
            if room && !queues.is_empty() {
                let mut got = 0;
                let mut empty = 0;
                while got < 1_000 && empty < queues.len() && below_bounds() {
                    let (tp, q) = &queues[next % queues.len()];
                    match q.poll(Duration::ZERO) {
                        Some(Ok(m)) => {
                            self.push(&m);
                            pacer.message(*tp);
                            resumed = None;
                            got += 1;
                            empty = 0;
                        }
                        Some(Err(KafkaError::PartitionEOF(_))) => {
                            pacer.end(*tp);
                            resumed = None;
                            empty += 1;
                            next += 1;
                        }
                        Some(Err(e)) if poll_failed(&e) => return false,
                        Some(Err(_)) => next += 1,
                        None => {
                            empty += 1;
                            next += 1;
                        }
                    }
                }
                if !idle_pause.is_zero() {
                    self.resume_silent(consumer, pacer.silent(Instant::now()));
                }
                if got > 0 {
                    last_activity = Instant::now();
                } else if !idle_pause.is_zero() && pacer.pause_now() {
                    self.pause_fetching(consumer, idle_pause);
                    resumed = Some(Instant::now());
                    pacer.resumed(Instant::now());
                } else if resumed.is_some_and(|t| t.elapsed() >= RESUME_WAKE_EVERY) {
                    self.wake(consumer);
                    resumed = Some(Instant::now());
                } else {
                    // Nothing prefetched: wait a little on the main queue (group events).
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(5)) {
                        self.push(&m);
                    }
                }
            }
            self.close_due_and_offer();
            if last_check.elapsed() >= Duration::from_millis(250) {
                last_check = Instant::now();
                let assignment = consumer.assignment().ok();
                let assigned = assignment.as_ref().is_some_and(|a| a.count() > 0);
                if let Some(a) = assignment {
                    self.note_assignment(&a, member_id(consumer));
                }
                metrics::gauge!("projector_in_flight_messages")
                    .set(self.shared.in_flight.load(Ordering::Relaxed) as f64);
                metrics::gauge!("projector_in_flight_bytes")
                    .set(self.shared.in_flight_bytes.load(Ordering::Relaxed) as f64);
                self.shared.assigned.store(assigned, Ordering::Relaxed);
            }
            // Idle means the whole group is caught up (every partition's committed offset at
            // its high watermark, as the broker says) and nothing is pending here; a partition
            // nobody consumes keeps it from ever being idle.
            if !self.shared.group_caught_up.load(Ordering::Relaxed)
                || self.shared.in_flight.load(Ordering::Relaxed) > 0
            {
                last_activity = Instant::now();
            }
            if let Some(idle) = stop_when_idle
                && last_activity.elapsed() >= idle
            {
                tracing::info!("idle: stopping");
                self.shared.shutdown.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Tell the group watch what this consumer consumes now.
    fn note_assignment(&self, a: &TopicPartitionList, member_id: Option<String>) {
        let assignment = a
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        if let Some(mut b) = self.shared.belief()
            && (b.assignment != assignment || b.member_id != member_id)
        {
            b.assignment = assignment;
            b.member_id = member_id;
            self.shared.set_belief(Some(b));
        }
    }

    /// At shutdown: keep polling (paused, so the session stays alive) until every window is
    /// written and acknowledged, or the shutdown deadline passes.
    fn wait_until_written(&self, consumer: &SourceConsumer) {
        let _ = self.pause_owned(consumer);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(50));
            let mut st = self.state();
            self.offer(&mut st);
        }
        let left = self.shared.in_flight.load(Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(
                messages = left,
                "shutdown deadline: leaving them uncommitted (redelivered later)"
            );
        }
    }
}
