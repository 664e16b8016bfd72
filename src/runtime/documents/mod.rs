//! The document stage: one per document projector (and shard). Batches of windows in,
//! durable compare-and-set writes out, one acknowledgement per window. It runs in the shared
//! pipelined driver ([`crate::runtime::stage::driver`]): batch N+1 is folded while N is
//! written, and a view is only ever folded onto its settled state.
//!
//! Per batch, one module per step:
//! - [`route`] (pure): this projector's events of this shard, and the view each names;
//! - [`cache`]: typed views by key, loaded when missing;
//! - [`fold`]: every event folded into its view in arrival order through the guards (a
//!   parked stream's events held, refusals and panics dead-lettered and parked), each touched
//!   view encoded once;
//! - [`settle`]: the write outcome judged view by view (durable, refused, or reloaded, folded
//!   and written again after a conflict, refused after too many rounds).
//!
//! Only then are its dead letters sent, its parks recorded, and its windows acknowledged.

pub mod cache;
pub mod fold;
pub mod route;
pub mod settle;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
// Tokio's clock: the simulation pauses and advances it.
use tokio::time::Instant;

use contract::Event;
use projectors::document::StreamKey;
use projectors::parking::ParkFrom;
use projectors::{Parked, Projector, Rejection};
use tracing::{Instrument, Span};

use super::parking::ParkRecord;
use super::parking::unsaved::Unsaved;
use super::spans;
use super::stage::driver::{Pipelined, Settled};
use super::stage::{Batch, EventRef, Mode, StageCtx};
use super::targets::Target;
use crate::resilience::dead_letter::DeadLetter;
use crate::sinks::{DocStore, DocWrite, SinkError, WriteOutcome};
use cache::Cache;
use route::Routed;

pub use settle::{CAS_LIMIT, CAS_ROUNDS};

/// Opens the store of a read-model version.
pub type OpenStore<S> = super::stage::OpenFn<S>;

/// What a key in a fresh replay's `seen` set costs besides its bytes (the `String` and its
/// hash table slot).
const SEEN_OVERHEAD: usize = 48;

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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Applied,
    Duplicate,
    Rejected,
    /// The projector panicked on it: refused, never folded again.
    Panicked,
    /// Held after all: an earlier event of its stream in this batch was refused on a refold.
    Held,
    /// Not folded yet: its view was half-changed by a panic and is folded again from the store.
    Deferred,
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
pub struct Prepared {
    routed: Routed,
    target: Target,
    keys: Vec<KeyWork>,
    index: HashMap<String, usize>,
    /// Dead letters decided while folding (held, key-less, refused, corrupt view, panics).
    letters: Vec<(EventRef, &'static str, String)>,
    parks: Vec<ParkRecord>,
    /// Streams stopped at an event of this batch by a panic: (stream, its sequence).
    stopped: Vec<(String, i64)>,
    events: usize,
    duplicates: usize,
    /// Views written so far.
    written: u64,
    /// When its writes were sent.
    started: Instant,
}

impl Prepared {
    fn new(routed: Routed, target: Target) -> Prepared {
        Prepared {
            routed,
            target,
            keys: Vec::new(),
            index: HashMap::default(),
            letters: Vec::new(),
            parks: Vec::new(),
            stopped: Vec::new(),
            events: 0,
            duplicates: 0,
            written: 0,
            started: Instant::now(),
        }
    }

    fn event(&self, r: EventRef) -> &Event {
        self.routed.batch.event(r)
    }

    /// The index of `key`'s work, made with `expected` if new.
    fn view(&mut self, key: &str, expected: impl FnOnce() -> Option<u64>) -> usize {
        if let Some(i) = self.index.get(key) {
            return *i;
        }
        self.keys.push(KeyWork::new(key.to_owned(), expected()));
        self.index.insert(key.to_owned(), self.keys.len() - 1);
        self.keys.len() - 1
    }

    /// The views with a write still to make.
    fn pending(&self) -> Vec<usize> {
        (0..self.keys.len())
            .filter(|i| self.keys[*i].write.is_some())
            .collect()
    }

