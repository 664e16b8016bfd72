//! Wiring: stages per registered projector, the decode step, the tracker, and the source
//! thread; the live worker (`projector run`) is [`run`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use projectors::{FactProjector, Projector, Registrar, StoreKind};
use tokio::sync::mpsc;

use super::Shared;
use super::commit::{Tracker, TrackerMsg, TrackerStats};
use super::control::{Control, PgControl};
use super::documents::{DocStage, OpenStore};
use super::facts::{FactStage, OpenFacts};
use super::parking::ParkStore;
use super::stage::{Mode, StageCtx, StageStats};
use super::targets::{Pointers, Retirements};
use crate::config::Config;
use crate::resilience::dead_letter::DeadLetterQueue;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::sinks::mongo::MongoSink;
use crate::sinks::null::{NullDocs, NullFacts};
use crate::sinks::redis::RedisSink;
use crate::sinks::{DocStore, FactStore};
use crate::source::kafka::{KafkaSource, RawWindow};
use crate::source::sequence::{PgPositions, Positions, Sequencing};
use crate::source::window::Window;
use crate::store::{EventStore, Pg};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("unknown projector {0:?} in worker.projectors (known: {1})")]
    UnknownProjector(String, String),
    #[error("the source thread failed: {0}")]
    Source(String),
}

/// Windows queued between two stages, at most.
const QUEUE: usize = 2;

/// Opens the stores of each kind for a read-model version.
pub trait SinkFactory: Send + Sync + 'static {
    type Redis: DocStore;
    type Mongo: DocStore;
    type Facts: FactStore;
    fn redis(&self) -> OpenStore<Self::Redis>;
    fn mongo(&self) -> OpenStore<Self::Mongo>;
    fn facts(&self) -> OpenFacts<Self::Facts>;
}

/// The real stores, named per version from the settings.
pub struct RealSinks {
    cfg: Config,
    /// A replay leaves MongoDB's secondary indexes to the rebuild's end
    /// ([`crate::sinks::mongo::MongoSink::connect_unindexed`]).
    replay: bool,
}

impl RealSinks {
    /// The live worker's stores.
    pub fn live(cfg: &Config) -> RealSinks {
        RealSinks {
            cfg: cfg.clone(),
            replay: false,
        }
    }

    /// A replay's stores: the rebuild builds the secondary indexes once it has caught up.
    pub fn replay(cfg: &Config) -> RealSinks {
        RealSinks {
            cfg: cfg.clone(),
            replay: true,
        }
    }
}

impl SinkFactory for RealSinks {
    type Redis = RedisSink;
    type Mongo = MongoSink;
    type Facts = ClickHouseSink;

    fn redis(&self) -> OpenStore<RedisSink> {
        let cfg = self.cfg.clone();
        Arc::new(move |v: String| {
            let cfg = cfg.clone();
            async move {
                let views = crate::versions::views_for(&cfg, &v);
                Ok(RedisSink::connect(&cfg.redis, &views.redis_prefix)
                    .await?
                    .with_pointer(cfg.redis_pointer_key()))
            }
            .boxed()
        })
    }

    fn mongo(&self) -> OpenStore<MongoSink> {
        let (cfg, replay) = (self.cfg.clone(), self.replay);
        Arc::new(move |v: String| {
            let cfg = cfg.clone();
            async move {
                let views = crate::versions::views_for(&cfg, &v);
                if replay {
                    MongoSink::connect_unindexed(&cfg.mongo, &views.mongo_collection).await
                } else {
                    MongoSink::connect(&cfg.mongo, &views.mongo_collection).await
                }
            }
            .boxed()
        })
    }

    fn facts(&self) -> OpenFacts<ClickHouseSink> {
        let cfg = self.cfg.clone();
        Arc::new(move |v: String| {
            let cfg = cfg.clone();
            async move {
                let views = crate::versions::views_for(&cfg, &v);
                ClickHouseSink::connect(&cfg.clickhouse, &views.clickhouse_table).await
            }
            .boxed()
        })
    }
}

/// Stores that keep nothing (the engine benchmark).
#[derive(Default)]
pub struct NullSinks {
    pub docs: NullDocs,
    pub facts: NullFacts,
}

