//! Cutting polled messages into windows: each message joins the open window (by size, bytes
//! and age a window closes), a closed window is registered with the commit tracker and
//! offered to the pipeline, and a partition whose log goes back starts a new epoch.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};

use super::{KafkaSource, State};
use crate::runtime::commit::{Registration, Tp, TrackerMsg};
use crate::source::decode::RawItem;
use crate::source::window::{Arena, Origin, RawRef, age_limit};

/// A closed window of raw messages, registered with the tracker, not decoded yet.
pub struct RawWindow {
    pub id: u64,
    pub generation: u64,
    pub items: Vec<RawItem>,
    pub arena: Arena,
    pub opened: Instant,
}

pub(super) struct Builder {
    pub(super) items: Vec<RawItem>,
    pub(super) arena: Arena,
    pub(super) opened: Option<Instant>,
    /// Highest offset per (partition, epoch), with that message's create time.
    pub(super) offsets: HashMap<(Tp, u32), (i64, i64)>,
    pub(super) timestamps: Vec<i64>,
    /// The longest a message of the window waited between its create time and the poll.
    pub(super) broker_ms: i64,
    /// Bytes added to [`crate::runtime::Shared::in_flight_bytes`] for its messages.
    pub(super) bytes: usize,
}

impl Builder {
    pub(super) fn new() -> Builder {
        Builder {
            items: Vec::new(),
            arena: Arena::with_capacity(1 << 20),
            opened: None,
            offsets: HashMap::new(),
            timestamps: Vec::new(),
            broker_ms: 0,
            bytes: 0,
        }
    }
}

impl KafkaSource {
    /// Copy one message into the open window.
    pub(super) fn push(&self, m: &BorrowedMessage<'_>) {
        let Some(tp) = self.tp_of(m.topic(), m.partition()) else {
            return;
        };
        let mut st = self.state();
        // A message of a partition given up meanwhile: its new owner reads it.
        let Some(owned) = st.owned.get_mut(&tp) else {
            return;
        };
        let expected = owned.next.replace(m.offset() + 1);
        let mut epoch = owned.epoch;
        if let Some(expected) = expected.filter(|e| m.offset() < *e) {
            epoch = self.rewound(&mut st, tp, expected, m.offset());
        }
        // Windows are bounded in bytes too: one that this message would take past the limit
        // closes first (a message larger than the limit travels alone).
        let incoming = m.key().map_or(0, <[u8]>::len)
            + m.payload().map_or(0, <[u8]>::len)
            + m.headers().map_or(0, |h| {
                h.iter()
                    .map(|h| 6 + h.key.len() + h.value.map_or(0, <[u8]>::len))
                    .sum()
            });
        if crate::source::window::full_before(
            st.builder.items.len(),
            st.builder.arena.len(),
            incoming,
            self.cfg.worker.window_max_bytes,
        ) {
            self.close(&mut st, true);
        }
        let b = &mut st.builder;
        b.opened.get_or_insert_with(Instant::now);
        let raw = RawRef {
            key: m.key().map(|k| b.arena.push(k)),
            payload: m.payload().map(|p| b.arena.push(p)),
            headers: m
                .headers()
                .map(|h| b.arena.push_headers(h.iter().map(|h| (h.key, h.value)))),
        };
        let timestamp_ms = m.timestamp().to_millis();
        b.items.push(RawItem {
            origin: Origin::Kafka {
                topic: tp.0,
                partition: tp.1,
                offset: m.offset(),
                epoch,
                timestamp_ms,
            },
            raw,
        });
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ts = timestamp_ms.unwrap_or(now_ms);
        b.broker_ms = b.broker_ms.max(now_ms - ts);
        let slot = b.offsets.entry((tp, epoch)).or_insert((m.offset(), ts));
        if m.offset() >= slot.0 {
            *slot = (m.offset(), ts);
        }
        b.timestamps.push(ts);
        b.bytes += incoming;
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        self.shared
            .in_flight_bytes
            .fetch_add(incoming, Ordering::Relaxed);
    }

