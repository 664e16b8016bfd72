//! The event store as the sequencer reads it: stored events by stream and sequence range (to
//! fill gaps) and the event id at a place (to tell a duplicate from a foreign message).
//! PostgreSQL in a worker; [`MemoryEvents`] in the unit tests and the simulation.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use contract::Event;
use uuid::Uuid;

use crate::store::streams::{StreamRange, StreamSeq, event_ids_at, read_ranges};
use crate::store::{Pg, StoreError, Typed};

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

/// An event store in memory: the events it holds (in any order), a switch that makes every
/// read a refusal, and how many range reads it answered or refused.
#[derive(Default)]
pub struct MemoryEvents {
    events: Mutex<Vec<Event>>,
    fail: AtomicBool,
    asked: AtomicU32,
}

impl MemoryEvents {
    pub fn new(events: Vec<Event>) -> MemoryEvents {
        MemoryEvents {
            events: Mutex::new(events),
            ..MemoryEvents::default()
        }
    }

    /// Refuse every read from now on (`true`), or answer again.
    pub fn fail(&self, refuse: bool) {
        self.fail.store(refuse, Ordering::Relaxed);
    }

    /// Range reads asked so far.
    pub fn asked(&self) -> u32 {
        self.asked.load(Ordering::Relaxed)
    }

    fn refused(&self) -> Result<(), StoreError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::ConcurrentAppend("refused".into()));
        }
        Ok(())
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl GapSource for MemoryEvents {
    async fn ranges(&self, ranges: &[StreamRange]) -> Result<Vec<Typed>, StoreError> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        self.refused()?;
        Ok(self
            .events()
            .iter()
            .filter(|e| {
                let h = &e.header;
                ranges.iter().any(|r| {
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
        self.refused()?;
        let events = self.events();
        Ok(at
            .iter()
            .filter_map(|k| {
                events
                    .iter()
                    .find(|e| {
                        e.header.aggregate_type == k.aggregate_type
                            && e.header.aggregate_id == k.aggregate_id
                            && e.header.sequence_number == k.sequence
                    })
                    .map(|e| (k.clone(), e.header.event_id))
            })
            .collect())
    }
}
