//! The `projector` binary: the edge where errors become messages and exit codes.

mod cli;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use projector::config::Config;
use projector::generator::{self, GenerateOptions};
use projector::kafka::{self, EventPublisher};
use projector::runtime::{self, RunOptions, Shared};
use projector::store::EventStore;

// The engine allocates many small, short-lived values; mimalloc serves them far faster
// than the system allocator (see the bench section of the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's `purge_delay` option (its index in `mi_option_e`, which the sys crate does
/// not name) and its default, which is checked before the option is changed.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_PURGE_DELAY_DEFAULT_MS: std::ffi::c_long = 1_000;

/// Give freed memory back to the system within 10 ms rather than mimalloc v3's default second
/// (and ten for whole arenas): under the engine's churn the pages freed but held made the
/// worker's peak RSS 70 MiB larger while draining, 24 MiB at 5,000 events/s.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides when set.
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reading and setting an option are plain calls, safe at any time.
    unsafe {
        // Another option at that index (a different mimalloc): leave it alone.
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_PURGE_DELAY_DEFAULT_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "projector",
    version,
    about = "Projects domain events into read models"
)]
struct Cli {
    /// Settings file (TOML); PROJECTOR_* environment variables override it.
    #[arg(long, global = true, env = "PROJECTOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the event store's schema migrations.
    Migrate,
    /// Write a seeded event history to the event store and publish it to Kafka.
    Generate(GenerateArgs),
    /// Join the consumer group and keep the read models up to date (SIGTERM: drain, commit, exit 0).
    Run(RunArgs),
    /// Print one Customer-360, one order view and the analytics answers.
    Show(ShowArgs),
    /// Rebuild read models from the event store into a new version beside the live one
    /// (resumable); `rebuild-projection status` shows where each rebuild stands.
    RebuildProjection(RebuildArgs),
    /// Measure the engine alone and generate → worker end to end, beside each store's capacity.
    Bench(BenchCli),
    /// Serve the read API for agents and services (HTTP, OpenAPI at /openapi.json; MCP at
    /// /mcp). Bearer tokens from PROJECTOR_READ__TOKENS or read.token_file.
    Serve(ServeArgs),
    /// The MCP tools over stdio, for an agent that starts this process itself.
    Mcp,
    /// The dead-letter topic: list, show, replay chosen letters, unpark a stream.
    #[command(subcommand)]
    Dlq(DlqCli),
    /// Check the configured deployment end to end (servers, durability, topics, groups,
    /// versions, parks): one row per check; exits non-zero if any fails.
    Doctor(DoctorArgs),
}

#[derive(Args)]
struct DoctorArgs {
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds any one question to a server may take (a hung server is a fail row).
    #[arg(long, default_value_t = 10.0)]
    timeout_secs: f64,
}

