//! Fold: a routed batch onto its views, in arrival order, through the guards; then each
//! touched view sealed and encoded once. Refusals (by the projector, a panic, the store)
//! become dead letters and park their stream; a view a panic may have half-changed is folded
//! again from the store without the event that panicked.

use std::sync::atomic::Ordering;
// Tokio's clock: the simulation pauses and advances it.
use tokio::time::Instant;

use projectors::Projector;
use projectors::document::{Doc, Step, apply_caught, panic_message};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use tracing::{Instrument, Span};

use super::route::Routed;
use super::{DocStage, KeyWork, Outcome, Prepared, stored};
use crate::runtime::budget::{self, Step as Budget};
use crate::runtime::retry::Retry;
use crate::runtime::spans;
use crate::runtime::stage::{EventRef, StageCtx};
use crate::sinks::{DocStore, DocWrite, new_rev};

impl<P: Projector, S: DocStore> DocStage<P, S> {
    /// Load, fold and encode one routed batch (in its span).
    pub(super) async fn fold_batch(&mut self, routed: Routed) -> Prepared {
        let span = routed.batch.span.clone();
        let prep = self.fold_in_span(routed).instrument(span.clone()).await;
        span.record("shard", self.shard);
        span.record("version", StageCtx::version_of(&prep.target));
        span.record("events", prep.events);
        prep
    }

    async fn fold_in_span(&mut self, routed: Routed) -> Prepared {
        let started = Instant::now();
        let loading_before = self.loading;
        let prep = self.fold_routed(routed).await;
        // The load is a step of its own.
        let load = self.loading.saturating_sub(loading_before);
        budget::record(Budget::Fold, started.elapsed().saturating_sub(load));
        prep
    }

    /// Live: before the first event this stage takes of a stream unparked lately, the
    /// stream's stored history is spliced in (once per release). A worker reads the parks
    /// again only every `PARKS_REFRESH`, so until then it held what arrived of the stream
    /// after the unpark's replay had read the store; taking a later event over those would
    /// bury them (the guard would skip them as duplicates when the unpark replays them
    /// again). Spliced, they are applied first, and the guard skips what is applied already.
    async fn splice_released(&mut self, routed: Routed) -> Routed {
        // A replay reads no releases (`StageCtx::released`): always empty there.
        if self.st().releases.is_empty() {
            return routed;
        }
        // The first event of each released stream that no park holds, in arrival order.
        let mut firsts: Vec<(EventRef, String, i64)> = Vec::new();
        {
            let mut keys = projectors::document::StreamKey::default();
            let st = self.st();
            for (r, _) in &routed.events {
                let e = routed.batch.event(*r);
                let stream = keys.of(e);
                if !st.releases.contains_key(stream) || firsts.iter().any(|f| f.1 == stream) {
                    continue;
                }
                let seq = e.header.sequence_number;
                let position = routed.batch.item(*r).origin.position();
                if st.parked.holding(stream, seq, position).is_some() {
                    // Parked again: held as before; the release waits for its next event.
                    continue;
                }
                firsts.push((*r, stream.to_owned(), seq));
            }
        }
        if firsts.is_empty() {
            return routed;
        }
        let Routed { mut batch, .. } = routed;
        // From the last place back, so the places before stay where they are.
        firsts.sort_by_key(|(r, _, _)| std::cmp::Reverse(*r));
        for (r, stream, seq) in firsts {
            let history = self.ctx.history(&stream, seq).await;
            tracing::info!(projection = self.ctx.name, stream = %stream, before = seq,
                events = history.len(), "a released stream: its stored history goes first");
            let w = &batch.windows[r.0 as usize];
            batch.windows[r.0 as usize] = std::sync::Arc::new(
                crate::source::sequence::with_history_before(w, r.1 as usize, history),
            );
            let st = self.st();
            if let Some(mark) = st.releases.remove(&stream) {
                st.caught.insert((stream, mark));
            }
        }
        super::route::route(self.p.as_ref(), batch, self.shard, self.shards)
    }

