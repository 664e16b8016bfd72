//! The `projector` binary: the edge where errors become messages and exit codes.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use projector::config::Config;
use projector::generator::{self, GenerateOptions};
use projector::kafka::{self, EventPublisher};
use projector::store::EventStore;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    projector::telemetry::init();
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => {
            let mut store = connect_store(&config).await?;
            let n = store.migrate().await?;
            println!("migrations applied: {n}");
        }
        Command::Generate(args) => generate(&config, args).await?,
    }
    Ok(())
}

async fn connect_store(config: &Config) -> anyhow::Result<EventStore> {
    EventStore::connect(&config.postgres.url)
        .await
        .with_context(|| format!("connecting to the event store at {}", config.postgres.url))
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
    let mut store = connect_store(config).await?;
    store.migrate().await?;
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
    let report = generator::generate(&mut store, publisher.as_ref(), &opts, |r| {
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
