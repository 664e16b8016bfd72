//! The fact stage: one row per event, appended in one insert per batch while the next batch
//! is turned into rows (in the shared pipelined driver, [`crate::runtime::stage::driver`]).
//! The store deduplicates by event id, so a retried or replayed row counts once.
//!
//! A row the projector refuses (or panics on) is a dead letter and parks its stream. An
//! insert the store refuses for good is split in halves until the refused rows are found:
//! those are dead letters (`store_refused`) and park their streams; the rest are stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
// Tokio's clock: the simulation pauses and advances it.
use tokio::time::Instant;

use projectors::analytics::Fact;
use projectors::document::StreamKey;
use projectors::document::fact_caught;
use projectors::parking::ParkFrom;
use projectors::{FactProjector, Parked};
use tracing::{Instrument, Span};

use super::parking::ParkRecord;
use super::parking::unsaved::Unsaved;
use super::retry::Retry;
use super::spans;
use super::stage::driver::{Pipelined, Settled};
use super::stage::{Batch, EventRef, Mode, StageCtx};
use super::targets::Target;
use crate::sinks::{FactStore, SinkError};

pub type OpenFacts<S> = super::stage::OpenFn<S>;

pub struct Prepared {
    batch: Batch,
    target: Target,
    facts: Vec<Fact>,
    /// The event of each row.
    refs: Vec<EventRef>,
    letters: Vec<(EventRef, &'static str, String)>,
    parks: Vec<ParkRecord>,
    events: usize,
    started: Instant,
}

pub struct FactStage<F: FactProjector, S: FactStore> {
    f: Arc<F>,
    ctx: StageCtx,
    open: OpenFacts<S>,
    state: Option<(Target, S, Parked)>,
    keys: StreamKey,
    seen_gen: u64,
    parks_loaded: Instant,
    /// Parks the table may not have yet (this stage's, unreadable messages').
    unsaved: Unsaved,
}

impl<F: FactProjector, S: FactStore> FactStage<F, S> {
    pub fn new(f: Arc<F>, ctx: StageCtx, open: OpenFacts<S>) -> Self {
        FactStage {
            f,
            ctx,
            open,
            state: None,
            keys: StreamKey::default(),
            seen_gen: 0,
            parks_loaded: Instant::now(),
            unsaved: Unsaved::default(),
        }
    }

    /// Run until the input closes (see [`crate::runtime::stage::driver`]).
    pub async fn run(self, rx: tokio::sync::mpsc::Receiver<Arc<super::Window>>) {
        super::stage::driver::run(self, rx).await
    }

    /// Make `target` current (never a retired version: then the one the pointers name now);
    /// returns the target made current.
    async fn ensure(&mut self, target: Target) -> Target {
        let generation = self.ctx.shared.assignment_gen.load(Ordering::Relaxed);
        let live = matches!(self.ctx.mode, Mode::Live);
        let stale = live && self.parks_loaded.elapsed() >= super::documents::PARKS_REFRESH;
        if self.state.as_ref().is_some_and(|s| s.0 == target)
            && !(live && generation != self.seen_gen)
            && !stale
        {
            return target;
        }
        self.parks_loaded = Instant::now();
        self.seen_gen = generation;
        let (target, store) = match self.state.take() {
            Some((t, s, _)) if t == target => (target, s),
            _ => self.ctx.open(target, &self.open).await,
        };
        let target = &target;
        // Read before the table: what was recorded up to these windows is in it.
        let poison_saved = self.ctx.shared.poison_saved.load(Ordering::Acquire);
        let mut parked = self.ctx.load_parks(&target.version).await;
        self.unsaved
            .merge_into(&mut parked, &target.version, poison_saved);
        self.state = Some((target.clone(), store, parked));
        target.clone()
    }

