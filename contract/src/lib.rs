//! The event contract of `DESIGN.md` §1: the envelope every event travels in, the typed
//! `event_data` of each event of the catalogue, and strict validation of both.
//!
//! Everything here is pure: no I/O. Decoding never panics; every class of bad input has its
//! own [`ContractError`] variant so the engine can dead-letter it with a precise reason.

pub mod aggregate;
pub mod catalogue;
pub mod envelope;
pub mod error;
pub mod headers;

pub use aggregate::AggregateType;
pub use catalogue::{EventData, EventType};
pub use envelope::{Event, EventEnvelope, EventHeader, MAX_EVENT_BYTES, Metadata};
pub use error::ContractError;
pub use headers::{
    HEADER_AGGREGATE_TYPE, HEADER_EVENT_TYPE, HEADER_SEQUENCE, HeaderFields, RequiredHeaders,
};
