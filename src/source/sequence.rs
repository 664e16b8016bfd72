//! The sequencer: per-stream wire order, between decode and the stages (live feed only).
//!
//! The guards of the read models are high-water marks: an event whose sequence is below the
//! last applied one is skipped as a duplicate, one above it is applied. That is exactly right
//! when every event of a stream arrives once or more, in order; a relay that loses or reorders
//! messages breaks it silently (a lost event leaves a hole the next one is applied over, a
//! swapped pair loses its first half as a "duplicate"). So, per stream, this step remembers
//! the last sequence it passed on and, in window order:
//!
//! - first sight, or the next sequence: passes the event on;
//! - a jump past the next sequence: reads the missing ones from the event store (one query
//!   per window) and splices them in right before it, or, if the store does not hold them
//!   within `worker.gap_wait_secs`, turns it into poison that holds the stream from the first
//!   missing sequence (dead letter `sequence_gap`, parked for every projector);
//! - at or below the last one: asks the store which event holds that sequence (one query per
//!   window). The same event is a duplicate and passes (the guards skip it); another one, or
//!   none, is a foreign message: dead letter `sequence_conflict`, not projected, nothing held.
//!
//! An unreadable message whose headers tell its place moves its stream on too (it parks the
//! stream itself); one that does not, and replayed events, pass untouched.
//!
//! [`Sequencer`] is the pure state machine; [`Sequencing`] adds the event store
//! ([`GapSource`]) and rewrites windows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use contract::{AggregateType, ContractError, Event, RequiredHeaders};
use projectors::document::StreamKey;
use uuid::Uuid;

use super::window::{Arena, Item, Origin, Poison, RawRef, Window};
use crate::config::WorkerConfig;
use crate::resilience::backoff::Backoff;
use crate::runtime::Shared;
use crate::runtime::retry::Retry;
use crate::store::streams::{StreamRange, StreamSeq, event_ids_at, read_ranges};
use crate::store::{Pg, StoreError, Typed};

/// What to do with one event of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The first of its stream seen in this assignment of its partition: nothing to compare.
    First,
    /// The sequence after the last one passed on.
    Next,
    /// Sequences `from..=to` never arrived: fill them in before this event.
    Gap { from: i64, to: i64 },
    /// At or below the last sequence passed on: a duplicate, or a foreign message.
    Late,
    /// Its stream is held (events are missing from the store): passed on, the parks hold it.
    Held,
}

/// Per stream: the last sequence passed on, in which assignment of the partition, and whether
/// the stream is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    last: i64,
    epoch: u32,
    held: bool,
}

/// The pure state: the last sequence passed on per stream, for at most `capacity` streams.
///
/// Bounded as two generations: new and used streams go to the young map; when it holds half
/// the capacity, it becomes the old one and the previous old one is forgotten. A stream not
/// seen for that long is simply seen for the first time again (nothing is checked for it).
#[derive(Debug)]
pub struct Sequencer {
    young: HashMap<Box<str>, Slot>,
    old: HashMap<Box<str>, Slot>,
    capacity: usize,
    /// The consumer incarnation of the windows seen (a new one forgets everything).
    generation: Option<u64>,
}

impl Sequencer {
    /// Remembers at most `capacity` streams; 0 remembers none (every event is a first sight).
    pub fn new(capacity: usize) -> Sequencer {
        Sequencer {
            young: HashMap::new(),
            old: HashMap::new(),
            capacity,
            generation: None,
        }
    }

    /// Forget every stream when the windows come from another consumer incarnation (another
    /// member may have moved its streams on meanwhile). Returns whether it forgot anything.
    pub fn start_generation(&mut self, generation: u64) -> bool {
        if self.generation == Some(generation) {
            return false;
        }
        let had = !self.is_empty();
        self.young.clear();
        self.old.clear();
        self.generation = Some(generation);
        had
    }

