//! The document stage: one per document projector (and shard). Batches of windows in,
//! durable compare-and-set writes out, one acknowledgement per window.
//!
//! Per batch: route the events this projector handles (and this shard owns), hold those of
//! parked streams, load the views the cache lacks, fold every event into its typed view in arrival order, encode each touched view
//! once, and write them all while the next batch is folded. A view whose write token moved
//! on (another worker) is reloaded, folded again and written again. A view is only ever
//! folded onto its settled state: a batch that touches a view the batch in flight writes
//! waits until that write has settled. Only then are its dead letters sent, its parks
//! recorded, the pointers checked, and its windows acknowledged.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
// Tokio's clock: the simulation pauses and advances it.
use tokio::time::Instant;

use projectors::document::{Doc, Step, StreamKey, apply_event};
use projectors::parking::ParkFrom;
use projectors::{Parked, Projector, Rejection};
use tokio::sync::mpsc;
use tracing::{Instrument, Span};

use super::parking::ParkRecord;
use super::retry::Retry;
use super::spans;
use super::stage::{Batch, EventRef, Mode, StageCtx};
use super::targets::Target;
use crate::resilience::dead_letter::DeadLetter;
use crate::sinks::{DocStore, DocWrite, SinkError, WriteOutcome, new_rev};

/// Opens the store of a read-model version.
pub type OpenStore<S> = super::stage::OpenFn<S>;

/// Rounds of reload-fold-write for contended views before the batch backs off a little.
const CAS_ROUNDS: usize = 10;

/// Rounds after which a view still contended is refused (its streams parked with the
/// reason): about 9 s of backing off, far past a rebalance overlap, so only a writer that
/// never stops (a second deployment writing the same version) gets there.
pub const CAS_LIMIT: usize = 300;

/// How often parked streams are read again (an operator may have unparked one).
pub const PARKS_REFRESH: Duration = Duration::from_secs(10);

