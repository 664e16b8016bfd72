//! The reference fold: every event of a log applied one at a time, in log order, with the
//! same guard and parking rules as the engine. The real stores are compared with it, and a
//! rebuild must give exactly the same documents.

use std::collections::BTreeMap;

use contract::Event;

use crate::analytics::Fact;
use crate::document::{Doc, Step, StreamKey, apply_caught, fact_caught};
use crate::parking::{ParkFrom, Parked};
use crate::{FactProjector, Projector, Rejection};

/// Documents of one projector by key.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryViews<V> {
    pub docs: BTreeMap<String, Doc<V>>,
    pub parked: Parked,
    pub rejected: Vec<Rejection>,
    /// Events held back because their stream was parked.
    pub held: usize,
    pub duplicates: usize,
}

impl<V> Default for MemoryViews<V> {
    fn default() -> Self {
        MemoryViews {
            docs: BTreeMap::new(),
            parked: Parked::default(),
            rejected: Vec::new(),
            held: 0,
            duplicates: 0,
        }
    }
}

impl<V: Default + Clone> MemoryViews<V> {
    /// Fold a whole log.
    pub fn fold<P: Projector<View = V>>(p: &P, events: &[Event]) -> Self {
        let mut m = MemoryViews::default();
        m.apply(p, events);
        m
    }

    /// Fold `events` in the order given, routing only the types the projector handles.
    pub fn apply<P: Projector<View = V>>(&mut self, p: &P, events: &[Event]) {
        let mut keys = StreamKey::default();
        for e in events {
            if !e.event_type().is_some_and(|t| p.handles().contains(&t)) {
                continue;
            }
            let seq = e.header.sequence_number;
            if self.parked.holding(keys.of(e), seq, None).is_some() {
                self.held += 1;
                continue;
            }
            let Some(key) = p.view_key(e) else {
                let r = Rejection {
                    projector: p.name(),
                    event_type: e.header.event_type.clone(),
                    stream: keys.of(e).to_owned(),
                    sequence: seq,
                    reason: "the event names no view".into(),
                };
                self.parked
                    .park(&r.stream, ParkFrom::Sequence(seq), &r.reason);
                self.rejected.push(r);
                continue;
            };
            let doc = self.docs.entry(key.to_owned()).or_default();
            // A projector that panics leaves the view as it was, like a refusal.
            let before = doc.clone();
            match apply_caught(p, doc, e, &mut keys) {
                Ok(Step::Applied) => {}
                Ok(Step::Duplicate) => self.duplicates += 1,
                Err(r) => {
                    *doc = before;
                    self.parked
                        .park(&r.stream, ParkFrom::Sequence(seq), &r.reason);
                    self.rejected.push(r);
                }
                Ok(Step::Rejected(r)) => {
                    self.parked
                        .park(&r.stream, ParkFrom::Sequence(seq), &r.reason);
                    self.rejected.push(r);
                }
            }
        }
        // A key whose only event was refused has no document.
        self.docs.retain(|_, d| !d.guard.is_empty());
        for d in self.docs.values_mut() {
            p.seal(&mut d.view);
        }
    }
}

/// Facts by event id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryFacts {
    pub facts: BTreeMap<String, Fact>,
    pub parked: Parked,
    pub rejected: Vec<Rejection>,
}

impl MemoryFacts {
    pub fn fold<F: FactProjector>(f: &F, events: &[Event]) -> Self {
        Self::fold_parked(f, events, Parked::default())
    }

    /// Fold a log with streams already parked (by unreadable messages, say).
    pub fn fold_parked<F: FactProjector>(f: &F, events: &[Event], parked: Parked) -> Self {
        let mut m = MemoryFacts {
            parked,
            ..MemoryFacts::default()
        };
        let mut keys = StreamKey::default();
        for e in events {
            if !e.event_type().is_some_and(|t| f.handles().contains(&t)) {
                continue;
            }
            let seq = e.header.sequence_number;
            if m.parked.holding(keys.of(e), seq, None).is_some() {
                continue;
            }
            match fact_caught(f, e) {
                Ok(fact) => {
                    m.facts.insert(fact.event_id.clone(), fact);
                }
                Err(reason) => {
                    let stream = keys.of(e).to_owned();
                    m.parked.park(&stream, ParkFrom::Sequence(seq), &reason);
                    m.rejected.push(Rejection {
                        projector: f.name(),
                        event_type: e.header.event_type.clone(),
                        stream,
                        sequence: seq,
                        reason,
                    });
                }
            }
        }
        m
    }
}
