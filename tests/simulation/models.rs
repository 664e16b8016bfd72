//! What the read models must be: the pure fold of the log (`projectors::memory`), per
//! registered projector, and whether one event is durable in a store (for the commit check).

use std::collections::{BTreeMap, BTreeSet};

use contract::Event;
use contract::EventType;
use projector::runtime::pipeline::Projectors;
use projectors::memory::{MemoryFacts, MemoryViews};
use projectors::{Doc, FactProjector, Parked, Projector, Registrar, StoreKind, StreamKey};
use serde_json::Value;

use super::world::World;

/// A document as compared: its view and guard (the write token differs by design).
pub fn comparable(body: &[u8]) -> Value {
    comparable_whole(body, None)
}

/// [`comparable`] of a document whole: the finished streams kept beside it back in its guard.
pub fn comparable_whole(body: &[u8], finished: Option<&BTreeSet<String>>) -> Value {
    let mut v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.remove("_rev");
        if let Some(finished) = finished.filter(|f| !f.is_empty()) {
            let guard = m
                .entry("_guard")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(g) = guard.as_object_mut() {
                for s in finished {
                    g.insert(s.clone(), projectors::document::FINISHED.into());
                }
            }
        }
    }
    v
}

/// The fold of a log, with streams parked before it begins (by unreadable messages).
type FoldFn = Box<dyn Fn(&[Event], &Parked) -> Folded + Send + Sync>;
pub type DurableFn = Box<dyn Fn(&World, &Event) -> bool + Send + Sync>;

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

/// What a panicking projector says (the simulation's panic hook keeps it quiet).
pub const INJECTED: &str = "sim: injected panic";

/// A registered projector that panics on some events (a pure function of the event id and
/// `salt`), after it has half-changed the view: the stages must catch it per event, dead
/// letter the event, park its stream and restore the view; the fold does the same.
pub struct Panicky<P> {
    inner: P,
    salt: Option<u64>,
}

impl<P> Panicky<P> {
    fn panics(&self, e: &Event) -> bool {
        self.salt
            .is_some_and(|s| (e.header.event_id.as_u128() as u64 ^ s).is_multiple_of(17))
    }
}

impl<P: Projector> Projector for Panicky<P> {
    type View = P::View;
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn store(&self) -> StoreKind {
        self.inner.store()
    }
    fn handles(&self) -> &'static [EventType] {
        self.inner.handles()
    }
    fn view_key<'e>(&self, event: &'e Event) -> Option<&'e str> {
        self.inner.view_key(event)
    }
    fn apply(&self, view: &mut Self::View, event: &Event) -> Result<(), String> {
        let r = self.inner.apply(view, event);
        if self.panics(event) {
            // After the view changed: a half-applied event.
            *view = Self::View::default();
            panic!("{INJECTED}");
        }
        r
    }
    fn seal(&self, view: &mut Self::View) {
        self.inner.seal(view)
    }
    fn finishes(&self, event: &Event) -> bool {
        self.inner.finishes(event)
    }
}

impl<F: FactProjector> FactProjector for Panicky<F> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn handles(&self) -> &'static [EventType] {
        self.inner.handles()
    }
    fn fact(&self, event: &Event) -> Result<projectors::analytics::Fact, String> {
        if self.panics(event) {
            panic!("{INJECTED}");
        }
        self.inner.fact(event)
    }
}

/// Every registered projector, each wrapped in [`Panicky`].
pub struct SimProjectors(pub Option<u64>);

impl Projectors for SimProjectors {
    fn register(&self, r: &mut impl Registrar) {
        struct Wrap<'a, R>(&'a mut R, Option<u64>);
        impl<R: Registrar> Registrar for Wrap<'_, R> {
            fn document<P: Projector>(&mut self, p: P) {
                self.0.document(Panicky {
                    inner: p,
                    salt: self.1,
                });
            }
            fn facts<F: FactProjector>(&mut self, f: F) {
                self.0.facts(Panicky {
                    inner: f,
                    salt: self.1,
                });
            }
        }
        projectors::register_all(&mut Wrap(r, self.0));
    }
}

/// The models of every projector, panicking where the stages' do (`panics`: the salt).
pub fn models(panics: Option<u64>) -> Vec<Model> {
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
                fold: Box::new(move |log, parked| {
                    let mut m = MemoryViews {
                        parked: parked.clone(),
                        ..MemoryViews::default()
                    };
                    m.apply(pf.as_ref(), log);
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
                    w.docs.iter().any(|((s, version), docs)| {
                        let beside = || {
                            w.finished
                                .get(&(s.clone(), version.clone()))
                                .and_then(|f| f.get(key))
                                .is_some_and(|f| f.contains(&stream))
                        };
                        *s == store
                            && docs.get(key).is_some_and(|(body, _)| {
                                beside()
                                    || serde_json::from_slice::<Doc<P::View>>(body).is_ok_and(|d| {
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
                fold: Box::new(move |log, parked| {
                    let m = MemoryFacts::fold_parked(ff.as_ref(), log, parked.clone());
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
    SimProjectors(panics).register(&mut r);
    r.0
}
