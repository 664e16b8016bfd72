//! Analytics facts in ClickHouse: a ReplacingMergeTree keyed by event_id, so a fact inserted
//! twice (redelivery, replay) counts once in every `FINAL` query.
//!
//! Writes: one RowBinary insert per batch, rows serialised straight from the typed facts
//! (no schema round trip, no per-row validation), with an insert deduplication token made
//! from the batch's event ids, so a retried insert whose first attempt did land is dropped
//! by the server instead of written twice.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use clickhouse::{Client, Row};
use projectors::analytics::Fact;
use serde::{Deserialize, Serialize};

use super::{FactStore, SinkError, with_timeout};
use crate::config::ClickHouseConfig;

const STORE: &str = "clickhouse";

/// A fact as read back (tests, the demo).
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct FactRow {
    pub event_id: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub customer_id: String,
    pub sequence_number: i64,
    pub global_position: i64,
    /// DateTime64(3): milliseconds since the epoch.
    pub ts: i64,
    pub amount_cents: i64,
    pub interaction_type: String,
    pub sentiment: f64,
}

impl From<&Fact> for FactRow {
    fn from(f: &Fact) -> FactRow {
        FactRow {
            event_id: f.event_id.clone(),
            event_type: f.event_type.clone(),
            aggregate_type: f.aggregate_type.clone(),
            aggregate_id: f.aggregate_id.clone(),
            customer_id: f.customer_id.clone(),
            sequence_number: f.sequence_number,
            global_position: f.global_position,
            ts: f.ts_ms,
            amount_cents: f.amount_cents,
            interaction_type: f.interaction_type.clone(),
            sentiment: f.sentiment,
        }
    }
}

/// The same row, borrowed from a fact: what an insert serialises (no copies).
#[derive(Row, Serialize)]
struct FactRowRef<'a> {
    event_id: &'a str,
    event_type: &'a str,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    customer_id: &'a str,
    sequence_number: i64,
    global_position: i64,
    ts: i64,
    amount_cents: i64,
    interaction_type: &'a str,
    sentiment: f64,
}

impl<'a> From<&'a Fact> for FactRowRef<'a> {
    fn from(f: &'a Fact) -> Self {
        FactRowRef {
            event_id: &f.event_id,
            event_type: &f.event_type,
            aggregate_type: &f.aggregate_type,
            aggregate_id: &f.aggregate_id,
            customer_id: &f.customer_id,
            sequence_number: f.sequence_number,
            global_position: f.global_position,
            ts: f.ts_ms,
            amount_cents: f.amount_cents,
            interaction_type: &f.interaction_type,
            sentiment: f.sentiment,
        }
    }
}

#[derive(Clone)]
pub struct ClickHouseSink {
    client: Client,
    table: String,
    timeout: Duration,
}

pub(crate) fn classify(e: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error as E;
    match &e {
        E::Network(_) | E::TimedOut => SinkError::transient(STORE, e),
        // A server answer: a few codes mean "try again" (too many parts, memory, shutdown).
        E::BadResponse(text) => {
            let transient = [
                "TOO_MANY_PARTS",
                "MEMORY_LIMIT_EXCEEDED",
                "TOO_MANY_SIMULTANEOUS_QUERIES",
                "ABORTED",
                "TABLE_IS_READ_ONLY",
                "TIMEOUT_EXCEEDED",
                "SOCKET_TIMEOUT",
                "NETWORK_ERROR",
                "UNKNOWN_STATUS_OF_INSERT",
                "QUERY_WAS_CANCELLED",
                "TOO_FEW_LIVE_REPLICAS",
                "KEEPER_EXCEPTION",
                "CANNOT_SCHEDULE_TASK",
                "UNEXPECTED_END_OF_FILE",
                "CANNOT_READ_FROM_SOCKET",
                "CANNOT_WRITE_TO_SOCKET",
            ];
            // Credentials, permissions, a table or database gone: the deployment's problem,
            // and every row would fail alike. Wait (the circuit opens) rather than refuse them.
            let deployment = [
                "AUTHENTICATION_FAILED",
                "ACCESS_DENIED",
                "UNKNOWN_USER",
                "REQUIRED_PASSWORD",
                "READONLY",
                "UNKNOWN_TABLE",
                "UNKNOWN_DATABASE",
            ];
            if transient
                .iter()
                .chain(&deployment)
                .any(|c| text.contains(c))
            {
                SinkError::transient(STORE, e)
            } else {
                SinkError::permanent(STORE, e)
            }
        }
        _ => SinkError::transient(STORE, e),
    }
}