    async fn fold_routed(&mut self, routed: Routed) -> Prepared {
        let target = self.ctx.target(false).await;
        let target = self.ensure(target).await;
        self.refresh().await;
        let routed = self.splice_released(routed).await;
        self.tick += 1;
        let tick = self.tick;
        for m in &routed.poison {
            // The poison stage records the park; hold the stream's later events meanwhile.
            self.st().parked.park(&m.stream, m.from, &m.reason);
            self.unsaved.poison(m.window, &m.stream, m.from, &m.reason);
        }
        let mut prep = Prepared::new(routed, target);

        // The views the cache lacks. Only a replay into a fresh version knows a view is
        // absent without asking. Live, even a stream's first event may find its view already
        // made by another stream's events (another partition, read earlier): always loaded.
        let mut to_load = Vec::new();
        {
            let st = self.st();
            let mut wanted: HashSet<&str> = HashSet::default();
            for (_, key) in &prep.routed.events {
                let Some(k) = key.as_deref() else { continue };
                if st.cache.contains_key(k) || wanted.contains(k) {
                    continue;
                }
                if st.seen.as_ref().is_some_and(|seen| !seen.contains(k)) {
                    st.cache.put(k.to_owned(), Doc::default(), tick);
                } else {
                    wanted.insert(k);
                    to_load.push(k.to_owned());
                }
            }
        }
        let corrupt = self.load_into_cache(to_load, &prep.routed.batch.span).await;
        self.load_finished(&prep, None).await;

        let mut tainted = Vec::new();
        for i in 0..prep.routed.events.len() {
            let (r, key) = prep.routed.events[i].clone();
            prep.events += 1;
            let e = prep.event(r);
            let seq = e.header.sequence_number;
            let position = prep.routed.batch.item(r).origin.position();
            let stream = self.keys.of(e).to_owned();
            if let Some(mark) = self.st().parked.holding(&stream, seq, position) {
                let reason = format!("stream {stream} is parked: {}", mark.reason);
                prep.letters.push((r, "parked", reason));
                continue;
            }
            let Some(key) = key else {
                let reason = "the event names no view".to_owned();
                self.park(&mut prep, r, &stream, seq, &reason);
                prep.letters.push((r, "rejected", reason));
                continue;
            };
            if let Some(why) = corrupt.get(&key) {
                self.park(&mut prep, r, &stream, seq, why);
                prep.letters.push((r, "corrupt_view", why.clone()));
                continue;
            }
            let ki = prep.view(&key, || {
                stored(self.st().cache.get(&key).map_or(0, |c| c.doc.rev))
            });
            if tainted.contains(&ki) {
                // The view may be half-changed by a panic: folded from the store below.
                prep.keys[ki].offered.push((r, Outcome::Deferred));
                continue;
            }
            let p = self.p.clone();
            let st = self.state.as_mut().unwrap_or_else(|| unreachable!());
            let entry = st.cache.touch(key, tick);
            let event = prep.routed.batch.event(r);
            match apply_caught(p.as_ref(), &mut entry.doc, event, &mut self.keys) {
                Ok(Step::Applied) => prep.keys[ki].offered.push((r, Outcome::Applied)),
                Ok(Step::Duplicate) => {
                    prep.duplicates += 1;
                    prep.keys[ki].offered.push((r, Outcome::Duplicate));
                }
                Ok(Step::Rejected(rej)) => {
                    prep.keys[ki].offered.push((r, Outcome::Rejected));
                    self.park(&mut prep, r, &rej.stream, rej.sequence, &rej.reason);
                    prep.keys[ki].rejected.push((r, rej));
                }
                Err(rej) => {
                    // The view may be half-changed: folded again from the store below.
                    self.panicked(&mut prep, ki, r, rej);
                    tainted.push(ki);
                }
            }
        }
        if !tainted.is_empty() {
            tainted.dedup();
            self.refold_from_store(&mut prep, tainted.clone()).await;
        }
        // Encode each touched view once.
        for ki in 0..prep.keys.len() {
            if !tainted.contains(&ki) {
                self.encode(&mut prep, ki);
            }
        }
        self.st().cache.evict(tick);
        prep
    }

