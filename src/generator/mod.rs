//! `projector generate`: writes a seeded history to the event store and publishes each
//! committed batch to Kafka, optionally with injected duplicates and redeliveries.

pub mod history;

use std::time::{Duration, Instant};

use contract::EventEnvelope;
pub use history::History;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kafka::EventPublisher;
use crate::store::{EventStore, StoreError};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub seed: u64,
    pub events: u64,
    pub namespace: String,
    pub batch_size: usize,
    /// Probability that an event is published twice in a row.
    pub duplicate_rate: f64,
    /// Probability that, after a batch, a run of its events is published again.
    pub redelivery_rate: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            seed: 42,
            events: 10_000,
            namespace: String::new(),
            batch_size: 5_000,
            duplicate_rate: 0.0,
            redelivery_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateReport {
    pub appended: u64,
    pub published: u64,
    pub injected_duplicates: u64,
    pub append_time: Duration,
    pub publish_time: Duration,
    pub total_time: Duration,
}

impl GenerateReport {
    pub fn append_rate(&self) -> f64 {
        rate(self.appended, self.append_time)
    }
    pub fn publish_rate(&self) -> f64 {
        rate(self.published, self.publish_time)
    }
    pub fn overall_rate(&self) -> f64 {
        rate(self.appended, self.total_time)
    }
}

fn rate(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing to Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Which events to send to Kafka for one committed batch: each once, plus injected copies.
/// Driven by its own RNG so the history is the same whatever the injection rates.
pub struct Injector {
    rng: ChaCha8Rng,
    duplicate_rate: f64,
    redelivery_rate: f64,
}

impl Injector {
    pub fn new(opts: &GenerateOptions) -> Injector {
        Injector {
            rng: ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5eed_d00d),
            duplicate_rate: opts.duplicate_rate,
            redelivery_rate: opts.redelivery_rate,
        }
    }

    /// The batch as it goes on the wire; the order per aggregate stays that of the store,
    /// copies only ever repeat an event already sent.
    pub fn wire_order(&mut self, batch: &[EventEnvelope]) -> Vec<EventEnvelope> {
        let mut out = Vec::with_capacity(batch.len() + batch.len() / 10);
        for e in batch {
            out.push(e.clone());
            if self.duplicate_rate > 0.0 && self.rng.random_bool(self.duplicate_rate) {
                out.push(e.clone());
            }
        }
        if !batch.is_empty()
            && self.redelivery_rate > 0.0
            && self.rng.random_bool(self.redelivery_rate)
        {
            let len = self.rng.random_range(1..=batch.len().min(200));
            let start = self.rng.random_range(0..=batch.len() - len);
            out.extend_from_slice(&batch[start..start + len]);
        }
        out
    }
}

/// Append a batch over several connections at once, each stream wholly on one of them (so
/// its sequence stays contiguous per transaction). Positions are written back into `batch`.
async fn append_sharded(
    stores: &mut [EventStore],
    batch: &mut [EventEnvelope],
) -> Result<(), StoreError> {
    let n = stores.len().max(1);
    let shard_of = |e: &EventEnvelope| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        e.aggregate_id.hash(&mut h);
        (h.finish() % n as u64) as usize
    };
    let mut shards: Vec<Vec<EventEnvelope>> = vec![Vec::new(); n];
    for e in batch.iter() {
        shards[shard_of(e)].push(e.clone());
    }
    let appends = stores
        .iter_mut()
        .zip(shards.iter_mut())
        .map(|(store, shard)| store.append(shard));
    futures::future::try_join_all(appends).await?;
    let mut cursors = vec![0usize; n];
    for e in batch.iter_mut() {
        let s = shard_of(e);
        e.global_position = shards[s][cursors[s]].global_position;
        cursors[s] += 1;
    }
    Ok(())
}

/// Append the history in batches and publish each batch once it is committed. Three stages
/// overlap: the next batch is generated (own thread) and appended while the last committed
/// one is being published.
pub async fn generate(
    stores: &mut [EventStore],
    publisher: Option<&EventPublisher>,
    opts: &GenerateOptions,
    mut progress: impl FnMut(&GenerateReport),
) -> Result<GenerateReport, GenerateError> {
    let started = Instant::now();
    let mut report = GenerateReport::default();
    let mut injector = Injector::new(opts);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<EventEnvelope>>(2);
    let (seed, namespace, total, size) = (
        opts.seed,
        opts.namespace.clone(),
        opts.events,
        opts.batch_size.max(1) as u64,
    );
    let producer = std::thread::spawn(move || {
        let mut history = History::new(seed, &namespace);
        let mut remaining = total;
        while remaining > 0 {
            let n = remaining.min(size);
            remaining -= n;
            if tx
                .blocking_send(history.by_ref().take(n as usize).collect())
                .is_err()
            {
                break; // the consumer failed and went away
            }
        }
    });
    let mut committed: Option<Vec<EventEnvelope>> = None;
    loop {
        let next = rx.recv().await;
        if next.is_none() && committed.is_none() {
            break;
        }
        let wire = match (publisher, &committed) {
            (Some(_), Some(batch)) => Some((injector.wire_order(batch), batch.len())),
            _ => None,
        };
        let publish = async {
            let t = Instant::now();
            if let (Some(p), Some((wire, _))) = (publisher, &wire) {
                p.publish(wire).await?;
            }
            Ok::<_, GenerateError>(t.elapsed())
        };
        let append = async {
            let t = Instant::now();
            match next {
                Some(mut batch) => {
                    append_sharded(stores, &mut batch).await?;
                    Ok::<_, GenerateError>((Some(batch), t.elapsed()))
                }
                None => Ok((None, Duration::ZERO)),
            }
        };
        let (published, appended) = tokio::join!(publish, append);
        let publish_time = published?;
        let (batch, append_time) = appended?;
        if let Some((wire, original)) = wire {
            report.publish_time += publish_time;
            report.published += wire.len() as u64;
            report.injected_duplicates += (wire.len() - original) as u64;
        }
        if let Some(b) = &batch {
            report.append_time += append_time;
            report.appended += b.len() as u64;
        }
        committed = batch;
        report.total_time = started.elapsed();
        progress(&report);
    }
    drop(rx);
    let _ = producer.join();
    report.total_time = started.elapsed();
    Ok(report)
}
