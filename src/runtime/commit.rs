//! The commit tracker: the one component that decides what is durable and may be committed.
//!
//! Every window is registered when the source closes it, with the offsets it covers. Each
//! stage (every projector shard, and the poison handler) acknowledges a window once its
//! writes, dead letters and parked streams are durable. When a window and every window
//! before it are acknowledged by all, their offsets are committed — only for partitions the
//! worker still owns in the same assignment (a revoked partition's new owner may be ahead;
//! committing an older offset would move it backwards).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::Shared;
use crate::source::SourceConsumer;

/// A partition of a topic (topic index into the source's topic table).
pub type Tp = (u16, i32);

/// Where committed offsets go: the Kafka consumer, or the simulation's group.
pub trait OffsetCommit: Send + Sync {
    /// Commit `(topic, partition, next offset to read)` without waiting for the answer.
    fn commit_offsets(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String>;
}

impl OffsetCommit for SourceConsumer {
    fn commit_offsets(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| e.to_string())?;
        }
        // The answer arrives in the consumer's commit callback (a fenced or failed commit
        // is handled there).
        crate::source::commit_answered(self, &tpl).map_err(|e| e.to_string())
    }
}

/// Where a checkpoint of a replay (rebuild) stands; the rebuild's own committer saves it.
pub trait Committer: Send + 'static {
    /// The windows up to and including `upto` are durable in every store.
    fn windows_durable(&mut self, upto: u64);
}

/// A pending drain: (up to window, partitions, deadline, where to answer).
type DrainRequest = (
    u64,
    Vec<Tp>,
    Instant,
    std::sync::mpsc::Sender<Vec<(Tp, i64)>>,
);

/// What the tracker is told.
pub enum TrackerMsg {
    /// A window the source closed (before any stage sees it).
    Register(Registration),
    /// `participant` made window `id` durable.
    Ack { id: u64, participant: usize },
    /// The source's consumer (a new incarnation after a fatal error starts a new generation:
    /// windows of older generations are never committed).
    Consumer {
        generation: u64,
        consumer: Arc<dyn OffsetCommit>,
    },
    /// Drop the consumer (the source closes it on its own thread).
    Release { reply: std::sync::mpsc::Sender<()> },
    /// Partitions now owned, with their assignment epoch.
    Assigned(Vec<(Tp, u32)>),
    /// Partitions given up: nothing more is committed for them.
    Revoked(Vec<Tp>),
    /// Reply once every window up to `upto` is acknowledged (or `deadline` passes), with the
    /// committable offsets of `partitions` (next offset to read).
    Drain {
        upto: u64,
        partitions: Vec<Tp>,
        deadline: Instant,
        reply: std::sync::mpsc::Sender<Vec<(Tp, i64)>>,
    },
}

pub struct Registration {
    pub id: u64,
    pub generation: u64,
    /// Highest offset per (partition, epoch) in the window.
    pub offsets: Vec<(Tp, u32, i64)>,
    /// Create time of the newest message per partition in the window (ms since the epoch).
    pub newest: Vec<(Tp, i64)>,
    pub messages: usize,
    /// Bytes of those messages (keys, values, headers) counted in
    /// [`crate::runtime::Shared::in_flight_bytes`] when they were polled (0 for replays).
    pub bytes: usize,
    /// Create times of the messages (ms since the epoch), for publish → visible latency.
    pub timestamps: Vec<i64>,
}

struct Pending {
    reg: Registration,
    /// Which participants acknowledged it: a participant that acknowledges twice (a batch
    /// written again after a switch) still counts once.
    acked: Vec<bool>,
    acks: usize,
}

impl Pending {
    fn new(reg: Registration, participants: usize) -> Pending {
        Pending {
            reg,
            acked: vec![false; participants],
            acks: 0,
        }
    }

    /// Record `participant`'s acknowledgement; false if it was not one of the participants
    /// or had acknowledged already.
    fn ack(&mut self, participant: usize) -> bool {
        match self.acked.get_mut(participant) {
            Some(done) if !*done => {
                *done = true;
                self.acks += 1;
                true
            }
            _ => false,
        }
    }
}

/// Figures the tracker keeps for the run report.
#[derive(Debug, Default)]
pub struct TrackerStats {
    pub windows: u64,
    pub messages: u64,
    pub largest_window: u64,
    pub commits: u64,
    pub first_message: Option<Instant>,
    pub last_commit: Option<Instant>,
    pub latency: Option<hdrhistogram::Histogram<u64>>,
}

