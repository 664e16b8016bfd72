//! Windows: the unit that flows through the pipeline. A window is a run of consecutive
//! messages (closed by size or by time); it is decoded once, folded by every projector,
//! written by every store, and committed when all of them have acknowledged it.
//!
//! The raw bytes of a window's messages (keys, values, headers) live in one arena, so a
//! window costs one allocation for its bytes, and dead letters can still carry the
//! original message untouched.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use contract::{ContractError, Event};

use crate::store::ReplayPosition;

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Origin {
    /// The live feed: topic (index into [`Window::topics`]), partition, offset, the
    /// partition's assignment epoch when polled, and the message's create time.
    Kafka {
        topic: u16,
        partition: i32,
        offset: i64,
        epoch: u32,
        timestamp_ms: Option<i64>,
    },
    /// A replay of the event store (rebuild).
    Replay { position: ReplayPosition },
    /// An event lost on the wire, read back from the event store and spliced right before
    /// the live message that revealed the gap (at `before` in `topic`/`partition`). It has no
    /// offset of its own: nothing is registered or committed for it.
    Gap {
        topic: u16,
        partition: i32,
        before: i64,
    },
}

impl Origin {
    /// (partition, offset) for the parking rule of unreadable messages.
    pub fn position(&self) -> Option<(i32, i64)> {
        match *self {
            Origin::Kafka {
                partition, offset, ..
            } => Some((partition, offset)),
            // Held or released with the message it was spliced before.
            Origin::Gap {
                partition, before, ..
            } => Some((partition, before)),
            Origin::Replay { .. } => None,
        }
    }
}

/// A message that cannot be projected by anyone, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct Poison {
    pub error: ContractError,
    /// The stream it belongs to, when the topic and key tell (`aggregate_type/aggregate_id`).
    pub stream: Option<String>,
    /// Its sequence, when the `sequence` header tells.
    pub sequence: Option<i64>,
}

impl Poison {
    /// Where its stream's held events begin: its sequence when the header tells, else after
    /// its offset (a replay has neither and parks nothing). A sequence gap holds from its
    /// first missing sequence; a sequence conflict holds nothing.
    pub fn park_from(&self, origin: &Origin) -> Option<projectors::parking::ParkFrom> {
        use projectors::parking::ParkFrom;
        match &self.error {
            // Held from the first sequence missing, not from the message that showed it.
            ContractError::SequenceGap { from, .. }
            | ContractError::SequenceUnreadable { from, .. } => {
                return Some(ParkFrom::Sequence(*from));
            }
            // A foreign message: the stream's own events are intact, hold none of them.
            ContractError::SequenceConflict { .. } => return None,
            _ => {}
        }
        match (self.sequence, origin.position()) {
            (Some(s), _) => Some(ParkFrom::Sequence(s)),
            (None, Some((partition, offset))) => Some(ParkFrom::Offset { partition, offset }),
            (None, None) => None,
        }
    }
}

/// Byte ranges of a message in its window's arena.
#[derive(Debug, Clone, Default)]
pub struct RawRef {
    pub key: Option<Range<u32>>,
    pub payload: Option<Range<u32>>,
    /// Encoded headers (see [`Arena::push_headers`]).
    pub headers: Option<Range<u32>>,
}

/// One message of a window.
#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    pub decoded: Result<Event, Poison>,
    pub raw: RawRef,
}

/// Owned bytes of a window's messages.
#[derive(Debug, Default, Clone)]
pub struct Arena(Vec<u8>);

/// The largest window in bytes the arena's `u32` offsets can address, with room for one
/// message of the largest size the client accepts past the limit.
pub const MAX_WINDOW_BYTES: usize = 1 << 31;

/// Whether a window holding `items` messages in `bytes` bytes must close before a message of
/// `incoming` bytes joins it: it would pass `max_bytes` (never an empty window: a message
/// larger than the limit travels alone).
pub fn full_before(items: usize, bytes: usize, incoming: usize, max_bytes: usize) -> bool {
    items > 0 && bytes.saturating_add(incoming) > max_bytes.min(MAX_WINDOW_BYTES)
}

/// How long after its first message a window closes by age: `window_ms`, or `idle_ms` (if
/// shorter and not 0) while its messages are `alone` in flight, every earlier window written.
/// An idle pipeline then takes what has come at once, and a busy one batches what arrives
/// while it writes, up to `window_ms`, so a store is never sent more writes than it finishes.
pub fn age_limit(window_ms: u64, idle_ms: u64, alone: bool) -> std::time::Duration {
    let ms = if alone && idle_ms > 0 {
        idle_ms.min(window_ms)
    } else {
        window_ms
    };
    std::time::Duration::from_millis(ms)
}

