//! The sequencer: per-stream wire order, between decode and the stages (live feed only).
//!
//! The guards of the read models are high-water marks: an event whose sequence is below the
//! last applied one is skipped as a duplicate, one above it is applied. That is exactly right
//! when every event of a stream arrives once or more, in order; a relay that loses or reorders
//! messages breaks it silently (a lost event leaves a hole the next one is applied over, a
//! swapped pair loses its first half as a "duplicate"). So, per stream, this step remembers
//! the last sequence it passed on and, in window order:
//!
//! - the next sequence: passes the event on;
//! - a jump past the next sequence: reads the missing ones from the event store (one query
//!   per window) and splices them in right before it, or, if the store does not hold them
//!   within `worker.gap_wait_secs`, turns it into poison that holds the stream from the first
//!   missing sequence (dead letter `sequence_gap`, parked for every projector);
//! - at or below the last one: asks the store which event holds that sequence (one query per
//!   window). The same event is a duplicate and passes (the guards skip it); another one, or
//!   none, is a foreign message: dead letter `sequence_conflict`, not projected, nothing held.
//!
//! A stream seen for the first time (after a restart, a reassignment of its partition, a new
//! consumer, or once forgotten beyond `worker.sequence_streams`) starts from its durable
//! position for the consumer group (one query per window for all such streams; no row: from
//! 0), so an event lost or swapped right at that point is filled in like any other gap
//! ([`positions`] says why a lagging position is safe and a leading one is not). With
//! `worker.stream_positions` off, such an event is taken as it comes.
//!
//! An unreadable message whose headers tell its place moves its stream on too (it parks the
//! stream itself); one that does not, and replayed events, pass untouched.
//!
//! - [`machine`]: the pure state ([`Sequencer`]: per stream, what to do with the next event);
//! - [`events`]: the event store as it is read here ([`GapSource`]: PostgreSQL, or memory);
//! - [`positions`]: durable positions per group (read at first sight, recorded once durable);
//! - this module: [`Sequencing`], which asks the stores and rewrites windows.

pub mod events;
pub mod machine;
pub mod positions;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use contract::{AggregateType, ContractError, Event, RequiredHeaders};
use projectors::document::StreamKey;
use uuid::Uuid;

pub use events::{GapSource, MemoryEvents};
pub use machine::{Sequencer, Start, Step};
pub use positions::{MemoryPositions, PgPositions, PositionStore, Positions};

use super::window::{Arena, Item, Origin, Poison, RawRef, Window};
use crate::config::WorkerConfig;
use crate::resilience::backoff::Backoff;
use crate::runtime::Shared;
use crate::runtime::retry::Retry;
use crate::store::streams::{StreamId, StreamRange, StreamSeq};
use crate::store::{StoreError, Typed};

/// What one window's sequencing did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Events read from the store and spliced in.
    pub filled: u64,
    /// Of those, events before a stream's first sight (from its durable position).
    pub first_sight_filled: u64,
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
    /// `first`: found at the stream's first sight (from its durable position).
    Gap {
        from: i64,
        to: i64,
        first: bool,
    },
    Late {
        event_id: Uuid,
    },
}