    /// A projector panicked on an event: a dead letter, its stream parked from it; it is
    /// never folded again.
    fn panicked(
        &mut self,
        prep: &mut Prepared,
        ki: usize,
        r: EventRef,
        rej: projectors::Rejection,
    ) {
        tracing::error!(projection = self.ctx.name, stream = %rej.stream, sequence = rej.sequence,
            reason = %rej.reason, "the projector panicked: the event is a dead letter, its stream parked");
        metrics::counter!("projector_panics_total", "projector" => self.ctx.name).increment(1);
        self.park(prep, r, &rej.stream, rej.sequence, &rej.reason);
        prep.stopped.push((rej.stream.clone(), rej.sequence));
        prep.keys[ki].offered.push((r, Outcome::Panicked));
        prep.letters.push((r, "projector_panic", rej.reason));
    }

    /// Load views the cache lacks; returns the keys whose stored document does not decode.
    pub(super) async fn load_into_cache(
        &mut self,
        keys: Vec<String>,
        parent: &Span,
    ) -> HashMap<String, String> {
        let mut corrupt = HashMap::default();
        if keys.is_empty() {
            return corrupt;
        }
        let tick = self.tick;
        self.ctx
            .stats
            .loads
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let store = self.st().store.clone();
        let loaded = self
            .read_store(parent, keys.len(), "loading views", || {
                store.load::<P::View>(keys.clone())
            })
            .await;
        let st = self.st();
        for k in keys {
            st.cache.touch(k, tick);
        }
        for (k, doc) in loaded {
            match doc {
                Ok(doc) => st.cache.put(k, doc, tick),
                Err(why) => {
                    st.cache.remove(&k);
                    corrupt.insert(k, why);
                }
            }
        }
        corrupt
    }

    /// One read of the batch's views from the store (under `parent`'s span, retried while
    /// the store fails), timed as the budget's load step.
    async fn read_store<T, F, Fut>(
        &mut self,
        parent: &Span,
        n: usize,
        what: &'static str,
        call: F,
    ) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::sinks::SinkError>>,
    {
        let started = Instant::now();
        let mut retry = Retry::new(&self.ctx.shared, self.ctx.store, what);
        let out = loop {
            let span = self.store_span(parent, n, true);
            let r = call().instrument(span.clone()).await;
            spans::finished(&span, &r);
            match r {
                Ok(v) => break v,
                Err(e) => retry.failed(&e).await,
            }
        };
        let took = started.elapsed();
        self.loading += took;
        budget::record(Budget::Load, took);
        out
    }

    /// Bring back into the cached views the finished streams the store keeps apart, for the
    /// events whose stream a view's guard lacks (those of `views`, or of the whole batch):
    /// such a stream may be finished (its events then duplicates), and only the store knows.
    /// One call for the whole batch.
    pub(super) async fn load_finished(&mut self, prep: &Prepared, views: Option<&[usize]>) {
        let events: Vec<(EventRef, &str)> = match views {
            None => prep
                .routed
                .events
                .iter()
                .filter_map(|(r, k)| Some((*r, k.as_deref()?)))
                .collect(),
            Some(views) => views
                .iter()
                .flat_map(|ki| {
                    let k = &prep.keys[*ki];
                    k.offered.iter().map(|(r, _)| (*r, k.key.as_str()))
                })
                .collect(),
        };
        let mut asks: HashMap<String, Vec<String>> = HashMap::default();
        {
            let Some(st) = self.state.as_ref() else {
                return;
            };
            for (r, key) in events {
                let Some(entry) = st.cache.get(key) else {
                    continue;
                };
                let stream = self.keys.of(prep.event(r));
                // Most events' streams are in their view's guard: nothing to ask.
                if entry.doc.guard.contains_key(stream)
                    || !st.store.finished_apart(key)
                    // A view a fresh replay has not written yet has nothing beside it either.
                    || st.seen.as_ref().is_some_and(|seen| !seen.contains(key))
                {
                    continue;
                }
                let streams = asks.entry(key.to_owned()).or_default();
                if !streams.iter().any(|s| s == stream) {
                    streams.push(stream.to_owned());
                }
            }
        }
        if asks.is_empty() {
            return;
        }
        let asks: Vec<(String, Vec<String>)> = asks.into_iter().collect();
        let store = self.st().store.clone();
        let found = self
            .read_store(
                &prep.routed.batch.span,
                asks.len(),
                "loading finished streams",
                || store.finished(asks.clone()),
            )
            .await;
        let st = self.st();
        for (key, streams) in found {
            if let Some(entry) = st.cache.get_mut(&key) {
                for s in streams {
                    entry.doc.finish(s);
                }
            }
        }
    }