    async fn prepare_in_span(&mut self, batch: Batch) -> Prepared {
        let target = self.ctx.target(false).await;
        let target = self.ensure(target).await;
        let f = self.f.clone();
        let name = self.ctx.name;
        let mut prep = Prepared {
            facts: Vec::with_capacity(batch.messages()),
            refs: Vec::with_capacity(batch.messages()),
            started: Instant::now(),
            batch,
            target,
            letters: Vec::new(),
            parks: Vec::new(),
            events: 0,
        };
        let Some((target, _, parked)) = self.state.as_mut() else {
            unreachable!("a target is set before any batch")
        };
        for (wi, w) in prep.batch.windows.iter().enumerate() {
            for (ii, item) in w.items.iter().enumerate() {
                let e = match &item.decoded {
                    Err(poison) => {
                        if let Some(stream) = &poison.stream {
                            let from = poison.park_from(&item.origin);
                            if let Some(from) = from {
                                let why = poison.error.to_string();
                                parked.park(stream, from, &why);
                                self.unsaved.poison(w.id, stream, from, &why);
                            }
                        }
                        continue;
                    }
                    Ok(e) => e,
                };
                if !e.event_type().is_some_and(|t| f.handles().contains(&t)) {
                    continue;
                }
                prep.events += 1;
                let r = (wi as u32, ii as u32);
                let seq = e.header.sequence_number;
                let stream = self.keys.of(e);
                if let Some(mark) = parked.holding(stream, seq, item.origin.position()) {
                    prep.letters.push((
                        r,
                        "parked",
                        format!("stream {stream} is parked: {}", mark.reason),
                    ));
                    continue;
                }
                match fact_caught(f.as_ref(), e) {
                    Ok(fact) => {
                        prep.facts.push(fact);
                        prep.refs.push(r);
                    }
                    Err(reason) => {
                        let record = ParkRecord {
                            projection: name.to_owned(),
                            version: target.version.clone(),
                            stream: stream.to_owned(),
                            from: ParkFrom::Sequence(seq),
                            reason: reason.clone(),
                        };
                        prep.parks.extend(self.unsaved.park(parked, w.id, record));
                        prep.letters.push((r, "rejected", reason));
                    }
                }
            }
        }
        prep
    }

    fn insert_span(&self, parent: &Span, target: &Target, store: &S, rows: usize) -> Span {
        let version = StageCtx::version_of(target);
        spans::fact_write(parent, self.ctx.store, version, store.location(), rows)
    }

    /// Insert rows of the batch now, in this task.
    async fn insert_rows(&self, prepared: &Prepared, rows: &[Fact]) -> Result<(), SinkError> {
        match self.state.as_ref() {
            Some((target, store, _)) => {
                let span = self.insert_span(&prepared.batch.span, target, store, rows.len());
                insert_traced(store, rows, span).await
            }
            None => Err(SinkError::transient(self.ctx.store, "no store")),
        }
    }

    /// The store refused the insert for good: split it until the refused rows are found.
    /// Those become dead letters and park their streams; the others are stored. `Err` when a
    /// part failed transiently (the whole batch is retried; the store deduplicates).
    async fn isolate(&mut self, prepared: &mut Prepared) -> Result<(), SinkError> {
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut parts = Vec::new();
        parts.push(0..prepared.facts.len());
        while let Some(part) = parts.pop() {
            match self
                .insert_rows(prepared, &prepared.facts[part.clone()])
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) if part.len() == 1 => refused.push((part.start, e.to_string())),
                Err(_) => {
                    let mid = part.start + part.len() / 2;
                    parts.push(mid..part.end);
                    parts.push(part.start..mid);
                }
            }
        }
        refused.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, why) in refused {
            let r = prepared.refs.remove(i);
            prepared.facts.remove(i);
            let e = prepared.batch.event(r);
            let (seq, stream) = (e.header.sequence_number, self.keys.of(e).to_owned());
            let reason = format!("{} refused the row: {why}", self.ctx.store);
            self.park_own(prepared, r, &stream, seq, &reason);
            prepared.letters.push((r, "store_refused", reason));
        }
        Ok(())
    }

    /// Park `stream` from `seq` for this projection (kept until the table has it).
    fn park_own(
        &mut self,
        prepared: &mut Prepared,
        r: EventRef,
        stream: &str,
        seq: i64,
        why: &str,
    ) {
        let window = prepared.batch.windows[r.0 as usize].id;
        if let Some((target, _, parked)) = self.state.as_mut() {
            let record = ParkRecord {
                projection: self.ctx.name.to_owned(),
                version: target.version.clone(),
                stream: stream.to_owned(),
                from: ParkFrom::Sequence(seq),
                reason: why.to_owned(),
            };
            prepared
                .parks
                .extend(self.unsaved.park(parked, window, record));
        }
    }

    /// Durable: send the batch's letters, record its parks, acknowledge it.
    async fn complete_batch(&mut self, prepared: Prepared) {
        let started = prepared.started;
        let name = self.ctx.name;
        let letters = prepared
            .letters
            .iter()
            .filter_map(|(r, kind, reason)| prepared.batch.letter(*r, kind, reason.clone(), name))
            .collect::<Vec<_>>();
        prepared.batch.span.record("written", prepared.facts.len());
        prepared.batch.span.record("letters", letters.len());
        self.ctx.send_letters(letters).await;
        self.ctx.save_parks(&prepared.parks).await;
        if let Some(last) = prepared.batch.windows.last() {
            self.unsaved.saved(last.id);
        }
        tracing::debug!(
            projector = self.ctx.name,
            windows = prepared.batch.windows.len(),
            rows = prepared.facts.len(),
            write_ms = started.elapsed().as_millis() as u64,
            age_ms = prepared.batch.windows[0].opened.elapsed().as_millis() as u64,
            "batch durable"
        );
        let s = &self.ctx.stats;
        s.events
            .fetch_add(prepared.events as u64, Ordering::Relaxed);
        s.writes
            .fetch_add(prepared.facts.len() as u64, Ordering::Relaxed);
        s.write_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        metrics::counter!("projector_projected_events_total", "projector" => name)
            .increment(prepared.events as u64);
        metrics::counter!("projector_writes_total", "projector" => name, "store" => self.ctx.store)
            .increment(prepared.facts.len() as u64);
        metrics::histogram!("projector_write_seconds", "projector" => name, "store" => self.ctx.store)
            .record(started.elapsed().as_secs_f64());
        super::budget::record_write(self.ctx.store, started.elapsed());
        self.ctx.ack(&prepared.batch);
    }
}