    /// Classify an event of `stream` with sequence `seq`, read in assignment `epoch` of its
    /// partition, and remember it: past a gap, the stream stands at `seq` (the caller fills or
    /// holds the gap). A stream last seen under another epoch is seen afresh: the partition
    /// was revoked meanwhile and its next owner may have moved the stream on.
    pub fn observe(&mut self, stream: &str, seq: i64, epoch: u32) -> Step {
        if self.capacity == 0 {
            return Step::First;
        }
        let fresh = Slot {
            last: seq,
            epoch,
            held: false,
        };
        let Some(slot) = self.slot(stream) else {
            self.insert(stream.into(), fresh);
            return Step::First;
        };
        if slot.epoch != epoch {
            *slot = fresh;
            return Step::First;
        }
        if seq <= slot.last {
            return Step::Late;
        }
        let before = slot.last;
        slot.last = seq;
        if slot.held {
            Step::Held
        } else if seq == before + 1 {
            Step::Next
        } else {
            Step::Gap {
                from: before + 1,
                to: seq - 1,
            }
        }
    }

    /// The stream's missing events are not in the store: pass its later events on without
    /// looking for gaps again (the parks hold them).
    pub fn hold(&mut self, stream: &str) {
        if let Some(slot) = self.slot(stream) {
            slot.held = true;
        }
    }

    /// The last sequence passed on for `stream`, if remembered (does not count as a use).
    pub fn last(&self, stream: &str) -> Option<i64> {
        self.young
            .get(stream)
            .or_else(|| self.old.get(stream))
            .map(|s| s.last)
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot of `stream`, made young again if it was old.
    fn slot(&mut self, stream: &str) -> Option<&mut Slot> {
        if !self.young.contains_key(stream) {
            let (k, v) = self.old.remove_entry(stream)?;
            self.insert(k, v);
        }
        self.young.get_mut(stream)
    }

    fn insert(&mut self, stream: Box<str>, slot: Slot) {
        if self.young.len() >= (self.capacity / 2).max(1) {
            let young = std::mem::take(&mut self.young);
            // With room for one stream only, there is no old generation.
            self.old = if self.capacity >= 2 {
                young
            } else {
                HashMap::new()
            };
        }
        self.young.insert(stream, slot);
    }
}

/// The event store as the sequencer reads it (PostgreSQL in a worker; a simulation can plug
/// in its own).
#[async_trait]
pub trait GapSource: Send + Sync {
    /// Every stored event inside the ranges (what the store lacks is absent).
    async fn ranges(&self, ranges: &[StreamRange]) -> Result<Vec<Typed>, StoreError>;
    /// The event id stored at each of `at` that holds one.
    async fn ids(&self, at: &[StreamSeq]) -> Result<Vec<(StreamSeq, Uuid)>, StoreError>;
}

#[async_trait]
impl GapSource for Pg {
    async fn ranges(&self, ranges: &[StreamRange]) -> Result<Vec<Typed>, StoreError> {
        self.run(|c| async move { read_ranges(&c, ranges).await })
            .await
    }

    async fn ids(&self, at: &[StreamSeq]) -> Result<Vec<(StreamSeq, Uuid)>, StoreError> {
        self.run(|c| async move { event_ids_at(&c, at).await })
            .await
    }
}

/// What one window's sequencing did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Events read from the store and spliced in.
    pub filled: u64,
    /// Late messages that were the stored event (passed on as duplicates).
    pub late_duplicates: u64,
    /// Late messages that were not (dead-lettered).
    pub conflicts: u64,
    /// Gaps the store could not fill (streams held).
    pub held: u64,
}

/// A gap or a late message found in a window, to settle with the store.
struct Plan {
    item: usize,
    stream: String,
    aggregate_type: AggregateType,
    aggregate_id: String,
    sequence: i64,
    kind: PlanKind,
}

enum PlanKind {
    Gap { from: i64, to: i64 },
    Late { event_id: Uuid },
}

/// The sequencer with its event store, rewriting the live worker's windows.
pub struct Sequencing {
    state: Sequencer,
    source: Arc<dyn GapSource>,
    shared: Arc<Shared>,
    gap_wait: Duration,
}

