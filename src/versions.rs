//! Which version of each read model readers and live workers use. `live` is the version named
//! in `[views]`; a rebuild adds `vYYYYMMDDHHMMSS` beside it and moves the pointer at handover.
//!
//! Pointers, parks, checkpoints and retired versions belong to a *deployment*
//! (`deployment` in the settings), which the per-read-model consumer groups, the rebuild and
//! the read service share: a consumer group only says who consumes which partitions.

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

/// A version name, a deployment name or a retired version refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("invalid {what} name {name:?}: {rule}")]
    InvalidName {
        what: &'static str,
        name: String,
        rule: &'static str,
    },
    /// Permanent: a retired version is never written (nor created) again.
    #[error("version {version} of {projection} is retired: it is never written again")]
    Retired { projection: String, version: String },
}

/// The longest version or deployment name.
const MAX_NAME: usize = 64;

/// A version name is `[A-Za-z0-9_]{1,64}`: it becomes part of Redis prefixes, MongoDB
/// collection and ClickHouse table names, so nothing that could change a query's meaning.
pub fn validate_version(name: &str) -> Result<(), VersionError> {
    validate_name("version", name, b"", "1 to 64 of A-Z a-z 0-9 _")
}

/// A deployment name is `[A-Za-z0-9_.-]{1,64}`: no `/` (it ends the scope of its rows) and
/// no `:` (it ends the Redis pointer key).
pub fn validate_deployment(name: &str) -> Result<(), VersionError> {
    validate_name("deployment", name, b".-", "1 to 64 of A-Z a-z 0-9 _ . -")
}

/// 1 to [`MAX_NAME`] bytes of ASCII letters, digits, `_` and the bytes of `also`.
fn validate_name(
    what: &'static str,
    name: &str,
    also: &[u8],
    rule: &'static str,
) -> Result<(), VersionError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || also.contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VersionError::InvalidName {
            what,
            name: name.to_owned(),
            rule,
        })
    }
}

/// Pointers, checkpoints and retired versions are rows keyed `<deployment>/<projection>`:
/// several deployments, or test runs, can share an event store without moving each other's
/// readers, and every consumer group of one deployment shares them.
pub fn scope_key(cfg: &Config, projection: &str) -> String {
    format!("{}/{projection}", cfg.deployment)
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
        let version: String = r.get(1);
        if let Err(e) = validate_version(&version) {
            // Never built into a store name or a query.
            tracing::error!(error = %e, projection, "version pointer ignored");
            continue;
        }
        if r.get::<_, bool>(2) {
            out.switching.push(projection.clone());
        }
        out.by_projection.insert(projection, version);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_are_letters_digits_and_underscores() {
        for ok in ["live", "v20261123150000", "va", "A_b_9", &"x".repeat(64)] {
            assert_eq!(validate_version(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "v1; DROP TABLE events",
            "v1`",
            "a-b",
            "a.b",
            "a:b",
            "a/b",
            "v1 ",
            "é",
            "a\0",
        ] {
            assert!(
                matches!(
                    validate_version(bad),
                    Err(VersionError::InvalidName {
                        what: "version",
                        ..
                    })
                ),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn deployment_names_cannot_cross_scopes() {
        for ok in ["projector", "blue-2", "eu.prod", "t_1"] {
            assert_eq!(validate_deployment(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/b", "a:b", "a b", "a@b", &"d".repeat(65)] {
            assert!(validate_deployment(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_default_deployment_keeps_the_old_default_groups_rows() {
        let cfg = Config::load_for_tests().unwrap();
        assert_eq!(cfg.deployment, "projector");
        // Rows written when the scope was the default group `projector` stay this one's.
        assert_eq!(scope_key(&cfg, "customer360"), "projector/customer360");
    }
}