    fn writes(&self, views: &[usize]) -> Vec<DocWrite> {
        views
            .iter()
            .filter_map(|i| self.keys[*i].write.clone())
            .collect()
    }
}

struct TargetState<V, S> {
    target: Target,
    store: S,
    cache: Cache<V>,
    parked: Parked,
    /// A replay into a fresh version: every key a write was sent for so far (an unseen key
    /// is absent). Recorded when the write is sent, not when it is acknowledged: a write
    /// whose reply was lost may have landed, and a view found stored by a conflict is never
    /// written again. Given up (`None`: every key the cache lacks is loaded) once its keys
    /// weigh more than the cache's budget, so the set does not grow with the event store.
    seen: Option<HashSet<String>>,
    seen_bytes: usize,
    parks_loaded: Instant,
    /// Live: streams unparked lately (with the mark of the release) whose stored history is
    /// spliced before the next event of theirs this stage takes ([`DocStage::splice_released`]).
    releases: HashMap<String, i64>,
    /// Releases acted on already: each once per version opened.
    caught: HashSet<(String, i64)>,
}

/// How a batch's writes went. The views written are those whose write is still pending in
/// the batch ([`Prepared::pending`]): settling takes them off as they become durable.
pub type Written = Result<WriteOutcome, SinkError>;

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
    /// Parks the table may not have yet (this stage's, unreadable messages').
    unsaved: Unsaved,
    /// Time spent loading views so far (the fold step is measured without it).
    loading: Duration,
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
            unsaved: Unsaved::default(),
            loading: Duration::ZERO,
        }
    }

    /// Run until the input closes (see [`crate::runtime::stage::driver`]).
    pub async fn run(self, rx: tokio::sync::mpsc::Receiver<Arc<super::Window>>) {
        super::stage::driver::run(self, rx).await
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
        let (released, parked) = self.read_holds(&target.version).await;
        let seen = matches!(self.ctx.mode, Mode::Replay { fresh: true, .. }).then(HashSet::default);
        self.state = Some(TargetState {
            target: target.clone(),
            store,
            cache: Cache::new(self.cache_cap),
            parked,
            seen,
            seen_bytes: 0,
            parks_loaded: Instant::now(),
            releases: released.into_iter().collect(),
            caught: HashSet::default(),
        });
        self.seen_gen = self.ctx.shared.assignment_gen.load(Ordering::Relaxed);
        target.clone()
    }

    /// What holds events of `version` back: the streams released lately, then its parks with
    /// this stage's own not yet recorded.
    async fn read_holds(&mut self, version: &str) -> (Vec<(String, i64)>, projectors::Parked) {
        // Before the parks: an unpark deletes the park and notes the release in one statement.
        let released = self.ctx.released().await;
        // Read before the table: whatever the poison stage recorded up to here is in it.
        let saved = self.ctx.shared.poison_saved.load(Ordering::Acquire);
        let mut parked = self.ctx.load_parks(version).await;
        self.unsaved.merge_into(&mut parked, version, saved);
        (released, parked)
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
        let (released, parked) = self.read_holds(&version).await;
        let st = self.st();
        for (stream, mark) in released {
            if !st.caught.contains(&(stream.clone(), mark)) {
                st.releases.insert(stream, mark);
            }
        }
        st.parked = parked;
        st.parks_loaded = Instant::now();
        if rebalanced {
            st.cache.clear();
        }
    }

    /// Park `stream` from `seq` (event `r` of the batch refused): held at once, recorded
    /// when the batch completes, kept across reloads of the table until then.
    fn park(&mut self, prep: &mut Prepared, r: EventRef, stream: &str, seq: i64, reason: &str) {
        let window = prep.routed.batch.windows[r.0 as usize].id;
        let record = ParkRecord {
            projection: self.ctx.name.to_owned(),
            version: self.st().target.version.clone(),
            stream: stream.to_owned(),
            from: ParkFrom::Sequence(seq),
            reason: reason.to_owned(),
        };
        let st = self.state.as_mut().unwrap_or_else(|| unreachable!());
        prep.parks
            .extend(self.unsaved.park(&mut st.parked, window, record));
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

    /// Views of the batch written now: durable.
    fn durable(&mut self, prep: &mut Prepared, views: &[usize]) {
        let mut written = 0;
        for v in views {
            if prep.keys[*v].write.take().is_some() {
                written += 1;
            }
        }
        prep.written += written;
        self.ctx.stats.writes.fetch_add(written, Ordering::Relaxed);
        metrics::counter!("projector_writes_total", "projector" => self.ctx.name, "store" => self.ctx.store)
            .increment(written);
    }

    /// Write `views` of the batch now, in this task.
    async fn write_views(
        &mut self,
        prep: &Prepared,
        views: &[usize],
    ) -> Result<WriteOutcome, SinkError> {
        self.sending(prep, views);
        let writes = prep.writes(views);
        let store = self.st().store.clone();
        let span = self.store_span(&prep.routed.batch.span, writes.len(), false);
        write_traced(&store, &writes, span).await
    }

    /// Writes of `views` are about to be sent: from now on they may be in the store, which a
    /// replay into a fresh version remembers (see [`TargetState::seen`]).
    fn sending(&mut self, prep: &Prepared, views: &[usize]) {
        let Some(st) = self.state.as_mut() else {
            return;
        };
        let Some(seen) = st.seen.as_mut() else {
            return;
        };
        for v in views {
            let key = &prep.keys[*v].key;
            if seen.insert(key.clone()) {
                st.seen_bytes += key.len() + SEEN_OVERHEAD;
            }
        }
        if st.seen_bytes > self.cache_cap {
            tracing::info!(
                projection = self.ctx.name,
                shard = self.shard,
                keys = seen.len(),
                "a fresh replay's written keys outgrew the cache budget: views the cache lacks are read from the store from now on"
            );
            st.seen = None;
        }
    }

    /// A batch is durable: send its letters, record its parks, acknowledge its windows.
    async fn complete_batch(&mut self, prep: Prepared) {
        let started = prep.started;
        let batch = &prep.routed.batch;
        let name = self.ctx.name;
        let mut letters: Vec<DeadLetter> = Vec::new();
        for (r, kind, reason) in &prep.letters {
            letters.extend(batch.letter(*r, kind, reason.clone(), name));
        }
        for k in &prep.keys {
            for (r, rej) in &k.rejected {
                letters.extend(batch.letter(*r, "rejected", rej.to_string(), name));
            }
        }
        batch.span.record("written", prep.written);
        batch.span.record("letters", letters.len());
        self.ctx.send_letters(letters).await;
        self.ctx.save_parks(&prep.parks).await;
        if let Some(last) = batch.windows.last() {
            self.unsaved.saved(last.id);
        }
        tracing::debug!(
            projector = self.ctx.name,
            shard = self.shard,
            windows = batch.windows.len(),
            events = prep.events,
            views = prep.keys.len(),
            write_ms = started.elapsed().as_millis() as u64,
            age_ms = batch.windows[0].opened.elapsed().as_millis() as u64,
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
        super::budget::record_write(self.ctx.store, started.elapsed());
        self.ctx.ack(&prep.routed.batch);
    }
}

impl<P: Projector, S: DocStore> Pipelined for DocStage<P, S> {
    type Routed = Routed;
    type Prepared = Prepared;
    type Written = Written;

    fn ctx(&self) -> &StageCtx {
        &self.ctx
    }

    fn route(&self, batch: Batch) -> Routed {
        route::route(self.p.as_ref(), batch, self.shard, self.shards)
    }

    /// A batch that touches a view the batch in flight writes waits for that write to settle
    /// (conflicts resolved, refusals known) before it is folded.
    fn overlaps(&self, routed: &Routed, inflight: &Prepared) -> bool {
        !inflight.index.is_empty() && routed.touches(|k| inflight.index.contains_key(k))
    }

    async fn prepare(&mut self, routed: Routed) -> Prepared {
        self.fold_batch(routed).await
    }

    fn target_of(prepared: &Prepared) -> &Target {
        &prepared.target
    }

    fn current(&self) -> Option<&Target> {
        self.state.as_ref().map(|s| &s.target)
    }

    fn unfold(prepared: Prepared) -> Routed {
        prepared.routed
    }

    fn start(&mut self, prepared: &mut Prepared) -> tokio::task::JoinHandle<Written> {
        prepared.started = Instant::now();
        let views = prepared.pending();
        self.sending(prepared, &views);
        let writes = prepared.writes(&views);
        let store = self.st().store.clone();
        let span = self.store_span(&prepared.routed.batch.span, writes.len(), false);
        tokio::spawn(async move { write_traced(&store, &writes, span).await })
    }

    async fn write(&mut self, prepared: &mut Prepared) -> Written {
        let views = prepared.pending();
        self.write_views(prepared, &views).await
    }

    fn died(&self, _prepared: &Prepared, e: tokio::task::JoinError) -> Written {
        Err(SinkError::transient(self.ctx.store, e))
    }

    async fn settle(&mut self, prepared: &mut Prepared, written: Written) -> Settled {
        let span = prepared.routed.batch.span.clone();
        self.settle_writes(prepared, written).instrument(span).await
    }

    async fn complete(&mut self, prepared: Prepared) {
        let span = prepared.routed.batch.span.clone();
        self.complete_batch(prepared).instrument(span).await
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
