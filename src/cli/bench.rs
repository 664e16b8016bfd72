//! `projector bench`: every figure from the same seeded history, each printed beside the
//! reference it is judged against, measured in the same run on the same machine.
//!
//! 1. the engine alone (decode, route, fold, encode; stores that keep nothing), every core;
//! 2. each store's raw capacity with the write shape its sink really uses (and the cost of
//!    durable acknowledgements: Redis `appendfsync always` against `everysec`);
//! 3. the history appended to the event store and preloaded on the topics as a backlog;
//! 4. a fresh group drains it into all three read models, then analytics only, each in a
//!    worker process (peak RSS sampled), and ClickHouse's own Kafka table engine drains the
//!    same backlog into the same kind of table;
//! 5. steady state: publish → visible at 1k, 2k, 5k and 10k events/s and at 80 % of the
//!    measured drain rate, with each rate's latency budget;
//! 6. the hot customer ([`super::bench_hot`]): one customer's long history, then a steady
//!    rate for it alone, beside the same rate over many customers;
//! 7. rebuild from the event store, per projection and all at once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use contract::EventEnvelope;
use projector::config::Config;
use projector::generator::{self, GenerateOptions, History};
use projector::kafka::{self, EventPublisher};
use projector::rebuild::{self, Checkpoint, RebuildOptions};
use projector::runtime::RunReport;
use projector::runtime::pipeline::{NullSinks, run_memory};
use projector::sinks::clickhouse::ClickHouseSink;
use projector::sinks::mongo::MongoSink;
use projector::sinks::redis::RedisSink;
use projector::sinks::{DocStore, DocWrite, FactStore, new_rev};
use projector::source::decode::RawItem;
use projector::source::kafka::RawWindow;
use projector::source::window::{Arena, Origin, RawRef};
use projector::store::EventStore;

pub struct BenchArgs {
    pub events: u64,
    pub raw_docs: usize,
    pub steady: bool,
    pub clickhouse_engine: bool,
    /// Only the engine-alone figure (for profiling).
    pub engine_only: bool,
    /// Only the steady-state latency, at this publish rate (for profiling).
    pub steady_rate: Option<f64>,
    /// Only the read service's latency (HTTP and MCP) on a drained history.
    pub read_only: bool,
    /// Only the backlog drain of all three read models (for profiling memory).
    pub drain_only: bool,
    /// Seed URLs of a Redis Cluster whose raw write rate to measure beside one server.
    pub redis_cluster: Option<String>,
    /// The hot customer's finished orders before its load (0: no hot-customer figure).
    pub hot_orders: usize,
    /// Only the hot-customer figure.
    pub hot_only: bool,
    /// Only the latency curve.
    pub curve_only: bool,
}

/// The hot customer's load: events/s, for how many seconds.
const HOT_RATE: f64 = 1_000.0;
const HOT_SECS: f64 = 15.0;

const SEED: u64 = 7;

/// The worker's memory target at any steady rate (issue 15); while draining a backlog it may
/// add the largest fetch response, which librdkafka holds whole until its last message is
/// read (the local broker ignores fetch limits: a backlog comes in one response).
const RSS_TARGET_MIB: f64 = 150.0;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The RSS line of a run: peak (and median), its target, and what the client's fetches held.
fn rss_line(peak_mib: f64, median_mib: Option<f64>, report: &RunReport, draining: bool) -> String {
    let fetch = mib(report.fetch_response_bytes_max);
    let target = if draining {
        format!(
            "target ≤ {RSS_TARGET_MIB:.0} MiB + largest fetch = {:.0} MiB",
            RSS_TARGET_MIB + fetch
        )
    } else {
        format!("target ≤ {RSS_TARGET_MIB:.0} MiB")
    };
    let median = median_mib.map_or(String::new(), |m| format!(" (median {m:.0})"));
    format!(
        "peak RSS {peak_mib:.0} MiB{median}, {target}; largest fetch response ≤ {fetch:.1} MiB \
         (all its broker sent in one 5 s statistics interval), librdkafka's fetch queues held \
         ≤ {:.1} MiB (sampled every 5 s)",
        mib(report.fetch_queue_bytes_max)
    )
}

fn rate(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64().max(1e-9)
}

/// One line of the summary table.
struct Row {
    figure: String,
    value: String,
    reference: String,
    ratio: Option<f64>,
}

fn row(
    figure: impl Into<String>,
    value: impl Into<String>,
    reference: impl Into<String>,
    ratio: Option<f64>,
) -> Row {
    Row {
        figure: figure.into(),
        value: value.into(),
        reference: reference.into(),
        ratio,
    }
}

pub async fn run(base: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let id = format!("bench{}", chrono::Utc::now().timestamp_millis());
    let mut cfg = base.isolated(&id);
    let own = super::bench_store::BenchStore::create(&mut cfg, &id).await;
    let outcome = measure(&cfg, &id, args).await;
    // Every mode, finished or failed part-way, leaves the servers as they were. `measure` has
    // closed its event store connection by now (dropping the database ends any still open).
    cleanup(&cfg, &analytics_config(&cfg, &id), own.as_ref()).await;
    outcome
}

/// The analytics-only drain's settings: a group, a deployment (its table's pointers are not
/// the full drain's) and a table of its own.
fn analytics_config(cfg: &Config, id: &str) -> Config {
    let mut c = cfg.clone();
    c.kafka.group_id = format!("{id}-analytics");
    c.deployment = format!("{id}-analytics");
    c.views.clickhouse_table = format!("{id}_facts_only");
    c
}