/// The shard of a view key.
pub fn shard_of(key: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut h = rustc_hash::FxHasher::default();
    key.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

/// The token a store holds for a cached document (`None`: absent).
fn stored(rev: u64) -> Option<u64> {
    (rev != 0).then_some(rev)
}

struct Entry<V> {
    doc: Doc<V>,
    used: u64,
}

/// Typed views by key, bounded: the least recently used quarter goes when it is full.
struct Cache<V> {
    map: HashMap<String, Entry<V>>,
    cap: usize,
}

impl<V: Default> Cache<V> {
    fn evict(&mut self, now: u64) {
        if self.map.len() <= self.cap {
            return;
        }
        let mut used: Vec<u64> = self.map.values().map(|e| e.used).collect();
        let cut = used.len() / 4;
        let (_, threshold, _) = used.select_nth_unstable(cut);
        // Never what the batch in flight or the one being folded touches.
        let threshold = (*threshold).min(now.saturating_sub(2));
        self.map.retain(|_, e| e.used > threshold);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Applied,
    Duplicate,
    Rejected,
}

/// What a batch does to one view.
struct KeyWork {
    key: String,
    /// The token the store held when this batch began on the view.
    expected: Option<u64>,
    /// Events folded into the view (not held), in arrival order, and what each did.
    offered: Vec<(EventRef, Outcome)>,
    rejected: Vec<(EventRef, Rejection)>,
    write: Option<DocWrite>,
}

impl KeyWork {
    fn applied(&self) -> usize {
        self.offered
            .iter()
            .filter(|(_, o)| *o == Outcome::Applied)
            .count()
    }
}

/// A folded batch, ready to write.
struct Prepared {
    batch: Batch,
    target: Target,
    keys: Vec<KeyWork>,
    index: HashMap<String, usize>,
    /// Dead letters decided while folding (held, key-less, refused, corrupt view).
    letters: Vec<(EventRef, &'static str, String)>,
    parks: Vec<ParkRecord>,
    events: usize,
    duplicates: usize,
    /// Views written so far.
    written: u64,
    /// When its writes were sent.
    started: Instant,
}

impl Prepared {
    fn take_writes(&mut self) -> (Vec<DocWrite>, Vec<usize>) {
        let mut writes = Vec::new();
        let mut order = Vec::new();
        for (i, k) in self.keys.iter_mut().enumerate() {
            if let Some(w) = k.write.take() {
                writes.push(w);
                order.push(i);
            }
        }
        (writes, order)
    }

    fn put_back(&mut self, writes: Vec<DocWrite>, order: &[usize]) {
        for (w, i) in writes.into_iter().zip(order) {
            self.keys[*i].write = Some(w);
        }
    }
}

struct TargetState<V, S> {
    target: Target,
    store: S,
    cache: Cache<V>,
    parked: Parked,
    /// A replay into a fresh version: every key written so far (an unseen key is absent).
    seen: Option<HashSet<String>>,
    parks_loaded: Instant,
}

type Written = (Vec<DocWrite>, Result<WriteOutcome, SinkError>);

/// A write task's result; a task that died is a transient failure (its writes are retried).
fn joined(r: Result<Written, tokio::task::JoinError>, store: &'static str) -> Written {
    r.unwrap_or_else(|e| (Vec::new(), Err(SinkError::transient(store, e))))
}

struct InFlight {
    prepared: Prepared,
    order: Vec<usize>,
    task: tokio::task::JoinHandle<Written>,
}

pub struct DocStage<P: Projector, S: DocStore> {
    p: Arc<P>,
    ctx: StageCtx,
    shard: usize,
    shards: usize,
    open: OpenStore<S>,
    cache_cap: usize,
    state: Option<TargetState<P::View, S>>,
    seen_gen: u64,
    tick: u64,
    keys: StreamKey,
    /// Parks of batches folded but not finished yet: kept across a reload of the table.
    pending_parks: Vec<ParkRecord>,
    /// Parks of unreadable messages (the poison stage records them): kept across reloads
    /// for a while, in case this stage reloads before that stage's record lands.
    /// (window id, stream, from, reason): kept until the poison stage has recorded that
    /// window's parks (see [`super::Shared::poison_saved`]).
    poison_parks: Vec<(u64, String, ParkFrom, String)>,
}

impl<P: Projector, S: DocStore> DocStage<P, S> {
    pub fn new(
        p: Arc<P>,
        ctx: StageCtx,
        shard: usize,
        shards: usize,
        open: OpenStore<S>,
        cache_cap: usize,
    ) -> Self {
        DocStage {
            p,
            ctx,
            shard,
            shards,
            open,
            cache_cap: cache_cap.max(1),
            state: None,
            seen_gen: 0,
            tick: 0,
            keys: StreamKey::default(),
            pending_parks: Vec::new(),
            poison_parks: Vec::new(),
        }
    }

    /// Run until the input closes; every batch taken is written and acknowledged. A batch is
    /// folded while the one before is being written; when nothing new arrives, the batch in
    /// flight is finished (acknowledged) at once.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Arc<super::Window>>) {
        let mut inflight: Option<InFlight> = None;
        loop {
            let first = match inflight.as_mut() {
                None => rx.recv().await,
                Some(f) => tokio::select! {
                    // In a fixed order, so a seeded simulation replays exactly.
                    biased;
                    w = rx.recv() => w,
                    r = &mut f.task => {
                        let done = inflight.take().map(|f| (f.prepared, f.order));
                        if let Some((prepared, order)) = done {
                            self.finish_opt(prepared, order, joined(r, self.ctx.store)).await;
                        }
                        continue;
                    }
                },
            };
            let Some(first) = first else { break };
            let batch = self.ctx.coalesce(first, &mut rx);
            if inflight
                .as_ref()
                .is_some_and(|f| self.overlaps(&batch, &f.prepared))
                && let Some(f) = inflight.take()
            {
                // A view is folded only onto its settled state: a batch that touches a view
                // the batch in flight writes waits for that write to settle (conflicts
                // resolved, refusals known) before it is folded.
                let r = joined(f.task.await, self.ctx.store);
                self.finish_opt(f.prepared, f.order, r).await;
            }
            let mut next = self.prepare(batch).await;
            if let Some(f) = inflight.take() {
                let r = joined(f.task.await, self.ctx.store);
                self.finish_opt(f.prepared, f.order, r).await;
                if Some(&next.target) != self.state.as_ref().map(|s| &s.target) {
                    // The batch in flight moved to another version: fold this one there too.
                    next = self.prepare(next.batch).await;
                }
            }
            // Folding may have waited (a slow load, the batch in flight settling): the version
            // it was folded for may have been switched and retired meanwhile.
            while self.ctx.mode == Mode::Live && self.ctx.target(false).await != next.target {
                next = self.prepare(next.batch).await;
            }
            inflight = Some(self.start(next));
        }
        if let Some(f) = inflight.take() {
            let r = joined(f.task.await, self.ctx.store);
            self.finish_opt(f.prepared, f.order, r).await;
        }
    }

    /// Whether `batch` has an event for a view that `inflight` writes (this shard's views).
    fn overlaps(&mut self, batch: &Batch, inflight: &Prepared) -> bool {
        if inflight.index.is_empty() {
            return false;
        }
        let p = &self.p;
        batch.windows.iter().any(|w| {
            w.items.iter().any(|it| {
                it.decoded.as_ref().is_ok_and(|e| {
                    e.event_type().is_some_and(|t| p.handles().contains(&t))
                        && p.view_key(e).is_some_and(|k| {
                            shard_of(k, self.shards) == self.shard && inflight.index.contains_key(k)
                        })
                })
            })
        })
    }

    fn st(&mut self) -> &mut TargetState<P::View, S> {
        self.state
            .as_mut()
            .unwrap_or_else(|| unreachable!("a target is set before any batch is folded"))
    }

    /// Make `target` current: open its store (never a retired version's: then the one the
    /// pointers name now), read its parks, start an empty cache. Returns the target made
    /// current.
    async fn ensure(&mut self, target: Target) -> Target {
        if self.state.as_ref().is_some_and(|s| s.target == target) {
            return target;
        }
        let (target, store) = self.ctx.open(target, &self.open).await;
        if self.state.as_ref().is_some_and(|s| s.target == target) {
            return target;
        }
        let target = &target;
        if self.state.is_some() {
            tracing::info!(projection = self.ctx.name, version = %target.version, epoch = target.epoch,
                "writing another version of the read model");
        }
        if matches!(self.ctx.mode, Mode::Live) && self.shard == 0 {
            // Best effort: readers that resolve versions through PostgreSQL are unaffected,
            // and every live worker announces again whenever it opens a version.
            if let Err(e) = store.announce(&target.version).await {
                tracing::warn!(error = %e, version = %target.version, "the live version was not announced in the store");
            }
        }
        self.pending_parks.retain(|r| r.version == target.version);
        let saved = self.ctx.shared.poison_saved.load(Ordering::Acquire);
        let mut parked = self.ctx.load_parks(&target.version).await;
        self.merge_unsaved(&mut parked, saved);
        let seen = matches!(self.ctx.mode, Mode::Replay { fresh: true, .. }).then(HashSet::default);
        self.state = Some(TargetState {
            target: target.clone(),
            store,
            cache: Cache {
                map: HashMap::default(),
                cap: self.cache_cap,
            },
            parked,
            seen,
            parks_loaded: Instant::now(),
        });
        self.seen_gen = self.ctx.shared.assignment_gen.load(Ordering::Relaxed);
        target.clone()
    }

    /// After a rebalance (or now and then): drop cached views (other workers may have
    /// written them) and read the parked streams again.
    async fn refresh(&mut self) {
        let generation = self.ctx.shared.assignment_gen.load(Ordering::Relaxed);
        let live = matches!(self.ctx.mode, Mode::Live);
        let rebalanced = live && generation != self.seen_gen;
        let stale_parks = self.st().parks_loaded.elapsed() >= PARKS_REFRESH;
        if !(rebalanced || (live && stale_parks)) {
            return;
        }
        self.seen_gen = generation;
        let version = self.st().target.version.clone();
        // Read before the table: whatever the poison stage recorded up to here is in it.
        let saved = self.ctx.shared.poison_saved.load(Ordering::Acquire);
        let mut parked = self.ctx.load_parks(&version).await;
        self.merge_unsaved(&mut parked, saved);
        let st = self.st();
        st.parked = parked;
        st.parks_loaded = Instant::now();
        if rebalanced {
            st.cache.map.clear();
        }
    }

    /// Parks made here (or seen in poison) that the table may not have yet: the table was
    /// read after the poison stage had recorded every window up to `poison_saved`.
    fn merge_unsaved(&mut self, parked: &mut Parked, poison_saved: u64) {
        for r in &self.pending_parks {
            parked.park(&r.stream, r.from, &r.reason);
        }
        self.poison_parks.retain(|(id, ..)| *id > poison_saved);
        for (_, stream, from, reason) in &self.poison_parks {
            parked.park(stream, *from, reason);
        }
    }

    fn park(&mut self, stream: &str, seq: i64, reason: &str) -> Option<ParkRecord> {
        let version = self.st().target.version.clone();
        if !self
            .st()
            .parked
            .park(stream, ParkFrom::Sequence(seq), reason)
        {
            return None;
        }
        let r = ParkRecord {
            projection: self.ctx.name.to_owned(),
            version,
            stream: stream.to_owned(),
            from: ParkFrom::Sequence(seq),
            reason: reason.to_owned(),
        };
        self.pending_parks.push(r.clone());
        Some(r)
    }

    /// Route, load, fold and encode one batch (in its span).
    async fn prepare(&mut self, batch: Batch) -> Prepared {
        let span = batch.span.clone();
        let prep = self.prepare_in_span(batch).instrument(span.clone()).await;
        span.record("shard", self.shard);
        span.record("version", StageCtx::version_of(&prep.target));
        span.record("events", prep.events);
        prep
    }

    async fn prepare_in_span(&mut self, batch: Batch) -> Prepared {
        let target = self.ctx.target(false).await;
        let target = self.ensure(target).await;
        self.refresh().await;
        self.tick += 1;
        let tick = self.tick;
        let mut prep = Prepared {
            batch,
            target,
            keys: Vec::new(),
            index: HashMap::default(),
            letters: Vec::new(),
            parks: Vec::new(),
            events: 0,
            duplicates: 0,
            written: 0,
            started: Instant::now(),
        };

        // Route: this projector's events of this shard, and which views to load.
        let p = self.p.clone();
        let mut routed: Vec<(EventRef, Option<String>)> = Vec::new();
        let mut to_load: Vec<String> = Vec::new();
        {
            let st = self.state.as_mut().unwrap_or_else(|| unreachable!());
            let mut wanted: HashSet<&str> = HashSet::default();
            for (wi, w) in prep.batch.windows.iter().enumerate() {
                for (ii, item) in w.items.iter().enumerate() {
                    let e = match &item.decoded {
                        Err(poison) => {
                            // Unreadable messages park their stream for every projector (the
                            // poison stage records it); this stage holds later events too.
                            if let Some(stream) = &poison.stream {
                                let from = poison.park_from(&item.origin);
                                if let Some(from) = from {
                                    let why = poison.error.to_string();
                                    st.parked.park(stream, from, &why);
                                    self.poison_parks.push((w.id, stream.clone(), from, why));
                                }
                            }
                            continue;
                        }
                        Ok(e) => e,
                    };
                    if !e.event_type().is_some_and(|t| p.handles().contains(&t)) {
                        continue;
                    }
                    let r = (wi as u32, ii as u32);
                    match p.view_key(e) {
                        None => {
                            if self.shard == 0 {
                                routed.push((r, None));
                            }
                        }
                        Some(k) => {
                            if shard_of(k, self.shards) != self.shard {
                                continue;
                            }
                            if !st.cache.map.contains_key(k) && !wanted.contains(k) {
                                // Only a replay into a fresh version knows a view is absent
                                // without asking. Live, even a stream's first event may find
                                // its view already made by another stream's events (another
                                // partition, read earlier), so the view is always loaded.
                                let absent = st.seen.as_ref().is_some_and(|seen| !seen.contains(k));
                                if absent {
                                    st.cache.map.insert(
                                        k.to_owned(),
                                        Entry {
                                            doc: Doc::default(),
                                            used: tick,
                                        },
                                    );
                                } else {
                                    wanted.insert(k);
                                    to_load.push(k.to_owned());
                                }
                            }
                            routed.push((r, Some(k.to_owned())));
                        }
                    }
                }
            }
        }
        let corrupt = self.load_into_cache(to_load, tick, &prep.batch.span).await;

        // Fold, in arrival order.
        for (r, key) in routed {
            prep.events += 1;
            let e = prep.batch.event(r);
            let seq = e.header.sequence_number;
            let position = prep.batch.item(r).origin.position();
            let stream = self.keys.of(e).to_owned();
            if let Some(mark) = self.st().parked.holding(&stream, seq, position) {
                let reason = format!("stream {stream} is parked: {}", mark.reason);
                prep.letters.push((r, "parked", reason));
                continue;
            }
            let Some(key) = key else {
                let reason = "the event names no view".to_owned();
                prep.parks.extend(self.park(&stream, seq, &reason));
                prep.letters.push((r, "rejected", reason));
                continue;
            };
            if let Some(why) = corrupt.get(&key) {
                prep.parks.extend(self.park(&stream, seq, why));
                prep.letters.push((r, "corrupt_view", why.clone()));
                continue;
            }
            let ki = match prep.index.get(&key) {
                Some(i) => *i,
                None => {
                    let rev = self.st().cache.map.get(&key).map_or(0, |c| c.doc.rev);
                    prep.keys.push(KeyWork {
                        key: key.clone(),
                        expected: stored(rev),
                        offered: Vec::new(),
                        rejected: Vec::new(),
                        write: None,
                    });
                    prep.index.insert(key.clone(), prep.keys.len() - 1);
                    prep.keys.len() - 1
                }
            };
            let st = self.state.as_mut().unwrap_or_else(|| unreachable!());
            let entry = st.cache.map.entry(key).or_insert_with(|| Entry {
                doc: Doc::default(),
                used: tick,
            });
            entry.used = tick;
            match apply_event(
                p.as_ref(),
                &mut entry.doc,
                prep.batch.event(r),
                &mut self.keys,
            ) {
                Step::Applied => prep.keys[ki].offered.push((r, Outcome::Applied)),
                Step::Duplicate => {
                    prep.duplicates += 1;
                    prep.keys[ki].offered.push((r, Outcome::Duplicate));
                }
                Step::Rejected(rej) => {
                    prep.keys[ki].offered.push((r, Outcome::Rejected));
                    prep.parks
                        .extend(self.park(&rej.stream, rej.sequence, &rej.reason));
                    prep.keys[ki].rejected.push((r, rej));
                }
            }
        }

        // Encode each touched view once.
        for ki in 0..prep.keys.len() {
            self.encode(&mut prep, ki);
        }
        self.st().cache.evict(tick);
        prep
    }

    /// Load views the cache lacks; returns the keys whose stored document does not decode.
    async fn load_into_cache(
        &mut self,
        keys: Vec<String>,
        tick: u64,
        parent: &Span,
    ) -> HashMap<String, String> {
        let mut corrupt = HashMap::default();
        if keys.is_empty() {
            return corrupt;
        }
        self.ctx
            .stats
            .loads
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let store = self.st().store.clone();
        let loaded = {
            let mut retry = Retry::new(&self.ctx.shared, self.ctx.store, "loading views");
            loop {
                let span = self.store_span(parent, keys.len(), true);
                let r = store
                    .load::<P::View>(keys.clone())
                    .instrument(span.clone())
                    .await;
                spans::finished(&span, &r);
                match r {
                    Ok(l) => break l,
                    Err(e) => retry.failed(&e).await,
                }
            }
        };
        let st = self.st();
        for k in keys {
            st.cache.map.entry(k).or_insert_with(|| Entry {
                doc: Doc::default(),
                used: tick,
            });
        }
        for (k, doc) in loaded {
            match doc {
                Ok(doc) => {
                    st.cache.map.insert(k, Entry { doc, used: tick });
                }
                Err(why) => {
                    st.cache.map.remove(&k);
                    corrupt.insert(k, why);
                }
            }
        }
        corrupt
    }

    /// Give the view of `prep.keys[ki]` a fresh token and encode it (or refuse it).
    fn encode(&mut self, prep: &mut Prepared, ki: usize) {
        prep.keys[ki].write = None;
        if prep.keys[ki].applied() == 0 {
            return;
        }
        let key = prep.keys[ki].key.clone();
        let p = self.p.clone();
        let st = self.st();
        let max = st.store.max_doc_bytes();
        let Some(entry) = st.cache.map.get_mut(&key) else {
            return;
        };
        p.seal(&mut entry.doc.view);
        entry.doc.rev = new_rev();
        match st.store.encode(&entry.doc) {
            Ok(body) if body.len() <= max => {
                prep.keys[ki].write = Some(DocWrite {
                    key,
                    expected: prep.keys[ki].expected,
                    rev: entry.doc.rev,
                    body,
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
    fn refuse(&mut self, prep: &mut Prepared, ki: usize, why: &str) {
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
            let e = prep.batch.event(r);
            let (seq, stream) = (e.header.sequence_number, self.keys.of(e).to_owned());
            let reason = format!("{} refused view {key}: {why}", self.ctx.store);
            prep.parks.extend(self.park(&stream, seq, &reason));
            prep.letters.push((r, "store_refused", reason));
        }
        self.st().cache.map.remove(&key);
    }

    /// Fold the offered events of `prep.keys[ki]` again, onto `base` (after a conflict, or
    /// because the batch before changed the view), and encode the result.
    fn refold(&mut self, prep: &mut Prepared, ki: usize, base: Doc<P::View>) {
        let tick = self.tick;
        let p = self.p.clone();
        let mut doc = base;
        let kw = &mut prep.keys[ki];
        kw.expected = stored(doc.rev);
        let before: Vec<EventRef> = kw.rejected.iter().map(|(r, _)| *r).collect();
        kw.rejected.clear();
        let mut new_parks = Vec::new();
        for (r, outcome) in kw.offered.iter_mut() {
            *outcome = match apply_event(p.as_ref(), &mut doc, prep.batch.event(*r), &mut self.keys)
            {
                Step::Applied => Outcome::Applied,
                Step::Duplicate => Outcome::Duplicate,
                Step::Rejected(rej) => {
                    if !before.contains(r) {
                        tracing::warn!(rejection = %rej, "refused only when folded again");
                    }
                    new_parks.push((rej.stream.clone(), rej.sequence, rej.reason.clone()));
                    kw.rejected.push((*r, rej));
                    Outcome::Rejected
                }
            };
        }
        let key = kw.key.clone();
        for (stream, seq, reason) in new_parks {
            prep.parks.extend(self.park(&stream, seq, &reason));
        }
        self.st().cache.map.insert(key, Entry { doc, used: tick });
        self.encode(prep, ki);
    }

    /// The span of one store call of the batch under `parent` (a load, or a write).
    fn store_span(&mut self, parent: &Span, documents: usize, load: bool) -> Span {
        let store = self.ctx.store;
        let st = self.st();
        let (version, location) = (StageCtx::version_of(&st.target), st.store.location());
        if load {
            spans::doc_load(parent, store, version, location, documents)
        } else {
            spans::doc_write(parent, store, version, location, documents)
        }
    }

    fn start(&mut self, mut prepared: Prepared) -> InFlight {
        prepared.started = Instant::now();
        let (writes, order) = prepared.take_writes();
        let store = self.st().store.clone();
        let span = self.store_span(&prepared.batch.span, writes.len(), false);
        let task = tokio::spawn(async move {
            let r = write_traced(&store, &writes, span).await;
            (writes, r)
        });
        InFlight {
            prepared,
            order,
            task,
        }
    }

    /// Wait for a batch's writes, settle conflicts and refusals, check
    /// the pointers, then send its letters, record its parks and acknowledge it.
    async fn finish_opt(
        &mut self,
        prepared: Prepared,
        order: Vec<usize>,
        written: (Vec<DocWrite>, Result<WriteOutcome, SinkError>),
    ) {
        let span = prepared.batch.span.clone();
        self.finish_in_span(prepared, order, written)
            .instrument(span)
            .await
    }

    async fn finish_in_span(
        &mut self,
        mut prepared: Prepared,
        order: Vec<usize>,
        written: (Vec<DocWrite>, Result<WriteOutcome, SinkError>),
    ) {
        let started = prepared.started;
        let (writes, mut result) = written;
        prepared.put_back(writes, &order);
        loop {
            self.write_until_settled(&mut prepared, result).await;
            match &self.ctx.mode {
                Mode::Replay { .. } => break,
                Mode::Live => {
                    // Fresh pointers, read after the writes: hold during a handover; write the
                    // batch again if the version changed under it.
                    let t = self.ctx.target(true).await;
                    if t == prepared.target {
                        break;
                    }
                    tracing::info!(projection = self.ctx.name, from = %prepared.target.version,
                        to = %t.version, "the read model was switched under a batch: writing it to the new version");
                    let batch = prepared.batch;
                    prepared = self.prepare(batch).await;
                    let (writes, order) = prepared.take_writes();
                    let span = self.store_span(&prepared.batch.span, writes.len(), false);
                    let store = self.st().store.clone();
                    let r = write_traced(&store, &writes, span).await;
                    prepared.put_back(writes, &order);
                    result = r;
                }
            }
        }
        self.complete(prepared, started).await;
    }

    /// Retry transient failures; resolve conflicts (reload, fold again, write again) and
    /// refusals; patch the batch folded behind this one.
    async fn write_until_settled(
        &mut self,
        prep: &mut Prepared,
        mut result: Result<WriteOutcome, SinkError>,
    ) {
        let mut retry = Retry::new(&self.ctx.shared, self.ctx.store, "writing views");
        let mut rounds = 0;
        loop {
            let (writes_in_order, order) = {
                let order: Vec<usize> = (0..prep.keys.len())
                    .filter(|i| prep.keys[*i].write.is_some())
                    .collect();
                (order.len(), order)
            };
            let outcome = match result {
                Ok(o) => o,
                Err(e) => {
                    retry.failed(&e).await;
                    if matches!(self.ctx.mode, Mode::Live)
                        && self.ctx.target(true).await != prep.target
                    {
                        // Switched while the store failed: the caller writes the batch to
                        // the new version; the replaced one (maybe retired) is not retried.
                        return;
                    }
                    result = self.write_keys(prep, &order).await;
                    continue;
                }
            };
            let _ = writes_in_order;
            let conflicted: Vec<usize> = outcome.conflicts.iter().map(|i| order[*i]).collect();
            let refused: Vec<(usize, String)> = outcome
                .refused
                .iter()
                .map(|(i, why)| (order[*i], why.clone()))
                .collect();
            // Everything not conflicted or refused is durable now.
            let done: HashSet<usize> = conflicted
                .iter()
                .copied()
                .chain(refused.iter().map(|r| r.0))
                .collect();
            let mut written = 0;
            for (i, k) in prep.keys.iter_mut().enumerate() {
                if !done.contains(&i) && k.write.take().is_some() {
                    written += 1;
                    if let Some(seen) = self.state.as_mut().and_then(|s| s.seen.as_mut()) {
                        seen.insert(k.key.clone());
                    }
                }
            }
            prep.written += written;
            self.ctx.stats.writes.fetch_add(written, Ordering::Relaxed);
            metrics::counter!("projector_writes_total", "projector" => self.ctx.name, "store" => self.ctx.store)
                .increment(written);
            for (ki, why) in refused {
                self.refuse(prep, ki, &why);
            }
            if conflicted.is_empty() {
                return;
            }
            self.ctx
                .stats
                .conflicts
                .fetch_add(conflicted.len() as u64, Ordering::Relaxed);
            rounds += 1;
            if rounds >= CAS_LIMIT {
                let why = format!("still contended after {CAS_LIMIT} compare-and-set rounds");
                tracing::error!(projection = self.ctx.name, views = conflicted.len(), %why,
                    "another writer never lets go of these views: their streams are parked");
                for ki in conflicted {
                    self.refuse(prep, ki, &why);
                }
                return;
            }
            if rounds % CAS_ROUNDS == 0 {
                // Contended by another worker (a rebalance overlap): let it finish first.
                tokio::time::sleep(Duration::from_millis(20 * (rounds / CAS_ROUNDS) as u64)).await;
            }
            // Reload the contended views, fold this batch's events again, write again.
            let keys: Vec<String> = conflicted
                .iter()
                .map(|i| prep.keys[*i].key.clone())
                .collect();
            for k in &keys {
                self.st().cache.map.remove(k);
            }
            let corrupt = self
                .load_into_cache(keys.clone(), self.tick, &prep.batch.span)
                .await;
            for (ki, key) in conflicted.iter().zip(&keys) {
                if let Some(why) = corrupt.get(key) {
                    let why = why.clone();
                    self.refuse(prep, *ki, &why);
                    continue;
                }
                let base = self
                    .st()
                    .cache
                    .map
                    .remove(key)
                    .map_or_else(Doc::default, |e| e.doc);
                self.refold(prep, *ki, base);
            }
            if self.ctx.mode == Mode::Live && self.ctx.target(true).await != prep.target {
                // Switched while contended: the caller writes the batch to the new version.
                return;
            }
            let order: Vec<usize> = (0..prep.keys.len())
                .filter(|i| prep.keys[*i].write.is_some())
                .collect();
            result = self.write_keys(prep, &order).await;
        }
    }

    async fn write_keys(
        &mut self,
        prep: &mut Prepared,
        order: &[usize],
    ) -> Result<WriteOutcome, SinkError> {
        let writes: Vec<DocWrite> = order
            .iter()
            .filter_map(|i| prep.keys[*i].write.clone())
            .collect();
        let store = self.st().store.clone();
        let span = self.store_span(&prep.batch.span, writes.len(), false);
        write_traced(&store, &writes, span).await
    }

    /// A batch is durable: send its letters, record its parks, acknowledge its windows.
    async fn complete(&mut self, prep: Prepared, started: Instant) {
        let name = self.ctx.name;
        let mut letters: Vec<DeadLetter> = Vec::new();
        for (r, kind, reason) in &prep.letters {
            letters.extend(prep.batch.letter(*r, kind, reason.clone(), name));
        }
        for k in &prep.keys {
            for (r, rej) in &k.rejected {
                letters.extend(prep.batch.letter(*r, "rejected", rej.to_string(), name));
            }
        }
        prep.batch.span.record("written", prep.written);
        prep.batch.span.record("letters", letters.len());
        self.ctx.send_letters(letters).await;
        self.ctx.save_parks(&prep.parks).await;
        self.pending_parks.retain(|r| !prep.parks.contains(r));
        tracing::debug!(
            projector = self.ctx.name,
            shard = self.shard,
            windows = prep.batch.windows.len(),
            events = prep.events,
            views = prep.keys.len(),
            write_ms = started.elapsed().as_millis() as u64,
            age_ms = prep.batch.windows[0].opened.elapsed().as_millis() as u64,
            "batch durable"
        );
        let s = &self.ctx.stats;
        s.events.fetch_add(prep.events as u64, Ordering::Relaxed);
        s.duplicates
            .fetch_add(prep.duplicates as u64, Ordering::Relaxed);
        s.write_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        metrics::counter!("projector_projected_events_total", "projector" => name)
            .increment(prep.events as u64);
        metrics::counter!("projector_duplicates_total", "projector" => name)
            .increment(prep.duplicates as u64);
        metrics::histogram!("projector_write_seconds", "projector" => name, "store" => self.ctx.store)
            .record(started.elapsed().as_secs_f64());
        self.ctx.ack(&prep.batch);
    }
}

/// Write views under `span`, and record what the store said.
async fn write_traced<S: DocStore>(
    store: &S,
    writes: &[DocWrite],
    span: Span,
) -> Result<WriteOutcome, SinkError> {
    let r = store.write(writes).instrument(span.clone()).await;
    spans::doc_written(&span, &r);
    r
}