#[derive(clap::Subcommand)]
enum DlqCli {
    /// Every letter with its kind, projector, stream, source and reason.
    List {
        /// Only letters of this kind (e.g. rejected, parked, invalid_json).
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
    /// One letter (partition:offset) in full: headers, origin, payload.
    Show { id: String },
    /// Send the originals of these letters (partition:offset) again to their topics, through
    /// the normal guarded path (after a fix; a duplicate changes nothing).
    Replay { ids: Vec<String> },
    /// Let a parked stream's held events flow: unpark it and replay it from the event store.
    Unpark {
        /// aggregate_type/aggregate_id, e.g. customer/cus-7
        stream: String,
        /// Only for these projectors (default: every one).
        #[arg(long = "projector")]
        projectors: Vec<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Listen here (default: read.http_addr).
    #[arg(long)]
    addr: Option<String>,
    /// Accept requests without a bearer token (a local experiment only).
    #[arg(long)]
    no_auth: bool,
}

#[derive(Args)]
struct RebuildArgs {
    /// Projections to rebuild (customer360, order_view, analytics); or `status`; or
    /// `switch <version>` (a version built with `--no-switch` goes live, the old one retires
    /// after `--grace-seconds`); or `drop <version>` (delete a version no reader uses).
    names: Vec<String>,
    /// Rebuild every projection in one pass.
    #[arg(long)]
    all: bool,
    /// Show what would happen and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The version to build or resume (default: resume the unfinished one, else a new one).
    #[arg(long)]
    version: Option<String>,
    /// Events read per page.
    #[arg(long, default_value_t = 5_000)]
    batch: i64,
    /// Save the checkpoint after this many events (and at the end).
    #[arg(long, default_value_t = 20_000)]
    checkpoint_every: u64,
    /// Only build and catch up; leave readers and live workers on the current version.
    #[arg(long)]
    no_switch: bool,
    /// Seconds the replaced version is kept after the switch before it is deleted.
    #[arg(long, default_value_t = 60)]
    grace_seconds: u64,
}

#[derive(Args)]
struct BenchCli {
    /// Events in the seeded history every figure uses.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Documents/rows written per store to measure its raw capacity.
    #[arg(long, default_value_t = 20_000)]
    raw_docs: usize,
    /// Skip the steady-state latency curve (five rates, about 30 s each).
    #[arg(long)]
    no_steady: bool,
    /// Skip the ClickHouse Kafka engine comparison.
    #[arg(long)]
    no_clickhouse_engine: bool,
    /// Measure the engine alone and stop (for profiling).
    #[arg(long)]
    engine_only: bool,
    /// Measure only publish → visible latency at this steady rate (events/s), and stop.
    #[arg(long)]
    steady_rate: Option<f64>,
    /// Measure only the read service's latency (HTTP and MCP) on a drained history.
    #[arg(long)]
    read_only: bool,
    /// Measure only the backlog drain of all three read models (rate, peak RSS, largest
    /// fetch response), and stop.
    #[arg(long)]
    drain_only: bool,
    /// Also measure raw Customer-360 writes to this Redis Cluster (seed URLs, comma
    /// separated; `scripts/services.sh up rcluster` starts one).
    #[arg(long)]
    redis_cluster: Option<String>,
    /// The hot customer's history: this many finished orders, then 1,000 events/s of new
    /// orders for it alone, beside the same rate over many customers (0: skip).
    #[arg(long, default_value_t = 20_000)]
    hot_orders: usize,
    /// Measure only the hot customer, and stop.
    #[arg(long)]
    hot_only: bool,
    /// Measure only the latency curve (1k, 2k, 5k, 10k events/s), and stop.
    #[arg(long)]
    curve_only: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Exit once the whole consumer group has been caught up for this many seconds: every
    /// partition's committed offset at its high watermark, as the broker reports, and nothing
    /// in flight here (demo, tests, benchmarks). A partition nobody consumes keeps it running.
    #[arg(long)]
    exit_when_idle: Option<f64>,
    /// Only these projectors (comma-separated), e.g. `customer360,analytics`; one read model
    /// per consumer group lets each scale on its own. Default: `worker.projectors`.
    #[arg(long, value_delimiter = ',')]
    projectors: Option<Vec<String>>,
    /// Write the run's figures (events, batches, writes, latency percentiles) as JSON here.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

#[derive(Args)]
struct ShowArgs {
    /// Only documents whose id starts with this (a generator namespace).
    #[arg(long, default_value = "")]
    namespace: String,
}

#[derive(Args)]
struct GenerateArgs {
    /// How many events to write.
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// The same seed always gives the same history.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Prefix of every aggregate id, so several histories can share one store.
    #[arg(long, default_value = "")]
    namespace: String,
    /// Events appended per transaction.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Probability that an event is published twice (Kafka only; the store holds it once).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Probability that a batch is partly published again after it (a redelivery).
    #[arg(long, default_value_t = 0.0)]
    redeliveries: f64,
    /// Only append to the event store.
    #[arg(long)]
    no_publish: bool,
    /// Connections appending each batch in parallel (streams are split between them).
    #[arg(long, default_value_t = 2)]
    writers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Only the worker, whose memory is bounded: a rebuild (and the bench's engine and
    // rebuilds, in its own process) ran at 0.55–0.75 of its speed with the pages given back
    // within 10 ms, against 12 MiB less peak while a worker drained.
    if matches!(cli.command, Command::Run(_)) {
        return_freed_memory_promptly();
    }
    let config = Config::load(cli.config.as_deref())?;
    let telemetry = projector::telemetry::init(&config.telemetry)?;
    let result = dispatch(cli.command, config).await;
    // Whatever the outcome: the spans of a failed run matter most.
    telemetry.shutdown().await;
    result
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let mut store = connect_store(&config).await?;
            let n = store.migrate().await?;
            println!("migrations applied: {n}");
        }
        Command::Generate(args) => generate(&config, args).await?,
        Command::Run(args) => run(&config, args).await?,
        Command::Show(args) => show(&config, args).await?,
        Command::RebuildProjection(args) => rebuild(&config, args).await?,
        Command::Serve(args) => serve(&config, args).await?,
        Command::Dlq(cmd) => {
            use cli::dlq::DlqCommand;
            let cmd = match cmd {
                DlqCli::List { kind, limit } => DlqCommand::List { kind, limit },
                DlqCli::Show { id } => DlqCommand::Show { id },
                DlqCli::Replay { ids } => DlqCommand::Replay { ids },
                DlqCli::Unpark { stream, projectors } => DlqCommand::Unpark { stream, projectors },
            };
            cli::dlq::run(&config, cmd).await?
        }
        Command::Doctor(args) => {
            anyhow::ensure!(
                args.timeout_secs > 0.0 && args.timeout_secs.is_finite(),
                "--timeout-secs must be positive"
            );
            let opts = projector::doctor::Options {
                timeout: std::time::Duration::from_secs_f64(args.timeout_secs),
            };
            let report = projector::doctor::run(&config, opts).await;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            let failed = report.count(projector::doctor::Verdict::Fail);
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} checks failed",
                report.rows.len()
            );
        }
        Command::Mcp => {
            let service = std::sync::Arc::new(projector::read::ReadService::new(&config).await?);
            projector::read::mcp::serve_stdio(service).await?;
        }
        Command::Bench(args) => {
            cli::bench::run(
                &config,
                cli::bench::BenchArgs {
                    events: args.events,
                    raw_docs: args.raw_docs,
                    steady: !args.no_steady,
                    clickhouse_engine: !args.no_clickhouse_engine,
                    engine_only: args.engine_only,
                    steady_rate: args.steady_rate,
                    read_only: args.read_only,
                    drain_only: args.drain_only,
                    redis_cluster: args.redis_cluster,
                    hot_orders: args.hot_orders,
                    hot_only: args.hot_only,
                    curve_only: args.curve_only,
                },
            )
            .await?
        }
    }
    Ok(())
}

