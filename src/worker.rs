//! `projector run`: the consumer-group worker loop.
//!
//! poll a batch → decode → park/dead-letter poison → apply to every read model (durable) →
//! dead-letter refusals → commit the batch's offsets. Offsets are committed only after the
//! writes they cover are acknowledged, so a crash at any instant redelivers, never loses,
//! and the guards make the redelivery a no-op.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use contract::Event;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::apply::{Applier, ApplyError, Sinks};
use crate::config::Config;
use crate::kafka::{ensure_topics, event_topics};
use crate::resilience::backoff::{Backoff, CircuitBreaker};
use crate::resilience::dead_letter::{DeadLetter, DeadLetterQueue};
use crate::sinks::SinkError;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::sinks::mongo::MongoSink;
use crate::sinks::redis::RedisSink;
use crate::source::{Incoming, Poison, WorkerConsumer, create_consumer, decode_message};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit once no message has arrived for this long (tests, demo, bench). `None`: run until
    /// SIGTERM/SIGINT.
    pub stop_when_idle: Option<Duration>,
    /// Readiness for the pod endpoints.
    pub health: Option<std::sync::Arc<crate::observability::Health>>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub messages: u64,
    pub batches: u64,
    pub dead_letters: u64,
    pub unrouted: u64,
    pub duplicates: u64,
    /// Documents/rows written per projector, and the time spent writing them.
    pub writes: HashMap<String, u64>,
    pub write_seconds: HashMap<String, f64>,
    pub largest_batch: u64,
    /// Seconds from the first message received to the last batch committed.
    pub active_seconds: f64,
    /// Publish → visible in every read model, per event, in milliseconds.
    pub latency_ms_p50: u64,
    pub latency_ms_p99: u64,
    pub latency_ms_max: u64,
    #[serde(skip)]
    latency: Option<hdrhistogram::Histogram<u64>>,
    #[serde(skip)]
    first_message: Option<Instant>,
}

impl RunReport {
    fn finish(&mut self) {
        if let Some(h) = &self.latency {
            self.latency_ms_p50 = h.value_at_quantile(0.5);
            self.latency_ms_p99 = h.value_at_quantile(0.99);
            self.latency_ms_max = h.max();
        }
    }
}

/// Connect to the three stores (creating tables and indexes as needed).
pub async fn connect_sinks(cfg: &Config) -> Result<Sinks, SinkError> {
    Ok(Sinks {
        redis: RedisSink::connect(&cfg.redis.url, &cfg.views.redis_prefix).await?,
        mongo: MongoSink::connect(
            &cfg.mongo.uri,
            &cfg.mongo.database,
            &cfg.views.mongo_collection,
        )
        .await?,
        clickhouse: ClickHouseSink::connect(
            &cfg.clickhouse.url,
            &cfg.clickhouse.database,
            &cfg.views.clickhouse_table,
        )
        .await?,
    })
}

struct Worker {
    cfg: Config,
    consumer: WorkerConsumer,
    applier: Applier,
    /// The stores of the `live` version (and the parked-streams set).
    live_sinks: Sinks,
    /// The stores of other versions, once a handover pointed a projection at them.
    version_sinks: HashMap<String, Sinks>,
    /// The event store, for the version pointers.
    store: crate::store::EventStore,
    dlq: DeadLetterQueue,
    shutdown: watch::Receiver<bool>,
    health: std::sync::Arc<crate::observability::Health>,
    /// Messages received while waiting out a failure; they open the next batch.
    carry: Vec<Incoming>,
    /// Streams with a dead-lettered event: their later events are dead-lettered too, so a
    /// stream is never applied out of order. Persisted in Redis for the next owner.
    parked: HashSet<String>,
    report: RunReport,
}