    /// Reload `views` from the store and fold their offered events again (after a conflict,
    /// or a panic that may have half-changed the cached view), until none panics.
    pub(super) async fn refold_from_store(&mut self, prep: &mut Prepared, mut views: Vec<usize>) {
        while !views.is_empty() {
            let keys: Vec<String> = views.iter().map(|i| prep.keys[*i].key.clone()).collect();
            for k in &keys {
                self.st().cache.remove(k);
            }
            let corrupt = self
                .load_into_cache(keys.clone(), &prep.routed.batch.span.clone())
                .await;
            self.load_finished(prep, Some(&views)).await;
            let mut again = Vec::new();
            for (ki, key) in views.iter().zip(&keys) {
                if let Some(why) = corrupt.get(key) {
                    let why = why.clone();
                    self.refuse(prep, *ki, &why);
                    continue;
                }
                let base = self
                    .st()
                    .cache
                    .remove(key)
                    .map_or_else(Doc::default, |e| e.doc);
                if !self.refold(prep, *ki, base) {
                    again.push(*ki);
                }
            }
            views = again;
        }
    }

    /// Fold the offered events of `prep.keys[ki]` again onto `base` and encode the result.
    /// `false` when an event panicked (now refused): the view must be reloaded and folded
    /// again without it.
    fn refold(&mut self, prep: &mut Prepared, ki: usize, base: Doc<P::View>) -> bool {
        let tick = self.tick;
        let p = self.p.clone();
        let mut doc = base;
        prep.keys[ki].expected = stored(doc.rev);
        let before: Vec<EventRef> = prep.keys[ki].rejected.iter().map(|(r, _)| *r).collect();
        prep.keys[ki].rejected.clear();
        let mut new_parks = Vec::new();
        let mut stopped_here: Vec<(String, i64)> = Vec::new();
        let mut panic = None;
        for i in 0..prep.keys[ki].offered.len() {
            let (r, outcome) = prep.keys[ki].offered[i];
            if matches!(outcome, Outcome::Panicked | Outcome::Held) {
                continue;
            }
            let event = prep.routed.batch.event(r);
            let stream = self.keys.of(event).to_owned();
            let seq = event.header.sequence_number;
            let stop = prep
                .stopped
                .iter()
                .chain(&stopped_here)
                .find(|(s, from)| *s == stream && seq > *from);
            if let Some((_, from)) = stop {
                // Its stream stopped at an earlier event of this batch that is refused now.
                let reason = format!("stream {stream} is parked from sequence {from}");
                prep.letters.push((r, "parked", reason));
                prep.keys[ki].offered[i].1 = Outcome::Held;
                continue;
            }
            let kw = &mut prep.keys[ki];
            kw.offered[i].1 = match apply_caught(p.as_ref(), &mut doc, event, &mut self.keys) {
                Ok(Step::Applied) => Outcome::Applied,
                Ok(Step::Duplicate) => Outcome::Duplicate,
                Ok(Step::Rejected(rej)) => {
                    if !before.contains(&r) {
                        tracing::warn!(rejection = %rej, "refused only when folded again");
                        stopped_here.push((rej.stream.clone(), rej.sequence));
                    }
                    new_parks.push((r, rej.stream.clone(), rej.sequence, rej.reason.clone()));
                    kw.rejected.push((r, rej));
                    Outcome::Rejected
                }
                Err(rej) => {
                    panic = Some((i, r, rej));
                    break;
                }
            };
        }
        for (r, stream, seq, reason) in new_parks {
            self.park(prep, r, &stream, seq, &reason);
        }
        if let Some((i, r, rej)) = panic {
            prep.keys[ki].offered.remove(i);
            self.panicked(prep, ki, r, rej);
            prep.keys[ki].write = None;
            return false;
        }
        let key = prep.keys[ki].key.clone();
        self.st().cache.put(key, doc, tick);
        self.encode(prep, ki);
        true
    }

