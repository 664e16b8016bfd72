//! Projector plugins: pure functions of (current view, event) → new view, and of event →
//! fact row. No I/O here: the engine reads the current views, calls [`Projector::apply`] for
//! each event through [`document::apply_event`] (which keeps the idempotence guard), and
//! writes the results.
//!
//! Adding a projector: one module implementing [`Projector`] (or [`FactProjector`]), one line
//! in [`registry::register_all`].

pub mod analytics;
pub mod customer360;
pub mod document;
pub mod memory;
pub mod order_view;
pub mod parking;
pub mod registry;
pub mod time;

pub use document::{Doc, Guard, Step, StreamKey, apply_event};
pub use parking::{ParkMark, Parked};
pub use registry::{Registrar, names, register_all};

use contract::{Event, EventType};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where a projector's read model lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// One JSON document per key in Redis.
    Redis,
    /// One document per key in MongoDB.
    Mongo,
    /// One fact row per event in ClickHouse.
    ClickHouse,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Mongo => "mongo",
            StoreKind::ClickHouse => "clickhouse",
        }
    }
}

/// A projector refused an event: it goes to the dead-letter topic with this reason, and its
/// stream is parked for this projector (later events held) so nothing applies out of order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{projector} rejected {event_type} #{sequence} of {stream}: {reason}")]
pub struct Rejection {
    pub projector: &'static str,
    pub event_type: String,
    pub stream: String,
    pub sequence: i64,
    pub reason: String,
}

/// A document projector: a pure fold of events into one typed view per key.
pub trait Projector: Send + Sync + 'static {
    /// The read model's shape: a public contract for agents (see README). Fields serialise
    /// in the order declared, and the stored document is `{view fields, _guard, _rev}`.
    type View: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static;

    /// Stable name, used by the CLI, metrics, parking and checkpoints.
    fn name(&self) -> &'static str;
    fn store(&self) -> StoreKind;
    /// The only event types the router sends here.
    fn handles(&self) -> &'static [EventType];
    /// The key of the view an event changes (`None`: the event names no view; rejected).
    fn view_key<'e>(&self, event: &'e Event) -> Option<&'e str>;
    /// Apply one event. On `Err` the view must be left as it was (check before you change).
    fn apply(&self, view: &mut Self::View, event: &Event) -> Result<(), String>;

    /// Fill the fields derived from the whole view, once before each write (not per event).
    fn seal(&self, _view: &mut Self::View) {}

    /// Whether `event` (just applied) is the last of its stream this view takes: the stream
    /// is then finished for the view, and every later event of it is skipped like a
    /// duplicate. A finished stream costs the view nothing more: its guard entry leaves the
    /// document (a store keeps it beside the document, in the same atomic write), so a view
    /// fed by many short streams (a customer's orders) stays small however long its history.
    fn finishes(&self, _event: &Event) -> bool {
        false
    }
}

/// The read models' contract version (README, "Read models"): 2 added Customer-360
/// `context`, `sentiment_trend` "neutral" before any score, the exact mean resolution time,
/// and timestamps always with six fraction digits (they sort as text); 3 keeps only open
/// orders in Customer-360's `_state` and finished streams beside the document, not in
/// `_guard`, so a document's size does not grow with its history.
pub const CONTRACT_VERSION: u32 = 3;

/// A fact projector: one row per event, appended (the store deduplicates by event id).
pub trait FactProjector: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn handles(&self) -> &'static [EventType];
    fn fact(&self, event: &Event) -> Result<analytics::Fact, String>;
}

/// What the engine needs to know of any projector without its types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorInfo {
    pub name: &'static str,
    pub store: StoreKind,
    pub handles: &'static [EventType],
}

impl ProjectorInfo {
    pub fn of<P: Projector>(p: &P) -> ProjectorInfo {
        ProjectorInfo {
            name: p.name(),
            store: p.store(),
            handles: p.handles(),
        }
    }

    pub fn of_facts<F: FactProjector>(f: &F) -> ProjectorInfo {
        ProjectorInfo {
            name: f.name(),
            store: StoreKind::ClickHouse,
            handles: f.handles(),
        }
    }

    pub fn handles(&self, t: Option<EventType>) -> bool {
        t.is_some_and(|t| self.handles.contains(&t))
    }
}
