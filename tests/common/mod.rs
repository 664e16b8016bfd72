//! Shared by the integration tests: settings for the real local services and unique names.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use projector::config::Config;
use projector::store::EventStore;

pub fn config() -> Config {
    Config::load_for_tests().expect("config/local.toml must load")
}

/// A namespace no other test run uses, so tests can share the servers.
pub fn unique_namespace(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}{:x}{}{}-",
        nanos % 0xffff_ffff,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A migrated event store. Fails loudly when PostgreSQL is not up: run scripts/services.sh up.
pub async fn store() -> EventStore {
    let cfg = config();
    let mut store = EventStore::connect(&cfg.postgres.url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {} (run scripts/services.sh up): {e}",
                cfg.postgres.url
            )
        });
    store.migrate().await.expect("migrations");
    store
}

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use contract::Event;
use projector::generator::{self, GenerateOptions};
use projector::kafka::{self, EventPublisher};
use projector::sinks::clickhouse::FactRow;
use projector::worker;
use projectors::memory::MemoryViews;
use projectors::{Document, DynProjector};

/// Settings isolated to one test: own topics, group, dead-letter topic and read models.
pub fn isolated_config(tag: &str) -> (Config, String) {
    let ns = unique_namespace(tag);
    let id = ns.trim_end_matches('-').replace('-', "_");
    (config().isolated(&id), ns)
}

/// The same settings as environment variables, for a worker run as a child process.
pub fn config_env(cfg: &Config) -> Vec<(&'static str, String)> {
    cfg.child_env()
}

pub fn projector_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_projector"))
}

/// Append a seeded history to the store and publish it on the test's topics.
pub async fn generate(
    cfg: &Config,
    ns: &str,
    events: u64,
    seed: u64,
    duplicates: f64,
    redeliveries: f64,
) {
    let mut stores = vec![store().await];
    kafka::ensure_topics(&cfg.kafka)
        .await
        .expect("Kafka up (scripts/services.sh up)");
    let publisher = EventPublisher::new(&cfg.kafka).unwrap();
    let opts = GenerateOptions {
        seed,
        events,
        namespace: ns.to_owned(),
        batch_size: 1_000,
        duplicate_rate: duplicates,
        redelivery_rate: redeliveries,
    };
    generator::generate(&mut stores, Some(&publisher), &opts, |_| {})
        .await
        .unwrap();
}

/// The event log of a namespace, in commit order.
pub async fn event_log(ns: &str) -> Vec<Event> {
    store()
        .await
        .read_prefix(ns)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.into_event().unwrap())
        .collect()
}

/// View and guard only: the revision counts writes, which depends on batching.
fn comparable(
    docs: impl IntoIterator<Item = (String, Document)>,
    ns: &str,
) -> BTreeMap<String, (serde_json::Value, BTreeMap<String, i64>)> {
    docs.into_iter()
        .filter(|(k, _)| k.starts_with(ns))
        .map(|(k, d)| (k, (serde_json::Value::Object(d.view), d.guard)))
        .collect()
}

fn fold(p: &dyn DynProjector, log: &[Event]) -> MemoryViews {
    let mut m = MemoryViews::default();
    m.apply(p, log).unwrap();
    m
}

/// Every read model equals the pure fold of the event log, exactly.
pub async fn assert_read_models_equal_fold(cfg: &Config, ns: &str) {
    let log = event_log(ns).await;
    assert!(!log.is_empty());
    let sinks = worker::connect_sinks(cfg).await.unwrap();

    let c360 = fold(&projectors::customer360::Customer360Projector, &log);
    let redis = sinks.redis.scan_all().await.unwrap();
    let (want, got) = (comparable(c360.docs, ns), comparable(redis, ns));
    assert_eq!(want.len(), got.len(), "Customer-360 document count");
    for (k, w) in &want {
        assert_eq!(
            Some(w),
            got.get(k),
            "Customer-360 {k} differs from the fold"
        );
    }

    let orders = fold(&projectors::order_view::OrderViewProjector, &log);
    let mongo = sinks.mongo.scan_all().await.unwrap();
    let (want, got) = (comparable(orders.docs, ns), comparable(mongo, ns));
    assert_eq!(want.len(), got.len(), "order view count");
    for (k, w) in &want {
        assert_eq!(Some(w), got.get(k), "order view {k} differs from the fold");
    }

    let facts = fold(&projectors::analytics::AnalyticsProjector, &log);
    let want: BTreeMap<String, FactRow> = facts
        .docs
        .into_values()
        .map(|d| {
            let f: projectors::analytics::Fact =
                serde_json::from_value(serde_json::Value::Object(d.view)).unwrap();
            (f.event_id.clone(), FactRow::from(&f))
        })
        .collect();
    let got = facts_of(&sinks, ns).await;
    assert_eq!(want.len(), log.len());
    assert_eq!(got.len(), want.len(), "fact count (each event once)");
    assert!(want == got, "analytics facts differ from the fold");
}

/// Run the worker in this process until no event arrived for `idle`.
pub async fn run_worker_until_idle(cfg: &Config, idle: Duration) -> worker::RunReport {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let opts = worker::RunOptions {
        stop_when_idle: Some(idle),
        health: None,
    };
    worker::run(cfg, opts, rx).await.expect("worker")
}

/// The facts of one namespace, by event id (a rebuilt version's table also holds other
/// tests' events replayed beside ours).
pub async fn facts_of(sinks: &projector::apply::Sinks, ns: &str) -> BTreeMap<String, FactRow> {
    sinks
        .clickhouse
        .all_facts()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.aggregate_id.starts_with(ns))
        .map(|r| (r.event_id.clone(), r))
        .collect()
}

/// Poll (up to 120 s) until the namespace has `want` facts; returns how many it has.
pub async fn wait_for_facts(sinks: &projector::apply::Sinks, ns: &str, want: usize) -> usize {
    let mut have = 0;
    for _ in 0..240 {
        have = facts_of(sinks, ns).await.len();
        if have >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    have
}