/// Run the worker until shutdown (or idle, per `opts`).
pub async fn run(
    cfg: &Config,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<RunReport, WorkerError> {
    ensure_topics(&cfg.kafka).await?;
    let sinks = connect_sinks(cfg).await?;
    let mut store = crate::store::EventStore::connect(&cfg.postgres.url).await?;
    store.migrate().await?;
    let consumer = create_consumer(&cfg.kafka)?;
    let topics = event_topics(&cfg.kafka);
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut w = Worker {
        cfg: cfg.clone(),
        consumer,
        applier: Applier::new(projectors::all()),
        live_sinks: sinks,
        version_sinks: HashMap::new(),
        store,
        dlq: DeadLetterQueue::new(&cfg.kafka)?,
        shutdown,
        health: opts.health.clone().unwrap_or_default(),
        carry: Vec::new(),
        parked: HashSet::new(),
        report: RunReport::default(),
    };
    w.parked = w.load_parked().await?;
    tracing::info!(group = %cfg.kafka.group_id, ?topics, "worker started");
    let mut last_message = Instant::now();
    loop {
        if *w.shutdown.borrow() && w.carry.is_empty() {
            tracing::info!("shutdown: last batch committed, leaving the group");
            break;
        }
        let batch = w.collect_batch().await;
        let assigned = w.consumer.assignment().is_ok_and(|a| a.count() > 0);
        w.health.set_assigned(assigned);
        if batch.is_empty() {
            // Idle time counts only while partitions are assigned: a join can take a while
            // when a killed member's session has yet to expire.
            if !assigned {
                last_message = Instant::now();
            }
            if opts
                .stop_when_idle
                .is_some_and(|idle| last_message.elapsed() >= idle)
            {
                break;
            }
            continue;
        }
        last_message = Instant::now();
        if !w.process(batch).await? {
            break;
        }
    }
    w.report.finish();
    Ok(w.report)
}

impl Worker {
    fn parked_key(&self) -> String {
        format!("projector:parked:{}", self.cfg.kafka.group_id)
    }

    async fn load_parked(&self) -> Result<HashSet<String>, SinkError> {
        let mut con = self.live_sinks.redis.connection();
        let streams: Vec<String> = redis::cmd("HKEYS")
            .arg(self.parked_key())
            .query_async(&mut con)
            .await?;
        Ok(streams.into_iter().collect())
    }

    async fn park(&mut self, stream: &str, reason: &str) -> Result<(), SinkError> {
        if self.parked.insert(stream.to_owned()) {
            tracing::warn!(
                stream,
                reason,
                "stream parked: its later events go to the dead-letter topic"
            );
            let mut con = self.live_sinks.redis.connection();
            let _: () = redis::cmd("HSET")
                .arg(self.parked_key())
                .arg(stream)
                .arg(reason)
                .query_async(&mut con)
                .await?;
        }
        Ok(())
    }

    /// Up to `batch_size` messages: waits up to a second for the first, then `batch_wait_ms`
    /// for the rest.
    async fn collect_batch(&mut self) -> Vec<Incoming> {
        let mut batch = std::mem::take(&mut self.carry);
        let size = self.cfg.worker.batch_size.max(1);
        if batch.is_empty() {
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                m = self.consumer.recv() => match m {
                    Ok(m) => batch.push(decode_message(&m, &self.cfg.kafka.topic_prefix)),
                    Err(e) => tracing::warn!(error = %e, "consumer error"),
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            if batch.is_empty() {
                return batch;
            }
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.cfg.worker.batch_wait_ms);
        while batch.len() < size {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(decode_message(&m, &self.cfg.kafka.topic_prefix)),
                Ok(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                Err(_) => break,
            }
        }
        batch
    }

    /// Wait out a failure while still polling, so the consumer stays in its group; anything
    /// already fetched is kept for the next batch.
    async fn wait_polling(&mut self, delay: Duration) {
        let until = tokio::time::Instant::now() + delay;
        while let Ok(m) = tokio::time::timeout_at(until, self.consumer.recv()).await {
            match m {
                Ok(m) => self
                    .carry
                    .push(decode_message(&m, &self.cfg.kafka.topic_prefix)),
                Err(e) => tracing::warn!(error = %e, "consumer error"),
            }
        }
    }

    fn set_paused(&self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if paused {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, paused, "could not change the pause state");
        }
    }

    /// Process one batch. Returns false when shutdown came while the stores were failing
    /// (the batch is then left uncommitted, to be redelivered).
    async fn process(&mut self, batch: Vec<Incoming>) -> Result<bool, WorkerError> {
        let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
        let mut events: Vec<Event> = Vec::with_capacity(batch.len());
        let mut origins = Vec::with_capacity(batch.len());
        let mut letters = Vec::new();
        for incoming in batch {
            let (origin, event) = match incoming {
                Incoming::Poison(p) => {
                    let o = &p.origin;
                    offsets.insert((o.topic.clone(), o.partition), o.offset);
                    if let Some(stream) = &p.stream {
                        self.park(stream, &p.error.to_string()).await?;
                    }
                    letters.push(DeadLetter {
                        kind: p.error.kind().to_owned(),
                        reason: p.error.to_string(),
                        projector: None,
                        poison: *p,
                    });
                    continue;
                }
                Incoming::Event(b) => *b,
            };
            offsets.insert((origin.topic.clone(), origin.partition), origin.offset);
            let stream = projectors::stream_key(&event);
            if self.parked.contains(&stream) {
                letters.push(DeadLetter {
                    poison: as_poison(origin, &event),
                    kind: "parked".into(),
                    reason: format!("stream {stream} is parked after an earlier dead letter"),
                    projector: None,
                });
                continue;
            }
            origins.push(origin);
            events.push(event);
        }

        let Some(targets) = self.targets().await? else {
            return Ok(false);
        };
        let Some(mut outcome) = self.apply_with_retry(&events, &targets).await else {
            return Ok(false);
        };
        for (i, rejection) in std::mem::take(&mut outcome.rejected) {
            self.park(&rejection.stream, &rejection.reason).await?;
            letters.push(DeadLetter {
                poison: as_poison(origins[i].clone(), &events[i]),
                kind: "rejected".into(),
                reason: rejection.to_string(),
                projector: Some(rejection.projector),
            });
        }
        if !letters.is_empty() {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            while let Err(e) = self.dlq.send(&letters).await {
                tracing::warn!(error = %e, "dead-letter topic unavailable; retrying");
                self.wait_polling(backoff.next_delay()).await;
            }
        }
        self.commit(&offsets);

        let now_ms = chrono::Utc::now().timestamp_millis();
        let r = &mut self.report;
        let first = *r.first_message.get_or_insert_with(Instant::now);
        r.active_seconds = first.elapsed().as_secs_f64();
        let h = r.latency.get_or_insert_with(|| {
            // 1 ms .. 1 hour; a slower event saturates at an hour.
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds")
        });
        for o in &origins {
            if let Some(ts) = o.timestamp_ms {
                h.saturating_record((now_ms - ts).max(0) as u64);
            }
        }
        r.largest_batch = r.largest_batch.max((events.len() + letters.len()) as u64);
        record_metrics(
            &events,
            &letters,
            &outcome,
            origins.last().and_then(|o| o.timestamp_ms),
            now_ms,
        );
        r.batches += 1;
        r.messages += (events.len() + letters.len()) as u64;
        r.dead_letters += letters.len() as u64;
        r.unrouted += outcome.unrouted as u64;
        for p in &outcome.projectors {
            r.duplicates += p.duplicates as u64;
            *r.writes.entry(p.name.to_owned()).or_default() += p.writes as u64;
            *r.write_seconds.entry(p.name.to_owned()).or_default() += p.write_time.as_secs_f64();
        }
        tracing::debug!(
            events = events.len(),
            dead_letters = letters.len(),
            "batch committed"
        );
        Ok(true)
    }

    /// The stores each projector writes now, per the version pointers. While a projection is
    /// being handed over, wait (polling, so the consumer stays in its group): the rebuild
    /// takes its last step alone. `None` when shutdown came meanwhile.
    async fn targets(&mut self) -> Result<Option<Vec<Sinks>>, WorkerError> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let versions = loop {
            match crate::versions::live_versions(&self.store, &self.cfg).await {
                Ok(v) if v.switching.is_empty() => break v,
                Ok(v) => {
                    tracing::info!(projections = ?v.switching, "handover in progress: holding the batch")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the version pointers failed; retrying")
                }
            }
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            self.wait_polling(backoff.next_delay()).await;
        };
        let mut targets = Vec::with_capacity(self.applier.projectors().len());
        for p in self.applier.projectors().to_vec() {
            let version = versions.of(p.name());
            if version == crate::versions::LIVE {
                targets.push(self.live_sinks.clone());
                continue;
            }
            if !self.version_sinks.contains_key(version) {
                let sinks = crate::rebuild::version_sinks(&self.cfg, version).await?;
                tracing::info!(
                    projection = p.name(),
                    version,
                    "writing the rebuilt version"
                );
                self.version_sinks.insert(version.to_owned(), sinks);
            }
            targets.push(self.version_sinks[version].clone());
        }
        Ok(Some(targets))
    }

    /// Retry transient store failures with backoff; after five in a row the circuit opens and
    /// the assigned partitions are paused (the consumer keeps polling, so it stays in the group).
    async fn apply_with_retry(
        &mut self,
        events: &[Event],
        targets: &[Sinks],
    ) -> Option<crate::apply::BatchOutcome> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut breaker = CircuitBreaker::new(5);
        loop {
            match self.applier.apply(events, targets).await {
                Ok(outcome) => {
                    if breaker.is_open() {
                        tracing::info!("stores answer again: circuit closed, partitions resumed");
                        self.set_paused(false);
                        self.health.set_circuit_open(false);
                    }
                    return Some(outcome);
                }
                Err(e) => {
                    let was_open = breaker.is_open();
                    let open = breaker.record_failure();
                    log_apply_error(&e, backoff.attempts(), open);
                    if open && !was_open {
                        self.set_paused(true);
                        self.health.set_circuit_open(true);
                    }
                    if *self.shutdown.borrow() {
                        return None;
                    }
                    self.wait_polling(backoff.next_delay()).await;
                }
            }
        }
    }

    fn commit(&self, offsets: &HashMap<(String, i32), i64>) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
            {
                tracing::warn!(error = %e, "bad offset");
            }
        }
        // The commit is a blocking call of librdkafka; keep it off the async executor.
        let result = tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync));
        if let Err(e) = result {
            // A partition revoked meanwhile: its new owner redelivers, the guards absorb it.
            tracing::warn!(error = %e, "offset commit failed; the batch will be redelivered");
        }
    }
}

