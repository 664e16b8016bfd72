//! The gap-safe replay reader: pages through the event store in commit order.

use contract::EventEnvelope;
use serde::{Deserialize, Serialize};

use super::read::envelope;
use super::{EventStore, StoreError};

/// Where a replay stands: every event at or before this (commit order) has been read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplayPosition {
    /// Id of the writing transaction (PostgreSQL xid8).
    pub transaction_id: u64,
    pub global_position: i64,
}

impl EventStore {
    /// Up to `limit` events after `after`, in commit order, from finished transactions only.
    ///
    /// A transaction still in flight may hold positions below rows already visible, so
    /// nothing at or above the oldest running transaction is returned: the checkpoint never
    /// passes an event that could still appear. A rolled-back transaction leaves no rows and
    /// stops holding the horizon back the moment it ends, so a gap never stalls the reader.
    /// (An unrelated transaction left open for long does hold it back: keep sessions short.)
    pub async fn read_committed_after(
        &self,
        after: ReplayPosition,
        limit: i64,
    ) -> Result<Vec<(ReplayPosition, EventEnvelope)>, StoreError> {
        let sql = format!(
            "SELECT * FROM ({SELECT_WITH_TX}) e \
             WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
               AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY transaction_id, global_position LIMIT $3"
        );
        let rows = self
            .client
            .query(
                &sql,
                &[
                    &after.transaction_id.to_string(),
                    &after.global_position,
                    &limit,
                ],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let tx: String = r.get("tx");
                let env = envelope(r)?;
                let transaction_id = tx.parse().unwrap_or(0);
                Ok((
                    ReplayPosition {
                        transaction_id,
                        global_position: env.global_position,
                    },
                    env,
                ))
            })
            .collect()
    }

    /// The commit-order head: the position of the newest event a replay could read now.
    pub async fn committed_head(&self) -> Result<ReplayPosition, StoreError> {
        let row = self
            .client
            .query_opt(
                "SELECT transaction_id::text, global_position FROM events \
                 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
                &[],
            )
            .await?;
        Ok(
            row.map_or_else(ReplayPosition::default, |r| ReplayPosition {
                transaction_id: r.get::<_, String>(0).parse().unwrap_or(0),
                global_position: r.get(1),
            }),
        )
    }
}

/// The plain select plus the transaction id as text (tokio-postgres has no xid8 type).
const SELECT_WITH_TX: &str = "SELECT global_position, event_id, aggregate_type, aggregate_id, \
     sequence_number, event_type, event_data, metadata, timestamp, transaction_id, \
     transaction_id::text AS tx FROM events";
