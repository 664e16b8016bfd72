//! `projector bench`: every figure from the same seeded history, each printed beside the
//! reference it is judged against, measured in the same run on the same machine.
//!
//! 1. the engine alone ([`engine`]: decode, route, fold, encode; stores that keep nothing),
//!    every core;
//! 2. each store's raw capacity ([`capacity`]) with the write shape its sink really uses (and
//!    the cost of durable acknowledgements: Redis `appendfsync always` against `everysec`);
//! 3. the history appended to the event store and preloaded on the topics as a backlog;
//! 4. a fresh group drains it into all three read models, then analytics only, each in a
//!    worker process ([`worker`]: peak RSS and CPU sampled), and ClickHouse's own Kafka table
//!    engine ([`peer`]) drains the same backlog into the same kind of table;
//! 5. the read service's latency ([`read`]), HTTP and MCP, on the drained read models;
//! 6. steady state ([`steady`]): publish → visible at 1k, 2k, 5k and 10k events/s and at
//!    80 % of the measured drain rate, with each rate's latency budget;
//! 7. the hot customer ([`hot`]): one customer's long history, then a steady rate for it
//!    alone, beside the same rate over many customers;
//! 8. rebuild from the event store, per projection and all at once.
//!
//! Each run works in an event-store database ([`store`]), topics and read models of its own,
//! and removes them whatever the outcome.

use std::time::{Duration, Instant};

use contract::EventEnvelope;
use projector::config::Config;
use projector::generator::{self, GenerateOptions, History};
use projector::kafka::{self, EventPublisher};
use projector::rebuild::{self, Checkpoint, RebuildOptions};
use projector::sinks::clickhouse::ClickHouseSink;
use projector::sinks::mongo::MongoSink;
use projector::sinks::redis::RedisSink;
use projector::store::EventStore;

mod capacity;
mod engine;
mod hot;
mod peer;
mod read;
mod steady;
mod store;
mod worker;

use capacity::raw_capacity;
use engine::engine_alone;
use peer::clickhouse_engine;
use steady::{at_rate, curve, print_budget};
use worker::{RSS_TARGET_MIB, drain, mib, rss_line};

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
    let own = store::BenchStore::create(&mut cfg, &id).await?;
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
        let s = at_rate(cfg, id, rate).await?;
        println!("{}", s.line());
        print_budget(&s.report.steps);
        return Ok(());
    }
    if args.curve_only {
        curve(cfg, id, None).await?;
        return Ok(());
    }
    if args.hot_only {
        let hot = hot::run(cfg, id, args.hot_orders, HOT_RATE, HOT_SECS).await?;
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
        let hot = hot::run(cfg, id, args.hot_orders, HOT_RATE, HOT_SECS).await?;
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
    let lines = read::measure(cfg, &customers, Duration::from_secs(2)).await?;
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

/// Leave the local servers as they were: topics, read models and the bench's own event store
/// dropped.
async fn cleanup(cfg: &Config, analytics_cfg: &Config, own: Option<&store::BenchStore>) {
    let _ = kafka::delete_topics(&cfg.kafka).await;
    // The live versions of both deployments (each announced its pointer key in Redis) and
    // the rebuilt ones (never switched to: nothing announced).
    let rebuilt = ["rcustomer360", "rorder_view", "ranalytics", "rall"]
        .map(|v| (cfg, projector::versions::views_for(cfg, v), false));
    for (c, views, announced) in [
        (cfg, cfg.views.clone(), true),
        (analytics_cfg, analytics_cfg.views.clone(), true),
    ]
    .into_iter()
    .chain(rebuilt)
    {
        // Each store on its own: one that is down (the reason a run failed, say) does not
        // keep the others from being cleaned, nor get MongoDB collections made to be dropped.
        if let Ok(r) = RedisSink::connect(&c.redis, &views.redis_prefix).await {
            let _ = r.delete_all().await;
            if announced {
                let _ = r.with_pointer(c.redis_pointer_key()).forget_pointer().await;
            }
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