/// Prometheus figures of one committed batch.
fn record_metrics(
    events: &[Event],
    letters: &[DeadLetter],
    outcome: &crate::apply::BatchOutcome,
    last_ts_ms: Option<i64>,
    now_ms: i64,
) {
    metrics::histogram!("projector_batch_size").record((events.len() + letters.len()) as f64);
    let mut by_type: HashMap<&str, u64> = HashMap::new();
    for e in events {
        *by_type.entry(e.envelope.event_type.as_str()).or_default() += 1;
    }
    for (t, n) in by_type {
        metrics::counter!("projector_events_total", "event_type" => t.to_owned()).increment(n);
    }
    for p in &outcome.projectors {
        let name = p.name;
        metrics::counter!("projector_projected_events_total", "projector" => name)
            .increment(p.events as u64);
        metrics::counter!("projector_writes_total", "projector" => name).increment(p.writes as u64);
        metrics::counter!("projector_duplicates_total", "projector" => name)
            .increment(p.duplicates as u64);
        metrics::histogram!("projector_write_seconds", "projector" => name)
            .record(p.write_time.as_secs_f64());
    }
    for l in letters {
        metrics::counter!("projector_dead_letters_total", "kind" => l.kind.clone()).increment(1);
    }
    metrics::counter!("projector_unrouted_total").increment(outcome.unrouted as u64);
    if let Some(ts) = last_ts_ms {
        metrics::gauge!("projector_lag_seconds").set((now_ms - ts).max(0) as f64 / 1000.0);
    }
}

fn log_apply_error(e: &ApplyError, attempt: u32, circuit_open: bool) {
    tracing::warn!(error = %e, attempt, circuit_open, "applying the batch failed; retrying");
}

/// An event as a dead letter: the message as it was published.
fn as_poison(origin: crate::source::Origin, event: &Event) -> Poison {
    let headers = crate::kafka::event_headers(&event.envelope);
    Poison {
        payload: Some(event.envelope.to_json_bytes()),
        headers: Some(headers),
        stream: Some(projectors::stream_key(event)),
        error: contract::ContractError::InvalidValue {
            field: "event",
            reason: "refused downstream".into(),
        },
        origin,
    }
}