async fn measure(cfg: &Config, id: &str, args: BenchArgs) -> anyhow::Result<()> {
    let ns = format!("{id}-");
    let n = args.events;
    println!(
        "== projector bench: {n} events (seed {SEED}), windows of up to {} messages, {} cores",
        cfg.worker.window_size,
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    if let Some(rate) = args.steady_rate {
        let s = steady(cfg, id, rate).await?;
        println!("{}", s.line());
        print_budget(&s.report.steps);
        return Ok(());
    }
    if args.curve_only {
        curve(cfg, id, None).await?;
        return Ok(());
    }
    if args.hot_only {
        let hot = super::bench_hot::run(cfg, id, args.hot_orders, HOT_RATE, HOT_SECS).await?;
        hot.print();
        return Ok(());
    }
    let history: Vec<EventEnvelope> = History::new(SEED, &ns).take(n as usize).collect();
    let mut rows = Vec::new();
    if args.read_only {
        backlog(cfg, &ns, n).await?;
        drain(cfg, "all", None).await?;
        read_latency(cfg, &history, &mut rows).await?;
        return Ok(());
    }
    if args.drain_only {
        backlog(cfg, &ns, n).await?;
        let all = drain(cfg, "all", None).await?;
        let r = &all.report;
        let all_rate = rate(r.messages as f64, Duration::from_secs_f64(r.active_seconds));
        println!(
            "drain, all three read models: {all_rate:.0} events/s ({:.1}s); {} windows, {} \
             views loaded",
            r.active_seconds, r.windows, r.loads
        );
        println!(
            "  {}",
            rss_line(all.rss_mib, Some(all.rss_median_mib), r, true)
        );
        println!("  CPU while draining (share of one core): {}", all.cpu);
        print_budget(&r.steps);
        for (p, n) in &r.writes {
            let secs = r.write_seconds.get(p).copied().unwrap_or_default();
            println!("  {p}: {n} writes, {secs:.1} s writing");
        }
        return Ok(());
    }

    // 1. The engine alone.
    let (engine_rate, engine) = engine_alone(cfg, &history).await?;
    println!(
        "engine alone: {engine_rate:.0} events/s ({} windows; writes per projector {:?})",
        engine.windows, engine.writes
    );
    rows.push(row(
        "engine alone (decode, route, fold, encode)",
        format!("{engine_rate:.0} events/s"),
        "target 500,000",
        Some(engine_rate / 500_000.0),
    ));
    if args.engine_only {
        return Ok(());
    }

    // 2. Raw capacity.
    let raw = raw_capacity(cfg, &history, args.raw_docs, args.redis_cluster.as_deref()).await?;

    rows.push(row(
        "redis writes with durable acknowledgements",
        format!("{:.0}/s (appendfsync always)", raw.redis),
        format!("{:.0}/s with everysec", raw.redis_everysec),
        Some(raw.redis / raw.redis_everysec.max(1e-9)),
    ));
    if let Some(c) = raw.redis_cluster {
        rows.push(row(
            "redis cluster writes (3 primaries)",
            format!("{c:.0}/s (appendfsync always)"),
            format!("{:.0}/s on one server", raw.redis),
            Some(c / raw.redis.max(1e-9)),
        ));
    }

    // 3. The backlog: the same history, appended and published.
    let (store, start) = backlog(cfg, &ns, n).await?;

    // 4. Drains: all three read models, analytics only, ClickHouse's Kafka engine.
    let all = drain(cfg, "all", None).await?;
    let all_rate = rate(
        all.report.messages as f64,
        Duration::from_secs_f64(all.report.active_seconds),
    );
    println!(
        "drain, all three read models: {all_rate:.0} events/s ({:.1}s); {} windows, {} views \
         loaded, {} conflicts",
        all.report.active_seconds, all.report.windows, all.report.loads, all.report.conflicts
    );
    println!(
        "  {}",
        rss_line(all.rss_mib, Some(all.rss_median_mib), &all.report, true)
    );
    println!("  CPU while draining (share of one core): {}", all.cpu);
    let analytics_cfg = analytics_config(cfg, id);
    let only = drain(&analytics_cfg, "analytics", Some("analytics")).await?;
    let only_rate = rate(
        only.report.messages as f64,
        Duration::from_secs_f64(only.report.active_seconds),
    );
    println!(
        "drain, analytics only: {only_rate:.0} events/s ({:.1}s)",
        only.report.active_seconds
    );
    println!(
        "  {}",
        rss_line(only.rss_mib, Some(only.rss_median_mib), &only.report, true)
    );
    println!("  CPU while draining (share of one core): {}", only.cpu);
    let ch_engine = if args.clickhouse_engine {
        let r = clickhouse_engine(cfg, id, n).await?;
        println!("ClickHouse Kafka engine, same backlog: {r:.0} rows/s");
        Some(r)
    } else {
        None
    };
    rows.push(row(
        "backlog drain, all three read models",
        format!("{all_rate:.0} events/s"),
        "target 45,000",
        Some(all_rate / 45_000.0),
    ));
    rows.push(row(
        "backlog drain, analytics only",
        format!("{only_rate:.0} events/s"),
        ch_engine.map_or("-".into(), |r| {
            format!("ClickHouse Kafka engine {r:.0} rows/s (target 2x)")
        }),
        ch_engine.map(|r| only_rate / r),
    ));
    let drain_target = RSS_TARGET_MIB + mib(all.report.fetch_response_bytes_max);
    rows.push(row(
        "worker peak RSS, draining all three",
        format!("{:.0} MiB", all.rss_mib),
        format!(
            "target 150 MiB + largest fetch {:.0} MiB",
            mib(all.report.fetch_response_bytes_max)
        ),
        Some(all.rss_mib / drain_target),
    ));
    for (name, store) in [
        ("customer360", "redis"),
        ("order_view", "mongo"),
        ("analytics", "clickhouse"),
    ] {
        let writes = all.report.writes.get(name).copied().unwrap_or(0);
        let capacity = raw.of(store);
        let busy = rate(
            writes as f64,
            Duration::from_secs_f64(all.report.active_seconds),
        );
        rows.push(row(
            format!("{store} writes while draining ({name})"),
            format!("{busy:.0}/s ({writes} in all)"),
            format!("raw capacity {capacity:.0}/s"),
            Some(busy / capacity.max(1e-9)),
        ));
    }

    // Read latency (HTTP and MCP) on the read models just drained.
    read_latency(cfg, &history, &mut rows).await?;

    // The backlog's topics are done with: every later phase runs on topics of its own.
    let _ = kafka::delete_topics(&cfg.kafka).await;

    // 5. Steady state: the latency curve, up to 80 % of the drain rate.
    if args.steady {
        let top = (all_rate * 0.8).max(100.0);
        for s in curve(cfg, id, Some(top)).await? {
            let (target, why) = if s.rate == 5_000.0 {
                (250.0, "target 250 ms")
            } else if s.rate == top {
                (1_000.0, "target 1,000 ms (80 % of the drain)")
            } else {
                (0.0, "-")
            };
            rows.push(row(
                format!("p99 publish → visible at {:.0} events/s", s.rate),
                format!("{} ms (p50 {} ms)", s.p99, s.p50),
                why,
                (target > 0.0).then(|| s.p99 as f64 / target),
            ));
            rows.push(row(
                format!("worker peak RSS at {:.0} events/s", s.rate),
                format!("{:.0} MiB", s.rss),
                "target 150 MiB",
                Some(s.rss / RSS_TARGET_MIB),
            ));
        }
    }

    // 6. The hot customer (after the rebuild's start position: its events are not in the
    // event store, so the rebuilds below replay exactly the seeded history).
    if args.hot_orders > 0 {
        let hot = super::bench_hot::run(cfg, id, args.hot_orders, HOT_RATE, HOT_SECS).await?;
        hot.print();
        rows.push(row(
            format!("hot customer ({} orders): worker CPU", args.hot_orders),
            format!("{:.1} % of a core", hot.hot.cpu_share * 100.0),
            format!(
                "{:.1} % over many customers; target ≤1.5×",
                hot.spread.cpu_share * 100.0
            ),
            Some(hot.cpu_ratio() / 1.5),
        ));
        rows.push(row(
            "hot customer: p99 publish → visible",
            format!("{} ms", hot.hot.p99),
            format!("{} ms over many customers; target ≤1.5×", hot.spread.p99),
            Some(hot.p99_ratio() / 1.5),
        ));
        rows.push(row(
            "hot customer: its Customer-360 document",
            format!("{} bytes", hot.document_bytes),
            "target: flat in history",
            None,
        ));
    }

    // 7. Rebuilds from the event store: exactly this run's history.
    for (label, names) in [
        ("customer360", vec!["customer360"]),
        ("order_view", vec!["order_view"]),
        ("analytics", vec!["analytics"]),
        ("--all", projectors::names()),
    ] {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let version = format!("r{}", label.trim_start_matches('-'));
        for p in &names {
            rebuild::save_checkpoint(
                &store,
                &Checkpoint {
                    projection: projector::versions::scope_key(cfg, p),
                    version: version.clone(),
                    position: start,
                    events_applied: 0,
                    status: "building".into(),
                },
            )
            .await?;
        }
        let opts = RebuildOptions {
            version,
            batch: 10_000,
            checkpoint_every: 50_000,
        };
        let t = Instant::now();
        let done = rebuild::rebuild(cfg, &store, &names, &opts, None, &mut |_, _, _| {}).await?;
        let secs = t.elapsed();
        let applied = done.first().map_or(0, |c| c.events_applied);
        anyhow::ensure!(
            applied as u64 == n,
            "rebuild {label} replayed {applied} events, not {n}"
        );
        let r = rate(applied as f64, secs);
        let target = if label == "analytics" {
            300_000.0
        } else if label == "--all" {
            100_000.0
        } else {
            0.0
        };
        println!("rebuild {label}: {r:.0} events/s ({applied} events)");
        rows.push(row(
            format!("rebuild {label}"),
            format!("{r:.0} events/s"),
            if target > 0.0 {
                format!("target {target:.0}")
            } else {
                "-".into()
            },
            (target > 0.0).then(|| r / target),
        ));
    }

    println!();
    println!(
        "{:<48} {:>26} {:>46} {:>7}",
        "figure", "measured", "reference (same run)", "ratio"
    );
    for r in &rows {
        println!(
            "{:<48} {:>26} {:>46} {:>7}",
            r.figure,
            r.value,
            r.reference,
            r.ratio.map_or("-".into(), |x| format!("{x:.2}"))
        );
    }
    Ok(())
}

/// Append the seeded history to the event store and publish it (the backlog every drain
/// reads); returns the store and its head before the append.
async fn backlog(
    cfg: &Config,
    ns: &str,
    n: u64,
) -> anyhow::Result<(EventStore, projector::store::ReplayPosition)> {
    let mut store = EventStore::connect(&cfg.postgres.url).await?;
    store.migrate().await?;
    let start = store.committed_head().await?;
    kafka::ensure_topics(&cfg.kafka).await?;
    let publisher = EventPublisher::new(&cfg.kafka)?;
    let t = Instant::now();
    let g = generator::generate(
        &mut [
            EventStore::connect(&cfg.postgres.url).await?,
            EventStore::connect(&cfg.postgres.url).await?,
        ],
        Some(&publisher),
        &GenerateOptions {
            seed: SEED,
            events: n,
            namespace: ns.to_owned(),
            batch_size: 10_000,
            ..Default::default()
        },
        |_| {},
    )
    .await?;
    println!(
        "backlog: {} events appended and published in {:.1}s",
        g.appended,
        t.elapsed().as_secs_f64()
    );
    Ok((store, start))
}

/// Read latency through the read service (HTTP and MCP) on the drained read models.
async fn read_latency(
    cfg: &Config,
    history: &[EventEnvelope],
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut customers: Vec<String> = history
        .iter()
        .filter(|e| e.aggregate_type == contract::AggregateType::Customer)
        .map(|e| e.aggregate_id.clone())
        .collect();
    customers.sort();
    customers.dedup();
    customers.truncate(5_000);
    let lines = super::read_bench::measure(cfg, &customers, Duration::from_secs(2)).await?;
    println!(
        "{:<28} {:>11} {:>9} {:>10} {:>10}",
        "read latency", "concurrency", "requests", "p50 µs", "p99 µs"
    );
    for l in &lines {
        println!(
            "{:<28} {:>11} {:>9} {:>10} {:>10}",
            l.what, l.concurrency, l.requests, l.p50_us, l.p99_us
        );
        rows.push(row(
            format!("p99 {} at concurrency {}", l.what, l.concurrency),
            format!(
                "{:.2} ms (p50 {:.2} ms)",
                l.p99_us as f64 / 1e3,
                l.p50_us as f64 / 1e3
            ),
            if l.what == "HTTP Customer-360" {
                "target 2 ms".to_owned()
            } else {
                format!("{:.0} requests/s", l.requests as f64 / 2.0)
            },
            (l.what == "HTTP Customer-360").then(|| l.p99_us as f64 / 2_000.0),
        ));
    }
    Ok(())
}

/// The history as raw windows of Kafka messages (value, key, headers), ready for decoding.
fn raw_windows(cfg: &Config, history: &[EventEnvelope]) -> (Vec<RawWindow>, Arc<Vec<String>>) {
    let topics = Arc::new(kafka::event_topics(&cfg.kafka));
    let size = cfg.worker.window_size.max(1);
    let mut out = Vec::new();
    for (i, chunk) in history.chunks(size).enumerate() {
        let mut arena = Arena::with_capacity(chunk.len() * 600);
        let mut items = Vec::with_capacity(chunk.len());
        for (j, e) in chunk.iter().enumerate() {
            let pairs = contract::RequiredHeaders::for_event(e).pairs();
            let topic = contract::AggregateType::ALL
                .iter()
                .position(|a| *a == e.aggregate_type)
                .unwrap_or(0) as u16;
            let raw = RawRef {
                key: Some(arena.push(e.aggregate_id.as_bytes())),
                payload: Some(arena.push(&e.to_json_bytes())),
                headers: Some(
                    arena.push_headers(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                ),
            };
            items.push(RawItem {
                origin: Origin::Kafka {
                    topic,
                    partition: 0,
                    offset: (i * size + j) as i64,
                    epoch: 0,
                    timestamp_ms: None,
                },
                raw,
            });
        }
        out.push(RawWindow {
            id: i as u64 + 1,
            generation: 0,
            items,
            arena,
            opened: Instant::now(),
        });
    }
    (out, topics)
}

async fn engine_alone(cfg: &Config, history: &[EventEnvelope]) -> anyhow::Result<(f64, RunReport)> {
    let (windows, topics) = raw_windows(cfg, history);
    let sinks = NullSinks::default();
    // The null stores give nothing back: a view evicted from the cache would be folded again
    // from nothing (and refused). The engine keeps every view, as it did before the cache had
    // a byte budget.
    let mut cfg = cfg.clone();
    cfg.worker.cache_bytes = 1 << 40;
    let (took, report) = run_memory(&cfg, windows, topics, &sinks).await?;
    anyhow::ensure!(
        report.messages == history.len() as u64,
        "the engine lost messages"
    );
    anyhow::ensure!(
        report.dead_letters == 0,
        "the engine refused {} events of a clean history",
        report.dead_letters
    );
    Ok((rate(history.len() as f64, took), report))
}

struct RawCapacity {
    redis: f64,
    redis_everysec: f64,
    redis_cluster: Option<f64>,
    mongo_insert: f64,
    mongo_update: f64,
    clickhouse: f64,
}

impl RawCapacity {
    fn of(&self, store: &str) -> f64 {
        match store {
            "redis" => self.redis,
            "mongo" => self.mongo_insert.min(self.mongo_update),
            _ => self.clickhouse,
        }
    }
}

/// Documents of a realistic size through the sinks' own write path (compare-and-set
/// scripts, insert/update commands, RowBinary inserts), no projection.
async fn raw_capacity(
    cfg: &Config,
    history: &[EventEnvelope],
    n: usize,
    cluster: Option<&str>,
) -> anyhow::Result<RawCapacity> {
    #[derive(serde::Serialize, serde::Deserialize, Default, Clone)]
    struct Blob {
        customer_id: String,
        blob: String,
    }
    let doc = |i: usize, rev: u64| projectors::Doc {
        view: Blob {
            customer_id: format!("c{i}"),
            blob: "y".repeat(1200),
        },
        guard: Default::default(),
        rev,
    };
    let writes = |store: &dyn Fn(&projectors::Doc<Blob>) -> Vec<u8>,
                  expected: &[u64]|
     -> (Vec<DocWrite>, Vec<u64>) {
        let mut revs = Vec::with_capacity(n);
        let ws = (0..n)
            .map(|i| {
                let rev = new_rev();
                revs.push(rev);
                DocWrite {
                    key: format!("k{i}"),
                    expected: expected.get(i).copied(),
                    rev,
                    body: store(&doc(i, rev)).into(),
                    finished: Vec::new(),
                }
            })
            .collect();
        (ws, revs)
    };
    let window = cfg.worker.window_size.max(1);

    let redis = RedisSink::connect(&cfg.redis, &format!("{}raw:", cfg.views.redis_prefix)).await?;
    let mut con = redis.connection();
    let old: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    let set_fsync = |policy: String| {
        let mut con = con.clone();
        async move {
            let _: Result<(), _> = redis::cmd("CONFIG")
                .arg("SET")
                .arg("appendfsync")
                .arg(policy)
                .query_async(&mut con)
                .await;
        }
    };
    let redis_rate = |policy: &'static str| {
        let redis = redis.clone();
        let set_fsync = &set_fsync;
        let (ws, _) = writes(&|d| redis.encode(d).unwrap_or_default(), &[]);
        async move {
            set_fsync(policy.to_owned()).await;
            redis.delete_all().await?;
            let t = Instant::now();
            for c in ws.chunks(window) {
                redis.write(c).await?;
            }
            Ok::<_, anyhow::Error>(rate(ws.len() as f64, t.elapsed()))
        }
    };
    let redis_everysec = redis_rate("everysec").await?;
    let redis_always = redis_rate("always").await?;
    if let Some(policy) = old.get(1) {
        set_fsync(policy.clone()).await;
    }
    redis.delete_all().await?;

    let redis_cluster = match cluster {
        Some(urls) => {
            let c = projector::config::RedisConfig {
                url: urls.to_owned(),
                cluster: true,
                ..cfg.redis.clone()
            };
            let sink = RedisSink::connect(&c, &format!("{}raw:", cfg.views.redis_prefix)).await?;
            let (ws, _) = writes(&|d| sink.encode(d).unwrap_or_default(), &[]);
            sink.delete_all().await?;
            let t = Instant::now();
            for c in ws.chunks(window) {
                sink.write(c).await?;
            }
            let r = rate(ws.len() as f64, t.elapsed());
            sink.delete_all().await?;
            Some(r)
        }
        None => None,
    };

    let mongo =
        MongoSink::connect(&cfg.mongo, &format!("{}_raw", cfg.views.mongo_collection)).await?;
    let (ws, revs) = writes(&|d| mongo.encode(d).unwrap_or_default(), &[]);
    let t = Instant::now();
    for c in ws.chunks(window) {
        mongo.write(c).await?;
    }
    let mongo_insert = rate(ws.len() as f64, t.elapsed());
    let (ws, _) = writes(&|d| mongo.encode(d).unwrap_or_default(), &revs);
    let t = Instant::now();
    for c in ws.chunks(window) {
        let out = mongo.write(c).await?;
        anyhow::ensure!(out.conflicts.is_empty(), "raw update conflicted");
    }
    let mongo_update = rate(ws.len() as f64, t.elapsed());
    mongo.drop_collection().await?;

    let ch = ClickHouseSink::connect(
        &cfg.clickhouse,
        &format!("{}_raw", cfg.views.clickhouse_table),
    )
    .await?;
    let facts: Vec<projectors::analytics::Fact> = history
        .iter()
        .cycle()
        .take(n)
        .filter_map(|e| {
            projectors::FactProjector::fact(
                &projectors::analytics::AnalyticsProjector,
                &e.clone().into_event().ok()?,
            )
            .ok()
        })
        .collect();
    let t = Instant::now();
    for c in facts.chunks(window) {
        ch.insert(c).await?;
    }
    let clickhouse = rate(facts.len() as f64, t.elapsed());
    ch.drop_table().await?;
    println!(
        "raw capacity ({n} documents/rows, {window} per call): redis {redis_always:.0}/s fsync always ({redis_everysec:.0}/s everysec: durable acknowledgements cost {:.0}%), \
         mongo insert {mongo_insert:.0}/s update {mongo_update:.0}/s, clickhouse {clickhouse:.0}/s",
        100.0 * (1.0 - redis_always / redis_everysec.max(1e-9))
    );
    Ok(RawCapacity {
        redis: redis_always,
        redis_everysec,
        redis_cluster,
        mongo_insert,
        mongo_update,
        clickhouse,
    })
}

struct Drain {
    report: RunReport,
    rss_mib: f64,
    /// Where the CPU went while it drained (share of one core per process).
    cpu: String,
    /// Median of the RSS samples: the peak is set by the broker's fetch responses, which the
    /// local broker does not bound (see README).
    rss_median_mib: f64,
}

/// A fresh group drains the backlog in a worker process (this binary); peak RSS sampled.
async fn drain(cfg: &Config, label: &str, only: Option<&str>) -> anyhow::Result<Drain> {
    let stats = std::env::temp_dir().join(format!("{}-{label}-stats.json", cfg.kafka.group_id));
    let probe = CpuProbe::start();
    let child = spawn_worker(cfg, &stats, 3.0, only)?;
    let (status, rss, worker_cpu, median) = wait_sampling_rss(child).await?;
    let cpu = probe.report(worker_cpu);
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let report: RunReport = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let _ = std::fs::remove_file(&stats);
    Ok(Drain {
        report,
        rss_mib: rss as f64 / 1024.0,
        cpu,
        rss_median_mib: median as f64 / 1024.0,
    })
}

/// Wait for a worker, sampling its peak RSS and median RSS (KiB) and its CPU seconds.
pub(super) async fn wait_sampling_rss(
    mut child: std::process::Child,
) -> anyhow::Result<(std::process::ExitStatus, u64, Option<f64>, u64)> {
    let pid = child.id();
    let mut peak = 0u64;
    let mut cpu = None;
    let mut samples = Vec::new();
    loop {
        if let Some(s) = child.try_wait()? {
            samples.sort_unstable();
            let median = samples.get(samples.len() / 2).copied().unwrap_or(0);
            return Ok((s, peak, cpu, median));
        }
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(kib) = vm_rss_kib(pid) {
            samples.push(kib);
        }
        if let Some(c) = cpu_seconds(pid) {
            cpu = Some(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The servers' pids, from the pid files `scripts/services.sh` keeps (this machine's
/// servers only; none when they run elsewhere).
fn server_pids() -> Vec<(&'static str, u32)> {
    let out = std::process::Command::new("bash")
        .args(["scripts/services.sh", "pid"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ["kafka", "postgres", "redis", "mongo", "clickhouse"]
        .into_iter()
        .filter_map(|svc| {
            let line = text.lines().find(|l| l.starts_with(svc))?;
            Some((svc, line.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect()
}

/// CPU used by each server (and PostgreSQL's backends, counted with it) between two reads.
struct CpuProbe(Vec<(&'static str, u32, f64)>, Instant);

impl CpuProbe {
    fn start() -> CpuProbe {
        let v = server_pids()
            .into_iter()
            .map(|(s, p)| (s, p, cpu_seconds(p).unwrap_or(0.0)))
            .collect();
        CpuProbe(v, Instant::now())
    }

    /// "mongo 93%, redis 20%, …" of one core, over the time since `start`.
    fn report(&self, worker: Option<f64>) -> String {
        let secs = self.1.elapsed().as_secs_f64().max(1e-9);
        let mut parts: Vec<(String, f64)> = self
            .0
            .iter()
            .map(|(s, p, before)| {
                (
                    (*s).to_owned(),
                    (cpu_seconds(*p).unwrap_or(*before) - before) / secs,
                )
            })
            .collect();
        if let Some(w) = worker {
            parts.push(("worker".into(), w / secs));
        }
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        parts
            .iter()
            .map(|(s, c)| format!("{s} {:.0}%", c * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Resident set of a process now (VmRSS), in KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set of a process (VmHWM), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// ClickHouse's Kafka table engine drains the same backlog (a consumer group of its own)
/// through a materialized view into a ReplacingMergeTree of the same facts; rows/s from the
/// first row to the last.
async fn clickhouse_engine(cfg: &Config, id: &str, n: u64) -> anyhow::Result<f64> {
    let ch = ClickHouseSink::connect(&cfg.clickhouse, &format!("{id}_kengine_facts")).await?;
    let c = ch.client();
    let topics = kafka::event_topics(&cfg.kafka).join(",");
    let exec = |sql: String| async move { c.query(&sql).execute().await };
    // The local engine answers CREATE of a Kafka table with "Shutdown was called" though it
    // creates it: believe the catalogue.
    let created = exec(format!(
        "CREATE TABLE {id}_kqueue (raw String) ENGINE = Kafka SETTINGS \
         kafka_broker_list = '{}', kafka_topic_list = '{topics}', kafka_group_name = '{id}-clickhouse', \
         kafka_format = 'JSONAsString', kafka_num_consumers = 1, kafka_flush_interval_ms = 200, \
         kafka_max_block_size = 65536",
        cfg.kafka.brokers
    ))
    .await;
    if let Err(e) = created {
        let exists: u8 = c
            .query(&format!("EXISTS TABLE {id}_kqueue"))
            .fetch_one()
            .await
            .unwrap_or(0);
        anyhow::ensure!(exists == 1, "creating the Kafka table: {e}");
    }
    let t = Instant::now();
    exec(format!(
        "CREATE MATERIALIZED VIEW {id}_kmv TO {id}_kengine_facts AS SELECT \
           JSONExtractString(raw, 'event_id') AS event_id, \
           JSONExtractString(raw, 'event_type') AS event_type, \
           JSONExtractString(raw, 'aggregate_type') AS aggregate_type, \
           JSONExtractString(raw, 'aggregate_id') AS aggregate_id, \
           JSONExtractString(raw, 'event_data', 'customer_id') AS customer_id, \
           JSONExtractInt(raw, 'sequence_number') AS sequence_number, \
           JSONExtractInt(raw, 'global_position') AS global_position, \
           parseDateTime64BestEffort(JSONExtractString(raw, 'timestamp'), 3) AS ts, \
           toInt64(round(multiIf(event_type = 'order.placed', JSONExtractFloat(raw, 'event_data', 'total_amount'), \
             event_type = 'order.payment_confirmed', JSONExtractFloat(raw, 'event_data', 'amount'), 0) * 100)) AS amount_cents, \
           JSONExtractString(raw, 'event_data', 'interaction_type') AS interaction_type, \
           if(JSONHas(raw, 'event_data', 'sentiment_score'), JSONExtractFloat(raw, 'event_data', 'sentiment_score'), -1) AS sentiment \
         FROM {id}_kqueue"
    ))
    .await?;
    let count = || async move {
        c.query(&format!("SELECT count() FROM {id}_kengine_facts"))
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
    };
    let mut first: Option<Instant> = None;
    let deadline = t + Duration::from_secs(600);
    loop {
        let have = count().await;
        if have > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if have >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the Kafka engine stalled at {have} of {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = first.map_or(t.elapsed(), |f| f.elapsed());
    // A Kafka table left behind would keep consuming, and the local engine cannot even start
    // with one whose topics are gone: drop it until it is really gone.
    for table in [format!("{id}_kmv"), format!("{id}_kqueue")] {
        let mut gone = false;
        for _ in 0..10 {
            let _ = exec(format!("DROP TABLE IF EXISTS {table} SYNC")).await;
            let exists: u8 = c
                .query(&format!("EXISTS TABLE {table}"))
                .fetch_one()
                .await
                .unwrap_or(1);
            if exists == 0 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::ensure!(
            gone,
            "could not drop the benchmark's table {table}: drop it by hand"
        );
    }
    let _ = ch.drop_table().await;
    Ok(rate(n as f64, took))
}

/// A worker that has caught up receives a new history published at `target` events/s for
/// about 15 s; publish → visible percentiles from the worker's own figures.
/// The latency budget of a run, step by step (see `projector::runtime::budget`).
fn print_budget(steps: &[projector::runtime::budget::StepLatency]) {
    println!(
        "  {:<16} {:>6} {:>11} {:>11} {:>11}",
        "latency budget", "count", "p50 ms", "p99 ms", "max ms"
    );
    for s in steps {
        println!(
            "  {:<16} {:>6} {:>11.2} {:>11.2} {:>11.2}",
            s.step, s.count, s.p50_ms, s.p99_ms, s.max_ms
        );
    }
}

/// One steady-state run: publish → visible from the worker's own figures.
pub(super) struct Steady {
    pub rate: f64,
    pub sent: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// Peak RSS, MiB.
    pub rss: f64,
    /// Worker CPU seconds per wall second while the load was published.
    pub cpu_share: f64,
    /// Each server's and the worker's CPU while the load was published (what bounds a rate).
    pub servers: String,
    /// The worker's own report (latency budget, fetch sizes).
    pub report: RunReport,
}

impl Steady {
    fn line(&self) -> String {
        format!(
            "steady state at {:.0} events/s ({} events): publish → visible p50 {} ms, p99 {} ms, max {} ms\n  CPU while publishing (share of one core): {}\n  {}",
            self.rate,
            self.sent,
            self.p50,
            self.p99,
            self.max,
            self.servers,
            rss_line(self.rss, None, &self.report, false)
        )
    }
}

/// A worker that has caught up receives a new history published at `target` events/s for
/// about 15 s.
async fn steady(cfg: &Config, id: &str, target: f64) -> anyhow::Result<Steady> {
    let history: Vec<EventEnvelope> = History::new(SEED + 1, &format!("{id}s{target:.0}-"))
        .take((target * 15.0) as usize)
        .collect();
    publish_steadily(cfg, &format!("{id}-steady-{target:.0}"), &history, target).await
}

/// `cfg` on topics and a group of the phase's own (`label`), created. The local broker
/// rewrites a snapshot of everything it holds whenever any topic changes: a 200,000-event
/// backlog left on it took 58 % of a core from the broker at 5,000 events/s (15–33 % with
/// topics of the phase's own). Each phase after the drains runs on its own, deleted after.
pub(super) async fn on_own_topics(cfg: &Config, label: &str) -> anyhow::Result<Config> {
    let mut c = cfg.clone();
    c.kafka.topic_prefix = format!("{label}.");
    c.kafka.dlq_topic = format!("{label}.dlq");
    c.kafka.group_id = format!("{label}-group");
    kafka::ensure_topics(&c.kafka).await?;
    Ok(c)
}

/// A worker that has caught up receives `events` published at `rate` events/s, on topics of
/// its own; its figures.
pub(super) async fn publish_steadily(
    cfg: &Config,
    label: &str,
    events: &[EventEnvelope],
    rate: f64,
) -> anyhow::Result<Steady> {
    let cfg = &on_own_topics(cfg, label).await?;
    let steady = measure_steadily(cfg, label, events, rate).await;
    let _ = kafka::delete_topics(&cfg.kafka).await;
    steady
}

async fn measure_steadily(
    cfg: &Config,
    label: &str,
    events: &[EventEnvelope],
    rate: f64,
) -> anyhow::Result<Steady> {
    let stats = std::env::temp_dir().join(format!("{label}-stats.json"));
    let child = spawn_worker(cfg, &stats, 8.0, None)?;
    let pid = child.id();
    let waiting = tokio::spawn(wait_sampling_rss(child));
    // Joined and caught up before the load starts (the worker exits 8 s after the last event).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let publisher = EventPublisher::new(&cfg.kafka)?;
    let tick = Duration::from_millis(50);
    let per_tick = ((rate * tick.as_secs_f64()).ceil() as usize).max(1);
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let probe = CpuProbe::start();
    let started = Instant::now();
    for (i, chunk) in events.chunks(per_tick).enumerate() {
        let due = started + tick * i as u32;
        tokio::time::sleep_until(due.into()).await;
        publisher.publish(chunk).await?;
    }
    let cpu = cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
    let wall = started.elapsed().as_secs_f64();
    let servers = probe.report(Some(cpu));
    let (status, rss, _, _) = waiting.await??;
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let report: RunReport = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let _ = std::fs::remove_file(&stats);
    Ok(Steady {
        rate,
        sent: events.len() as u64,
        p50: report.latency_ms_p50,
        p99: report.latency_ms_p99,
        max: report.latency_ms_max,
        rss: rss as f64 / 1024.0,
        cpu_share: cpu / wall.max(1e-9),
        servers,
        report,
    })
}

/// Publish → visible at each rate of the curve (and `extra`, 80 % of the drain rate): one
/// line per rate, the latency budget of each, and what the targets say.
async fn curve(cfg: &Config, id: &str, extra: Option<f64>) -> anyhow::Result<Vec<Steady>> {
    let mut rates = CURVE.to_vec();
    rates.extend(extra);
    let mut out = Vec::new();
    for rate in rates {
        let s = steady(cfg, id, rate).await?;
        println!("{}", s.line());
        print_budget(&s.report.steps);
        out.push(s);
    }
    println!("  rate ev/s     p50 ms     p99 ms     max ms   worker %   RSS MiB");
    for s in &out {
        println!(
            "  {:>9.0} {:>10} {:>10} {:>10} {:>10.0} {:>9.0}",
            s.rate,
            s.p50,
            s.p99,
            s.max,
            s.cpu_share * 100.0,
            s.rss
        );
    }
    Ok(out)
}

/// The rates of the latency curve, events/s.
const CURVE: [f64; 4] = [1_000.0, 2_000.0, 5_000.0, 10_000.0];

/// A worker process that exits when idle, writing its figures to `stats` (only the `only`
/// projector, if named).
pub(super) fn spawn_worker(
    cfg: &Config,
    stats: &Path,
    idle: f64,
    only: Option<&str>,
) -> anyhow::Result<std::process::Child> {
    // BENCH_WORKER_WRAP runs the worker under another program, e.g. "heaptrack -o /tmp/w"
    // or "perf record -g -o /tmp/w.data" (profiling the process the figures come from).
    let wrap = std::env::var("BENCH_WORKER_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(std::env::current_exe()?);
            c
        }
        None => std::process::Command::new(std::env::current_exe()?),
    };
    cmd.args(["run", "--exit-when-idle", &idle.to_string(), "--stats-json"])
        .arg(PathBuf::from(stats));
    if let Some(p) = only {
        cmd.args(["--projectors", p]);
    }
    cmd.envs(cfg.child_env())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .context("starting the worker")
}

/// Leave the local servers as they were: topics, read models and the bench's own event store
/// dropped.
async fn cleanup(
    cfg: &Config,
    analytics_cfg: &Config,
    own: Option<&super::bench_store::BenchStore>,
) {
    let _ = kafka::delete_topics(&cfg.kafka).await;
    let rebuilt = ["rcustomer360", "rorder_view", "ranalytics", "rall"]
        .map(|v| (cfg, projector::versions::views_for(cfg, v)));
    for (c, views) in [
        (cfg, cfg.views.clone()),
        (analytics_cfg, analytics_cfg.views.clone()),
    ]
    .into_iter()
    .chain(rebuilt)
    {
        // Each store on its own: one that is down (the reason a run failed, say) does not
        // keep the others from being cleaned, nor get MongoDB collections made to be dropped.
        if let Ok(r) = RedisSink::connect(&c.redis, &views.redis_prefix).await {
            let _ = r.delete_all().await;
            let _ = r.with_pointer(c.redis_pointer_key()).forget_pointer().await;
        }
        if let Ok(m) = MongoSink::connect_unindexed(&c.mongo, &views.mongo_collection).await {
            let _ = m.drop_collection().await;
        }
        if let Ok(ch) = ClickHouseSink::connect(&c.clickhouse, &views.clickhouse_table).await {
            let _ = ch.drop_table().await;
        }
    }
    if let Some(own) = own {
        own.drop_now().await;
    }
}
