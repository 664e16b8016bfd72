//! Projector plugins: pure functions of (current view, event) → new view. No I/O here: the
//! engine reads the current views, calls [`DynProjector::fold`], and writes the results.
//!
//! Adding a projector: one module implementing [`Projector`], one line in [`registry::all`].

pub mod analytics;
pub mod customer360;
mod document;
pub mod memory;
pub mod order_view;
pub mod registry;

pub use document::{Document, FoldOutcome, Guard, stream_key};
pub use registry::{all, by_name};

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

/// A projector refused an event: it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{projector} rejected {event_type} #{sequence} of {stream}: {reason}")]
pub struct Rejection {
    pub projector: &'static str,
    pub event_type: String,
    pub stream: String,
    pub sequence: i64,
    pub reason: String,
}

/// A projector: a pure fold of events into views.
pub trait Projector: Send + Sync + 'static {
    /// The read model's shape: a public contract for agents (see README).
    type View: Serialize + DeserializeOwned + Default + Send;

    /// Stable name, used by the CLI, metrics and checkpoints.
    fn name(&self) -> &'static str;
    fn store(&self) -> StoreKind;
    /// The only event types the router sends here.
    fn handles(&self) -> &'static [EventType];
    /// The key of the view an event changes.
    fn view_key(&self, event: &Event) -> String;
    /// Apply one event. On `Err` the view must be left as it was (check before you change).
    fn apply(&self, view: &mut Self::View, event: &Event) -> Result<(), String>;
}

/// The object-safe face of a [`Projector`], over JSON views, that the engine calls.
pub trait DynProjector: Send + Sync {
    fn name(&self) -> &'static str;
    fn store(&self) -> StoreKind;
    fn handles(&self) -> &'static [EventType];
    fn view_key(&self, event: &Event) -> String;
    /// Fold a key's events (in arrival order) into its stored document. Events the document's
    /// guard has already seen are skipped; rejected ones are returned and change nothing.
    fn fold(&self, current: Option<Document>, events: &[&Event]) -> Result<FoldOutcome, ViewError>;
}

/// A stored view that does not decode: a bug or a foreign write, never the event's fault.
#[derive(Debug, thiserror::Error)]
#[error("stored view of {projector} does not decode: {reason}")]
pub struct ViewError {
    pub projector: &'static str,
    pub reason: String,
}

impl<P: Projector> DynProjector for P {
    fn name(&self) -> &'static str {
        Projector::name(self)
    }
    fn store(&self) -> StoreKind {
        Projector::store(self)
    }
    fn handles(&self) -> &'static [EventType] {
        Projector::handles(self)
    }
    fn view_key(&self, event: &Event) -> String {
        Projector::view_key(self, event)
    }
    fn fold(&self, current: Option<Document>, events: &[&Event]) -> Result<FoldOutcome, ViewError> {
        document::fold(self, current, events)
    }
}
