//! The queries behind every endpoint and tool: resolve the live version, read the store,
//! attach freshness, and for read-your-writes wait (bounded) until the answer includes the
//! caller's event.
//!
//! Read-only by construction: the service holds read clients of its own (ClickHouse with
//! `readonly=1`, a PostgreSQL session in read-only mode) and issues no write command.
//!
//! Here: the service, its errors and options, and status. Beside it: [`consistency`] (the
//! read-your-writes wait every answer goes through), [`documents`] (Customer-360, order
//! views, a customer's orders) and [`facts`] (the analytics queries).

use std::time::{Duration, Instant};

use crate::sinks::redis::RedisCon;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::lag::LagProbe;
use super::types::*;
use crate::config::Config;
use crate::store::Pg;
use crate::versions::{LiveVersions, live_versions_on};

mod consistency;
mod documents;
mod facts;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("no event {0} in the event store")]
    UnknownEvent(String),
    /// The caller asked for an answer that includes an event, and it is not in yet.
    #[error("the read model does not include the event yet")]
    NotYet(Box<Freshness>),
    #[error("{store} unavailable: {message}")]
    Unavailable {
        store: &'static str,
        message: String,
    },
}

impl ReadError {
    fn store(store: &'static str, e: impl std::fmt::Display) -> ReadError {
        ReadError::Unavailable {
            store,
            message: e.to_string(),
        }
    }
}

/// Query options shared by every answer: the read-your-writes condition and how long to wait.
#[derive(Debug, Clone, Default)]
pub struct Consistency {
    pub after: Option<After>,
    /// Milliseconds to wait for `after` (capped by `read.max_wait_ms`).
    pub wait_ms: Option<u64>,
}

/// Read-your-writes parameters, as every endpoint and tool takes them.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    /// Answer only once the read model includes the event at this global position (an
    /// event the caller caused).
    pub after_position: Option<i64>,
    /// With after_sequence: the event's stream, `aggregate_type/aggregate_id`.
    pub after_stream: Option<String>,
    /// With after_stream: the event's sequence_number.
    pub after_sequence: Option<i64>,
    /// How long to wait for that event, in milliseconds (default 3000, at most
    /// `read.max_wait_ms`); then the answer is `not_yet` with where the projection stands.
    pub wait_ms: Option<u64>,
}

impl Wait {
    pub fn consistency(&self) -> Consistency {
        let named = self.after_position.is_some()
            || self.after_stream.is_some()
            || self.after_sequence.is_some();
        Consistency {
            after: named.then(|| After {
                position: self.after_position,
                stream: self.after_stream.clone(),
                sequence: self.after_sequence,
            }),
            wait_ms: self.wait_ms,
        }
    }
}

/// Parameters of the analytics queries.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// Inclusive, `YYYY-MM-DD` (UTC).
    pub from: Option<String>,
    /// Exclusive, `YYYY-MM-DD` (UTC).
    pub to: Option<String>,
    pub granularity: Granularity,
    pub customer_id: Option<String>,
}

pub struct ReadService {
    cfg: Config,
    pg: Pg,
    redis: Mutex<Option<RedisCon>>,
    mongo: mongodb::Database,
    ch: clickhouse::Client,
    pointers: Mutex<Option<(Instant, LiveVersions)>>,
    lag: Option<LagProbe>,
}

/// The read service's ClickHouse client: every query in a `readonly=1` session
/// (`projector doctor` checks the server enforces it through this very client).
pub fn clickhouse_client(cfg: &Config) -> clickhouse::Client {
    let mut ch = clickhouse::Client::default()
        .with_url(&cfg.clickhouse.url)
        .with_database(&cfg.clickhouse.database)
        .with_setting("readonly", "1");
    if let Some(u) = &cfg.clickhouse.user {
        ch = ch.with_user(u);
    }
    if let Some(p) = &cfg.clickhouse.password {
        ch = ch.with_password(p);
    }
    ch
}