async fn connect_store(config: &Config) -> anyhow::Result<EventStore> {
    EventStore::connect(&config.postgres.url)
        .await
        .with_context(|| {
            format!(
                "connecting to the event store at {}",
                projector::redact::url(&config.postgres.url)
            )
        })
}

async fn generate(config: &Config, args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    for (name, p) in [
        ("--duplicates", args.duplicates),
        ("--redeliveries", args.redeliveries),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&p),
            "{name} must be within 0..1, got {p}"
        );
    }
    let mut stores = Vec::new();
    for _ in 0..args.writers.max(1) {
        stores.push(connect_store(config).await?);
    }
    stores[0].migrate().await?;
    let publisher = if args.no_publish {
        None
    } else {
        kafka::ensure_topics(&config.kafka)
            .await
            .with_context(|| format!("creating topics on {}", config.kafka.brokers))?;
        Some(EventPublisher::new(&config.kafka)?)
    };
    let opts = GenerateOptions {
        seed: args.seed,
        events: args.events,
        namespace: args.namespace,
        batch_size: args.batch,
        duplicate_rate: args.duplicates,
        redelivery_rate: args.redeliveries,
    };
    let report = generator::generate(&mut stores, publisher.as_ref(), &opts, |r| {
        tracing::info!(appended = r.appended, published = r.published, "generating");
    })
    .await?;
    println!(
        "generated {} events (seed {}) in {:.2}s: appended at {:.0} events/s, published {} messages ({} injected copies) at {:.0} msg/s, {:.0} events/s overall",
        report.appended,
        opts.seed,
        report.total_time.as_secs_f64(),
        report.append_rate(),
        report.published,
        report.injected_duplicates,
        report.publish_rate(),
        report.overall_rate(),
    );
    Ok(())
}