pub struct Tracker {
    participants: usize,
    shared: Arc<Shared>,
    pending: BTreeMap<u64, Pending>,
    consumer: Option<(u64, Arc<dyn OffsetCommit>)>,
    /// Current epoch of each owned partition.
    owned: HashMap<Tp, u32>,
    /// Next offset to commit per owned partition (epoch it belongs to).
    committable: HashMap<Tp, (u32, i64)>,
    committed: HashMap<Tp, i64>,
    topics: Arc<Vec<String>>,
    drains: Vec<DrainRequest>,
    /// Every window below this id is complete.
    low_water: u64,
    stats: TrackerStats,
    replay: Option<Box<dyn Committer>>,
    /// Offsets are committed at most this often (every commit is broker work; a crash
    /// redelivers at most this much, which the guards absorb).
    commit_every: Duration,
    /// Tokio's clock (the simulation pauses it): when offsets were last committed.
    last_commit: Option<tokio::time::Instant>,
    /// Told each window id once it is durable, in order (the durable stream positions).
    on_durable: Option<Box<dyn FnMut(u64) + Send>>,
    /// When the oldest window durable but not yet committed became durable (the budget's
    /// `commit` step).
    durable_since: Option<Instant>,
}

impl Tracker {
    pub fn new(
        participants: usize,
        shared: Arc<Shared>,
        topics: Arc<Vec<String>>,
        replay: Option<Box<dyn Committer>>,
    ) -> Tracker {
        Tracker {
            participants,
            shared,
            pending: BTreeMap::new(),
            consumer: None,
            owned: HashMap::new(),
            committable: HashMap::new(),
            committed: HashMap::new(),
            topics,
            drains: Vec::new(),
            low_water: 0,
            stats: TrackerStats::default(),
            replay,
            commit_every: Duration::from_millis(500),
            last_commit: None,
            on_durable: None,
            durable_since: None,
        }
    }

    /// Tell `listener` each window id once the window (and every earlier one) is durable,
    /// whatever becomes of its offsets (a durable window of a revoked partition or of a
    /// consumer that is gone is still durable).
    pub fn on_durable(mut self, listener: Box<dyn FnMut(u64) + Send>) -> Tracker {
        self.on_durable = Some(listener);
        self
    }

    /// Commit offsets at most this often.
    pub fn commit_every(mut self, every: Duration) -> Tracker {
        self.commit_every = every;
        self
    }

