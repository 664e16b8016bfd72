//! Store adapters. Document sinks (Redis, MongoDB) load the current documents of a batch and
//! write the new ones with a compare-and-set on the document revision, so the guard and the
//! data land in one atomic write and a concurrent writer is detected, never overwritten.
//! The fact sink (ClickHouse) appends rows deduplicated by event_id.

pub mod clickhouse;
pub mod memory;
pub mod mongo;
pub mod redis;

use std::collections::HashMap;

use projectors::Document;
use projectors::analytics::Fact;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("mongodb: {0}")]
    Mongo(#[from] ::mongodb::error::Error),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    #[error("stored document {key} does not decode: {reason}")]
    Corrupt { key: String, reason: String },
}

/// One document to write, if the stored revision is still `expected_rev` (0: absent).
#[derive(Debug, Clone)]
pub struct Write {
    pub key: String,
    pub expected_rev: i64,
    pub document: Document,
}

/// A store of one document per key.
pub trait DocumentSink: Send + Sync {
    fn name(&self) -> &'static str;
    /// The stored documents of `keys` (absent keys are missing from the map).
    fn load(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Document>, SinkError>> + Send;
    /// Write all; returns the keys whose revision had moved on (to reload and fold again).
    fn store(
        &self,
        writes: &[Write],
    ) -> impl Future<Output = Result<Vec<String>, SinkError>> + Send;
}

/// A store of one fact row per event.
pub trait FactSink: Send + Sync {
    fn insert(&self, facts: &[Fact]) -> impl Future<Output = Result<(), SinkError>> + Send;
}
