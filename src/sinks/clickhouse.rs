//! Analytics facts in ClickHouse: a ReplacingMergeTree keyed by event_id, so a fact inserted
//! twice (redelivery, replay) counts once in every `FINAL` query.

use clickhouse::{Client, Row};
use projectors::analytics::Fact;
use serde::{Deserialize, Serialize};

use super::{FactSink, SinkError};

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

#[derive(Clone)]
pub struct ClickHouseSink {
    client: Client,
    table: String,
}

impl ClickHouseSink {
    pub async fn connect(
        url: &str,
        database: &str,
        table: &str,
    ) -> Result<ClickHouseSink, SinkError> {
        let root = Client::default().with_url(url);
        root.query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .execute()
            .await?;
        let client = root.with_database(database);
        client
            .query(&format!(
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
                ORDER BY (event_type, event_id)"
            ))
            .execute()
            .await?;
        Ok(ClickHouseSink {
            client,
            table: table.to_owned(),
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
        Ok(self
            .client
            .query(&format!("DROP TABLE IF EXISTS {}", self.table))
            .execute()
            .await?)
    }

    /// Every fact, deduplicated (tests, the demo).
    pub async fn all_facts(&self) -> Result<Vec<FactRow>, SinkError> {
        Ok(self
            .client
            .query(&format!(
                "SELECT ?fields FROM {} FINAL ORDER BY global_position",
                self.table
            ))
            .fetch_all()
            .await?)
    }
}

impl FactSink for ClickHouseSink {
    async fn insert(&self, facts: &[Fact]) -> Result<(), SinkError> {
        if facts.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<FactRow>(&self.table).await?;
        for f in facts {
            insert.write(&FactRow::from(f)).await?;
        }
        insert.end().await?;
        Ok(())
    }
}
