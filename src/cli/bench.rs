//! `projector bench`: the engine alone (null sinks) and generate → worker end to end on the
//! local services, beside the raw bulk capacity of each store measured in the same run.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use contract::{Event, EventEnvelope};
use projector::apply::{apply_documents, apply_facts};
use projector::config::Config;
use projector::generator::{self, GenerateOptions, History};
use projector::kafka::{self, EventPublisher};
use projector::rebuild;
use projector::router::Router;
use projector::sinks::clickhouse::{ClickHouseSink, FactRow};
use projector::sinks::memory::{MemoryDocs, NullFacts};
use projector::sinks::mongo::MongoSink;
use projector::sinks::redis::RedisSink;
use projector::sinks::{FactSink, SinkError};
use projector::store::EventStore;
use projector::worker::RunReport;
use projectors::StoreKind;

/// (label, projections rebuilt together, the raw capacity of the slowest store they write).
type RebuildRun = (
    String,
    Vec<std::sync::Arc<dyn projectors::DynProjector>>,
    f64,
);

pub struct BenchArgs {
    pub events: u64,
    pub batch: usize,
    pub raw_docs: usize,
}

fn rate(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64().max(1e-9)
}

/// Names no earlier run used, so every run starts from empty topics and read models.
fn isolate(cfg: &Config) -> Config {
    cfg.isolated(&format!("bench{}", chrono::Utc::now().timestamp_millis()))
}

pub async fn run(base: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let cfg = isolate(base);
    println!(
        "== projector bench: {} events, batches of up to {}",
        args.events, args.batch
    );

    // 1. The engine alone: decode, route, project and coalesce into in-memory stores.
    let history: Vec<EventEnvelope> = History::new(7, "").take(args.events as usize).collect();
    let wire: Vec<Vec<u8>> = history.iter().map(EventEnvelope::to_json_bytes).collect();
    let router = Router::new(projectors::all());
    let docs: Vec<MemoryDocs> = router
        .projectors()
        .iter()
        .map(|_| MemoryDocs::default())
        .collect();
    let facts = NullFacts::default();
    let t = Instant::now();
    for chunk in wire.chunks(args.batch) {
        let events: Vec<Event> = chunk
            .iter()
            .map(|b| Event::decode(b))
            .collect::<Result<_, _>>()?;
        let routed = router.route(&events);
        for ((p, evs), store) in router
            .projectors()
            .iter()
            .zip(&routed.per_projector)
            .zip(&docs)
        {
            match p.store() {
                StoreKind::ClickHouse => apply_facts(p.as_ref(), &facts, evs).await.map(|_| ())?,
                _ => apply_documents(p.as_ref(), store, evs).await.map(|_| ())?,
            }
        }
    }
    let engine = t.elapsed();
    println!(
        "engine alone (null sinks): {:>10.0} events/s  ({} events in {:.2}s; {} Customer-360, {} order views, {} facts)",
        rate(args.events as f64, engine),
        args.events,
        engine.as_secs_f64(),
        docs[0].len(),
        docs[1].len(),
        facts.count.load(std::sync::atomic::Ordering::Relaxed)
    );

    // 2. Raw bulk capacity of each store, in this run, with documents of the real size.
    let raw = raw_capacity(&cfg, &history, args.raw_docs).await?;

    // 3. End to end: a worker process consumes while the generator appends and publishes.
    kafka::ensure_topics(&cfg.kafka).await?;
    let stats_path = std::env::temp_dir().join(format!("{}-stats.json", cfg.kafka.group_id));
    let mut child = spawn_worker(&cfg, &stats_path)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut stores = vec![
        EventStore::connect(&cfg.postgres.url).await?,
        EventStore::connect(&cfg.postgres.url).await?,
    ];
    stores[0].migrate().await?;
    // Rebuilds below replay from here: exactly this run's history.
    let start = stores[0].committed_head().await?;
    let publisher = EventPublisher::new(&cfg.kafka)?;
    let opts = GenerateOptions {
        seed: 42,
        events: args.events,
        namespace: format!("{}-", cfg.kafka.group_id),
        batch_size: 5_000,
        ..Default::default()
    };
    let gen_report = generator::generate(&mut stores, Some(&publisher), &opts, |_| {}).await?;
    let pid = child.id();
    let mut peak_rss_kib = 0u64;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if let Some(kib) = vm_hwm_kib(pid) {
            peak_rss_kib = peak_rss_kib.max(kib);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let report: RunReport = serde_json::from_slice(&std::fs::read(&stats_path)?)?;
    let _ = std::fs::remove_file(&stats_path);

    let e2e = rate(
        report.messages as f64,
        Duration::from_secs_f64(report.active_seconds),
    );
    println!(
        "generator: appended {:.0} events/s, published {:.0} msg/s",
        gen_report.append_rate(),
        gen_report.publish_rate()
    );
    println!(
        "end to end: {:>10.0} events/s  ({} messages, {} batches, largest {}, mean {:.0}; {:.2}s active)",
        e2e,
        report.messages,
        report.batches,
        report.largest_batch,
        report.messages as f64 / report.batches.max(1) as f64,
        report.active_seconds
    );
    println!(
        "latency publish → visible in all read models: p50 {} ms, p99 {} ms, max {} ms",
        report.latency_ms_p50, report.latency_ms_p99, report.latency_ms_max
    );
    println!("worker peak RSS: {:.1} MiB", peak_rss_kib as f64 / 1024.0);
    println!(
        "{:<12} {:>14} {:>16} {:>18} {:>8}",
        "store", "writes", "writes/s (busy)", "raw capacity/s", "ratio"
    );
    for (name, store, raw_rate) in [
        ("customer360", "redis", raw.redis),
        ("order_view", "mongo", raw.mongo),
        ("analytics", "clickhouse", raw.clickhouse),
    ] {
        let writes = report.writes.get(name).copied().unwrap_or(0);
        let busy = report.write_seconds.get(name).copied().unwrap_or(0.0);
        let busy_rate = writes as f64 / busy.max(1e-9);
        println!(
            "{:<12} {:>14} {:>16.0} {:>18.0} {:>7.0}%",
            store,
            writes,
            busy_rate,
            raw_rate,
            100.0 * busy_rate / raw_rate.max(1e-9)
        );
    }
    println!(
        "event store append capacity in this run: {:.0} events/s (end to end is {:.0}% of it)",
        gen_report.append_rate(),
        100.0 * e2e / gen_report.append_rate().max(1e-9)
    );

    // 4. rebuild-projection from the event store: each projection alone, then all in one pass.
    println!(
        "{:<12} {:>10} {:>14} {:>18}",
        "rebuild", "events", "events/s", "store raw cap./s"
    );
    let all = projectors::all();
    let mut runs: Vec<RebuildRun> = all
        .iter()
        .map(|p| {
            let raw_rate = match p.store() {
                StoreKind::Redis => raw.redis,
                StoreKind::Mongo => raw.mongo,
                StoreKind::ClickHouse => raw.clickhouse,
            };
            (p.name().to_owned(), vec![p.clone()], raw_rate)
        })
        .collect();
    runs.push((
        "--all".into(),
        all.clone(),
        raw.mongo.min(raw.redis).min(raw.clickhouse),
    ));
    for (label, selected, raw_rate) in runs {
        let version = format!("r{}", label.trim_start_matches('-'));
        for p in &selected {
            rebuild::save_checkpoint(
                &stores[0],
                &rebuild::Checkpoint {
                    projection: projector::versions::scope_key(&cfg, p.name()),
                    version: version.clone(),
                    position: start,
                    events_applied: 0,
                    status: "building".into(),
                },
            )
            .await?;
        }
        let opts = rebuild::RebuildOptions {
            version,
            batch: 5_000,
            checkpoint_every: 20_000,
        };
        let t = Instant::now();
        let done = rebuild::rebuild(&cfg, &stores[0], &selected, &opts, &mut |_, _, _| {}).await?;
        let secs = t.elapsed();
        let n = done.first().map_or(0, |c| c.events_applied);
        println!(
            "{:<12} {:>10} {:>14.0} {:>18.0}",
            label,
            n,
            rate(n as f64, secs),
            raw_rate
        );
    }
    Ok(())
}

fn spawn_worker(cfg: &Config, stats: &PathBuf) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    std::process::Command::new(exe)
        .args(["run", "--exit-when-idle", "10", "--stats-json"])
        .arg(stats)
        .envs(cfg.child_env())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .context("starting the worker")
}

