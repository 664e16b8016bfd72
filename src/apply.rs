//! Applies a batch of events to every read model: route, group by view key, load the current
//! documents, fold (pure projectors), write with compare-and-set, and fold again for keys a
//! concurrent writer moved on. Returns only when every write is acknowledged by its store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use contract::Event;
use futures::future::try_join_all;
use projectors::analytics::Fact;
use projectors::{DynProjector, Rejection, StoreKind, ViewError};
use rand::Rng;

use crate::router::Router;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::sinks::mongo::MongoSink;
use crate::sinks::redis::RedisSink;
use crate::sinks::{DocumentSink, FactSink, SinkError, Write};

/// Compare-and-set rounds before a batch is failed (and retried whole).
const CAS_ROUNDS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("{store}: {keys} documents still contended after {CAS_ROUNDS} compare-and-set rounds")]
    Contended { store: &'static str, keys: usize },
}

/// The three stores.
#[derive(Clone)]
pub struct Sinks {
    pub redis: RedisSink,
    pub mongo: MongoSink,
    pub clickhouse: ClickHouseSink,
}

/// What a batch did, per projector.
#[derive(Debug, Default, Clone)]
pub struct ProjectorStats {
    pub name: &'static str,
    pub events: usize,
    pub writes: usize,
    pub duplicates: usize,
    pub cas_retries: usize,
    pub write_time: Duration,
}

#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub projectors: Vec<ProjectorStats>,
    pub unrouted: usize,
    /// Events a projector refused: for the dead-letter topic. Index into the batch.
    pub rejected: Vec<(usize, Rejection)>,
}

pub struct Applier {
    router: Router,
}

impl Applier {
    pub fn new(projectors: Vec<Arc<dyn DynProjector>>) -> Applier {
        Applier {
            router: Router::new(projectors),
        }
    }

    pub fn projectors(&self) -> &[Arc<dyn DynProjector>] {
        self.router.projectors()
    }

    /// Apply `events` (in arrival order) to every projector's store, all stores at once;
    /// `targets[i]` are the stores (the read model version) of `projectors()[i]`.
    pub async fn apply(
        &self,
        events: &[Event],
        targets: &[Sinks],
    ) -> Result<BatchOutcome, ApplyError> {
        let routed = self.router.route(events);
        let index_of: HashMap<*const Event, usize> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e as *const Event, i))
            .collect();
        let jobs = self
            .router
            .projectors()
            .iter()
            .zip(&routed.per_projector)
            .zip(targets)
            .map(|((p, evs), sinks)| apply_projector(p.as_ref(), sinks, evs));
        let results = try_join_all(jobs).await?;
        let mut out = BatchOutcome {
            unrouted: routed.unrouted,
            ..Default::default()
        };
        for (stats, rejected, evs) in results
            .into_iter()
            .zip(&routed.per_projector)
            .map(|((s, r), evs)| (s, r, evs))
        {
            for (i, why) in rejected {
                out.rejected
                    .push((index_of[&(evs[i] as *const Event)], why));
            }
            out.projectors.push(stats);
        }
        Ok(out)
    }
}

/// Apply one projector's events to its store.
pub async fn apply_projector(
    p: &dyn DynProjector,
    sinks: &Sinks,
    events: &[&Event],
) -> Result<(ProjectorStats, Vec<(usize, Rejection)>), ApplyError> {
    match p.store() {
        StoreKind::Redis => apply_documents(p, &sinks.redis, events).await,
        StoreKind::Mongo => apply_documents(p, &sinks.mongo, events).await,
        StoreKind::ClickHouse => apply_facts(p, &sinks.clickhouse, events).await,
    }
}

/// Fold each key's events into its document and write them all, compare-and-set.
pub async fn apply_documents<S: DocumentSink>(
    p: &dyn DynProjector,
    sink: &S,
    events: &[&Event],
) -> Result<(ProjectorStats, Vec<(usize, Rejection)>), ApplyError> {
    let mut stats = ProjectorStats {
        name: p.name(),
        events: events.len(),
        ..Default::default()
    };
    // key → indexes of its events, in arrival order (one aggregate's events stay in sequence).
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        by_key.entry(p.view_key(e)).or_default().push(i);
    }
    let mut pending: Vec<String> = by_key.keys().cloned().collect();
    let mut rejected = Vec::new();
    let started = Instant::now();
    for round in 0..CAS_ROUNDS {
        let current = sink.load(&pending).await?;
        let mut writes = Vec::with_capacity(pending.len());
        let mut round_rejects: HashMap<&str, Vec<(usize, Rejection)>> = HashMap::new();
        let mut round_dups = 0;
        for key in &pending {
            let idx = &by_key[key];
            let evs: Vec<&Event> = idx.iter().map(|&i| events[i]).collect();
            let doc = current.get(key).cloned();
            let expected_rev = doc.as_ref().map_or(0, |d| d.rev);
            let outcome = p.fold(doc, &evs)?;
            round_dups += outcome.duplicates.len();
            round_rejects.insert(
                key,
                outcome
                    .rejected
                    .into_iter()
                    .map(|(j, r)| (idx[j], r))
                    .collect(),
            );
            if let Some(document) = outcome.document {
                writes.push(Write {
                    key: key.clone(),
                    expected_rev,
                    document,
                });
            }
        }
        let conflicts = sink.store(&writes).await?;
        stats.writes += writes.len() - conflicts.len();
        stats.duplicates += round_dups;
        // Rejections count only for keys whose fold was written (or had nothing to write).
        for key in &pending {
            if !conflicts.contains(key) {
                rejected.extend(round_rejects.remove(key.as_str()).unwrap_or_default());
            }
        }
        if conflicts.is_empty() {
            stats.write_time = started.elapsed();
            return Ok((stats, rejected));
        }
        stats.cas_retries += conflicts.len();
        pending = conflicts;
        // Another worker holds these keys too (a rebalance overlap): back off a little.
        let jitter = rand::rng().random_range(0..5 * (round as u64 + 1));
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
    Err(ApplyError::Contended {
        store: sink.name(),
        keys: pending.len(),
    })
}

/// One fact per event; the store deduplicates by event_id.
pub async fn apply_facts<S: FactSink>(
    p: &dyn DynProjector,
    sink: &S,
    events: &[&Event],
) -> Result<(ProjectorStats, Vec<(usize, Rejection)>), ApplyError> {
    let started = Instant::now();
    let mut facts = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let outcome = p.fold(None, &[e])?;
        rejected.extend(outcome.rejected.into_iter().map(|(_, r)| (i, r)));
        if let Some(doc) = outcome.document {
            let fact: Fact =
                serde_json::from_value(serde_json::Value::Object(doc.view)).map_err(|e| {
                    ViewError {
                        projector: p.name(),
                        reason: e.to_string(),
                    }
                })?;
            facts.push(fact);
        }
    }
    sink.insert(&facts).await?;
    Ok((
        ProjectorStats {
            name: p.name(),
            events: events.len(),
            writes: facts.len(),
            write_time: started.elapsed(),
            ..Default::default()
        },
        rejected,
    ))
}
