//! ClickHouse: reachable, its version; the facts table deduplicates a retried insert (what
//! the sink's insert tokens rely on); and the read service's session cannot write.

use std::time::Duration;

use super::{ProbeError, Row, timed};
use crate::config::Config;
use crate::sinks::clickhouse::{quote_ident, root_client};

/// A table the read service's session must not be able to create (engine Null: it would
/// hold nothing even if it were created).
const PROBE_TABLE: &str = "projector_doctor_readonly_probe";

/// The facts table as `system.tables` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableSeen {
    pub engine: String,
    pub engine_full: String,
}

pub(crate) async fn check(cfg: &Config, t: Duration, table: &str) -> Vec<Row> {
    let ch = &cfg.clickhouse;
    let writer = root_client(ch);
    let version = timed(t, writer.query("SELECT version()").fetch_one::<String>()).await;
    let version = match version {
        Ok(v) => v,
        Err(e) => {
            let seen = format!("{}: {e}", crate::redact::url(&ch.url));
            return vec![
                Row::fail("clickhouse", seen)
                    .action("check clickhouse.url and that ClickHouse runs and is reachable"),
                Row::fail("clickhouse dedup", "ClickHouse unreachable"),
                Row::fail("clickhouse read-only", "ClickHouse unreachable"),
            ];
        }
    };
    let has_db = timed(
        t,
        writer
            .query("SELECT count() FROM system.databases WHERE name = ?")
            .bind(ch.database.as_str())
            .fetch_one::<u64>(),
    )
    .await;
    let user = ch.user.as_deref().unwrap_or("default");
    let first = match has_db {
        Ok(0) => Row::warn(
            "clickhouse",
            format!(
                "ClickHouse {version}, user {user}: database {} missing",
                ch.database
            ),
        )
        .action("an analytics worker creates it when it starts (`projector run`)"),
        Ok(_) => Row::ok(
            "clickhouse",
            format!(
                "ClickHouse {version} at {}, user {user}, database {}",
                crate::redact::url(&ch.url),
                ch.database
            ),
        ),
        Err(e) => Row::fail(
            "clickhouse",
            format!("ClickHouse {version}: system.databases: {e}"),
        ),
    };
    vec![first, dedup(cfg, t, table).await, read_only(cfg, t).await]
}

async fn dedup(cfg: &Config, t: Duration, table: &str) -> Row {
    let ch = &cfg.clickhouse;
    let writer = root_client(ch);
    let seen = timed(
        t,
        writer
            .query("SELECT engine, engine_full FROM system.tables WHERE database = ? AND name = ?")
            .bind(ch.database.as_str())
            .bind(table)
            .fetch_optional::<(String, String)>(),
    )
    .await;
    let server_default = timed(
        t,
        writer
            .query(
                "SELECT toUInt64OrZero(value) FROM system.merge_tree_settings \
                 WHERE name = 'non_replicated_deduplication_window'",
            )
            .fetch_optional::<u64>(),
    )
    .await;
    let insert_dedup = timed(
        t,
        writer
            .query("SELECT toUInt64(getSetting('insert_deduplicate'))")
            .fetch_one::<u64>(),
    )
    .await;
    let (seen, server_default, insert_dedup) = match (seen, server_default, insert_dedup) {
        (Ok(s), Ok(d), Ok(i)) => (
            s.map(|(engine, engine_full)| TableSeen {
                engine,
                engine_full,
            }),
            d.unwrap_or(0),
            i,
        ),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return Row::fail("clickhouse dedup", format!("settings not read: {e}"));
        }
    };
    dedup_row(
        &format!("{}.{table}", ch.database),
        seen.as_ref(),
        server_default,
        insert_dedup,
    )
}

/// `name = <number>` among a table's `SETTINGS` (in `engine_full`).
pub(crate) fn table_setting(engine_full: &str, name: &str) -> Option<u64> {
    let settings = &engine_full[engine_full.find(" SETTINGS ")?..];
    settings
        .split([' ', ','])
        .collect::<Vec<_>>()
        .windows(3)
        .find(|w| w[0] == name && w[1] == "=")
        .and_then(|w| w[2].parse().ok())
}

pub(crate) fn dedup_row(
    table: &str,
    seen: Option<&TableSeen>,
    server_default: u64,
    insert_deduplicate: u64,
) -> Row {
    const CHECK: &str = "clickhouse dedup";
    let Some(seen) = seen else {
        return Row::warn(CHECK, format!("table {table} does not exist yet"))
            .action("an analytics worker creates it when it starts (`projector run`)");
    };
    if !seen.engine.contains("ReplacingMergeTree") {
        return Row::fail(
            CHECK,
            format!(
                "{table} is a {}: a fact inserted twice counts twice",
                seen.engine
            ),
        )
        .action("rebuild analytics into a new version (its table is made a ReplacingMergeTree)");
    }
    if insert_deduplicate == 0 {
        return Row::warn(
            CHECK,
            "insert_deduplicate = 0 for the workers' user: retried inserts are stored twice until merged",
        )
        .action("set insert_deduplicate = 1 in the user's settings profile");
    }
    if seen.engine.starts_with("Replicated") {
        return Row::ok(
            CHECK,
            format!(
                "{table}: {}, retried inserts dropped by replicated_deduplication_window",
                seen.engine
            ),
        );
    }
    let window = table_setting(&seen.engine_full, "non_replicated_deduplication_window")
        .unwrap_or(server_default);
    if window == 0 {
        return Row::warn(
            CHECK,
            format!(
                "{table}: non_replicated_deduplication_window = 0: a retried insert is stored \
                 twice until merged (FINAL still counts it once)"
            ),
        )
        .action(format!(
            "ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = 1000 \
             (an analytics worker does it when it starts)"
        ));
    }
    Row::ok(
        CHECK,
        format!(
            "{table}: {}, non_replicated_deduplication_window = {window}, insert_deduplicate = 1",
            seen.engine
        ),
    )
}