async fn run(config: &Config, args: RunArgs) -> anyhow::Result<()> {
    let mut config = config.clone();
    if let Some(p) = args.projectors {
        config.worker.projectors = p;
    }
    let shared = Arc::new(Shared::default());
    let s = shared.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: draining");
        s.shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let metrics = projector::observability::install_metrics()?;
    let health = projector::observability::Health {
        shared: shared.clone(),
        stall: std::time::Duration::from_secs(config.worker.liveness_stall_secs),
    };
    let bound = projector::observability::serve(&config.worker.http_addr, metrics, health).await?;
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    let opts = RunOptions {
        stop_when_idle: args.exit_when_idle.map(std::time::Duration::from_secs_f64),
    };
    let report = runtime::run(&config, opts, shared).await?;
    if let Some(path) = &args.stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "worker done: {} messages in {} windows, {} dead letters, {} duplicates skipped, writes {:?}",
        report.messages, report.windows, report.dead_letters, report.duplicates, report.writes
    );
    Ok(())
}

async fn serve(config: &Config, args: ServeArgs) -> anyhow::Result<()> {
    use projector::read::{ReadService, http};
    let tokens = http::Tokens::load(&config.read).context("reading read.token_file")?;
    anyhow::ensure!(
        args.no_auth || !tokens.is_empty(),
        "no bearer tokens: set PROJECTOR_READ__TOKENS or read.token_file (or --no-auth for a local experiment)"
    );
    let service = Arc::new(ReadService::new(config).await?);
    let mcp = projector::read::mcp::http_router(service.clone(), &config.read.allowed_hosts);
    let app = http::router(service, tokens, !args.no_auth, Some(mcp));
    let addr = args.addr.unwrap_or_else(|| config.read.http_addr.clone());
    http::serve(&addr, app, wait_for_signal(), |a| {
        // Tests and scripts read the bound address from this line.
        println!("serving the read API on http://{a}");
    })
    .await
    .with_context(|| format!("serving on {addr}"))?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn show(config: &Config, args: ShowArgs) -> anyhow::Result<()> {
    use projectors::customer360::Customer360;
    use projectors::order_view::OrderView;
    // Readers follow the version pointers a rebuild moves.
    let store = connect_store(config).await?;
    let versions = projector::versions::live_versions(&store, config)
        .await
        .unwrap_or_default();
    let views = projector::versions::reader_views(config, &versions);
    let sinks = projector::versions::VersionSinks::connect_views(config, &views).await?;
    let customers = sinks.redis.scan_all::<Customer360>().await?;
    // The customer with the most events in the namespace: the richest document to show.
    if let Some((id, doc)) = customers
        .iter()
        .filter(|(k, _)| k.starts_with(&args.namespace))
        .filter_map(|(k, d)| d.as_ref().ok().map(|d| (k, d)))
        .max_by_key(|(k, d)| (d.view.version, std::cmp::Reverse(k.as_str())))
    {
        println!("== Customer-360 {id} (Redis key {})", sinks.redis.key(id));
        println!("{}", serde_json::to_string_pretty(&doc.view)?);
    }
    let orders = sinks.mongo.scan_all::<OrderView>().await?;
    if let Some((id, doc)) = orders
        .iter()
        .filter_map(|(k, d)| d.as_ref().ok().map(|d| (k, d)))
        .filter(|(k, d)| k.starts_with(&args.namespace) && d.view.status == "delivered")
        .min_by_key(|(k, _)| k.as_str())
    {
        println!(
            "== Order view {id} (MongoDB {}.{})",
            config.mongo.database, views.mongo_collection
        );
        println!("{}", serde_json::to_string_pretty(&doc.view)?);
    }
    // Analytics through the read service: the answers agents get.
    let read = projector::read::ReadService::new(config).await?;
    let none = projector::read::Consistency::default();
    let month = projector::read::Range {
        granularity: projector::read::types::Granularity::Month,
        ..Default::default()
    };
    println!(
        "== Analytics (ClickHouse {}.{})",
        config.clickhouse.database, views.clickhouse_table
    );
    let revenue = read.revenue(&month, &none).await?;
    println!("{:<12} {:>8} {:>16}", "month", "orders", "revenue (EUR)");
    for r in &revenue.data {
        println!(
            "{:<12} {:>8} {:>16.2}",
            r.period,
            r.orders,
            r.revenue_cents as f64 / 100.0
        );
    }
    let f = read.funnel(&Default::default(), &none).await?.data;
    println!("order funnel (orders placed, then how many reached each step):");
    for (step, n) in [
        ("placed", f.placed),
        ("validated", f.validated),
        ("paid", f.paid),
        ("shipped", f.shipped),
        ("delivered", f.delivered),
        ("cancelled", f.cancelled),
        ("validation failed", f.validation_failed),
    ] {
        let share = 100.0 * n as f64 / f.placed.max(1) as f64;
        println!("  {step:<18} {n:>8} {share:>6.1} %");
    }
    let s = read.sentiment(&month, &none).await?.data;
    println!(
        "{:<12} {:<12} {:>12} {:>10}",
        "month", "interaction", "interactions", "sentiment"
    );
    for r in &s {
        let avg = r
            .avg_sentiment
            .map_or("-".to_owned(), |a| format!("{a:.3}"));
        println!(
            "{:<12} {:<12} {:>12} {:>10}",
            r.period, r.interaction_type, r.interactions, avg
        );
    }
    let r = read.resolution(&Default::default(), &none).await?.data;
    println!(
        "ticket resolution: {} resolved, p50 {:.0} s, p90 {:.0} s, p99 {:.0} s",
        r.resolved, r.p50_seconds, r.p90_seconds, r.p99_seconds
    );
    Ok(())
}

async fn rebuild(config: &Config, args: RebuildArgs) -> anyhow::Result<()> {
    use projector::rebuild::{self, RebuildOptions};
    let mut store = connect_store(config).await?;
    store.migrate().await?;
    match args.names.first().map(String::as_str) {
        Some("status") => return rebuild_status(config, &store).await,
        Some("switch") => return rebuild_switch(config, &mut store, &args).await,
        Some("drop") => return rebuild_drop(config, &store, &args).await,
        _ => {}
    }
    anyhow::ensure!(
        args.all || !args.names.is_empty(),
        "name projections to rebuild, or --all"
    );
    let names = rebuild::select(&args.names, args.all)?;
    // Resume the unfinished rebuild of these projections, if there is one.
    let scoped: Vec<String> = names
        .iter()
        .map(|n| projector::versions::scope_key(config, n))
        .collect();
    let unfinished = rebuild::all_checkpoints(&store)
        .await?
        .into_iter()
        .find(|c| c.status == "building" && scoped.contains(&c.projection))
        .map(|c| c.version);
    let version = args
        .version
        .or(unfinished)
        .unwrap_or_else(|| format!("v{}", chrono::Utc::now().format("%Y%m%d%H%M%S")));
    // It names stores and tables: refuse anything but [A-Za-z0-9_]{1,64} before any is made.
    projector::versions::validate_version(&version)?;
    let views = config.versioned_views(&version);
    let head = store.committed_head().await?;
    println!(
        "rebuild {names:?} into version {version}: redis {}*, mongo {}.{}, clickhouse {}.{}; live read models untouched",
        views.redis_prefix,
        config.mongo.database,
        views.mongo_collection,
        config.clickhouse.database,
        views.clickhouse_table
    );
    for p in &names {
        match rebuild::load_checkpoint(&store, &projector::versions::scope_key(config, p), &version)
            .await?
        {
            Some(c) => println!(
                "  {p}: resume after position {} ({} events applied)",
                c.position.global_position, c.events_applied
            ),
            None => println!(
                "  {p}: from the start, up to position {} or beyond",
                head.global_position
            ),
        }
    }
    if args.dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    let opts = RebuildOptions {
        version: version.clone(),
        batch: args.batch.max(1),
        checkpoint_every: args.checkpoint_every.max(1),
    };
    let total = store.count_committed().await.unwrap_or(0).max(1) as u64;
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} events  {per_sec}  eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let started = std::time::Instant::now();
    let mut last_log = std::time::Instant::now();
    let mut progress = |applied: u64,
                        at: projector::store::ReplayPosition,
                        _head: projector::store::ReplayPosition| {
        if let Some(bar) = &bar {
            bar.set_position(applied);
            bar.set_message(format!("position {}", at.global_position));
        } else if last_log.elapsed().as_secs() >= 5 {
            last_log = std::time::Instant::now();
            let rate = applied as f64 / started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                applied,
                total,
                position = at.global_position,
                rate,
                eta_seconds = (total.saturating_sub(applied)) as f64 / rate.max(1e-9),
                "rebuild progress"
            );
        }
    };
    let done = rebuild::rebuild(config, &store, &names, &opts, None, &mut progress).await?;
    let secs = started.elapsed().as_secs_f64();
    for c in &done {
        println!(
            "{} {}: {} at position {}, {} events, {:.0} events/s",
            c.projection,
            c.version,
            c.status,
            c.position.global_position,
            c.events_applied,
            c.events_applied as f64 / secs.max(1e-9)
        );
    }
    if args.no_switch {
        println!("--no-switch: readers and live workers stay on their current version");
        if let Some(bar) = &bar {
            bar.finish();
        }
        return Ok(());
    }
    let finished = switch_and_retire(
        config,
        &mut store,
        &names,
        &opts,
        args.grace_seconds,
        &mut progress,
    )
    .await;
    if let Some(bar) = &bar {
        bar.finish();
    }
    finished
}