impl<F: FactProjector, S: FactStore> Pipelined for FactStage<F, S> {
    type Routed = Batch;
    type Prepared = Prepared;
    type Written = Result<(), SinkError>;

    fn ctx(&self) -> &StageCtx {
        &self.ctx
    }

    fn route(&self, batch: Batch) -> Batch {
        batch
    }

    async fn prepare(&mut self, batch: Batch) -> Prepared {
        let span = batch.span.clone();
        let started = Instant::now();
        let prep = self.prepare_in_span(batch).instrument(span.clone()).await;
        super::budget::record(super::budget::Step::Fold, started.elapsed());
        span.record("version", StageCtx::version_of(&prep.target));
        span.record("events", prep.events);
        prep
    }

    fn target_of(prepared: &Prepared) -> &Target {
        &prepared.target
    }

    fn current(&self) -> Option<&Target> {
        self.state.as_ref().map(|s| &s.0)
    }

    fn unfold(prepared: Prepared) -> Batch {
        prepared.batch
    }

    fn start(&mut self, prepared: &mut Prepared) -> tokio::task::JoinHandle<Self::Written> {
        prepared.started = Instant::now();
        let Some((target, store, _)) = self.state.as_ref() else {
            unreachable!("a target is set before any batch")
        };
        let store = store.clone();
        // Copied: the rows stay with the batch, to insert again if this fails.
        let facts = prepared.facts.clone();
        let span = self.insert_span(&prepared.batch.span, target, &store, facts.len());
        tokio::spawn(async move { insert_traced(&store, &facts, span).await })
    }

    async fn write(&mut self, prepared: &mut Prepared) -> Self::Written {
        self.insert_rows(prepared, &prepared.facts).await
    }

    fn died(&self, _prepared: &Prepared, e: tokio::task::JoinError) -> Self::Written {
        Err(SinkError::transient(self.ctx.store, e))
    }

    async fn settle(&mut self, prepared: &mut Prepared, mut result: Self::Written) -> Settled {
        let span = prepared.batch.span.clone();
        async move {
            let mut retry = Retry::new(&self.ctx.shared, self.ctx.store, "inserting facts");
            loop {
                match result {
                    Ok(()) => return Settled::Done,
                    Err(e) if !e.is_transient() => {
                        tracing::warn!(projection = self.ctx.name, error = %e, rows = prepared.facts.len(),
                            "the store refused the insert: finding the rows it refuses");
                        result = self.isolate(prepared).await;
                    }
                    Err(e) => {
                        retry.failed(&e).await;
                        // A switch while the store was down: write where the pointers say now.
                        if self.ctx.mode == Mode::Live
                            && self.ctx.target(true).await != prepared.target
                        {
                            return Settled::Switched;
                        }
                        result = self.insert_rows(prepared, &prepared.facts).await;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn complete(&mut self, prepared: Prepared) {
        let span = prepared.batch.span.clone();
        self.complete_batch(prepared).instrument(span).await
    }
}

/// Insert rows under `span`, and record what the store said.
async fn insert_traced<S: FactStore>(
    store: &S,
    facts: &[projectors::analytics::Fact],
    span: Span,
) -> Result<(), SinkError> {
    let r = store.insert(facts).instrument(span.clone()).await;
    spans::finished(&span, &r);
    r
}