impl SinkFactory for NullSinks {
    type Redis = NullDocs;
    type Mongo = NullDocs;
    type Facts = NullFacts;
    fn redis(&self) -> OpenStore<NullDocs> {
        let d = self.docs.clone();
        Arc::new(move |_| futures::future::ready(Ok(d.clone())).boxed())
    }
    fn mongo(&self) -> OpenStore<NullDocs> {
        self.redis()
    }
    fn facts(&self) -> OpenFacts<NullFacts> {
        let f = self.facts.clone();
        Arc::new(move |_| futures::future::ready(Ok(f.clone())).boxed())
    }
}

/// The running stages: where to send windows, and their counters.
pub struct Stages {
    pub txs: Vec<mpsc::Sender<Arc<Window>>>,
    pub handles: Vec<tokio::task::JoinHandle<()>>,
    /// (projector, store, counters) per stage.
    pub stats: Vec<(&'static str, &'static str, Arc<StageStats>)>,
    /// Acknowledgements each window needs.
    pub participants: usize,
}

/// What every stage of one pipeline shares.
pub struct StageEnv {
    pub cfg: Config,
    pub shared: Arc<Shared>,
    pub tracker: mpsc::UnboundedSender<TrackerMsg>,
    /// Pointers, retired versions (checked before a store is opened), parks, dead letters.
    pub control: Arc<dyn Control>,
    pub mode: Mode,
    /// Projectors to run (empty: all).
    pub only: Vec<String>,
    pub shards: usize,
    /// Bytes of views the pipeline's document stages cache, all told (split evenly).
    pub cache_bytes: usize,
    pub max_batch: usize,
}

struct Builder<'a, F: SinkFactory> {
    env: &'a StageEnv,
    sinks: &'a F,
    stages: Stages,
    /// Bytes of views each document stage caches.
    cache_bytes: usize,
}

/// Counts the document stages a pipeline will run (to split the cache budget among them).
struct DocStages<'a> {
    only: &'a [String],
    shards: usize,
    count: usize,
}

impl Registrar for DocStages<'_> {
    fn document<P: Projector>(&mut self, p: P) {
        if self.only.is_empty() || self.only.iter().any(|n| n == p.name()) {
            self.count += self.shards;
        }
    }

    fn facts<P: FactProjector>(&mut self, _: P) {}
}

impl<F: SinkFactory> Builder<'_, F> {
    fn ctx(
        &mut self,
        name: &'static str,
        store: &'static str,
    ) -> (StageCtx, mpsc::Receiver<Arc<Window>>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(StageStats::default());
        self.stages.stats.push((name, store, stats.clone()));
        self.stages.txs.push(tx);
        let participant = self.stages.participants;
        self.stages.participants += 1;
        // Zero from the start, so an alert on them has a series before the first one.
        metrics::counter!("projector_panics_total", "projector" => name).increment(0);
        metrics::counter!("projector_dead_letters_lost_total", "projector" => name).increment(0);
        let e = self.env;
        (
            StageCtx {
                name,
                store,
                shared: e.shared.clone(),
                tracker: e.tracker.clone(),
                participant,
                mode: e.mode.clone(),
                control: e.control.clone(),
                stats,
                max_batch: e.max_batch,
            },
            rx,
        )
    }

    fn wanted(&self, name: &str) -> bool {
        self.env.only.is_empty() || self.env.only.iter().any(|n| n == name)
    }

    fn doc_stages<P: Projector, S: DocStore>(
        &mut self,
        p: Arc<P>,
        open: OpenStore<S>,
        store: &'static str,
    ) {
        let shards = self.env.shards.max(1);
        for shard in 0..shards {
            let (ctx, rx) = self.ctx(p.name(), store);
            let stage = DocStage::new(
                p.clone(),
                ctx,
                shard,
                shards,
                open.clone(),
                self.cache_bytes,
            );
            self.stages.handles.push(tokio::spawn(stage.run(rx)));
        }
    }
}

