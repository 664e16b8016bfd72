//! Which version of each read model readers and live workers use. `live` is the version named
//! in `[views]`; a rebuild adds `vYYYYMMDDHHMMSS` beside it and moves the pointer at handover.

use std::collections::HashMap;

use crate::config::{Config, ViewsConfig};
use crate::store::EventStore;

/// The version a projection has before any rebuild.
pub const LIVE: &str = "live";

/// The pointers, as read at one instant.
#[derive(Debug, Clone, Default)]
pub struct LiveVersions {
    pub by_projection: HashMap<String, String>,
    /// Projections being handed over right now: live workers hold their next batch.
    pub switching: Vec<String>,
}

impl LiveVersions {
    pub fn of(&self, projection: &str) -> &str {
        self.by_projection
            .get(projection)
            .map_or(LIVE, String::as_str)
    }
}

/// Pointers and checkpoints belong to one deployment (its consumer group): several
/// deployments, or test runs, can share an event store without moving each other's readers.
pub fn scope_key(cfg: &Config, projection: &str) -> String {
    format!("{}/{projection}", cfg.kafka.group_id)
}

/// The three stores of one read-model version (tests, `show`, retiring a version).
#[derive(Clone)]
pub struct VersionSinks {
    pub redis: crate::sinks::redis::RedisSink,
    pub mongo: crate::sinks::mongo::MongoSink,
    pub clickhouse: crate::sinks::clickhouse::ClickHouseSink,
}

impl VersionSinks {
    pub async fn connect(
        cfg: &Config,
        version: &str,
    ) -> Result<VersionSinks, crate::sinks::SinkError> {
        Self::connect_views(cfg, &views_for(cfg, version)).await
    }

    pub async fn connect_views(
        cfg: &Config,
        views: &ViewsConfig,
    ) -> Result<VersionSinks, crate::sinks::SinkError> {
        Ok(VersionSinks {
            redis: crate::sinks::redis::RedisSink::connect(&cfg.redis, &views.redis_prefix).await?,
            mongo: crate::sinks::mongo::MongoSink::connect(&cfg.mongo, &views.mongo_collection)
                .await?,
            clickhouse: crate::sinks::clickhouse::ClickHouseSink::connect(
                &cfg.clickhouse,
                &views.clickhouse_table,
            )
            .await?,
        })
    }
}

pub async fn live_versions(
    store: &EventStore,
    cfg: &Config,
) -> Result<LiveVersions, tokio_postgres::Error> {
    live_versions_on(store.client(), cfg).await
}

/// The pointers, read through any client (the read service's reconnecting one).
pub async fn live_versions_on(
    client: &tokio_postgres::Client,
    cfg: &Config,
) -> Result<LiveVersions, tokio_postgres::Error> {
    let prefix = scope_key(cfg, "");
    let rows = client
        .query(
            "SELECT projection, live_version, switching FROM projection_versions WHERE starts_with(projection, $1)",
            &[&prefix],
        )
        .await?;
    let mut out = LiveVersions::default();
    for r in rows {
        let scoped: String = r.get(0);
        let projection = scoped[prefix.len()..].to_owned();
        if r.get::<_, bool>(2) {
            out.switching.push(projection.clone());
        }
        out.by_projection.insert(projection, r.get(1));
    }
    Ok(out)
}

/// The store names of a version.
pub fn views_for(cfg: &Config, version: &str) -> ViewsConfig {
    if version == LIVE {
        cfg.views.clone()
    } else {
        cfg.versioned_views(version)
    }
}

/// The store names readers use now: each projection's store under its live version.
pub fn reader_views(cfg: &Config, versions: &LiveVersions) -> ViewsConfig {
    use projectors::{analytics, customer360, order_view};
    ViewsConfig {
        redis_prefix: views_for(cfg, versions.of(customer360::NAME)).redis_prefix,
        mongo_collection: views_for(cfg, versions.of(order_view::NAME)).mongo_collection,
        clickhouse_table: views_for(cfg, versions.of(analytics::NAME)).clickhouse_table,
    }
}