/// The read service's own client (its `readonly=1` session): the server must report the
/// session read-only and refuse a harmless write.
async fn read_only(cfg: &Config, t: Duration) -> Row {
    let reader = crate::read::service::clickhouse_client(cfg);
    let setting = timed(
        t,
        reader
            .query("SELECT toUInt64(getSetting('readonly'))")
            .fetch_one::<u64>(),
    )
    .await;
    let probe = format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (x UInt8) ENGINE = Null",
        quote_ident(&cfg.clickhouse.database),
        quote_ident(PROBE_TABLE)
    );
    let write = match setting {
        Ok(n) if n > 0 => Some(timed(t, reader.query(&probe).execute()).await),
        _ => None,
    };
    if let Some(Ok(())) = write {
        // The server ignored the session setting: take the probe table away again.
        let drop = format!(
            "DROP TABLE IF EXISTS {}.{}",
            quote_ident(&cfg.clickhouse.database),
            quote_ident(PROBE_TABLE)
        );
        let _ = timed(t, root_client(&cfg.clickhouse).query(&drop).execute()).await;
    }
    read_only_row(cfg.clickhouse.user.as_deref(), setting, write)
}

pub(crate) fn read_only_row(
    user: Option<&str>,
    setting: Result<u64, ProbeError>,
    write: Option<Result<(), ProbeError>>,
) -> Row {
    const CHECK: &str = "clickhouse read-only";
    let user = user.unwrap_or("default");
    match (setting, write) {
        (Err(e), _) => Row::fail(
            CHECK,
            format!("the read service's session (user {user}, readonly=1) cannot query: {e}"),
        )
        .action(
            "give clickhouse.user a profile that allows setting readonly (readonly = 0 or 2), \
             or the read service answers no analytics",
        ),
        (Ok(0), _) => Row::fail(
            CHECK,
            format!("user {user}: the read service's session reports readonly = 0"),
        )
        .action(
            "the server ignores the session's readonly=1: check its settings profile constraints",
        ),
        (Ok(n), Some(Ok(()))) => Row::fail(
            CHECK,
            format!(
                "readonly = {n}, yet the read service's session created a table (dropped again)"
            ),
        )
        .action("check the user's settings profile and constraints"),
        (Ok(n), Some(Err(e))) => {
            let why = if e.to_string().contains("READONLY") {
                "READONLY"
            } else {
                "refused"
            };
            Row::ok(
                CHECK,
                format!(
                    "user {user}, session readonly = {n}: a harmless CREATE TABLE was refused ({why})"
                ),
            )
        }
        (Ok(n), None) => Row::ok(CHECK, format!("user {user}, session readonly = {n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    const FULL: &str = "ReplacingMergeTree PARTITION BY toYYYYMM(ts) ORDER BY (event_type, event_id) \
        SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192";

    fn table(engine: &str, full: &str) -> TableSeen {
        TableSeen {
            engine: engine.into(),
            engine_full: full.into(),
        }
    }

    #[test]
    fn table_settings_are_read_from_engine_full() {
        assert_eq!(
            table_setting(FULL, "non_replicated_deduplication_window"),
            Some(1000)
        );
        assert_eq!(table_setting(FULL, "index_granularity"), Some(8192));
        assert_eq!(table_setting(FULL, "replicated_deduplication_window"), None);
        assert_eq!(
            table_setting("MergeTree ORDER BY x", "index_granularity"),
            None
        );
    }

    #[test]
    fn retried_inserts_must_be_dropped() {
        let v = |t: Option<&TableSeen>, default, dedup| dedup_row("a.f", t, default, dedup).verdict;
        let ok = table("ReplacingMergeTree", FULL);
        assert_eq!(v(Some(&ok), 0, 1), Verdict::Ok);
        assert_eq!(v(Some(&ok), 0, 0), Verdict::Warn, "tokens ignored");
        let plain = table("ReplacingMergeTree", "ReplacingMergeTree ORDER BY x");
        assert_eq!(v(Some(&plain), 0, 1), Verdict::Warn, "window 0");
        assert_eq!(v(Some(&plain), 100, 1), Verdict::Ok, "the server's default");
        let merge = table("MergeTree", "MergeTree ORDER BY x");
        assert_eq!(v(Some(&merge), 100, 1), Verdict::Fail);
        let replicated = table(
            "ReplicatedReplacingMergeTree",
            "ReplicatedReplacingMergeTree('/p', '{r}')",
        );
        assert_eq!(v(Some(&replicated), 0, 1), Verdict::Ok);
        assert_eq!(v(None, 0, 1), Verdict::Warn);
    }

    #[test]
    fn the_read_session_must_refuse_writes() {
        let refused = || Some(Err(ProbeError::Failed("Code: 164. (READONLY)".into())));
        let v = |s, w| read_only_row(None, s, w).verdict;
        assert_eq!(v(Ok(1), refused()), Verdict::Ok);
        assert_eq!(v(Ok(1), Some(Ok(()))), Verdict::Fail);
        assert_eq!(v(Ok(0), None), Verdict::Fail);
        assert_eq!(v(Err(ProbeError::Timeout(10)), None), Verdict::Fail);
        let r = read_only_row(Some("reader"), Ok(1), refused());
        assert!(
            r.seen.contains("user reader") && r.seen.contains("READONLY"),
            "{}",
            r.seen
        );
    }
}