/// Peak resident set of a process (VmHWM), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct RawCapacity {
    redis: f64,
    mongo: f64,
    clickhouse: f64,
}

/// Bulk writes straight to each store, no projection: pipelined SETs of Customer-360-sized
/// JSON, batched Mongo upserts of order-view-sized documents, one ClickHouse insert of facts.
async fn raw_capacity(
    cfg: &Config,
    history: &[EventEnvelope],
    n: usize,
) -> Result<RawCapacity, SinkError> {
    let doc = serde_json::json!({"customer_id": "x", "blob": "y".repeat(1500)}).to_string();
    let redis =
        RedisSink::connect(&cfg.redis.url, &format!("{}raw:", cfg.views.redis_prefix)).await?;
    let mut con = redis.connection();
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(redis.key(&i.to_string()))
                .arg(&doc)
                .ignore();
        }
        let _: () = pipe.query_async(&mut con).await?;
    }
    let redis_rate = rate(n as f64, t.elapsed());

    let mongo = MongoSink::connect(
        &cfg.mongo.uri,
        &cfg.mongo.database,
        &format!("{}_raw", cfg.views.mongo_collection),
    )
    .await?;
    let t = Instant::now();
    let body = mongodb::bson::doc! {"status": "created", "blob": "y".repeat(1200)};
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let docs: Vec<mongodb::bson::Document> = chunk
            .iter()
            .map(|i| {
                let mut d = body.clone();
                d.insert("_id", i.to_string());
                d
            })
            .collect();
        mongo.collection().insert_many(docs).await?;
    }
    let mongo_rate = rate(n as f64, t.elapsed());

    let ch = ClickHouseSink::connect(
        &cfg.clickhouse.url,
        &cfg.clickhouse.database,
        &format!("{}_raw", cfg.views.clickhouse_table),
    )
    .await?;
    let facts: Vec<projectors::analytics::Fact> = history
        .iter()
        .cycle()
        .take(n)
        .filter_map(|e| {
            let ev = e.clone().into_event().ok()?;
            let mut f = projectors::analytics::Fact::default();
            projectors::Projector::apply(&projectors::analytics::AnalyticsProjector, &mut f, &ev)
                .ok()?;
            Some(f)
        })
        .collect();
    let t = Instant::now();
    ch.insert(&facts).await?;
    let ch_rate = rate(facts.len() as f64, t.elapsed());
    let _ = FactRow::from(&facts[0]);
    println!(
        "raw bulk capacity ({n} docs/rows each): redis {redis_rate:.0}/s, mongo {mongo_rate:.0}/s, clickhouse {ch_rate:.0}/s"
    );
    Ok(RawCapacity {
        redis: redis_rate,
        mongo: mongo_rate,
        clickhouse: ch_rate,
    })
}
