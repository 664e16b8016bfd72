//! What a stage asks of the world beside its store: the version pointers, the retired
//! versions, the parked streams and the dead-letter topic. One port, so the same stages run
//! against PostgreSQL and Kafka ([`PgControl`]) or against the deterministic simulation's
//! in-memory world (`tests/simulation`).

use std::sync::Arc;

use async_trait::async_trait;
use projectors::Parked;

use super::parking::{ParkRecord, ParkStore};
use super::targets::{Check, PointerError, Pointers, Retirements};
use crate::resilience::dead_letter::{DeadLetter, DeadLetterQueue};
use crate::sinks::SinkError;
use crate::source::sequence::GapSource;
use crate::store::streams::{StreamId, StreamRange};
use crate::store::{Pg, StoreError, Typed};

#[async_trait]
pub trait Control: Send + Sync + 'static {
    /// Which version `projection` writes now, or hold (a handover runs). `fresh`: read now,
    /// else a read younger than [`super::targets::MAX_AGE`] may stand in.
    async fn check(&self, projection: &str, fresh: bool) -> Result<Check, PointerError>;
    /// `Err(Version)` when `version` must never be written (retired, or an invalid name).
    async fn admit(&self, projection: &str, version: &str) -> Result<(), PointerError>;
    /// The parked streams of `projection` writing `version` (and those parked for all).
    async fn load_parks(&self, projection: &str, version: &str) -> Result<Parked, StoreError>;
    /// Record parks (an earlier sequence replaces a later one; anything else is kept).
    async fn save_parks(&self, records: &[ParkRecord]) -> Result<(), StoreError>;
    /// Send dead letters; durable when this returns.
    async fn send_letters(&self, letters: &[DeadLetter]) -> Result<(), SinkError>;
    /// Streams unparked lately, each with a mark of that release (see
    /// [`super::parking::ParkStore::released`]).
    async fn released(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// The stored events of `stream` (`aggregate_type/aggregate_id`) before `before`, in
    /// sequence order; a row that breaks the contract comes as its error.
    async fn history(&self, stream: &str, before: i64) -> Result<Vec<Typed>, StoreError>;
}

/// The real world: pointers and parks in PostgreSQL, dead letters on their topic. A replay
/// (rebuild, bench) has no pointers and sends no letters.
pub struct PgControl {
    pub pointers: Option<Arc<Pointers>>,
    pub retirements: Option<Retirements>,
    pub parks: ParkStore,
    pub dlq: Option<Arc<DeadLetterQueue>>,
    /// The event store, for a released stream's history.
    pub events: Arc<Pg>,
}

#[async_trait]
impl Control for PgControl {
    async fn check(&self, projection: &str, fresh: bool) -> Result<Check, PointerError> {
        match &self.pointers {
            Some(p) => p.check(projection, fresh).await,
            None => Err(StoreError::Unavailable("a replay has no version pointers".into()).into()),
        }
    }

    async fn admit(&self, projection: &str, version: &str) -> Result<(), PointerError> {
        match &self.retirements {
            Some(r) => r.admit(projection, version).await,
            None => Ok(()),
        }
    }

    async fn load_parks(&self, projection: &str, version: &str) -> Result<Parked, StoreError> {
        self.parks.load(projection, version).await
    }

    async fn save_parks(&self, records: &[ParkRecord]) -> Result<(), StoreError> {
        self.parks.save(records).await
    }

    async fn send_letters(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        match &self.dlq {
            Some(d) => d.send(letters).await,
            None => Ok(()),
        }
    }

    async fn released(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.parks.released().await
    }

    async fn history(&self, stream: &str, before: i64) -> Result<Vec<Typed>, StoreError> {
        match history_range(stream, before) {
            Some(range) => self.events.ranges(&[range]).await,
            None => Ok(Vec::new()),
        }
    }
}

/// The range of a stream key's sequences before `before` (`None`: not a stream key, or
/// nothing before).
fn history_range(stream: &str, before: i64) -> Option<StreamRange> {
    let s = StreamId::parse(stream).filter(|_| before > 0)?;
    Some(StreamRange {
        aggregate_type: s.aggregate_type,
        aggregate_id: s.aggregate_id,
        from: 0,
        to: before - 1,
    })
}