impl Sequencing {
    /// `None` when `worker.sequence_streams` is 0 (the check is off).
    pub fn new(
        source: Arc<dyn GapSource>,
        shared: Arc<Shared>,
        cfg: &WorkerConfig,
    ) -> Option<Sequencing> {
        if cfg.sequence_streams == 0 {
            return None;
        }
        // The series exist from the start, at zero.
        for name in [
            "projector_gap_events_total",
            "projector_sequence_conflicts_total",
            "projector_late_duplicates_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        Some(Sequencing {
            state: Sequencer::new(cfg.sequence_streams),
            source,
            shared,
            gap_wait: Duration::from_secs(cfg.gap_wait_secs),
        })
    }

    /// Put the window's events in wire order per stream: fill gaps from the store (or hold
    /// their streams), mark foreign late messages. Nothing is registered for spliced events:
    /// they have no offset, and the window's registration (by the source) stays as it is.
    pub async fn apply(&mut self, w: &mut Window) -> Tally {
        if self.state.start_generation(w.generation) {
            tracing::info!(
                generation = w.generation,
                "new consumer: wire order starts afresh"
            );
        }
        let plans = self.plan(w);
        if plans.is_empty() {
            return Tally::default();
        }
        let mut ranges = Vec::new();
        let mut late = Vec::new();
        for p in &plans {
            match p.kind {
                PlanKind::Gap { from, to } => ranges.push(StreamRange {
                    aggregate_type: p.aggregate_type,
                    aggregate_id: p.aggregate_id.clone(),
                    from,
                    to,
                }),
                PlanKind::Late { .. } => late.push(StreamSeq {
                    aggregate_type: p.aggregate_type,
                    aggregate_id: p.aggregate_id.clone(),
                    sequence: p.sequence,
                }),
            }
        }
        let stored = self.stored_ids(&late).await;
        let filled = self.fill(&ranges).await;
        let tally = self.rewrite(w, plans, filled, stored);
        metrics::counter!("projector_gap_events_total").increment(tally.filled);
        metrics::counter!("projector_sequence_conflicts_total").increment(tally.conflicts);
        metrics::counter!("projector_late_duplicates_total").increment(tally.late_duplicates);
        tally
    }

    /// Walk the window in order: the gaps and late messages to settle with the store.
    fn plan(&mut self, w: &Window) -> Vec<Plan> {
        let mut key = StreamKey::default();
        let mut plans = Vec::new();
        for (i, item) in w.items.iter().enumerate() {
            // Replays are in order already.
            let Origin::Kafka { epoch, .. } = item.origin else {
                continue;
            };
            let (stream, sequence, event_id) = match &item.decoded {
                Ok(e) => (key.of(e), e.header.sequence_number, Some(e.header.event_id)),
                // An unreadable message with a known place did arrive: it moves its stream on
                // (it parks the stream itself), and a gap before it is filled like any other.
                Err(Poison {
                    stream: Some(s),
                    sequence: Some(seq),
                    ..
                }) => (s.as_str(), *seq, None),
                Err(_) => continue,
            };
            let kind = match (self.state.observe(stream, sequence, epoch), event_id) {
                (Step::Gap { from, to }, _) => PlanKind::Gap { from, to },
                (Step::Late, Some(event_id)) => PlanKind::Late { event_id },
                _ => continue,
            };
            let Some((aggregate_type, aggregate_id)) = stream
                .split_once('/')
                .and_then(|(t, id)| Some((t.parse::<AggregateType>().ok()?, id)))
            else {
                continue;
            };
            plans.push(Plan {
                item: i,
                stream: stream.to_owned(),
                aggregate_type,
                aggregate_id: aggregate_id.to_owned(),
                sequence,
                kind,
            });
        }
        plans
    }

    /// The event id stored at each late message's place. A passing outage is waited out (as
    /// every store call of the worker); `Err` only for a refusal.
    async fn stored_ids(&self, at: &[StreamSeq]) -> Result<HashMap<StreamSeq, Uuid>, StoreError> {
        if at.is_empty() {
            return Ok(HashMap::new());
        }
        let mut retry = None;
        loop {
            match self.source.ids(at).await {
                Ok(ids) => return Ok(ids.into_iter().collect()),
                Err(e) if e.is_transient() => {
                    retry
                        .get_or_insert_with(|| {
                            Retry::new(&self.shared, "postgres", "checking late messages")
                        })
                        .failed(&e)
                        .await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The stored events of `ranges` by (stream, sequence). Events not there yet are asked
    /// again with backoff for up to the gap wait (an outbox commits before it publishes, so
    /// they are usually there); time spent on a passing outage does not count against it.
    async fn fill(
        &self,
        ranges: &[StreamRange],
    ) -> Result<HashMap<(String, i64), Typed>, StoreError> {
        let mut found = HashMap::new();
        if ranges.is_empty() {
            return Ok(found);
        }
        let mut pending = ranges.to_vec();
        let mut waited = Duration::ZERO;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut retry = None;
        loop {
            match self.source.ranges(&pending).await {
                Ok(rows) => {
                    for t in rows {
                        found.insert(place_of(&t), t);
                    }
                    pending.retain(|r| {
                        let stream = format!("{}/{}", r.aggregate_type, r.aggregate_id);
                        (r.from..=r.to).any(|s| !found.contains_key(&(stream.clone(), s)))
                    });
                    if pending.is_empty() || waited >= self.gap_wait {
                        return Ok(found);
                    }
                    let pause = backoff.next_delay().min(self.gap_wait - waited);
                    tokio::time::sleep(pause).await;
                    waited += pause;
                }
                Err(e) if e.is_transient() => {
                    retry
                        .get_or_insert_with(|| {
                            Retry::new(&self.shared, "postgres", "filling sequence gaps")
                        })
                        .failed(&e)
                        .await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Splice filled events in, turn held gaps and foreign late messages into poison.
    fn rewrite(
        &mut self,
        w: &mut Window,
        plans: Vec<Plan>,
        mut filled: Result<HashMap<(String, i64), Typed>, StoreError>,
        stored: Result<HashMap<StreamSeq, Uuid>, StoreError>,
    ) -> Tally {
        let mut tally = Tally::default();
        // Streams held by an earlier gap of this window: their later gaps are not filled.
        let mut held_here: HashSet<String> = HashSet::new();
        let items = std::mem::take(&mut w.items);
        let mut out = Vec::with_capacity(items.len());
        let mut plans = plans.into_iter().peekable();
        for (i, mut item) in items.into_iter().enumerate() {
            let Some(plan) = plans.next_if(|p| p.item == i) else {
                out.push(item);
                continue;
            };
            let sequence = plan.sequence;
            let error = match plan.kind {
                PlanKind::Gap { from, to } => {
                    let Origin::Kafka {
                        topic,
                        partition,
                        offset,
                        ..
                    } = item.origin
                    else {
                        out.push(item);
                        continue;
                    };
                    if held_here.contains(&plan.stream) {
                        out.push(item);
                        continue;
                    }
                    let origin = Origin::Gap {
                        topic,
                        partition,
                        before: offset,
                    };
                    let hold = match &mut filled {
                        Ok(found) => {
                            // The stored prefix of the gap goes in, in sequence order.
                            let mut next = from;
                            while next <= to {
                                let Some(t) = found.remove(&(plan.stream.clone(), next)) else {
                                    break;
                                };
                                out.push(spliced(t, origin, &mut w.arena));
                                tally.filled += 1;
                                next += 1;
                            }
                            if next > to {
                                tracing::warn!(stream = %plan.stream, from, to,
                                    "events lost on the wire: filled in from the event store");
                                out.push(item);
                                continue;
                            }
                            let last_missing = (next..=to)
                                .rev()
                                .find(|s| !found.contains_key(&(plan.stream.clone(), *s)))
                                .unwrap_or(next);
                            ContractError::SequenceGap {
                                stream: plan.stream.clone(),
                                from: next,
                                to: last_missing,
                            }
                        }
                        Err(e) => ContractError::SequenceUnreadable {
                            stream: plan.stream.clone(),
                            from,
                            to,
                            reason: e.to_string(),
                        },
                    };
                    if item.decoded.is_err() {
                        // Unreadable itself: it parks the stream from its own sequence and
                        // keeps its own reason; what is missing before it is only told.
                        tracing::warn!(stream = %plan.stream, reason = %hold,
                            "events lost on the wire before an unreadable message");
                        out.push(item);
                        continue;
                    }
                    hold
                }
                PlanKind::Late { event_id } => {
                    let at = StreamSeq {
                        aggregate_type: plan.aggregate_type,
                        aggregate_id: plan.aggregate_id.clone(),
                        sequence,
                    };
                    let verdict = match stored.as_ref().map(|ids| ids.get(&at)) {
                        Ok(Some(id)) if *id == event_id => {
                            tally.late_duplicates += 1;
                            out.push(item);
                            continue;
                        }
                        Ok(Some(id)) => format!("the event store holds event {id} there"),
                        Ok(None) => "the event store holds no event there".to_owned(),
                        Err(e) => format!("it could not be checked against the event store: {e}"),
                    };
                    tally.conflicts += 1;
                    tracing::warn!(stream = %plan.stream, sequence, %event_id, %verdict,
                        "a late message is not the stored event: dead-lettered");
                    ContractError::SequenceConflict {
                        stream: plan.stream.clone(),
                        sequence,
                        event_id: event_id.to_string(),
                        verdict,
                    }
                }
            };
            if matches!(
                error,
                ContractError::SequenceGap { .. } | ContractError::SequenceUnreadable { .. }
            ) {
                tracing::warn!(stream = %plan.stream, reason = %error,
                    "events lost on the wire are not in the event store: stream held");
                tally.held += 1;
                self.state.hold(&plan.stream);
                held_here.insert(plan.stream.clone());
            }
            item.decoded = Err(Poison {
                error,
                stream: Some(plan.stream),
                sequence: Some(sequence),
            });
            out.push(item);
        }
        w.items = out;
        tally
    }
}

/// (stream, sequence) of a stored row.
fn place_of(t: &Typed) -> (String, i64) {
    match t {
        Ok(e) => (
            projectors::document::stream_key(e),
            e.header.sequence_number,
        ),
        Err((stream, seq, _)) => (stream.clone(), *seq),
    }
}

/// A stored event as an item of the window: its bytes as the relay would have sent them
/// (key, envelope, headers), so a dead letter of it can be sent again as it is.
fn spliced(t: Typed, origin: Origin, arena: &mut Arena) -> Item {
    match t {
        Ok(e) => {
            let raw = raw_of(&e, arena);
            Item {
                origin,
                decoded: Ok(e),
                raw,
            }
        }
        // A stored row that breaks the contract parks its stream, as a replay does.
        Err((stream, seq, error)) => {
            let key = stream
                .split_once('/')
                .map(|(_, id)| arena.push(id.as_bytes()));
            Item {
                origin,
                decoded: Err(Poison {
                    error,
                    stream: Some(stream),
                    sequence: Some(seq),
                }),
                raw: RawRef {
                    key,
                    ..RawRef::default()
                },
            }
        }
    }
}

fn raw_of(e: &Event, arena: &mut Arena) -> RawRef {
    let headers = RequiredHeaders::for_event(&e.header).pairs();
    RawRef {
        key: Some(arena.push(e.header.aggregate_id.as_bytes())),
        payload: Some(arena.push(&e.to_envelope().to_json_bytes())),
        headers: Some(arena.push_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use contract::EventData;
    use contract::catalogue::InteractionRecorded;

    use super::*;

    const S: &str = "customer/cus-1";

    #[test]
    fn first_sight_then_next_sequences_pass() {
        let mut s = Sequencer::new(10);
        assert_eq!(s.observe(S, 4, 1), Step::First, "whatever it starts at");
        assert_eq!(s.observe(S, 5, 1), Step::Next);
        assert_eq!(s.observe(S, 6, 1), Step::Next);
        assert_eq!(s.last(S), Some(6));
        assert_eq!(s.observe("order/o-1", 0, 1), Step::First);
    }

    #[test]
    fn a_jump_is_a_gap_and_the_stream_moves_past_it() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1);
        assert_eq!(s.observe(S, 3, 1), Step::Gap { from: 1, to: 2 });
        assert_eq!(s.last(S), Some(3));
        assert_eq!(s.observe(S, 4, 1), Step::Next);
    }

    #[test]
    fn at_or_below_the_last_is_late_and_moves_nothing() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1);
        s.observe(S, 1, 1);
        assert_eq!(s.observe(S, 1, 1), Step::Late, "a repeat");
        assert_eq!(s.observe(S, 0, 1), Step::Late, "older");
        assert_eq!(s.last(S), Some(1));
        assert_eq!(s.observe(S, 2, 1), Step::Next);
    }

    #[test]
    fn a_swapped_pair_is_a_gap_then_a_late_message() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1);
        assert_eq!(s.observe(S, 2, 1), Step::Gap { from: 1, to: 1 });
        assert_eq!(s.observe(S, 1, 1), Step::Late);
        assert_eq!(s.observe(S, 3, 1), Step::Next);
    }

    #[test]
    fn a_held_stream_passes_later_events_without_looking_for_gaps() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1);
        assert_eq!(s.observe(S, 5, 1), Step::Gap { from: 1, to: 4 });
        s.hold(S);
        assert_eq!(s.observe(S, 6, 1), Step::Held);
        assert_eq!(s.observe(S, 9, 1), Step::Held, "no second wait");
        assert_eq!(s.observe(S, 2, 1), Step::Late, "still checked when late");
    }

    #[test]
    fn another_assignment_of_the_partition_starts_the_stream_afresh() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1);
        s.observe(S, 1, 1);
        // Revoked and assigned again: its next owner may have moved it on meanwhile.
        assert_eq!(s.observe(S, 7, 2), Step::First);
        assert_eq!(s.observe(S, 8, 2), Step::Next);
        assert_eq!(s.observe(S, 3, 2), Step::Late);
    }

    #[test]
    fn a_new_consumer_generation_forgets_every_stream() {
        let mut s = Sequencer::new(10);
        assert!(!s.start_generation(1), "nothing to forget yet");
        s.observe(S, 0, 1);
        assert!(!s.start_generation(1), "same generation");
        assert_eq!(s.last(S), Some(0));
        assert!(s.start_generation(2));
        assert!(s.is_empty());
        assert_eq!(s.observe(S, 5, 1), Step::First);
    }

    #[test]
    fn the_least_recently_seen_streams_are_forgotten_beyond_the_capacity() {
        let mut s = Sequencer::new(4);
        for i in 0..4 {
            s.observe(&format!("order/o-{i}"), 0, 1);
        }
        assert_eq!(s.len(), 4);
        // o-0 is used again, so it is kept; o-4 and o-5 push the others out.
        assert_eq!(s.observe("order/o-0", 1, 1), Step::Next);
        s.observe("order/o-4", 0, 1);
        s.observe("order/o-5", 0, 1);
        assert!(s.len() <= 4, "bounded: {}", s.len());
        assert_eq!(s.last("order/o-0"), Some(1));
        assert_eq!(s.last("order/o-1"), None, "forgotten");
        assert_eq!(s.observe("order/o-1", 3, 1), Step::First);
        for i in 0..1_000 {
            s.observe(&format!("order/x-{i}"), 0, 1);
            assert!(s.len() <= 4);
        }
        let mut one = Sequencer::new(1);
        one.observe("a/1", 0, 1);
        one.observe("a/2", 0, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(one.observe("a/2", 1, 1), Step::Next);
    }

    #[test]
    fn capacity_zero_checks_nothing() {
        let mut s = Sequencer::new(0);
        assert_eq!(s.observe(S, 0, 1), Step::First);
        assert_eq!(s.observe(S, 9, 1), Step::First);
        assert!(s.is_empty());
    }

    /// An event store in memory; `fail` refuses every read.
    #[derive(Default)]
    struct Memory {
        events: Mutex<Vec<Event>>,
        fail: bool,
        asked: Mutex<u32>,
    }

    #[async_trait]
    impl GapSource for Memory {
        async fn ranges(&self, ranges: &[StreamRange]) -> Result<Vec<Typed>, StoreError> {
            *self.asked.lock().unwrap() += 1;
            if self.fail {
                return Err(StoreError::ConcurrentAppend("refused".into()));
            }
            let events = self.events.lock().unwrap();
            Ok(events
                .iter()
                .filter(|e| {
                    ranges.iter().any(|r| {
                        let h = &e.header;
                        r.aggregate_type == h.aggregate_type
                            && r.aggregate_id == h.aggregate_id
                            && (r.from..=r.to).contains(&h.sequence_number)
                    })
                })
                .cloned()
                .map(Ok)
                .collect())
        }

        async fn ids(&self, at: &[StreamSeq]) -> Result<Vec<(StreamSeq, Uuid)>, StoreError> {
            let events = self.events.lock().unwrap();
            Ok(at
                .iter()
                .filter_map(|k| {
                    events
                        .iter()
                        .find(|e| {
                            e.header.aggregate_id == k.aggregate_id
                                && e.header.sequence_number == k.sequence
                        })
                        .map(|e| (k.clone(), e.header.event_id))
                })
                .collect())
        }
    }

    fn event(id: &str, seq: i64) -> Event {
        Event::new(
            Uuid::new_v4(),
            id,
            seq,
            EventData::InteractionRecorded(InteractionRecorded {
                customer_id: id.to_owned(),
                agent_id: "a".into(),
                interaction_id: format!("i-{seq}"),
                interaction_type: "chat".into(),
                channel: None,
                sentiment_score: Some(0.5),
            }),
            Default::default(),
            chrono::Utc::now(),
        )
        .expect("a catalogue event")
    }

    fn window(events: &[Event]) -> Window {
        let items = events
            .iter()
            .enumerate()
            .map(|(i, e)| Item {
                origin: Origin::Kafka {
                    topic: 0,
                    partition: 3,
                    offset: 100 + i as i64,
                    epoch: 1,
                    timestamp_ms: None,
                },
                decoded: Ok(e.clone()),
                raw: RawRef::default(),
            })
            .collect();
        Window {
            id: 1,
            generation: 1,
            items,
            arena: Arena::default(),
            topics: Arc::new(vec!["events.customer".into()]),
            opened: Instant::now(),
            span: tracing::Span::none(),
        }
    }

    fn sequencing(store: Arc<Memory>, gap_wait_ms: u64) -> Sequencing {
        let mut s = Sequencing::new(
            store,
            Arc::new(Shared::default()),
            &crate::config::Config::load_for_tests()
                .expect("config")
                .worker,
        )
        .expect("on by default");
        s.gap_wait = Duration::from_millis(gap_wait_ms);
        s
    }

    /// (sequence, origin is a gap fill, kind of poison if any) of each item.
    fn shape(w: &Window) -> Vec<(i64, bool, Option<&'static str>)> {
        w.items
            .iter()
            .map(|it| {
                let gap = matches!(it.origin, Origin::Gap { .. });
                match &it.decoded {
                    Ok(e) => (e.header.sequence_number, gap, None),
                    Err(p) => (p.sequence.unwrap_or(-1), gap, Some(p.error.kind())),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn gaps_are_filled_in_order_before_the_event_that_showed_them() {
        let log: Vec<Event> = (0..6).map(|s| event("cus-1", s)).collect();
        let store = Arc::new(Memory {
            events: Mutex::new(log.clone()),
            ..Memory::default()
        });
        let mut s = sequencing(store.clone(), 0);
        // 1 and 2 lost, 4 and 5 swapped.
        let mut w = window(&[
            log[0].clone(),
            log[3].clone(),
            log[5].clone(),
            log[4].clone(),
        ]);
        let tally = s.apply(&mut w).await;
        assert_eq!(
            shape(&w),
            vec![
                (0, false, None),
                (1, true, None),
                (2, true, None),
                (3, false, None),
                (4, true, None),
                (5, false, None),
                (4, false, None),
            ]
        );
        assert_eq!(
            tally,
            Tally {
                filled: 3,
                late_duplicates: 1,
                conflicts: 0,
                held: 0
            }
        );
        assert_eq!(*store.asked.lock().unwrap(), 1, "one query for every gap");
        // The spliced event carries the stored bytes, its key and headers, and is held or
        // released with the message it was put before.
        let it = &w.items[1];
        assert_eq!(it.origin.position(), Some((3, 101)));
        let payload = w.arena.get(it.raw.payload.as_ref().unwrap());
        assert_eq!(Event::decode(payload).unwrap(), log[1]);
        assert_eq!(w.arena.get(it.raw.key.as_ref().unwrap()), b"cus-1");
        let letter =
            crate::resilience::dead_letter::DeadLetter::of(&w, it, "parked", "x".into(), None)
                .expect("a letter for a filled event");
        assert_eq!(
            (letter.original.topic.as_str(), letter.original.partition),
            ("events.customer", -1)
        );
    }

    #[tokio::test]
    async fn a_late_message_that_is_not_the_stored_event_is_poison_that_parks_nothing() {
        let log: Vec<Event> = (0..3).map(|s| event("cus-1", s)).collect();
        let store = Arc::new(Memory {
            events: Mutex::new(log.clone()),
            ..Memory::default()
        });
        let mut s = sequencing(store, 0);
        let foreign = event("cus-1", 1);
        let mut w = window(&[log[0].clone(), log[1].clone(), log[2].clone(), foreign]);
        let tally = s.apply(&mut w).await;
        assert_eq!(tally.conflicts, 1);
        let Err(p) = &w.items[3].decoded else {
            panic!("the foreign message is poison")
        };
        assert_eq!(p.error.kind(), "sequence_conflict");
        assert!(
            p.error
                .to_string()
                .contains(&format!("holds event {}", log[1].header.event_id)),
            "{}",
            p.error
        );
        assert_eq!(p.park_from(&w.items[3].origin), None, "nothing held");
        // One the store does not hold at all says so (cus-9 is on the wire only).
        let mut w2 = window(&[event("cus-9", 0), event("cus-9", 0)]);
        s.apply(&mut w2).await;
        let Err(p) = &w2.items[1].decoded else {
            panic!("a late message the store lacks is a conflict")
        };
        assert!(
            p.error.to_string().contains("holds no event there"),
            "{}",
            p.error
        );
    }

    #[tokio::test]
    async fn a_gap_the_store_cannot_fill_holds_the_stream_from_the_first_missing_sequence() {
        let log: Vec<Event> = (0..7).map(|s| event("cus-1", s)).collect();
        // The store lacks 3 and 4: 1 and 2 are filled in, 5 becomes the hold.
        let stored: Vec<Event> = log
            .iter()
            .filter(|e| !(3..=4).contains(&e.header.sequence_number))
            .cloned()
            .collect();
        let store = Arc::new(Memory {
            events: Mutex::new(stored),
            ..Memory::default()
        });
        let mut s = sequencing(store.clone(), 120);
        let started = Instant::now();
        let mut w = window(&[log[0].clone(), log[5].clone(), log[6].clone()]);
        let tally = s.apply(&mut w).await;
        assert!(started.elapsed() >= Duration::from_millis(120), "waited");
        assert!(
            *store.asked.lock().unwrap() >= 2,
            "asked again while waiting"
        );
        assert_eq!(tally.held, 1);
        assert_eq!(
            shape(&w),
            vec![
                (0, false, None),
                (1, true, None),
                (2, true, None),
                (5, false, Some("sequence_gap")),
                (6, false, None),
            ]
        );
        let Err(p) = &w.items[3].decoded else {
            unreachable!()
        };
        assert_eq!(
            p.error.to_string(),
            "sequences 3..4 of stream customer/cus-1 are missing from the event store"
        );
        assert_eq!(
            p.park_from(&w.items[3].origin),
            Some(projectors::parking::ParkFrom::Sequence(3))
        );
        // Later gaps of a held stream wait for nothing: the parks hold its events.
        let mut w = window(&[log[0].clone()]);
        w.items[0].decoded = Ok(event("cus-1", 9));
        let started = Instant::now();
        assert_eq!(s.apply(&mut w).await, Tally::default());
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn an_unreadable_message_moves_its_stream_on_and_keeps_its_reason() {
        let log: Vec<Event> = (0..4).map(|s| event("cus-1", s)).collect();
        let store = Arc::new(Memory {
            events: Mutex::new(log.clone()),
            ..Memory::default()
        });
        let mut s = sequencing(store, 0);
        // 1 lost, 2 garbled in transit (its headers still tell its place), 3 fine.
        let mut w = window(&[log[0].clone(), log[2].clone(), log[3].clone()]);
        w.items[1].decoded = Err(Poison {
            error: ContractError::InvalidJson {
                reason: "garbled".into(),
            },
            stream: Some("customer/cus-1".into()),
            sequence: Some(2),
        });
        let tally = s.apply(&mut w).await;
        assert_eq!(tally.filled, 1);
        assert_eq!(
            shape(&w),
            vec![
                (0, false, None),
                (1, true, None),
                (2, false, Some("invalid_json")),
                (3, false, None),
            ],
            "the gap before it is filled, and 3 is next, not another gap"
        );
    }

    #[tokio::test]
    async fn a_store_that_refuses_to_be_read_holds_the_stream_too() {
        let store = Arc::new(Memory {
            fail: true,
            ..Memory::default()
        });
        let mut s = sequencing(store, 1_000);
        let mut w = window(&[event("cus-1", 0), event("cus-1", 2)]);
        s.apply(&mut w).await;
        let Err(p) = &w.items[1].decoded else {
            panic!("held")
        };
        assert_eq!(p.error.kind(), "sequence_unreadable");
        assert_eq!(
            p.park_from(&w.items[1].origin),
            Some(projectors::parking::ParkFrom::Sequence(1))
        );
    }
}