    /// Run until every sender is gone; returns the figures.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<TrackerMsg>) -> TrackerStats {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => self.handle(m),
                    None => break,
                },
                _ = tick.tick() => {
                    self.expire_drains();
                    self.commit();
                }
            }
        }
        self.advance();
        self.stats
    }

    fn handle(&mut self, m: TrackerMsg) {
        match m {
            TrackerMsg::Register(reg) => {
                self.stats.first_message.get_or_insert_with(Instant::now);
                self.pending
                    .insert(reg.id, Pending::new(reg, self.participants));
            }
            TrackerMsg::Ack { id, participant } => {
                if let Some(p) = self.pending.get_mut(&id)
                    && !p.ack(participant)
                {
                    tracing::warn!(
                        window = id,
                        participant,
                        "an acknowledgement from a stage that had acknowledged already (or is unknown): ignored"
                    );
                }
                self.advance();
            }
            TrackerMsg::Consumer {
                generation,
                consumer,
            } => {
                self.consumer = Some((generation, consumer));
                self.owned.clear();
                self.committable.clear();
                self.committed.clear();
            }
            TrackerMsg::Release { reply } => {
                self.consumer = None;
                let _ = reply.send(());
            }
            TrackerMsg::Assigned(parts) => {
                for (tp, epoch) in parts {
                    self.owned.insert(tp, epoch);
                    self.committable.remove(&tp);
                    self.committed.remove(&tp);
                }
            }
            TrackerMsg::Revoked(parts) => {
                for tp in parts {
                    self.owned.remove(&tp);
                    self.committable.remove(&tp);
                    self.committed.remove(&tp);
                }
            }
            TrackerMsg::Drain {
                upto,
                partitions,
                deadline,
                reply,
            } => {
                self.drains.push((upto, partitions, deadline, reply));
                self.answer_drains();
            }
        }
    }

    /// Complete the longest prefix of fully acknowledged windows, then commit.
    fn advance(&mut self) {
        let mut progressed = false;
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().acks < self.participants {
                break;
            }
            let p = entry.remove();
            self.complete(p.reg);
            progressed = true;
        }
        self.low_water = self
            .pending
            .first_key_value()
            .map_or(u64::MAX, |(id, _)| *id);
        if progressed {
            self.commit();
            self.answer_drains();
        }
    }

    fn complete(&mut self, reg: Registration) {
        self.shared
            .in_flight
            .fetch_sub(reg.messages, Ordering::Relaxed);
        self.shared
            .in_flight_bytes
            .fetch_sub(reg.bytes, Ordering::Relaxed);
        let current = self.consumer.as_ref().map(|(g, _)| *g);
        let s = &mut self.stats;
        s.windows += 1;
        s.messages += reg.messages as u64;
        s.largest_window = s.largest_window.max(reg.messages as u64);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let h = s.latency.get_or_insert_with(|| {
            // 1 ms .. 1 hour; slower saturates at an hour.
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3)
                .unwrap_or_else(|_| unreachable!("valid bounds"))
        });
        for ts in &reg.timestamps {
            h.saturating_record((now_ms - ts).max(1) as u64);
        }
        if let Some(last) = reg.timestamps.iter().max() {
            metrics::gauge!("projector_lag_seconds").set((now_ms - last).max(0) as f64 / 1000.0);
        }
        if !reg.newest.is_empty() {
            let mut done = self
                .shared
                .newest_done
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (tp, ts) in &reg.newest {
                if let Some(topic) = self.topics.get(tp.0 as usize) {
                    let slot = done.entry((topic.clone(), tp.1)).or_insert(*ts);
                    *slot = (*slot).max(*ts);
                }
            }
        }
        metrics::histogram!("projector_window_messages").record(reg.messages as f64);
        if let Some(listener) = self.on_durable.as_mut() {
            listener(reg.id);
        }
        metrics::gauge!("projector_in_flight_messages")
            .set(self.shared.in_flight.load(Ordering::Relaxed) as f64);
        metrics::gauge!("projector_in_flight_bytes")
            .set(self.shared.in_flight_bytes.load(Ordering::Relaxed) as f64);
        if let Some(r) = self.replay.as_mut() {
            r.windows_durable(reg.id);
            return;
        }
        if Some(reg.generation) != current {
            return; // polled by a consumer that is gone: its new owner redelivers
        }

        self.durable_since.get_or_insert_with(Instant::now);
        for (tp, epoch, offset) in reg.offsets {
            if self.owned.get(&tp) != Some(&epoch) {
                continue;
            }
            let next = offset + 1;
            let slot = self.committable.entry(tp).or_insert((epoch, next));
            if slot.0 == epoch && slot.1 < next {
                slot.1 = next;
            }
        }
    }

    fn commit(&mut self) {
        if self
            .last_commit
            .is_some_and(|t| t.elapsed() < self.commit_every)
        {
            return;
        }
        let Some((_, consumer)) = &self.consumer else {
            return;
        };
        let mut offsets: Vec<(&str, i32, i64)> = Vec::new();
        let mut sent = Vec::new();
        for (tp, (_, next)) in &self.committable {
            if self.committed.get(tp) == Some(next) {
                continue;
            }
            let Some(topic) = self.topics.get(tp.0 as usize) else {
                continue;
            };
            offsets.push((topic, tp.1, *next));
            sent.push((*tp, *next));
        }
        if offsets.is_empty() {
            return;
        }
        // Offsets only ever move forward per epoch.
        if let Err(e) = consumer.commit_offsets(&offsets) {
            tracing::warn!(error = %e, "offset commit not sent; the next one covers it");
            return;
        }
        self.committed.extend(sent);
        if let Some(t) = self.durable_since.take() {
            super::budget::record(super::budget::Step::Commit, t.elapsed());
        }
        self.stats.commits += 1;
        self.stats.last_commit = Some(Instant::now());
        self.last_commit = Some(tokio::time::Instant::now());
        self.shared.note_commit();
    }

    fn answer_drains(&mut self) {
        let now = Instant::now();
        let low = self.low_water;
        let mut keep = Vec::new();
        for (upto, parts, deadline, reply) in std::mem::take(&mut self.drains) {
            let done = low > upto;
            if done || now >= deadline {
                let offsets = parts
                    .iter()
                    .filter_map(|tp| self.committable.get(tp).map(|(_, o)| (*tp, *o)))
                    .collect();
                let _ = reply.send(offsets);
            } else {
                keep.push((upto, parts, deadline, reply));
            }
        }
        self.drains = keep;
    }

    fn expire_drains(&mut self) {
        if !self.drains.is_empty() {
            self.answer_drains();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: u64) -> Registration {
        Registration {
            id,
            generation: 0,
            offsets: Vec::new(),
            newest: Vec::new(),
            messages: 1,
            bytes: 0,
            timestamps: Vec::new(),
        }
    }

    fn tracker(participants: usize) -> Tracker {
        Tracker::new(
            participants,
            Arc::new(Shared::default()),
            Arc::new(Vec::new()),
            None,
        )
    }

    #[test]
    fn a_window_completes_when_every_participant_acknowledged_it_once() {
        let mut t = tracker(3);
        t.handle(TrackerMsg::Register(reg(1)));
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 0,
        });
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 0,
        });
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 2,
        });
        assert_eq!(t.stats.windows, 0, "participant 1 has not acknowledged");
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 7,
        });
        assert_eq!(
            t.stats.windows, 0,
            "an unknown participant counts for nothing"
        );
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 1,
        });
        assert_eq!(t.stats.windows, 1);
    }

    #[test]
    fn the_durable_listener_hears_each_window_once_in_order_when_all_acknowledged() {
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = heard.clone();
        let mut t = tracker(2).on_durable(Box::new(move |id| h.lock().unwrap().push(id)));
        for id in 1..=3 {
            t.handle(TrackerMsg::Register(reg(id)));
        }
        let ack = |t: &mut Tracker, id, participant| t.handle(TrackerMsg::Ack { id, participant });
        ack(&mut t, 2, 0);
        ack(&mut t, 2, 1);
        ack(&mut t, 1, 0);
        assert!(heard.lock().unwrap().is_empty(), "window 1 lacks an ack");
        ack(&mut t, 1, 1);
        assert_eq!(*heard.lock().unwrap(), vec![1, 2]);
        ack(&mut t, 3, 1);
        ack(&mut t, 3, 1);
        assert_eq!(*heard.lock().unwrap(), vec![1, 2], "one participant twice");
        ack(&mut t, 3, 0);
        assert_eq!(*heard.lock().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn windows_complete_in_order_only() {
        let mut t = tracker(1);
        t.handle(TrackerMsg::Register(reg(1)));
        t.handle(TrackerMsg::Register(reg(2)));
        t.handle(TrackerMsg::Ack {
            id: 2,
            participant: 0,
        });
        assert_eq!(t.stats.windows, 0, "window 1 is not durable yet");
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 0,
        });
        assert_eq!(t.stats.windows, 2);
    }

    /// The offsets the tracker sent, in order.
    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<(String, i32, i64)>>);

    impl OffsetCommit for Recorded {
        fn commit_offsets(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String> {
            let mut r = self.0.lock().unwrap();
            r.extend(offsets.iter().map(|(t, p, o)| (t.to_string(), *p, *o)));
            Ok(())
        }
    }

    #[test]
    fn a_partition_given_a_new_epoch_commits_below_the_old_one() {
        let recorded = Arc::new(Recorded::default());
        let mut t = Tracker::new(
            1,
            Arc::new(Shared::default()),
            Arc::new(vec!["t".to_owned()]),
            None,
        )
        .commit_every(Duration::ZERO);
        t.handle(TrackerMsg::Consumer {
            generation: 0,
            consumer: recorded.clone(),
        });
        let tp = (0u16, 3);
        let window = |id, offsets: Vec<(Tp, u32, i64)>| {
            TrackerMsg::Register(Registration { offsets, ..reg(id) })
        };
        t.handle(TrackerMsg::Assigned(vec![(tp, 1)]));
        t.handle(window(1, vec![(tp, 1, 999)]));
        t.handle(TrackerMsg::Ack {
            id: 1,
            participant: 0,
        });
        // The log went back to 0 under the member (the source's rewind): epoch 2. A window
        // still holding epoch 1's messages commits nothing of them.
        t.handle(TrackerMsg::Assigned(vec![(tp, 2)]));
        t.handle(window(2, vec![(tp, 1, 1_000), (tp, 2, 49)]));
        t.handle(TrackerMsg::Ack {
            id: 2,
            participant: 0,
        });
        t.handle(window(3, vec![(tp, 1, 1_001)]));
        t.handle(TrackerMsg::Ack {
            id: 3,
            participant: 0,
        });
        let sent: Vec<i64> = recorded.0.lock().unwrap().iter().map(|c| c.2).collect();
        assert_eq!(sent, vec![1_000, 50]);
    }
}
