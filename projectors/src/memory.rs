//! An in-memory store of documents: the reference fold the real stores are compared with,
//! and the null sink of the engine benchmark.

use std::collections::BTreeMap;

use contract::Event;

use crate::{Document, DynProjector, FoldOutcome, ViewError};

/// Documents of one projector by key, folded exactly as the engine folds them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemoryViews {
    pub docs: BTreeMap<String, Document>,
    pub rejected: usize,
    pub duplicates: usize,
}

impl MemoryViews {
    /// Fold `events` in the order given, routing only the types the projector handles.
    pub fn apply(&mut self, p: &dyn DynProjector, events: &[Event]) -> Result<(), ViewError> {
        for e in events {
            if !e.event_type().is_some_and(|t| p.handles().contains(&t)) {
                continue;
            }
            let key = p.view_key(e);
            let current = self.docs.get(&key).cloned();
            let FoldOutcome {
                document,
                duplicates,
                rejected,
            } = p.fold(current, &[e])?;
            self.duplicates += duplicates.len();
            self.rejected += rejected.len();
            if let Some(doc) = document {
                self.docs.insert(key, doc);
            }
        }
        Ok(())
    }
}
