//! What the read models must be: the pure fold of the log (`projectors::memory`), per
//! registered projector, and whether one event is durable in a store (for the commit check).

use std::collections::BTreeMap;

use contract::Event;
use projectors::memory::{MemoryFacts, MemoryViews};
use projectors::{Doc, FactProjector, Parked, Projector, Registrar, StoreKind, StreamKey};
use serde_json::Value;

use super::world::World;

/// A document as compared: its view and guard (the write token differs by design).
pub fn comparable(body: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.remove("_rev");
    }
    v
}

type FoldFn = Box<dyn Fn(&[Event]) -> Folded + Send + Sync>;
type DurableFn = Box<dyn Fn(&World, &Event) -> bool + Send + Sync>;

/// One projector's fold of a log.
pub struct Folded {
    /// key → (encoded document, comparable form).
    pub docs: BTreeMap<String, (Vec<u8>, Value)>,
    pub facts: BTreeMap<String, projectors::analytics::Fact>,
    pub parked: Parked,
}

pub struct Model {
    pub name: &'static str,
    /// "redis", "mongo" or "clickhouse".
    pub store: &'static str,
    pub fold: FoldFn,
    /// Whether an event this projector handles is durable in some version of its store.
    pub durable: DurableFn,
}

pub fn models() -> Vec<Model> {
    struct R(Vec<Model>);
    impl Registrar for R {
        fn document<P: Projector>(&mut self, p: P) {
            let p = std::sync::Arc::new(p);
            let store = match p.store() {
                StoreKind::Mongo => "mongo",
                _ => "redis",
            };
            let (pf, pd) = (p.clone(), p.clone());
            self.0.push(Model {
                name: p.name(),
                store,
                fold: Box::new(move |log| {
                    let m = MemoryViews::fold(pf.as_ref(), log);
                    let docs = m
                        .docs
                        .iter()
                        .map(|(k, d)| {
                            let body = serde_json::to_vec(d).unwrap_or_default();
                            let c = comparable(&body);
                            (k.clone(), (body, c))
                        })
                        .collect();
                    Folded {
                        docs,
                        facts: BTreeMap::new(),
                        parked: m.parked,
                    }
                }),
                durable: Box::new(move |w, e| {
                    if !e.event_type().is_some_and(|t| pd.handles().contains(&t)) {
                        return true;
                    }
                    let Some(key) = pd.view_key(e) else {
                        return true;
                    };
                    let stream = StreamKey::default().of(e).to_owned();
                    let seq = e.header.sequence_number;
                    w.docs.iter().any(|((s, _), docs)| {
                        *s == store
                            && docs.get(key).is_some_and(|(body, _)| {
                                serde_json::from_slice::<Doc<P::View>>(body).is_ok_and(|d| {
                                    d.guard.get(&stream).is_some_and(|last| *last >= seq)
                                })
                            })
                    })
                }),
            });
        }

        fn facts<F: FactProjector>(&mut self, f: F) {
            let f = std::sync::Arc::new(f);
            let (ff, fd) = (f.clone(), f.clone());
            self.0.push(Model {
                name: f.name(),
                store: "clickhouse",
                fold: Box::new(move |log| {
                    let m = MemoryFacts::fold(ff.as_ref(), log);
                    Folded {
                        docs: BTreeMap::new(),
                        facts: m.facts,
                        parked: m.parked,
                    }
                }),
                durable: Box::new(move |w, e| {
                    if !e.event_type().is_some_and(|t| fd.handles().contains(&t)) {
                        return true;
                    }
                    let id = e.header.event_id.to_string();
                    w.facts.values().any(|rows| rows.contains_key(&id))
                }),
            });
        }
    }
    let mut r = R(Vec::new());
    projectors::register_all(&mut r);
    r.0
}