/// Hand readers and live workers over to `opts.version`, then retire what it replaced after
/// the grace period (readers that resolved the old version just before finish their reads).
async fn switch_and_retire(
    config: &Config,
    store: &mut EventStore,
    names: &[String],
    opts: &projector::rebuild::RebuildOptions,
    grace_seconds: u64,
    progress: projector::rebuild::Progress<'_>,
) -> anyhow::Result<()> {
    use projector::rebuild;
    let report = rebuild::switch(config, store, names, opts, progress).await?;
    println!(
        "switched {names:?} to {} in {:.2}s (live workers held meanwhile)",
        opts.version,
        report.switch_time.as_secs_f64()
    );
    if report.replaced.is_empty() {
        return Ok(());
    }
    println!("retiring {:?} in {grace_seconds} s", report.replaced);
    tokio::time::sleep(std::time::Duration::from_secs(grace_seconds)).await;
    for (p, old) in &report.replaced {
        rebuild::retire(config, store, p, old).await?;
        println!("retired {p} {old}");
    }
    Ok(())
}

/// The version named after `switch` or `drop`.
fn version_arg(args: &RebuildArgs) -> anyhow::Result<String> {
    match (args.names.get(1), args.names.len()) {
        (Some(v), 2) => {
            projector::versions::validate_version(v)?;
            Ok(v.clone())
        }
        _ => anyhow::bail!(
            "usage: rebuild-projection {} <version> (versions: rebuild-projection status)",
            args.names[0]
        ),
    }
}

