//! PostgreSQL (the event store and the deployment's rows): reachable, its version, the
//! schema; the read models' live versions with the orphaned or retired ones still holding
//! data (the rules `rebuild-projection status` and `retire` use); the parked streams.

use std::time::Duration;

use super::{Row, timed};
use crate::config::Config;
use crate::rebuild::{self, Checkpoint};
use crate::runtime::parking::{ParkStore, ParkSummary};
use crate::store::EventStore;
use crate::store::MIGRATIONS;
use crate::versions::{self, LiveVersions};

pub(crate) async fn check(cfg: &Config, t: Duration) -> Vec<Row> {
    let store = match timed(t, EventStore::connect(&cfg.postgres.url)).await {
        Ok(s) => s,
        Err(e) => {
            let at = crate::redact::url(&cfg.postgres.url);
            return vec![
                Row::fail("postgres", format!("{at}: {e}"))
                    .action("check postgres.url and that PostgreSQL runs and is reachable"),
                Row::fail("postgres schema", "PostgreSQL unreachable"),
                Row::fail("versions", "PostgreSQL unreachable"),
                Row::fail("parked streams", "PostgreSQL unreachable"),
            ];
        }
    };
    let client = store.client();
    let version = timed(t, client.query_one("SHOW server_version", &[]))
        .await
        .map(|r| r.get::<_, String>(0));
    let mut rows = vec![match version {
        Ok(v) => Row::ok(
            "postgres",
            format!(
                "PostgreSQL {v} at {}",
                crate::redact::url(&cfg.postgres.url)
            ),
        ),
        Err(e) => Row::fail("postgres", format!("SHOW server_version: {e}")),
    }];
    let applied = timed(t, async {
        let exists = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await?
            .get::<_, bool>(0);
        if !exists {
            return Ok::<_, tokio_postgres::Error>(Vec::new());
        }
        let rows = client
            .query("SELECT version FROM schema_migrations", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
    })
    .await;
    rows.push(match applied {
        Ok(applied) => schema_row(&applied),
        Err(e) => Row::fail("postgres schema", format!("schema_migrations: {e}")),
    });
    rows.extend(versions_rows(cfg, &store, t).await);
    rows.push(parked_row(cfg, t).await);
    rows
}

/// Every embedded migration applied (workers apply missing ones when they start).
pub(crate) fn schema_row(applied: &[i32]) -> Row {
    let pending: Vec<String> = MIGRATIONS
        .iter()
        .filter(|(v, _, _)| !applied.contains(v))
        .map(|(v, name, _)| format!("{v} {name}"))
        .collect();
    if pending.is_empty() {
        return Row::ok(
            "postgres schema",
            format!("all {} migrations applied", MIGRATIONS.len()),
        );
    }
    Row::warn(
        "postgres schema",
        format!("migrations not applied: {}", pending.join(", ")),
    )
    .action("`projector migrate` (a worker applies them when it starts)")
}

/// The live versions read through the event store the worker reads them from.
pub(crate) async fn live(cfg: &Config, t: Duration) -> Option<LiveVersions> {
    let store = timed(t, EventStore::connect(&cfg.postgres.url))
        .await
        .ok()?;
    timed(t, versions::live_versions(&store, cfg)).await.ok()
}

async fn versions_rows(cfg: &Config, store: &EventStore, t: Duration) -> Vec<Row> {
    let read = timed(t, async {
        let live = versions::live_versions(store, cfg)
            .await
            .map_err(|e| e.to_string())?;
        let built = rebuild::versions_in_scope(cfg, store)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((live, built))
    })
    .await;
    let (live, built) = match read {
        Ok(v) => v,
        Err(e) => {
            return vec![
                Row::fail("versions", format!("pointers not read: {e}"))
                    .action("`projector migrate` if the tables are missing"),
            ];
        }
    };
    let mut rows = vec![live_row(&live)];
    for c in rebuild::orphaned(&built, &live) {
        rows.push(
            Row::warn(
                format!("version {} {}", c.projection, c.version),
                format!("{}, read by no one: it holds storage", c.status),
            )
            .action(rebuild::orphan_hint(c)),
        );
    }
    for c in built.iter().filter(|c| c.status == "retired") {
        if let Some(row) = retired_row(cfg, c, t).await {
            rows.push(row);
        }
    }
    rows
}

/// Which version each read model's readers and workers use; a handover in progress.
pub(crate) fn live_row(live: &LiveVersions) -> Row {
    let list: Vec<String> = projectors::names()
        .iter()
        .map(|p| format!("{p} {}", live.of(p)))
        .collect();
    let seen = list.join(", ");
    if live.switching.is_empty() {
        return Row::ok("versions", seen);
    }
    Row::warn(
        "versions",
        format!("{seen}; switching: {}", live.switching.join(", ")),
    )
    .action(
        "a rebuild is handing over (workers hold); a dead rebuild's lease expires and the \
         workers go on: see `rebuild-projection status`",
    )
}

/// A retired version whose store still holds data (its retire was interrupted after it was
/// recorded): `None` when nothing is left. Asked without connecting a sink, which would
/// create the store again.
async fn retired_row(cfg: &Config, c: &Checkpoint, t: Duration) -> Option<Row> {
    let views = versions::views_for(cfg, &c.version);
    let kind = projectors::registry::info(&c.projection).map(|i| i.store)?;
    let left: Result<Option<String>, super::ProbeError> = match kind {
        projectors::StoreKind::Redis => {
            timed(t, async {
                let mut con = crate::sinks::redis::RedisCon::open(&cfg.redis, 0).await?;
                let keys = con.scan(&format!("{}*", views.redis_prefix)).await?;
                Ok::<_, crate::sinks::SinkError>(
                    (!keys.is_empty())
                        .then(|| format!("{} Redis keys under {}", keys.len(), views.redis_prefix)),
                )
            })
            .await
        }
        projectors::StoreKind::Mongo => {
            timed(t, async {
                let client = super::mongo::connect(cfg, t).await?;
                let names = client
                    .database(&cfg.mongo.database)
                    .list_collection_names()
                    .filter(mongodb::bson::doc! {"name": views.mongo_collection.as_str()})
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((!names.is_empty()).then(|| {
                    format!(
                        "collection {}.{}",
                        cfg.mongo.database, views.mongo_collection
                    )
                }))
            })
            .await
        }
        projectors::StoreKind::ClickHouse => {
            timed(t, async {
                let n = crate::sinks::clickhouse::root_client(&cfg.clickhouse)
                    .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
                    .bind(cfg.clickhouse.database.as_str())
                    .bind(views.clickhouse_table.as_str())
                    .fetch_one::<u64>()
                    .await?;
                Ok::<_, clickhouse::error::Error>((n > 0).then(|| {
                    format!(
                        "table {}.{}",
                        cfg.clickhouse.database, views.clickhouse_table
                    )
                }))
            })
            .await
        }
    };
    let check = format!("version {} {}", c.projection, c.version);
    match left {
        Ok(None) => None,
        Ok(Some(what)) => Some(
            Row::warn(check, format!("retired, but {what} still exist(s)")).action(
                "its retire was interrupted: delete that data by hand (no worker writes it again)",
            ),
        ),
        Err(e) => Some(Row::warn(
            check,
            format!("retired; its store not asked: {e}"),
        )),
    }
}

async fn parked_row(cfg: &Config, t: Duration) -> Row {
    let pg = std::sync::Arc::new(crate::store::Pg::from_config(&cfg.postgres));
    let parks = ParkStore::new(pg, &cfg.deployment);
    match timed(t, parks.summary()).await {
        Ok(s) => parked_verdict(&s),
        Err(e) => Row::fail("parked streams", format!("parked_streams not read: {e}")),
    }
}

/// Parks never block the others, but each waits for an operator.
pub(crate) fn parked_verdict(s: &ParkSummary) -> Row {
    const CHECK: &str = "parked streams";
    let Some(oldest) = &s.oldest else {
        return Row::ok(CHECK, "none");
    };
    let by: Vec<String> = s
        .by_projection
        .iter()
        .map(|(p, n)| format!("{} {n}", if p == "*" { "every projector" } else { p }))
        .collect();
    Row::warn(
        CHECK,
        format!(
            "{} parked ({}); oldest {} for {} since {} ({})",
            s.total(),
            by.join(", "),
            oldest.stream,
            oldest.projection,
            oldest.parked_at.format("%Y-%m-%d %H:%M:%SZ"),
            oldest.reason
        ),
    )
    .action("`projector dlq list` shows why; fix the cause, then `projector dlq unpark <stream>`")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;
    use crate::runtime::parking::OldestPark;

    #[test]
    fn pending_migrations_warn() {
        let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(schema_row(&all).verdict, Verdict::Ok);
        let r = schema_row(&all[..all.len() - 1]);
        assert_eq!(r.verdict, Verdict::Warn);
        let last = MIGRATIONS.last().map_or("", |m| m.1);
        assert!(r.seen.contains(last), "{}", r.seen);
    }

    #[test]
    fn a_handover_in_progress_warns() {
        let mut live = LiveVersions::default();
        let r = live_row(&live);
        assert_eq!(r.verdict, Verdict::Ok);
        assert_eq!(r.seen, "customer360 live, order_view live, analytics live");
        live.by_projection.insert("analytics".into(), "v2".into());
        live.switching.push("analytics".into());
        let r = live_row(&live);
        assert_eq!(r.verdict, Verdict::Warn);
        assert!(
            r.seen.contains("analytics v2; switching: analytics"),
            "{}",
            r.seen
        );
    }

    #[test]
    fn parks_are_counted_with_the_oldest() {
        assert_eq!(parked_verdict(&ParkSummary::default()).verdict, Verdict::Ok);
        let s = ParkSummary {
            by_projection: vec![("*".into(), 1), ("order_view".into(), 2)],
            oldest: Some(OldestPark {
                projection: "order_view".into(),
                version: "live".into(),
                stream: "order/ord-1".into(),
                reason: "rejected: never placed".into(),
                parked_at: chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
            }),
        };
        let r = parked_verdict(&s);
        assert_eq!(r.verdict, Verdict::Warn);
        assert_eq!(
            r.seen,
            "3 parked (every projector 1, order_view 2); oldest order/ord-1 for order_view \
             since 1970-01-01 00:00:00Z (rejected: never placed)"
        );
    }
}
