//! The fact stage: one row per event, appended in one insert per batch while the next batch
//! is turned into rows. The store deduplicates by event id, so a retried or replayed row
//! counts once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
// Tokio's clock: the simulation pauses and advances it.
use tokio::time::Instant;

use projectors::analytics::Fact;
use projectors::document::StreamKey;
use projectors::parking::ParkFrom;
use projectors::{FactProjector, Parked};
use tokio::sync::mpsc;
use tracing::{Instrument, Span};

use super::parking::ParkRecord;
use super::retry::Retry;
use super::spans;
use super::stage::{Batch, EventRef, Mode, StageCtx};
use super::targets::Target;
use crate::sinks::{FactStore, SinkError};

pub type OpenFacts<S> = super::stage::OpenFn<S>;

struct Prepared {
    batch: Batch,
    target: Target,
    facts: Vec<Fact>,
    letters: Vec<(EventRef, &'static str, String)>,
    parks: Vec<ParkRecord>,
    events: usize,
}

type Inserted = (Vec<Fact>, Result<(), SinkError>);

/// An insert task's result; a task that died is a transient failure (retried).
fn joined(r: Result<Inserted, tokio::task::JoinError>, store: &'static str) -> Inserted {
    r.unwrap_or_else(|e| (Vec::new(), Err(SinkError::transient(store, e))))
}

struct InFlight {
    prepared: Prepared,
    started: Instant,
    task: tokio::task::JoinHandle<Inserted>,
}

pub struct FactStage<F: FactProjector, S: FactStore> {
    f: Arc<F>,
    ctx: StageCtx,
    open: OpenFacts<S>,
    state: Option<(Target, S, Parked)>,
    keys: StreamKey,
    seen_gen: u64,
    parks_loaded: Instant,
    /// Parks of this stage and of unreadable messages, kept across reloads for a while (the
    /// table may not have them yet).
    /// (window id, from an unreadable message, stream, from, reason): kept until the table
    /// has it — the poison stage's up to [`super::Shared::poison_saved`], this stage's own up
    /// to `saved_upto`.
    unsaved: Vec<(u64, bool, String, ParkFrom, String)>,
    /// The newest window whose parks this stage has recorded.
    saved_upto: u64,
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
            unsaved: Vec::new(),
            saved_upto: 0,
        }
    }

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
                        if let Some(f) = inflight.take() {
                            self.finish(f.prepared, f.started, joined(r, self.ctx.store)).await;
                        }
                        continue;
                    }
                },
            };
            let Some(first) = first else { break };
            let batch = self.ctx.coalesce(first, &mut rx);
            let mut next = self.prepare(batch).await;
            if let Some(f) = inflight.take() {
                let r = joined(f.task.await, self.ctx.store);
                self.finish(f.prepared, f.started, r).await;
                if Some(&next.target) != self.state.as_ref().map(|s| &s.0) {
                    next = self.prepare(next.batch).await;
                }
            }
            // The version may have been switched and retired while this batch waited.
            while self.ctx.mode == Mode::Live && self.ctx.target(false).await != next.target {
                next = self.prepare(next.batch).await;
            }
            inflight = Some(self.start(next));
        }
        if let Some(f) = inflight.take() {
            let r = joined(f.task.await, self.ctx.store);
            self.finish(f.prepared, f.started, r).await;
        }
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
        let own_saved = self.saved_upto;
        let mut parked = self.ctx.load_parks(&target.version).await;
        self.unsaved
            .retain(|(id, poison, ..)| *id > if *poison { poison_saved } else { own_saved });
        for (_, _, stream, from, why) in &self.unsaved {
            parked.park(stream, *from, why);
        }
        self.state = Some((target.clone(), store, parked));
        target.clone()
    }

    /// Turn a batch into rows (in its span).
    async fn prepare(&mut self, batch: Batch) -> Prepared {
        let span = batch.span.clone();
        let prep = self.prepare_in_span(batch).instrument(span.clone()).await;
        span.record("version", StageCtx::version_of(&prep.target));
        span.record("events", prep.events);
        prep
    }

    async fn prepare_in_span(&mut self, batch: Batch) -> Prepared {
        let target = self.ctx.target(false).await;
        let target = self.ensure(target).await;
        let f = self.f.clone();
        let name = self.ctx.name;
        let mut prep = Prepared {
            facts: Vec::with_capacity(batch.messages()),
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
                                self.unsaved.push((w.id, true, stream.clone(), from, why));
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
                match f.fact(e) {
                    Ok(fact) => prep.facts.push(fact),
                    Err(reason) => {
                        let stream = stream.to_owned();
                        self.unsaved.push((
                            w.id,
                            false,
                            stream.clone(),
                            ParkFrom::Sequence(seq),
                            reason.clone(),
                        ));
                        if parked.park(&stream, ParkFrom::Sequence(seq), &reason) {
                            prep.parks.push(ParkRecord {
                                projection: name.to_owned(),
                                version: target.version.clone(),
                                stream,
                                from: ParkFrom::Sequence(seq),
                                reason: reason.clone(),
                            });
                        }
                        prep.letters.push((r, "rejected", reason));
                    }
                }
            }
        }
        prep
    }

    fn start(&mut self, mut prepared: Prepared) -> InFlight {
        let Some((target, store, _)) = self.state.as_ref() else {
            unreachable!("a target is set before any batch")
        };
        let store = store.clone();
        let facts = std::mem::take(&mut prepared.facts);
        let span = self.insert_span(&prepared.batch.span, target, &store, facts.len());
        InFlight {
            prepared,
            started: Instant::now(),
            task: tokio::spawn(async move {
                let r = insert_traced(&store, &facts, span).await;
                (facts, r)
            }),
        }
    }

    fn insert_span(&self, parent: &Span, target: &Target, store: &S, rows: usize) -> Span {
        let version = StageCtx::version_of(target);
        spans::fact_write(parent, self.ctx.store, version, store.location(), rows)
    }

    /// Insert the batch's rows again (after a failure, or into a new version).
    async fn insert_again(&self, prepared: &Prepared) -> Result<(), SinkError> {
        match self.state.as_ref() {
            Some((target, store, _)) => {
                let span =
                    self.insert_span(&prepared.batch.span, target, store, prepared.facts.len());
                insert_traced(store, &prepared.facts, span).await
            }
            None => Err(SinkError::transient(self.ctx.store, "no store")),
        }
    }

    /// Settle the batch's insert, then send its letters, record its parks, acknowledge it.
    async fn finish(&mut self, prepared: Prepared, started: Instant, inserted: Inserted) {
        let span = prepared.batch.span.clone();
        self.finish_in_span(prepared, started, inserted)
            .instrument(span)
            .await
    }

    async fn finish_in_span(
        &mut self,
        mut prepared: Prepared,
        started: Instant,
        inserted: Inserted,
    ) {
        let (facts, mut result) = inserted;
        prepared.facts = facts;
        loop {
            {
                let mut retry = Retry::new(&self.ctx.shared, self.ctx.store, "inserting facts");
                while let Err(e) = &result {
                    retry.failed(e).await;
                    // A switch while the store was down: write where the pointers say now.
                    if let Mode::Live = self.ctx.mode {
                        let t = self.ctx.target(true).await;
                        if t != prepared.target {
                            break;
                        }
                    }
                    result = self.insert_again(&prepared).await;
                }
            }
            if let Mode::Replay { .. } = self.ctx.mode {
                break;
            }
            let t = self.ctx.target(true).await;
            if t == prepared.target && result.is_ok() {
                break;
            }
            tracing::info!(projection = self.ctx.name, to = %t.version,
                "the read model was switched under a batch: writing it to the new version");
            let batch = prepared.batch;
            prepared = self.prepare(batch).await;
            result = self.insert_again(&prepared).await;
        }
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
            self.saved_upto = self.saved_upto.max(last.id);
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
        self.ctx.ack(&prepared.batch);
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