/// `rebuild-projection switch <version>`: a version built with `--no-switch` goes live.
async fn rebuild_switch(
    config: &Config,
    store: &mut EventStore,
    args: &RebuildArgs,
) -> anyhow::Result<()> {
    use projector::rebuild::{self, RebuildOptions};
    let version = version_arg(args)?;
    let built = rebuild::versions_in_scope(config, store).await?;
    let mine: Vec<_> = built.iter().filter(|c| c.version == version).collect();
    anyhow::ensure!(
        !mine.is_empty(),
        "no rebuild of version {version} in this deployment (rebuild-projection status lists them)"
    );
    let names: Vec<String> = mine.iter().map(|c| c.projection.clone()).collect();
    if let Some(c) = mine.iter().find(|c| c.status != "caught_up") {
        anyhow::bail!(
            "{} {version} is {}, not caught_up: {}",
            c.projection,
            c.status,
            match c.status.as_str() {
                "building" => format!(
                    "finish it first: rebuild-projection {} --version {version}",
                    c.projection
                ),
                "live" => "it is already live".to_owned(),
                _ => "it was retired; rebuild a new version".to_owned(),
            }
        );
    }
    let opts = RebuildOptions {
        version,
        batch: args.batch.max(1),
        checkpoint_every: args.checkpoint_every.max(1),
    };
    switch_and_retire(
        config,
        store,
        &names,
        &opts,
        args.grace_seconds,
        &mut |_, _, _| {},
    )
    .await
}

