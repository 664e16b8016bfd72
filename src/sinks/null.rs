//! Null stores: the engine benchmark's sinks (the whole pipeline, no I/O). Documents are
//! still encoded, so the benchmark pays for serialisation as the real stores do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use projectors::Doc;
use projectors::analytics::Fact;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DocStore, DocWrite, FactStore, Loaded, SinkError, WriteOutcome};

/// Accepts every write; never holds anything.
#[derive(Clone, Default)]
pub struct NullDocs {
    pub written: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl DocStore for NullDocs {
    fn name(&self) -> &'static str {
        "null"
    }

    fn max_doc_bytes(&self) -> usize {
        usize::MAX
    }

    fn encode<V: Serialize>(&self, doc: &Doc<V>) -> Result<Vec<u8>, String> {
        serde_json::to_vec(doc).map_err(|e| e.to_string())
    }

    /// Like Redis, so the benchmark encodes documents without their finished streams.
    fn finished_apart(&self, _key: &str) -> bool {
        true
    }

    async fn load<V: DeserializeOwned + Send + 'static>(
        &self,
        _keys: Vec<String>,
    ) -> Result<Vec<(String, Loaded<V>)>, SinkError> {
        Ok(Vec::new())
    }

    async fn write(&self, writes: &[DocWrite]) -> Result<WriteOutcome, SinkError> {
        self.written
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(
            writes.iter().map(|w| w.body.len() as u64).sum(),
            Ordering::Relaxed,
        );
        Ok(WriteOutcome::default())
    }
}

/// Counts the facts it is given and drops them.
#[derive(Clone, Default)]
pub struct NullFacts {
    pub count: Arc<AtomicU64>,
}

impl FactStore for NullFacts {
    fn name(&self) -> &'static str {
        "null"
    }

    async fn insert(&self, facts: &[Fact]) -> Result<(), SinkError> {
        self.count.fetch_add(facts.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