impl<F: SinkFactory> Registrar for Builder<'_, F> {
    fn document<P: Projector>(&mut self, p: P) {
        if !self.wanted(p.name()) {
            return;
        }
        let p = Arc::new(p);
        match p.store() {
            StoreKind::Mongo => self.doc_stages(p, self.sinks.mongo(), "mongo"),
            _ => self.doc_stages(p, self.sinks.redis(), "redis"),
        }
    }

    fn facts<P: FactProjector>(&mut self, f: P) {
        if !self.wanted(f.name()) {
            return;
        }
        let (ctx, rx) = self.ctx(f.name(), "clickhouse");
        let stage = FactStage::new(Arc::new(f), ctx, self.sinks.facts());
        self.stages.handles.push(tokio::spawn(stage.run(rx)));
    }
}

/// Start a stage for every selected projector (shards of document projectors), and the
/// poison stage.
/// Which projectors a pipeline runs: the registered ones ([`Registered`]); the simulation
/// wraps them to make some panic.
pub trait Projectors {
    fn register(&self, r: &mut impl Registrar);
}

/// Every projector of [`projectors::register_all`].
pub struct Registered;

impl Projectors for Registered {
    fn register(&self, r: &mut impl Registrar) {
        projectors::register_all(r);
    }
}

pub fn spawn_stages<F: SinkFactory>(env: &StageEnv, sinks: &F) -> Result<Stages, RuntimeError> {
    spawn_stages_of(env, sinks, &Registered)
}

/// [`spawn_stages`] for the given projectors.
pub fn spawn_stages_of<F: SinkFactory>(
    env: &StageEnv,
    sinks: &F,
    projectors: &impl Projectors,
) -> Result<Stages, RuntimeError> {
    let known = projectors::names();
    for n in &env.only {
        if !known.contains(&n.as_str()) {
            return Err(RuntimeError::UnknownProjector(n.clone(), known.join(", ")));
        }
    }
    let mut docs = DocStages {
        only: &env.only,
        shards: env.shards.max(1),
        count: 0,
    };
    projectors.register(&mut docs);
    let mut b = Builder {
        env,
        sinks,
        cache_bytes: env.cache_bytes / docs.count.max(1),
        stages: Stages {
            txs: Vec::new(),
            handles: Vec::new(),
            stats: Vec::new(),
            participants: 0,
        },
    };
    projectors.register(&mut b);
    let (ctx, rx) = b.ctx("poison", "dead-letter topic");
    b.stages
        .handles
        .push(tokio::spawn(super::poison::run(ctx, rx)));
    Ok(b.stages)
}

/// Decode raw windows (on every core), put each stream back in wire order when `sequencing`
/// is given (the live feed), and fan them out to the stages.
pub async fn decode_loop(
    mut rx: mpsc::Receiver<RawWindow>,
    txs: Vec<mpsc::Sender<Arc<Window>>>,
    topics: Arc<Vec<String>>,
    topic_prefix: String,
    mut sequencing: Option<Sequencing>,
) {
    while let Some(raw) = rx.recv().await {
        let RawWindow {
            id,
            generation,
            items,
            arena,
            opened,
        } = raw;
        let (t, p) = (topics.clone(), topic_prefix.clone());
        let decoded = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let items = crate::source::decode::decode_all(items, &arena, &t, &p);
            super::budget::record(super::budget::Step::Decode, started.elapsed());
            Window {
                id,
                generation,
                items,
                arena,
                topics: t,
                opened,
                span: tracing::Span::none(),
            }
            .traced()
        })
        .await;
        let Ok(mut w) = decoded else {
            tracing::error!("decoding a window panicked; stopping");
            return;
        };
        if let Some(s) = sequencing.as_mut() {
            s.apply(&mut w).await;
        }
        let mut by_type: HashMap<&str, u64> = HashMap::new();
        for it in &w.items {
            let t = match &it.decoded {
                Ok(e) => e.header.event_type.as_str(),
                Err(_) => "poison",
            };
            *by_type.entry(t).or_default() += 1;
        }
        let unrouted: u64 = w
            .items
            .iter()
            .filter(|it| it.decoded.as_ref().is_ok_and(|e| e.event_type().is_none()))
            .count() as u64;
        metrics::counter!("projector_unrouted_total").increment(unrouted);
        for (t, n) in by_type {
            metrics::counter!("projector_events_total", "event_type" => t.to_owned()).increment(n);
        }
        let w = Arc::new(w);
        let sending = std::time::Instant::now();
        for tx in &txs {
            if tx.send(w.clone()).await.is_err() {
                return;
            }
        }
        super::budget::record(super::budget::Step::Queue, sending.elapsed());
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit once no message has arrived for this long (tests, demo, bench). `None`: run until
    /// shutdown is requested through `shared`.
    pub stop_when_idle: Option<Duration>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub messages: u64,
    pub windows: u64,
    pub dead_letters: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub loads: u64,
    pub consumer_restarts: u64,
    /// Documents/rows written per projector, and the time spent writing them (by name).
    pub writes: BTreeMap<String, u64>,
    pub write_seconds: BTreeMap<String, f64>,
    pub largest_window: u64,
    /// Seconds from the first message received to the last commit.
    pub active_seconds: f64,
    /// Publish → visible in every read model, per message, in milliseconds.
    pub latency_ms_p50: u64,
    pub latency_ms_p99: u64,
    pub latency_ms_max: u64,
    /// Where the time went, step by step (see [`super::budget`]).
    #[serde(default)]
    pub steps: Vec<super::budget::StepLatency>,
    /// The largest fetch response, bounded above (bytes its broker sent in one statistics
    /// interval), and the most bytes the client's fetch queues held (live only).
    #[serde(default)]
    pub fetch_response_bytes_max: u64,
    #[serde(default)]
    pub fetch_queue_bytes_max: u64,
}

