//! Appends: many streams in one transaction, fast (binary COPY), with optimistic concurrency
//! on each stream's `sequence_number` (0, 1, 2, ... with no holes).

use std::collections::HashMap;

use contract::EventEnvelope;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use super::{EventStore, StoreError};

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub appended: usize,
    pub first_position: i64,
    pub last_position: i64,
}

const COLUMNS: &str = "global_position, event_id, aggregate_type, aggregate_id, sequence_number, \
                       event_type, event_data, metadata, timestamp";
const TYPES: [Type; 9] = [
    Type::INT8,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::TIMESTAMPTZ,
];

impl EventStore {
    /// Append `events` atomically and set each one's `global_position`.
    ///
    /// Within the batch, each stream's events must follow on from what the store holds:
    /// the first one has sequence `current + 1` (0 for a new stream) and the rest are
    /// consecutive. Otherwise nothing is written and [`StoreError::Conflict`] is returned.
    pub async fn append(
        &mut self,
        events: &mut [EventEnvelope],
    ) -> Result<AppendOutcome, StoreError> {
        if events.is_empty() {
            return Ok(AppendOutcome {
                appended: 0,
                first_position: 0,
                last_position: 0,
            });
        }
        let tx = self.client.transaction().await?;
        check_sequences(&tx, events).await?;

        // Positions come from the table's own sequence, in batch order, so COPY can carry them.
        let rows = tx
            .query(
                "SELECT nextval(pg_get_serial_sequence('events', 'global_position')) \
                 FROM generate_series(1, $1::int)",
                &[&(events.len() as i32)],
            )
            .await?;
        let mut positions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        positions.sort_unstable();
        for (e, p) in events.iter_mut().zip(&positions) {
            e.global_position = *p;
        }

        let sink = tx
            .copy_in(&format!("COPY events ({COLUMNS}) FROM STDIN BINARY"))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &TYPES);
        pin_mut!(writer);
        for e in events.iter() {
            let data = tokio_postgres::types::Json(&e.event_data);
            let meta = tokio_postgres::types::Json(&e.metadata);
            let agg = e.aggregate_type.as_str();
            let row: [&(dyn ToSql + Sync); 9] = [
                &e.global_position,
                &e.event_id,
                &agg,
                &e.aggregate_id,
                &e.sequence_number,
                &e.event_type,
                &data,
                &meta,
                &e.timestamp,
            ];
            writer.as_mut().write(&row).await.map_err(classify)?;
        }
        writer.finish().await.map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(AppendOutcome {
            appended: events.len(),
            first_position: positions[0],
            last_position: positions[positions.len() - 1],
        })
    }
}

/// Each stream in the batch must continue exactly where the store's copy of it ends.
async fn check_sequences(
    tx: &tokio_postgres::Transaction<'_>,
    events: &[EventEnvelope],
) -> Result<(), StoreError> {
    // First and count of each stream, in batch order.
    let mut streams: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
    for e in events {
        let key = (e.aggregate_type.as_str(), e.aggregate_id.as_str());
        match streams.get_mut(&key) {
            None => {
                streams.insert(key, (e.sequence_number, e.sequence_number));
            }
            Some((_, last)) => {
                if e.sequence_number != *last + 1 {
                    return Err(conflict(key, *last + 1, e.sequence_number));
                }
                *last = e.sequence_number;
            }
        }
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = streams.keys().copied().unzip();
    let rows = tx
        .query(
            "SELECT aggregate_type, aggregate_id, MAX(sequence_number) FROM events \
             WHERE (aggregate_type, aggregate_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[])) \
             GROUP BY 1, 2",
            &[&types, &ids],
        )
        .await?;
    let mut current: HashMap<(String, String), i64> = HashMap::new();
    for r in rows {
        current.insert((r.get(0), r.get(1)), r.get(2));
    }
    for (key, (first, _)) in &streams {
        let next = current
            .get(&(key.0.to_owned(), key.1.to_owned()))
            .map_or(0, |m| m + 1);
        if *first != next {
            return Err(conflict(*key, next, *first));
        }
    }
    Ok(())
}

fn conflict((t, id): (&str, &str), expected: i64, got: i64) -> StoreError {
    StoreError::Conflict {
        aggregate_type: t.to_owned(),
        aggregate_id: id.to_owned(),
        expected,
        got,
    }
}

/// A concurrent writer that won the race shows up as a unique violation at COPY or commit.
fn classify(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error()
        && *db.code() == SqlState::UNIQUE_VIOLATION
    {
        let detail = db.detail().unwrap_or_default().to_owned();
        return match db.constraint() {
            Some("events_event_id_key") => StoreError::DuplicateEvent(detail),
            _ => StoreError::ConcurrentAppend(detail),
        };
    }
    StoreError::Postgres(e)
}