impl ReadService {
    /// Nothing is connected yet: the service starts (and answers what it can) while a store
    /// is down.
    pub async fn new(cfg: &Config) -> Result<ReadService, ReadError> {
        let options =
            crate::sinks::mongo::client_options(&cfg.mongo, "projector-read", Duration::MAX)
                .await
                .map_err(|e| ReadError::store("mongo", e))?;
        let mongo = mongodb::Client::with_options(options)
            .map_err(|e| ReadError::store("mongo", e))?
            .database(&cfg.mongo.database);
        let ch = clickhouse_client(cfg);
        // Each read model's group: answers carry the lag of the group that writes them.
        let groups = cfg.groups();
        let lag = LagProbe::start(
            cfg,
            &groups,
            Duration::from_millis(cfg.read.cache_ms.max(200)),
        )
        .map_err(|e| tracing::warn!(error = %e, "no consumer lag: the broker client failed"))
        .ok();
        // The first answers should carry a lag too: give the first observations a moment.
        for _ in 0..40 {
            if lag.as_ref().is_none_or(|l| l.observed_all(groups.len())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ReadService {
            cfg: cfg.clone(),
            pg: Pg::from_config(&cfg.postgres),
            redis: Mutex::new(None),
            mongo,
            ch,
            pointers: Mutex::new(None),
            lag,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The live versions, read at most every `read.cache_ms`; while PostgreSQL is away the
    /// last ones read are kept (every answer names the version it read).
    pub async fn versions(&self) -> LiveVersions {
        let mut slot = self.pointers.lock().await;
        if let Some((at, v)) = slot.as_ref()
            && at.elapsed() < Duration::from_millis(self.cfg.read.cache_ms)
        {
            return v.clone();
        }
        let cfg = self.cfg.clone();
        match self
            .pg
            .run(|c| async move { live_versions_on(&c, &cfg).await })
            .await
        {
            Ok(v) => {
                *slot = Some((Instant::now(), v.clone()));
                v
            }
            Err(e) => {
                tracing::warn!(error = %e, "version pointers not read; using the last known");
                slot.as_ref().map(|(_, v)| v.clone()).unwrap_or_default()
            }
        }
    }

    async fn redis(&self) -> Result<RedisCon, ReadError> {
        let mut slot = self.redis.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let con = RedisCon::open(&self.cfg.redis, 1)
            .await
            .map_err(|e| ReadError::store("redis", e))?;
        *slot = Some(con.clone());
        Ok(con)
    }

    fn base_freshness(&self, projection: &str, version: &str) -> Freshness {
        Freshness {
            projection: projection.to_owned(),
            version: version.to_owned(),
            lag: self
                .lag
                .as_ref()
                .and_then(|l| l.latest(self.cfg.group_of(projection))),
            read_at: super::now(),
            ..Freshness::default()
        }
    }

    /// Where every projection stands: live version, handover, rebuilds with rate and ETA,
    /// the event store's head and the group's lag.
    pub async fn status(&self) -> Result<Status, ReadError> {
        let versions = self.versions().await;
        let scope = crate::versions::scope_key(&self.cfg, "");
        let rows = self
            .pg
            .run(|c| async move {
                let head = c
                    .query_one(
                        "SELECT COALESCE((SELECT e.global_position FROM events e \
                          WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                          ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1), 0)",
                        &[],
                    )
                    .await?;
                let checkpoints = c
                    .query(
                        "SELECT projection, version, status, position, events_applied, \
                         started_at, updated_at FROM projection_checkpoints \
                         WHERE starts_with(projection, $1) ORDER BY updated_at DESC",
                        &[&scope],
                    )
                    .await?;
                Ok((head.get::<_, i64>(0), checkpoints))
            })
            .await
            .map_err(|e| ReadError::store("postgres", e))?;
        let (head, checkpoints) = rows;
        let prefix = crate::versions::scope_key(&self.cfg, "");
        let mut projections = Vec::new();
        for info in projectors::registry::infos() {
            let mut rebuilds = Vec::new();
            for r in &checkpoints {
                let p: String = r.get(0);
                if p.strip_prefix(&prefix) != Some(info.name) {
                    continue;
                }
                let started: chrono::DateTime<chrono::Utc> = r.get(5);
                let updated: chrono::DateTime<chrono::Utc> = r.get(6);
                let (status, position, applied): (String, i64, i64) =
                    (r.get(2), r.get(3), r.get(4));
                let secs = (updated - started).as_seconds_f64();
                let rate = (status == "building" && secs > 0.0).then(|| applied as f64 / secs);
                rebuilds.push(RebuildProgress {
                    version: r.get(1),
                    eta_seconds: rate.map(|r| (head - position).max(0) as f64 / r.max(1e-9)),
                    rate_per_second: rate,
                    status,
                    position,
                    events_applied: applied,
                    started_at: super::time(started),
                    updated_at: super::time(updated),
                });
            }
            projections.push(ProjectionStatus {
                projection: info.name.to_owned(),
                store: info.store.as_str().to_owned(),
                live_version: versions.of(info.name).to_owned(),
                switching: versions.switching.iter().any(|s| s == info.name),
                rebuilds,
            });
        }
        Ok(Status {
            event_store_head: head,
            projections,
            lag: self.lag.as_ref().and_then(LagProbe::worst),
            read_at: super::now(),
        })
    }
}

fn check_id(what: &str, id: &str) -> Result<(), ReadError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(ReadError::BadRequest(format!(
            "{what} must be 1 to 256 printable characters"
        )));
    }
    Ok(())
}
