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