    /// The partition's log went back under this member: a broker lost messages it had
    /// acknowledged, or truncated its log, and librdkafka reset the position to what is there
    /// now (`auto.offset.reset`). What follows is a new epoch of the partition, whose commits
    /// may lie below the last one's: holding them until the old offset is passed again would
    /// keep a quiet partition's lag above 0 for good. (The projectors are idempotent: what
    /// is read again changes nothing.)
    pub(super) fn rewound(&self, st: &mut State, tp: Tp, expected: i64, got: i64) -> u32 {
        let epoch = st.new_epoch(tp, Some(got + 1));
        let topic = self.topics.get(tp.0 as usize).map_or("?", String::as_str);
        tracing::warn!(
            topic,
            partition = tp.1,
            expected,
            got,
            "the partition's log went back (the broker lost or truncated it): following it"
        );
        metrics::counter!("projector_log_rewinds_total").increment(1);
        let _ = self.tracker.send(TrackerMsg::Assigned(vec![(tp, epoch)]));
        epoch
    }

    /// When the open window closes by age: `window_ms` after its first message, or
    /// `window_idle_ms` after it while nothing else is in flight (the window's own messages
    /// are all there is: every earlier window is written and none waits to be handed over).
    fn closes_at(&self, st: &State) -> Option<Instant> {
        let opened = st.builder.opened?;
        let w = &self.cfg.worker;
        // (Every message polled counts in flight until its window is written.)
        let alone = st.ready.is_empty()
            && self.shared.in_flight.load(Ordering::Relaxed) <= st.builder.items.len();
        Some(opened + age_limit(w.window_ms, w.window_idle_ms, alone))
    }

    /// Close the open window if it is full or old enough (`force`: if it has anything).
    pub(super) fn close(&self, st: &mut State, force: bool) {
        let Some(closes) = self.closes_at(st) else {
            return;
        };
        let b = &st.builder;
        let Some(opened) = b.opened else { return };
        let full = b.items.len() >= self.cfg.worker.window_size.max(1);
        if !(force || full || Instant::now() >= closes) {
            return;
        }
        let b = std::mem::replace(&mut st.builder, Builder::new());
        use crate::runtime::budget::{Step, record};
        record(Step::Window, opened.elapsed());
        record(
            Step::Broker,
            Duration::from_millis(b.broker_ms.max(0) as u64),
        );
        let id = st.next_window;
        st.next_window += 1;
        let reg = Registration {
            id,
            generation: st.generation,
            offsets: b
                .offsets
                .iter()
                .map(|((tp, epoch), (o, _))| (*tp, *epoch, *o))
                .collect(),
            newest: b
                .offsets
                .iter()
                .map(|((tp, _), (_, ts))| (*tp, *ts))
                .collect(),
            messages: b.items.len(),
            bytes: b.bytes,
            timestamps: b.timestamps,
        };
        // Registered before any stage can see it, so no acknowledgement arrives first.
        let _ = self.tracker.send(TrackerMsg::Register(reg));
        st.last_registered = Some(id);
        st.ready.push_back(RawWindow {
            id,
            generation: st.generation,
            items: b.items,
            arena: b.arena,
            opened,
        });
    }

    /// Close the open window if it is due and hand the closed ones over (without blocking);
    /// when the open window, if any, is due next.
    pub(super) fn close_due_and_offer(&self) -> Option<Instant> {
        let mut st = self.state();
        self.close(&mut st, false);
        self.offer(&mut st);
        self.closes_at(&st)
    }

    /// Hand closed windows to the pipeline without blocking; true when none is left.
    pub(super) fn offer(&self, st: &mut State) -> bool {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let Some(windows) = windows.as_ref() else {
            return true;
        };
        while let Some(w) = st.ready.pop_front() {
            match windows.try_send(w) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(w)) => {
                    st.ready.push_front(w);
                    return false;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return true,
            }
        }
        true
    }

    /// Close the open window and hand everything over, waiting up to `deadline`.
    pub(super) fn flush(&self, deadline: Instant) -> Option<u64> {
        let mut st = self.state();
        self.close(&mut st, true);
        while !self.offer(&mut st) && Instant::now() < deadline {
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
            st = self.state();
        }
        st.last_registered
    }
}