/// A ClickHouse identifier, back-quoted: a table name (made of a version name) is never
/// read as SQL.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The table's columns and engine (a rebuilt version gets the same).
fn create_table(table: &str) -> String {
    let table = quote_ident(table);
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            event_id String,
            event_type LowCardinality(String),
            aggregate_type LowCardinality(String),
            aggregate_id String,
            customer_id String,
            sequence_number Int64,
            global_position Int64,
            ts DateTime64(3, 'UTC'),
            amount_cents Int64,
            interaction_type LowCardinality(String),
            sentiment Float64
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(ts)
        ORDER BY (event_type, event_id)
        SETTINGS non_replicated_deduplication_window = 1000"
    )
}

/// The writers' client, before any database is chosen (`projector doctor` asks the server
/// through the same settings, without creating anything).
pub fn root_client(cfg: &ClickHouseConfig) -> Client {
    let mut root = Client::default().with_url(&cfg.url).with_validation(false);
    if let Some(user) = &cfg.user {
        root = root.with_user(user);
    }
    if let Some(password) = &cfg.password {
        root = root.with_password(password);
    }
    root
}

impl ClickHouseSink {
    pub async fn connect(cfg: &ClickHouseConfig, table: &str) -> Result<ClickHouseSink, SinkError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let root = root_client(cfg);
        with_timeout(STORE, timeout, async {
            root.query(&format!("CREATE DATABASE IF NOT EXISTS {}", cfg.database))
                .execute()
                .await
                .map_err(classify)
        })
        .await?;
        let client = root.with_database(&cfg.database);
        with_timeout(STORE, timeout, async {
            client
                .query(&create_table(table))
                .execute()
                .await
                .map_err(classify)?;
            // Tables made by earlier versions: deduplicate retried inserts too.
            client
                .query(&format!(
                    "ALTER TABLE {} MODIFY SETTING non_replicated_deduplication_window = 1000",
                    quote_ident(table)
                ))
                .execute()
                .await
                .map_err(classify)
        })
        .await?;
        Ok(ClickHouseSink {
            client,
            table: table.to_owned(),
            timeout,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Drop the table (retiring an old version).
    pub async fn drop_table(&self) -> Result<(), SinkError> {
        self.client
            .query(&format!(
                "DROP TABLE IF EXISTS {}",
                quote_ident(&self.table)
            ))
            .execute()
            .await
            .map_err(classify)
    }

    /// Every fact, deduplicated (tests, the demo).
    pub async fn all_facts(&self) -> Result<Vec<FactRow>, SinkError> {
        self.client
            .query(&format!(
                "SELECT ?fields FROM {} FINAL ORDER BY global_position",
                quote_ident(&self.table)
            ))
            .fetch_all()
            .await
            .map_err(classify)
    }
}

/// The same rows always give the same token; different rows practically never do.
fn dedup_token(facts: &[Fact]) -> String {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0xa5a5_u16.hash(&mut b);
    for f in facts {
        f.event_id.hash(&mut a);
        f.event_id.hash(&mut b);
    }
    format!("{:016x}{:016x}-{}", a.finish(), b.finish(), facts.len())
}

impl FactStore for ClickHouseSink {
    fn name(&self) -> &'static str {
        STORE
    }

    fn location(&self) -> &str {
        &self.table
    }

    async fn insert(&self, facts: &[Fact]) -> Result<(), SinkError> {
        if facts.is_empty() {
            return Ok(());
        }
        let token = dedup_token(facts);
        with_timeout(STORE, self.timeout, async {
            let mut insert = self
                .client
                .insert::<FactRowRef<'_>>(&self.table)
                .await
                .map_err(classify)?
                .with_setting("insert_deduplication_token", token)
                // Events of a batch may span many months: one part per month is fine.
                .with_setting("max_partitions_per_insert_block", "0")
                .with_timeouts(Some(self.timeout), Some(self.timeout));
            for f in facts {
                insert.write(&FactRowRef::from(f)).await.map_err(classify)?;
            }
            insert.end().await.map_err(classify)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, quote_ident};

    #[test]
    fn only_what_the_rows_cause_is_permanent() {
        use clickhouse::error::Error as E;
        let bad = |t: &str| classify(E::BadResponse(t.to_owned()));
        let auth =
            "Code: 516. DB::Exception: default: Authentication failed (AUTHENTICATION_FAILED)";
        assert!(bad(auth).is_transient());
        assert!(bad("Code: 60. Table x doesn't exist. (UNKNOWN_TABLE)").is_transient());
        assert!(bad("Code: 252. Too many parts (TOO_MANY_PARTS)").is_transient());
        let parse = "Code: 27. Cannot parse input (CANNOT_PARSE_INPUT_ASSERTION_FAILED)";
        assert!(!bad(parse).is_transient());
    }

    #[test]
    fn identifiers_are_back_quoted_and_cannot_break_out() {
        assert_eq!(quote_ident("event_facts_v1"), "`event_facts_v1`");
        assert_eq!(
            quote_ident("a`; DROP TABLE x; --"),
            "`a\\`; DROP TABLE x; --`"
        );
        assert_eq!(quote_ident("a\\`b"), "`a\\\\\\`b`");
    }
}