impl RunReport {
    pub fn from_parts(
        t: &TrackerStats,
        stages: &[(&'static str, &'static str, Arc<StageStats>)],
    ) -> RunReport {
        let mut r = RunReport {
            messages: t.messages,
            windows: t.windows,
            largest_window: t.largest_window,
            ..Default::default()
        };
        if let (Some(a), Some(b)) = (t.first_message, t.last_commit) {
            r.active_seconds = b.saturating_duration_since(a).as_secs_f64();
        }
        if let Some(h) = &t.latency {
            r.latency_ms_p50 = h.value_at_quantile(0.5);
            r.latency_ms_p99 = h.value_at_quantile(0.99);
            r.latency_ms_max = h.max();
        }
        r.steps = super::budget::snapshot();
        for (name, _, s) in stages {
            r.dead_letters += s.letters.load(Ordering::Relaxed);
            if *name == "poison" {
                continue;
            }
            r.duplicates += s.duplicates.load(Ordering::Relaxed);
            r.conflicts += s.conflicts.load(Ordering::Relaxed);
            r.loads += s.loads.load(Ordering::Relaxed);
            *r.writes.entry((*name).to_owned()).or_default() += s.writes.load(Ordering::Relaxed);
            *r.write_seconds.entry((*name).to_owned()).or_default() +=
                s.write_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        }
        r
    }
}

/// Migrate the event store, waiting for PostgreSQL if it is not up yet.
async fn migrate(cfg: &Config, shared: &Arc<Shared>) {
    super::retry::Retry::new(shared, "postgres", "applying migrations")
        .until_ok(|| async {
            let mut s = EventStore::connect(&cfg.postgres.url).await?;
            s.migrate().await
        })
        .await;
}

