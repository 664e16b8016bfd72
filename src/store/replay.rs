//! The gap-safe replay reader: pages through the event store in commit order.

use contract::{Event, EventData, EventEnvelope, EventHeader, Metadata};
use serde::{Deserialize, Serialize};

use super::read::envelope_of as envelope;
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
                // Ordered by the xid8 column itself (qualified: the text output column of the
                // same name would sort lexicographically, "999" above "1331").
                "SELECT e.transaction_id::text, e.global_position FROM events e \
                 WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1",
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

/// A stored event, validated and typed, or why the stored row breaks the contract (its
/// stream and sequence, so a reader can park it as the live feed would).
pub type Typed = Result<Event, (String, i64, contract::ContractError)>;

/// A replayed event and where it stands in commit order.
pub type Replayed = (ReplayPosition, Typed);

impl EventStore {
    /// Like [`EventStore::read_committed_after`], typed in one pass (payloads are read as
    /// text and decoded straight into the catalogue types), and bounded by `upto` when given.
    pub async fn read_events_after(
        &self,
        after: ReplayPosition,
        upto: Option<ReplayPosition>,
        limit: i64,
    ) -> Result<Vec<Replayed>, StoreError> {
        let (upto_tx, upto_pos) = upto.map_or((None, None), |u| {
            (Some(u.transaction_id.to_string()), Some(u.global_position))
        });
        let rows = self
            .client
            .query(
                "SELECT global_position, event_id, aggregate_type, aggregate_id, sequence_number, \
                   event_type, event_data::text, metadata::text, timestamp, transaction_id::text \
                 FROM events e \
                 WHERE (e.transaction_id, e.global_position) > ($1::text::xid8, $2) \
                   AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                   AND ($4::text IS NULL OR (e.transaction_id, e.global_position) <= ($4::text::xid8, $5)) \
                 ORDER BY e.transaction_id, e.global_position LIMIT $3",
                &[
                    &after.transaction_id.to_string(),
                    &after.global_position,
                    &limit,
                    &upto_tx,
                    &upto_pos,
                ],
            )
            .await?;
        Ok(rows.iter().map(replayed).collect())
    }
}

impl EventStore {
    /// Every event of one stream (`aggregate_type/aggregate_id`), in sequence.
    pub async fn read_stream(&self, stream: &str) -> Result<Vec<Replayed>, StoreError> {
        let (t, id) = stream.split_once('/').unwrap_or((stream, ""));
        let rows = self
            .client
            .query(
                "SELECT global_position, event_id, aggregate_type, aggregate_id, sequence_number, \
                   event_type, event_data::text, metadata::text, timestamp, transaction_id::text \
                 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence_number",
                &[&t, &id],
            )
            .await?;
        Ok(rows.iter().map(replayed).collect())
    }
}

/// A row of the typed replay select: its position and its event.
fn replayed(r: &tokio_postgres::Row) -> Replayed {
    let position = ReplayPosition {
        transaction_id: r.get::<_, String>(9).parse().unwrap_or(0),
        global_position: r.get(0),
    };
    (position, typed(r))
}

/// The event of a row of the typed select (columns 0–8), or why it breaks the contract.
pub(super) fn typed(r: &tokio_postgres::Row) -> Typed {
    let aggregate_type: String = r.get(2);
    let aggregate_id: String = r.get(3);
    let seq: i64 = r.get(4);
    let stream = format!("{aggregate_type}/{aggregate_id}");
    let event_type: String = r.get(5);
    let data: String = r.get(6);
    let metadata: String = r.get(7);
    let build = || -> Result<Event, contract::ContractError> {
        let header = EventHeader {
            event_id: r.get(1),
            aggregate_type: aggregate_type.parse()?,
            aggregate_id: aggregate_id.clone(),
            sequence_number: seq,
            global_position: r.get(0),
            event_type: event_type.clone(),
            metadata: Metadata::from_json(&metadata),
            timestamp: r.get(8),
        };
        let data = EventData::decode_str(&event_type, &data)?;
        Event::from_parts(header, data)
    };
    build().map_err(|e| (stream, seq, e))
}

/// The plain select plus the transaction id as text (tokio-postgres has no xid8 type).
const SELECT_WITH_TX: &str = "SELECT global_position, event_id, aggregate_type, aggregate_id, \
     sequence_number, event_type, event_data, metadata, timestamp, transaction_id, \
     transaction_id::text AS tx FROM events";
