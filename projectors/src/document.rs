//! The stored document around a view: the view itself plus the idempotence guard (the last
//! sequence applied from each source stream) and a write token for compare-and-set. Guard
//! and view are one value, so a store writes them in one atomic operation.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use contract::Event;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Projector, Rejection};

/// Last applied `sequence_number` per source stream (`aggregate_type/aggregate_id`), or
/// [`FINISHED`].
pub type Guard = BTreeMap<String, i64>;

/// The guard entry of a stream the view takes nothing more from ([`Projector::finishes`]):
/// every event of it is a duplicate. A store may keep such entries beside the document
/// ([`Doc::take_finished`]) and bring back only those a batch asks about.
pub const FINISHED: i64 = i64::MAX;

/// Writes an event's stream key (`aggregate_type/aggregate_id`) into a reused buffer, so the
/// hot path looks guards up without allocating.
#[derive(Debug, Default)]
pub struct StreamKey(String);

impl StreamKey {
    pub fn of(&mut self, event: &Event) -> &str {
        self.0.clear();
        let h = &event.header;
        let _ = write!(self.0, "{}/{}", h.aggregate_type, h.aggregate_id);
        &self.0
    }
}

/// The stream key of an event, allocated (off the hot path).
pub fn stream_key(event: &Event) -> String {
    StreamKey::default().of(event).to_owned()
}

/// A view as stored: `{...view fields, "_guard": {...}, "_rev": n}`.
///
/// `rev` is a write token, not a counter: every write draws a fresh random one, and a store
/// only accepts a write whose expected token is still the stored one. Two writers that both
/// start from the same document can therefore never both succeed, however their writes
/// interleave (a counter would let the second one match a revision written by the first).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Doc<V> {
    pub view: V,
    pub guard: Guard,
    pub rev: u64,
}

/// Tokens stay below 2^53 so JSON readers (and Redis's Lua) hold them exactly.
pub const REV_BITS: u32 = 53;

#[derive(Serialize)]
struct StoredRef<'a, V> {
    #[serde(flatten)]
    view: &'a V,
    #[serde(rename = "_guard")]
    guard: &'a Guard,
    #[serde(rename = "_rev")]
    rev: u64,
}

#[derive(Deserialize)]
struct Stored<V> {
    #[serde(flatten)]
    view: V,
    #[serde(rename = "_guard", default)]
    guard: Guard,
    #[serde(rename = "_rev", default)]
    rev: u64,
}

impl<V: Serialize> Serialize for Doc<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        StoredRef {
            view: &self.view,
            guard: &self.guard,
            rev: self.rev,
        }
        .serialize(s)
    }
}

impl<'de, V: DeserializeOwned> Deserialize<'de> for Doc<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Stored::<V>::deserialize(d)?;
        Ok(Doc {
            view: s.view,
            guard: s.guard,
            rev: s.rev,
        })
    }
}

impl<V> Doc<V> {
    /// Take the finished streams out of the guard (for a store that keeps them apart).
    pub fn take_finished(&mut self) -> Vec<String> {
        let finished: Vec<String> = self
            .guard
            .iter()
            .filter(|(_, seq)| **seq == FINISHED)
            .map(|(s, _)| s.clone())
            .collect();
        for s in &finished {
            self.guard.remove(s);
        }
        finished
    }

    /// Mark `stream` finished (read back from beside the document).
    pub fn finish(&mut self, stream: String) {
        self.guard.insert(stream, FINISHED);
    }
}

/// What applying one event to a document did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Applied,
    /// The guard has seen this sequence of the stream: skipped.
    Duplicate,
    Rejected(Rejection),
}

/// Apply one event to a document through the guard: the only way views change.
pub fn apply_event<P: Projector>(
    p: &P,
    doc: &mut Doc<P::View>,
    event: &Event,
    keys: &mut StreamKey,
) -> Step {
    let stream = keys.of(event);
    let seq = event.header.sequence_number;
    if doc.guard.get(stream).is_some_and(|last| seq <= *last) {
        return Step::Duplicate;
    }
    match p.apply(&mut doc.view, event) {
        Ok(()) => {
            let last = if p.finishes(event) { FINISHED } else { seq };
            match doc.guard.get_mut(stream) {
                Some(l) => *l = last,
                None => {
                    doc.guard.insert(stream.to_owned(), last);
                }
            }
            Step::Applied
        }
        Err(reason) => Step::Rejected(Rejection {
            projector: p.name(),
            event_type: event.header.event_type.clone(),
            stream: stream.to_owned(),
            sequence: seq,
            reason,
        }),
    }
}

/// What a panic carried, as text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// [`apply_event`] with a panic in the projector caught: `Err` is the refusal to record (its
/// reason says the projector panicked). The view may then be half-changed: the caller must
/// restore it (from the store, or from a copy).
pub fn apply_caught<P: Projector>(
    p: &P,
    doc: &mut Doc<P::View>,
    event: &Event,
    keys: &mut StreamKey,
) -> Result<Step, Rejection> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        apply_event(p, doc, event, keys)
    }))
    .map_err(|payload| Rejection {
        projector: p.name(),
        event_type: event.header.event_type.clone(),
        stream: stream_key(event),
        sequence: event.header.sequence_number,
        reason: format!(
            "projector {} panicked: {}",
            p.name(),
            panic_message(payload.as_ref())
        ),
    })
}

/// [`crate::FactProjector::fact`] with a panic caught (its reason says so).
pub fn fact_caught<F: crate::FactProjector>(
    f: &F,
    event: &Event,
) -> Result<crate::analytics::Fact, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.fact(event))).unwrap_or_else(
        |payload| {
            Err(format!(
                "projector {} panicked: {}",
                f.name(),
                panic_message(payload.as_ref())
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    struct V {
        a: u32,
        b: String,
    }

    #[test]
    fn a_document_is_its_view_then_guard_then_token() {
        let d = Doc {
            view: V {
                a: 1,
                b: "x".into(),
            },
            guard: Guard::from([("order/o1".to_owned(), 3)]),
            rev: 42,
        };
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(text, r#"{"a":1,"b":"x","_guard":{"order/o1":3},"_rev":42}"#);
        let back: Doc<V> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
    }
}