/// The live worker: join the group and keep the read models up to date until shutdown
/// (`shared.shutdown`) or idleness; returns the run's figures.
pub async fn run(
    cfg: &Config,
    opts: RunOptions,
    shared: Arc<Shared>,
) -> Result<RunReport, RuntimeError> {
    if let Some(n) = cfg.worker.cache_entries {
        tracing::warn!(
            cache_entries = n,
            cache_bytes = cfg.worker.cache_bytes,
            "worker.cache_entries is ignored: the view cache is bounded by worker.cache_bytes"
        );
    }
    {
        let mut retry = super::retry::Retry::new(&shared, "kafka", "creating topics");
        while let Err(e) = crate::kafka::ensure_topics(&cfg.kafka).await {
            if shared.shutdown.load(Ordering::Relaxed) {
                return Ok(RunReport::default());
            }
            retry.failed(&e).await;
        }
    }
    migrate(cfg, &shared).await;
    // Every series the dashboard and the alert rules name exists from the start, at zero.
    metrics::gauge!("projector_paused").set(0.0);
    for store in [
        "kafka",
        "postgres",
        "redis",
        "mongo",
        "clickhouse",
        "dead-letter topic",
    ] {
        metrics::gauge!("projector_circuit_open", "store" => store).set(0.0);
        metrics::counter!("projector_store_errors_total", "store" => store).increment(0);
    }
    metrics::counter!("projector_unrouted_total").increment(0);
    metrics::counter!("projector_consumer_restarts_total").increment(0);
    for outcome in ["ok", "failed"] {
        metrics::counter!("projector_commits_total", "outcome" => outcome).increment(0);
    }
    let pg = Arc::new(Pg::from_config(&cfg.postgres));
    crate::observability::watch_rebuilds(cfg, pg.clone());
    // Pointers, parks and retired versions are the deployment's, whatever this group is.
    let pointers = Arc::new(Pointers::new(pg.clone(), &cfg.deployment));
    let dlq = Arc::new(DeadLetterQueue::new(&cfg.kafka)?);
    let topics = Arc::new(crate::kafka::event_topics(&cfg.kafka));
    let (tracker_tx, tracker_rx) = mpsc::unbounded_channel();
    let env = StageEnv {
        cfg: cfg.clone(),
        shared: shared.clone(),
        tracker: tracker_tx.clone(),
        control: Arc::new(PgControl {
            pointers: Some(pointers),
            retirements: Some(Retirements::new(pg.clone(), &cfg.deployment)),
            parks: ParkStore::new(pg.clone(), &cfg.deployment),
            dlq: Some(dlq),
            events: pg.clone(),
        }),
        mode: Mode::Live,
        only: cfg.worker.projectors.clone(),
        shards: cfg.worker.shard_count(),
        cache_bytes: cfg.worker.cache_bytes,
        max_batch: cfg.worker.window_size.max(1) * 4,
    };
    let stages = spawn_stages(&env, &RealSinks::live(cfg))?;
    drop(env);
    // Durable stream positions: recorded as the tracker finds windows durable, read by the
    // sequencer when it sees a stream for the first time.
    let (positions, recorder) = if cfg.worker.stream_positions && cfg.worker.sequence_streams > 0 {
        let store = PgPositions {
            pg: pg.clone(),
            group: cfg.kafka.group_id.clone(),
        };
        let every = Duration::from_millis(cfg.worker.position_flush_ms);
        let (p, task) = Positions::start(Arc::new(store), every);
        (Some(p), Some(task))
    } else {
        (None, None)
    };
    let mut tracker = Tracker::new(stages.participants, shared.clone(), topics.clone(), None)
        .commit_every(Duration::from_millis(cfg.worker.commit_interval_ms));
    if let Some(p) = &positions {
        tracker = tracker.on_durable(p.on_durable());
    }
    let tracker = tokio::spawn(tracker.run(tracker_rx));
    let (raw_tx, raw_rx) = mpsc::channel(QUEUE);
    // Lost or reordered messages are filled in or held from the event store before any stage.
    let sequencing =
        Sequencing::new(pg.clone(), shared.clone(), &cfg.worker).map(|s| match positions {
            Some(p) => s.with_positions(p),
            None => s,
        });
    let decode = tokio::spawn(decode_loop(
        raw_rx,
        stages.txs.clone(),
        topics.clone(),
        cfg.kafka.topic_prefix.clone(),
        sequencing,
    ));
    let source = KafkaSource::new(cfg, shared.clone(), tracker_tx, raw_tx, topics.clone());
    tracing::info!(deployment = %cfg.deployment, group = %cfg.kafka.group_id, topics = ?topics, stages = stages.participants, "worker started");
    let watch = crate::source::group::spawn(cfg, shared.clone(), topics.as_ref().clone())
        .map_err(|e| RuntimeError::Source(e.to_string()))?;
    let idle = opts.stop_when_idle;
    let names = topics.as_ref().clone();
    let thread = std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || source.run(names, idle))
        .map_err(|e| RuntimeError::Source(e.to_string()))?;
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        return Err(RuntimeError::Source("the source thread panicked".into()));
    }
    shared.shutdown.store(true, Ordering::Relaxed);
    tracing::info!("shutdown: the source has stopped");
    let _ = tokio::task::spawn_blocking(move || watch.join()).await;
    tracing::info!("shutdown: the group watch has stopped");
    // The source is gone: the decode step, then the stages, then the tracker wind down.
    let Stages {
        txs,
        handles,
        stats,
        ..
    } = stages;
    drop(txs);
    let _ = decode.await;
    tracing::info!("shutdown: decoding has stopped");
    for mut h in handles {
        if tokio::time::timeout(Duration::from_secs(30), &mut h)
            .await
            .is_err()
        {
            tracing::warn!("a stage did not finish in time; its windows stay uncommitted");
            h.abort();
        }
    }
    tracing::info!("shutdown: the stages have stopped");
    let tstats = tracker.await.unwrap_or_default();
    tracing::info!("shutdown: the commit tracker has stopped");
    // The tracker and the sequencer are gone: the recorder writes what is durable and ends.
    if let Some(mut r) = recorder
        && tokio::time::timeout(Duration::from_secs(15), &mut r)
            .await
            .is_err()
    {
        tracing::warn!("stream positions not all recorded in time (the next start refills)");
        r.abort();
    }
    let mut report = RunReport::from_parts(&tstats, &stats);
    report.consumer_restarts = shared.consumer_restarts.load(Ordering::Relaxed);
    report.fetch_response_bytes_max = shared.fetch_response_bytes_max.load(Ordering::Relaxed);
    report.fetch_queue_bytes_max = shared.fetch_queue_bytes_max.load(Ordering::Relaxed);
    Ok(report)
}

