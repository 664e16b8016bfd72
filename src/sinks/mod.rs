//! Store writers: each store's connection, write shape, timeouts and error classification
//! live in its own module. Document stores (Redis, MongoDB) write a batch of whole documents
//! with a compare-and-set on each document's write token, so the guard and the data land in
//! one atomic write and a concurrent writer is detected, never overwritten. The fact store
//! (ClickHouse) appends rows deduplicated by event_id.
//!
//! Errors are classified here, once: [`SinkError::Transient`] (the store is down, slow or
//! restarting: retry the same writes later) and [`SinkError::Permanent`] (retrying can never
//! help). A write one document cannot take (too large, refused by the server) is reported
//! per document in [`WriteOutcome::refused`], so the rest of the batch goes on.

pub mod clickhouse;
pub mod mongo;
pub mod null;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use projectors::Doc;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Retry later: a connection refused or reset, a timeout, a server restarting.
    #[error("{store} unavailable: {reason}")]
    Transient { store: &'static str, reason: String },
    /// Retrying the same request can never succeed (bad configuration, a schema clash).
    #[error("{store} refused the request: {reason}")]
    Permanent { store: &'static str, reason: String },
}

impl SinkError {
    pub fn transient(store: &'static str, reason: impl ToString) -> SinkError {
        SinkError::Transient {
            store,
            reason: reason.to_string(),
        }
    }

    pub fn permanent(store: &'static str, reason: impl ToString) -> SinkError {
        SinkError::Permanent {
            store,
            reason: reason.to_string(),
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient { .. })
    }

    pub fn store(&self) -> &'static str {
        match self {
            SinkError::Transient { store, .. } | SinkError::Permanent { store, .. } => store,
        }
    }
}

/// Run a store call under a deadline: a hung server (SIGSTOP, a full disk) becomes a
/// transient error instead of a stuck worker.
pub async fn with_timeout<T>(
    store: &'static str,
    limit: Duration,
    f: impl Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(SinkError::transient(
            store,
            format!("no answer within {} ms", limit.as_millis()),
        )),
    }
}

/// One document to write. `expected` is the write token the store must still hold (`None`:
/// the document must not exist yet); `rev` is the token this write leaves.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub key: String,
    pub expected: Option<u64>,
    pub rev: u64,
    /// The encoded document (JSON for Redis, BSON for MongoDB), guard and token included.
    /// Shared, not copied, when the batch hands its writes to the task that sends them.
    pub body: bytes::Bytes,
    /// Streams finished for the view, kept beside the document in the same atomic write
    /// (only for a key the store keeps them apart for: [`DocStore::finished_apart`]).
    pub finished: Vec<String>,
}

/// What a batch of document writes did, by index into the batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteOutcome {
    /// The stored token had moved on (another writer): reload, fold again, write again.
    pub conflicts: Vec<usize>,
    /// The store refused this one document for good (with why).
    pub refused: Vec<(usize, String)>,
}

/// Split items of `sizes` into runs of at most `max` items and `max_bytes` bytes, in order
/// (an item larger than `max_bytes` alone), one command each.
pub(crate) fn runs(sizes: &[usize], max: usize, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, s) in sizes.iter().enumerate() {
        if i > start && (i - start >= max || bytes + s > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += s;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// A stored document, or why it could not be read.
pub type Loaded<V> = Result<Doc<V>, String>;

/// A store of one document per key.
pub trait DocStore: Clone + Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Where in the store the documents live (key prefix, collection), for traces.
    fn location(&self) -> &str {
        ""
    }
    /// The largest encoded document the store takes.
    fn max_doc_bytes(&self) -> usize;
    /// Encode one document as the store keeps it.
    fn encode<V: Serialize>(&self, doc: &Doc<V>) -> Result<Vec<u8>, String>;
    /// The stored documents of `keys` (absent keys are missing from the result).
    fn load<V: DeserializeOwned + Send + 'static>(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<(String, Loaded<V>)>, SinkError>> + Send;
    /// Write all, each under its compare-and-set; durable when this returns.
    fn write(
        &self,
        writes: &[DocWrite],
    ) -> impl Future<Output = Result<WriteOutcome, SinkError>> + Send;
    /// Whether the store keeps the finished streams of `key`'s view beside the document
    /// (otherwise they stay in its guard). A document fed by many streams that end (a
    /// customer's orders) then stays small however long its history.
    fn finished_apart(&self, _key: &str) -> bool {
        false
    }
    /// Of each `(key, streams)`, the streams kept beside the document as finished.
    fn finished(
        &self,
        _asks: Vec<(String, Vec<String>)>,
    ) -> impl Future<Output = Result<Vec<(String, Vec<String>)>, SinkError>> + Send {
        async { Ok(Vec::new()) }
    }
    /// Tell readers of the store itself that `version` is the one live workers write (a
    /// store whose readers resolve versions elsewhere does nothing).
    fn announce(&self, _version: &str) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }
}

/// A store of one fact row per event.
pub trait FactStore: Clone + Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Where in the store the rows land (table), for traces.
    fn location(&self) -> &str {
        ""
    }
    /// Insert all; a retried insert of the same rows is deduplicated.
    fn insert(
        &self,
        facts: &[projectors::analytics::Fact],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// A fresh write token (see [`projectors::Doc`]): random, never 0 (0 means "absent").
pub fn new_rev() -> u64 {
    use rand::Rng;
    rand::rng().random_range(1..(1u64 << projectors::document::REV_BITS))
}