impl Arena {
    pub fn with_capacity(n: usize) -> Arena {
        Arena(Vec::with_capacity(n))
    }

    pub fn push(&mut self, bytes: &[u8]) -> Range<u32> {
        let start = self.0.len() as u32;
        self.0.extend_from_slice(bytes);
        start..self.0.len() as u32
    }

    /// Headers as `u16 name length, name, u32 value length (u32::MAX: null), value`.
    pub fn push_headers<'a>(
        &mut self,
        headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Range<u32> {
        let start = self.0.len() as u32;
        for (name, value) in headers {
            let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
            self.0.extend_from_slice(&(name.len() as u16).to_le_bytes());
            self.0.extend_from_slice(name);
            match value {
                Some(v) => {
                    self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    self.0.extend_from_slice(v);
                }
                None => self.0.extend_from_slice(&u32::MAX.to_le_bytes()),
            }
        }
        start..self.0.len() as u32
    }

    pub fn get(&self, r: &Range<u32>) -> &[u8] {
        &self.0[r.start as usize..r.end as usize]
    }

    /// The headers stored by [`Arena::push_headers`].
    pub fn headers(&self, r: &Range<u32>) -> HeaderIter<'_> {
        HeaderIter(self.get(r))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub struct HeaderIter<'a>(&'a [u8]);

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(b.get(2..2 + n)?).unwrap_or("");
        let at = 2 + n;
        let len = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?);
        let (value, rest) = if len == u32::MAX {
            (None, at + 4)
        } else {
            let end = at + 4 + len as usize;
            (Some(b.get(at + 4..end)?), end)
        };
        self.0 = &b[rest..];
        Some((name, value))
    }
}

/// A window of decoded messages, shared by every stage that handles it.
#[derive(Debug)]
pub struct Window {
    pub id: u64,
    /// The consumer incarnation that polled it (a re-created consumer starts a new one; the
    /// windows of an old one are written but never committed).
    pub generation: u64,
    pub items: Vec<Item>,
    pub arena: Arena,
    /// Topic names, indexed by [`Origin::Kafka::topic`].
    pub topics: Arc<Vec<String>>,
    pub opened: Instant,
    /// Open while any stage holds the window (see [`crate::runtime::spans`]).
    pub span: tracing::Span,
}

impl Window {
    /// The same window with its trace span.
    pub fn traced(mut self) -> Window {
        self.span = crate::runtime::spans::window(&self);
        self
    }

    pub fn topic(&self, origin: &Origin) -> &str {
        match origin {
            Origin::Kafka { topic, .. } | Origin::Gap { topic, .. } => {
                self.topics.get(*topic as usize).map_or("?", String::as_str)
            }
            Origin::Replay { .. } => "event-store",
        }
    }

    pub fn events(&self) -> impl Iterator<Item = (usize, &Event)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| it.decoded.as_ref().ok().map(|e| (i, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_arena_including_nulls() {
        let mut a = Arena::default();
        let r = a.push_headers(
            [
                ("event_type", Some(&b"order.placed"[..])),
                ("x", None),
                ("", Some(&b""[..])),
            ]
            .into_iter(),
        );
        let back: Vec<_> = a.headers(&r).collect();
        assert_eq!(
            back,
            vec![
                ("event_type", Some(&b"order.placed"[..])),
                ("x", None),
                ("", Some(&b""[..]))
            ]
        );
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    #[test]
    fn a_window_alone_in_flight_closes_early_and_one_behind_others_waits() {
        use std::time::Duration;
        assert_eq!(age_limit(100, 5, true), Duration::from_millis(5));
        assert_eq!(age_limit(100, 5, false), Duration::from_millis(100));
        // Off, or not shorter than the window: the window's own age.
        assert_eq!(age_limit(100, 0, true), Duration::from_millis(100));
        assert_eq!(age_limit(20, 50, true), Duration::from_millis(20));
    }

    #[test]
    fn a_window_closes_before_a_message_would_take_it_past_its_bytes() {
        assert!(!full_before(0, 0, 100, 50), "a large message travels alone");
        assert!(!full_before(3, 40, 10, 50), "exactly at the limit fits");
        assert!(full_before(3, 40, 11, 50));
        assert!(!full_before(0, 0, usize::MAX, 50));
        // Whatever is configured, the arena's offsets stay addressable.
        assert!(full_before(1, MAX_WINDOW_BYTES, 1, usize::MAX));
    }
}