/// The engine alone: decode, route, fold and encode prepared raw windows through every
/// stage into `sinks` (the benchmark gives stores that keep nothing). Returns how long the
/// pipeline took, from the first window handed in to the last acknowledged.
pub async fn run_memory<F: SinkFactory>(
    cfg: &Config,
    windows: Vec<RawWindow>,
    topics: Arc<Vec<String>>,
    sinks: &F,
) -> Result<(Duration, RunReport), RuntimeError> {
    let shared = Arc::new(Shared::default());
    let pg = Arc::new(Pg::from_config(&cfg.postgres));
    let (tracker_tx, tracker_rx) = mpsc::unbounded_channel();
    let env = StageEnv {
        cfg: cfg.clone(),
        shared: shared.clone(),
        tracker: tracker_tx.clone(),
        control: Arc::new(PgControl {
            pointers: None,
            retirements: None,
            parks: ParkStore::new(pg.clone(), &cfg.deployment),
            dlq: None,
            events: pg,
        }),
        mode: Mode::Replay {
            version: "engine_bench".into(),
            fresh: true,
        },
        only: cfg.worker.projectors.clone(),
        shards: cfg.worker.shard_count(),
        cache_bytes: cfg.worker.cache_bytes,
        max_batch: cfg.worker.window_size.max(1) * 4,
    };
    let stages = spawn_stages(&env, sinks)?;
    drop(env);
    let tracker = Tracker::new(stages.participants, shared.clone(), topics.clone(), None);
    let tracker = tokio::spawn(tracker.run(tracker_rx));
    let (raw_tx, raw_rx) = mpsc::channel(QUEUE);
    let Stages {
        txs,
        handles,
        stats,
        ..
    } = stages;
    let decode = tokio::spawn(decode_loop(
        raw_rx,
        txs,
        topics,
        cfg.kafka.topic_prefix.clone(),
        None,
    ));
    let started = std::time::Instant::now();
    for w in windows {
        shared.in_flight.fetch_add(w.items.len(), Ordering::Relaxed);
        let _ = tracker_tx.send(TrackerMsg::Register(super::commit::Registration {
            id: w.id,
            generation: w.generation,
            offsets: Vec::new(),
            newest: Vec::new(),
            messages: w.items.len(),
            bytes: 0,
            timestamps: Vec::new(),
        }));
        if raw_tx.send(w).await.is_err() {
            break;
        }
    }
    drop(raw_tx);
    let _ = decode.await;
    for h in handles {
        let _ = h.await;
    }
    let took = started.elapsed();
    drop(tracker_tx);
    let tstats = tracker.await.unwrap_or_default();
    Ok((took, RunReport::from_parts(&tstats, &stats)))
}
