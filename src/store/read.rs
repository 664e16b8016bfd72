//! Reads in `global_position` order.

use chrono::{DateTime, Utc};
use contract::{ContractError, EventEnvelope};
use serde_json::Value;
use tokio_postgres::Row;

use super::{EventStore, StoreError};

/// The columns `envelope_of` reads.
pub const SELECT_EVENT: &str = "SELECT global_position, event_id, aggregate_type, aggregate_id, \
                      sequence_number, event_type, event_data, metadata, timestamp FROM events";

impl EventStore {
    /// Up to `limit` events with a position above `after`, in position order.
    ///
    /// This is a plain read: it may skip a position whose transaction commits later. Replay
    /// must go through the gap-safe reader, which bounds `after` and the visible horizon.
    pub async fn read_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "{SELECT_EVENT} WHERE global_position > $1 ORDER BY global_position LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?;
        rows.iter().map(envelope_of).collect()
    }

    /// Every event whose aggregate id starts with `prefix`, in position order (tests, demo).
    pub async fn read_prefix(&self, prefix: &str) -> Result<Vec<EventEnvelope>, StoreError> {
        let pattern = like_prefix(prefix);
        let rows = self
            .client
            .query(
                &format!("{SELECT_EVENT} WHERE aggregate_id LIKE $1 ORDER BY global_position"),
                &[&pattern],
            )
            .await?;
        rows.iter().map(envelope_of).collect()
    }
}

/// An event from a row of `SELECT_EVENT`.
pub fn envelope_of(row: &Row) -> Result<EventEnvelope, StoreError> {
    let position: i64 = row.get(0);
    let corrupt = |source: ContractError| StoreError::Corrupt { position, source };
    let aggregate_type: String = row.get(2);
    let metadata = match row.get::<_, Value>(7) {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let timestamp: DateTime<Utc> = row.get(8);
    Ok(EventEnvelope {
        global_position: position,
        event_id: row.get(1),
        aggregate_type: aggregate_type.parse().map_err(corrupt)?,
        aggregate_id: row.get(3),
        sequence_number: row.get(4),
        event_type: row.get(5),
        event_data: row.get(6),
        metadata,
        timestamp,
    })
}

/// A LIKE pattern matching every text that starts with `prefix` literally (`_`, `%` and `\`
/// escaped: ids and namespaces hold `_`).
pub fn like_prefix(prefix: &str) -> String {
    format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}
