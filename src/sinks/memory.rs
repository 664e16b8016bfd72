//! In-memory sinks: the engine benchmark's null stores (same code path, no I/O).

use std::collections::HashMap;
use std::sync::Mutex;

use projectors::Document;
use projectors::analytics::Fact;

use super::{DocumentSink, FactSink, SinkError, Write};

#[derive(Default)]
pub struct MemoryDocs {
    docs: Mutex<HashMap<String, Document>>,
}

impl MemoryDocs {
    pub fn len(&self) -> usize {
        self.docs.lock().map(|d| d.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DocumentSink for MemoryDocs {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn load(&self, keys: &[String]) -> Result<HashMap<String, Document>, SinkError> {
        let docs = self.docs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(keys
            .iter()
            .filter_map(|k| docs.get(k).map(|d| (k.clone(), d.clone())))
            .collect())
    }

    async fn store(&self, writes: &[Write]) -> Result<Vec<String>, SinkError> {
        let mut docs = self.docs.lock().unwrap_or_else(|e| e.into_inner());
        let mut conflicts = Vec::new();
        for w in writes {
            let current = docs.get(&w.key).map_or(0, |d| d.rev);
            if current == w.expected_rev {
                docs.insert(w.key.clone(), w.document.clone());
            } else {
                conflicts.push(w.key.clone());
            }
        }
        Ok(conflicts)
    }
}

/// Counts the facts it is given and drops them.
#[derive(Default)]
pub struct NullFacts {
    pub count: std::sync::atomic::AtomicU64,
}

impl FactSink for NullFacts {
    async fn insert(&self, facts: &[Fact]) -> Result<(), SinkError> {
        self.count
            .fetch_add(facts.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