/// `rebuild-projection drop <version>`: delete a version readers do not use.
async fn rebuild_drop(
    config: &Config,
    store: &EventStore,
    args: &RebuildArgs,
) -> anyhow::Result<()> {
    use projector::rebuild;
    let version = version_arg(args)?;
    let live = projector::versions::live_versions(store, config).await?;
    let built = rebuild::versions_in_scope(config, store).await?;
    let mine: Vec<_> = built
        .iter()
        .filter(|c| c.version == version && c.status != "retired")
        .collect();
    anyhow::ensure!(
        !mine.is_empty(),
        "no version {version} to drop in this deployment (rebuild-projection status lists them)"
    );
    for c in &mine {
        anyhow::ensure!(
            live.of(&c.projection) != version && !live.switching.contains(&c.projection),
            "{} reads version {version}: switch to another version before dropping it",
            c.projection
        );
    }
    if args.dry_run {
        println!(
            "dry run: would drop {version} of {:?}",
            mine.iter().map(|c| &c.projection).collect::<Vec<_>>()
        );
        return Ok(());
    }
    for c in &mine {
        rebuild::retire(config, store, &c.projection, &version).await?;
        println!("dropped {} {version}", c.projection);
    }
    Ok(())
}

async fn rebuild_status(config: &Config, store: &EventStore) -> anyhow::Result<()> {
    let head = store.committed_head().await?;
    let live = projector::versions::live_versions(store, config).await?;
    println!(
        "event store head (commit order): position {}",
        head.global_position
    );
    for name in projectors::names() {
        let switching = if live.switching.iter().any(|s| s == name) {
            " (switching)"
        } else {
            ""
        };
        println!("{name}: readers on version {}{switching}", live.of(name));
    }
    println!(
        "{:<12} {:<18} {:<10} {:>12} {:>12}",
        "projection", "version", "status", "position", "events"
    );
    let checkpoints = projector::rebuild::versions_in_scope(config, store).await?;
    for c in &checkpoints {
        println!(
            "{:<12} {:<18} {:<10} {:>12} {:>12}",
            c.projection, c.version, c.status, c.position.global_position, c.events_applied
        );
    }
    // Versions readers do not use and nothing retired: they hold storage until handled.
    let orphans = projector::rebuild::orphaned(&checkpoints, &live);
    if !orphans.is_empty() {
        println!("orphaned versions (not read by anyone):");
        for c in orphans {
            let hint = projector::rebuild::orphan_hint(c);
            println!("  {} {} ({}): {hint}", c.projection, c.version, c.status);
        }
    }
    Ok(())
}