/// The sequencer with its event store, rewriting the live worker's windows.
pub struct Sequencing {
    state: Sequencer,
    source: Arc<dyn GapSource>,
    shared: Arc<Shared>,
    gap_wait: Duration,
    /// Durable positions: read at first sight, recorded once windows are durable (`None`:
    /// a stream first seen is taken as it comes).
    positions: Option<Positions>,
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
            positions: None,
        })
    }

    /// Start streams seen for the first time from their durable positions, and record the
    /// positions of windows once they are durable (through `positions`' recorder).
    pub fn with_positions(mut self, positions: Positions) -> Sequencing {
        self.positions = Some(positions);
        self
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
        let recorded = self.first_sights(w).await;
        let (plans, passed) = self.plan(w, &recorded);
        let mut tally = Tally::default();
        if !plans.is_empty() {
            let mut ranges = Vec::new();
            let mut late = Vec::new();
            for p in &plans {
                match p.kind {
                    PlanKind::Gap { from, to, .. } => ranges.push(StreamRange {
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
            tally = self.rewrite(w, plans, filled, stored);
            metrics::counter!("projector_gap_events_total").increment(tally.filled);
            metrics::counter!("projector_sequence_conflicts_total").increment(tally.conflicts);
            metrics::counter!("projector_late_duplicates_total").increment(tally.late_duplicates);
            metrics::counter!("projector_first_sight_fills_total")
                .increment(tally.first_sight_filled);
        }
        if let Some(p) = &self.positions {
            let positions = passed
                .into_iter()
                .filter_map(|(stream, sequence)| {
                    let id = StreamId::parse(&stream)?;
                    Some(StreamSeq {
                        aggregate_type: id.aggregate_type,
                        aggregate_id: id.aggregate_id,
                        sequence,
                    })
                })
                .collect();
            p.passed(w.id, positions);
        }
        tally
    }

    /// The stream and sequence of a live item the sequencer follows, with its epoch.
    fn place<'a>(key: &'a mut StreamKey, item: &'a Item) -> Option<(&'a str, i64, u32)> {
        // Replays are in order already.
        let Origin::Kafka { epoch, .. } = item.origin else {
            return None;
        };
        match &item.decoded {
            Ok(e) => Some((key.of(e), e.header.sequence_number, epoch)),
            // An unreadable message with a known place did arrive: it moves its stream on
            // (it parks the stream itself), and a gap before it is filled like any other.
            Err(Poison {
                stream: Some(s),
                sequence: Some(seq),
                ..
            }) => Some((s.as_str(), *seq, epoch)),
            Err(_) => None,
        }
    }

    /// The durable positions of the streams this window shows for the first time past
    /// sequence 0 (one query). Streams without a row are absent: they start at 0. A refused
    /// read leaves them all absent, which is exact too (everything before is filled).
    async fn first_sights(&self, w: &Window) -> HashMap<String, i64> {
        let Some(p) = &self.positions else {
            return HashMap::new();
        };
        let mut key = StreamKey::default();
        // Only a stream's first event in the window can be its first sight.
        let mut seen: HashSet<String> = HashSet::new();
        let mut streams = Vec::new();
        for item in &w.items {
            let Some((stream, seq, epoch)) = Self::place(&mut key, item) else {
                continue;
            };
            if seen.contains(stream) {
                continue;
            }
            seen.insert(stream.to_owned());
            if seq > 0
                && self.state.is_first_sight(stream, epoch)
                && let Some(id) = StreamId::parse(stream)
            {
                streams.push(id);
            }
        }
        if streams.is_empty() {
            return HashMap::new();
        }
        metrics::counter!("projector_first_sight_lookups_total").increment(streams.len() as u64);
        let store = p.store();
        match patiently(&self.shared, "reading stream positions", || {
            store.read(&streams)
        })
        .await
        {
            Ok(rows) => rows
                .into_iter()
                .map(|(s, l)| (format!("{}/{}", s.aggregate_type, s.aggregate_id), l))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, streams = streams.len(),
                    "stream positions unreadable: those streams are filled from their start");
                HashMap::new()
            }
        }
    }

    /// Walk the window in order: the gaps and late messages to settle with the store, and
    /// the highest sequence passed on per stream.
    fn plan(
        &mut self,
        w: &Window,
        recorded: &HashMap<String, i64>,
    ) -> (Vec<Plan>, HashMap<String, i64>) {
        let mut key = StreamKey::default();
        let mut plans = Vec::new();
        let mut passed: HashMap<String, i64> = HashMap::new();
        for (i, item) in w.items.iter().enumerate() {
            let Some((stream, sequence, epoch)) = Self::place(&mut key, item) else {
                continue;
            };
            let event_id = item.decoded.as_ref().ok().map(|e| e.header.event_id);
            let first = self.state.is_first_sight(stream, epoch);
            let start = match &self.positions {
                None => Start::Unknown,
                // Passed on earlier in this window (then forgotten): exactly known. Never
                // looked up (forgotten within this window): from 0, exact too.
                Some(_) => passed
                    .get(stream)
                    .max(recorded.get(stream))
                    .map_or(Start::Fresh, |l| Start::At(*l)),
            };
            let step = self.state.observe(stream, sequence, epoch, start);
            if step != Step::Late {
                let at = passed.entry(stream.to_owned()).or_insert(sequence);
                *at = (*at).max(sequence);
            }
            let kind = match (step, event_id) {
                (Step::Gap { from, to }, _) => PlanKind::Gap { from, to, first },
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
        (plans, passed)
    }

    /// The event id stored at each late message's place. A passing outage is waited out (as
    /// every store call of the worker); `Err` only for a refusal.
    async fn stored_ids(&self, at: &[StreamSeq]) -> Result<HashMap<StreamSeq, Uuid>, StoreError> {
        if at.is_empty() {
            return Ok(HashMap::new());
        }
        let source = &self.source;
        let ids = patiently(&self.shared, "checking late messages", || source.ids(at)).await?;
        Ok(ids.into_iter().collect())
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
        let source = &self.source;
        loop {
            let rows = patiently(&self.shared, "filling sequence gaps", || {
                source.ranges(&pending)
            })
            .await?;
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
                PlanKind::Gap { from, to, first } => {
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
                                tally.first_sight_filled += u64::from(first);
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

/// Call the event store until it answers or refuses: a passing outage is waited out with
/// backoff (the source pauses meanwhile, as for every store call of the worker).
async fn patiently<T, F, Fut>(
    shared: &Arc<Shared>,
    what: &'static str,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut retry = None;
    loop {
        match call().await {
            Err(e) if e.is_transient() => {
                retry
                    .get_or_insert_with(|| Retry::new(shared, "postgres", what))
                    .failed(&e)
                    .await
            }
            answer => return answer,
        }
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

/// A copy of `w` with a stream's stored `history` spliced right before its item `at`, as a
/// gap's events are (no offset of their own): for a stage that must take a released stream's
/// history before the live event at `at` (see [`crate::runtime::parking::ParkStore::released`]).
/// Rows that break the contract end the history there: the unpark's replay parks the stream
/// at such a row itself.
pub fn with_history_before(w: &Window, at: usize, history: Vec<Typed>) -> Window {
    let origin = match w.items.get(at).map(|i| i.origin) {
        Some(Origin::Kafka {
            topic,
            partition,
            offset,
            ..
        }) => Origin::Gap {
            topic,
            partition,
            before: offset,
        },
        Some(other) => other,
        None => Origin::Gap {
            topic: 0,
            partition: -1,
            before: -1,
        },
    };
    let mut arena = w.arena.clone();
    let history: Vec<Item> = history
        .into_iter()
        .take_while(Result::is_ok)
        .map(|t| spliced(t, origin, &mut arena))
        .collect();
    let mut items = Vec::with_capacity(w.items.len() + history.len());
    items.extend(w.items[..at.min(w.items.len())].iter().cloned());
    items.extend(history);
    items.extend(w.items[at.min(w.items.len())..].iter().cloned());
    Window {
        id: w.id,
        generation: w.generation,
        items,
        arena,
        topics: w.topics.clone(),
        opened: w.opened,
        span: w.span.clone(),
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
    use std::time::Instant;

    use contract::EventData;
    use contract::catalogue::InteractionRecorded;

    use super::*;

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

    fn sequencing(store: Arc<MemoryEvents>, gap_wait_ms: u64) -> Sequencing {
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

    /// A worker's sequencer with durable positions in `positions` (flushed every 10 ms).
    fn with_positions(
        store: Arc<MemoryEvents>,
        positions: Arc<MemoryPositions>,
    ) -> (Sequencing, Box<dyn FnMut(u64) + Send>) {
        let (p, _task) = Positions::start(positions, Duration::from_millis(10));
        let durable = p.on_durable();
        (sequencing(store, 0).with_positions(p), durable)
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_starts_each_stream_from_its_durable_position() {
        let log: Vec<Event> = (0..8).map(|s| event("cus-1", s)).collect();
        let fresh: Vec<Event> = (0..3).map(|s| event("cus-2", s)).collect();
        let store = Arc::new(MemoryEvents::new(
            log.iter().chain(&fresh).cloned().collect(),
        ));
        let positions = Arc::new(MemoryPositions::default());
        // A first worker passes cus-1 up to 3; the window is durable, its positions recorded.
        let (mut s, mut durable) = with_positions(store.clone(), positions.clone());
        let mut w = window(&log[..4]);
        s.apply(&mut w).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(positions.get("customer/cus-1"), None, "not durable yet");
        durable(w.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(positions.get("customer/cus-1"), Some(3));
        drop((s, durable));

        // Restarted: 4 was lost right at the restart, 6 and 7 swapped; 2 is redelivered.
        // cus-2 was never durable: first seen at 2, its 0 and 1 are filled.
        let (mut s, _durable) = with_positions(store.clone(), positions.clone());
        let mut w = window(&[
            log[2].clone(),
            log[5].clone(),
            log[7].clone(),
            log[6].clone(),
            fresh[2].clone(),
        ]);
        let tally = s.apply(&mut w).await;
        assert_eq!(
            shape(&w),
            vec![
                (2, false, None),
                (4, true, None),
                (5, false, None),
                (6, true, None),
                (7, false, None),
                (6, false, None),
                (0, true, None),
                (1, true, None),
                (2, false, None),
            ]
        );
        assert_eq!(
            tally,
            Tally {
                filled: 4,
                // cus-2's 0 and 1 (cus-1 was first seen late, at 2; 4 is an ordinary gap).
                first_sight_filled: 2,
                late_duplicates: 2,
                conflicts: 0,
                held: 0,
            }
        );
        assert_eq!(positions.calls().0, 1, "one lookup for the window");
    }

    #[tokio::test(start_paused = true)]
    async fn positions_are_recorded_once_durable_and_a_stream_at_zero_needs_no_lookup() {
        let log: Vec<Event> = (0..3).map(|s| event("cus-1", s)).collect();
        let store = Arc::new(MemoryEvents::new(log.clone()));
        let positions = Arc::new(MemoryPositions::default());
        let (mut s, mut durable) = with_positions(store.clone(), positions.clone());
        // 1 lost: filled, and the position is the highest passed on (2).
        let mut w = window(&[log[0].clone(), log[2].clone()]);
        s.apply(&mut w).await;
        assert_eq!(
            positions.calls().0,
            0,
            "first seen at 0: nothing to look up"
        );
        durable(w.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(positions.get("customer/cus-1"), Some(2));
        // A late duplicate moves nothing; a lower position never replaces a greater one.
        let mut w = window(&[log[1].clone()]);
        w.id = 2;
        s.apply(&mut w).await;
        durable(2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(positions.get("customer/cus-1"), Some(2));
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
        let store = Arc::new(MemoryEvents::new(log.clone()));
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
                held: 0,
                first_sight_filled: 0,
            }
        );
        assert_eq!(store.asked(), 1, "one query for every gap");
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
        let store = Arc::new(MemoryEvents::new(log.clone()));
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
        let store = Arc::new(MemoryEvents::new(stored));
        let mut s = sequencing(store.clone(), 120);
        let started = Instant::now();
        let mut w = window(&[log[0].clone(), log[5].clone(), log[6].clone()]);
        let tally = s.apply(&mut w).await;
        assert!(started.elapsed() >= Duration::from_millis(120), "waited");
        assert!(store.asked() >= 2, "asked again while waiting");
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
        let store = Arc::new(MemoryEvents::new(log.clone()));
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
        let store = Arc::new(MemoryEvents::default());
        store.fail(true);
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