    /// Give the view of `prep.keys[ki]` a fresh token and encode it (or refuse it).
    pub(super) fn encode(&mut self, prep: &mut Prepared, ki: usize) {
        prep.keys[ki].write = None;
        if prep.keys[ki].applied() == 0 {
            return;
        }
        let key = prep.keys[ki].key.clone();
        let p = self.p.clone();
        let st = self.st();
        let max = st.store.max_doc_bytes();
        let Some(entry) = st.cache.get_mut(&key) else {
            return;
        };
        let sealed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.seal(&mut entry.doc.view)));
        if let Err(payload) = sealed {
            let why = format!(
                "projector {} panicked sealing the view: {}",
                p.name(),
                panic_message(payload.as_ref())
            );
            self.refuse(prep, ki, &why);
            return;
        }
        entry.doc.rev = new_rev();
        // Finished streams leave the document (and the cache): written beside it.
        let finished = if st.store.finished_apart(&key) {
            entry.doc.take_finished()
        } else {
            Vec::new()
        };
        match st.store.encode(&entry.doc) {
            Ok(body) if body.len() <= max => {
                let rev = entry.doc.rev;
                st.cache.weigh(&key, body.len());
                prep.keys[ki].write = Some(DocWrite {
                    key,
                    expected: prep.keys[ki].expected,
                    rev,
                    body: body.into(),
                    finished,
                });
            }
            Ok(body) => {
                let why = format!("the view is {} bytes, over the store's {max}", body.len());
                self.refuse(prep, ki, &why);
            }
            Err(why) => self.refuse(prep, ki, &format!("the view does not encode: {why}")),
        }
    }

    /// The store can never take this view: its events of this batch become dead letters,
    /// their streams are parked, and the view is forgotten (reloaded when next needed).
    pub(super) fn refuse(&mut self, prep: &mut Prepared, ki: usize, why: &str) {
        let kw = &mut prep.keys[ki];
        kw.write = None;
        let key = kw.key.clone();
        let applied: Vec<EventRef> = kw
            .offered
            .iter()
            .filter(|(_, o)| *o == Outcome::Applied)
            .map(|(r, _)| *r)
            .collect();
        kw.offered.retain(|(_, o)| *o != Outcome::Applied);
        for r in applied {
            let e = prep.routed.batch.event(r);
            let (seq, stream) = (e.header.sequence_number, self.keys.of(e).to_owned());
            let reason = format!("{} refused view {key}: {why}", self.ctx.store);
            self.park(prep, r, &stream, seq, &reason);
            prep.letters.push((r, "store_refused", reason));
        }
        self.st().cache.remove(&key);
    }
}

impl KeyWork {
    pub(super) fn new(key: String, expected: Option<u64>) -> KeyWork {
        KeyWork {
            key,
            expected,
            offered: Vec::new(),
            rejected: Vec::new(),
            write: None,
        }
    }
}
