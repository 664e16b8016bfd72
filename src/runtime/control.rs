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
use crate::store::StoreError;

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
}

/// The real world: pointers and parks in PostgreSQL, dead letters on their topic. A replay
/// (rebuild, bench) has no pointers and sends no letters.
pub struct PgControl {
    pub pointers: Option<Arc<Pointers>>,
    pub retirements: Option<Retirements>,
    pub parks: ParkStore,
    pub dlq: Option<Arc<DeadLetterQueue>>,
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
}
