//! Reads by stream and sequence, many streams in one query: what the live sequencer asks when
//! events were lost or reordered on the wire (`crate::source::sequence`); and the durable
//! position of each stream per consumer group, where it starts a stream seen for the first
//! time (`crate::source::sequence::positions`).

use contract::AggregateType;
use tokio_postgres::Client;
use uuid::Uuid;

use super::replay::{Typed, typed};

/// Sequences `from..=to` of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRange {
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
    pub from: i64,
    pub to: i64,
}

/// One sequence of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamSeq {
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
    pub sequence: i64,
}

/// One stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
}

impl StreamId {
    /// From a stream key `aggregate_type/aggregate_id`.
    pub fn parse(stream: &str) -> Option<StreamId> {
        let (t, id) = stream.split_once('/')?;
        Some(StreamId {
            aggregate_type: t.parse().ok()?,
            aggregate_id: id.to_owned(),
        })
    }
}

/// Every stored event inside the ranges, by stream and sequence (what the store lacks is
/// simply absent). One round trip whatever the number of ranges.
pub async fn read_ranges(
    c: &Client,
    ranges: &[StreamRange],
) -> Result<Vec<Typed>, tokio_postgres::Error> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let types: Vec<&str> = ranges.iter().map(|r| r.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = ranges.iter().map(|r| r.aggregate_id.as_str()).collect();
    let froms: Vec<i64> = ranges.iter().map(|r| r.from).collect();
    let tos: Vec<i64> = ranges.iter().map(|r| r.to).collect();
    let rows = c
        .query(
            "SELECT e.global_position, e.event_id, e.aggregate_type, e.aggregate_id, \
               e.sequence_number, e.event_type, e.event_data::text, e.metadata::text, e.timestamp \
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS r(t, id, lo, hi) \
             JOIN events e ON e.aggregate_type = r.t AND e.aggregate_id = r.id \
               AND e.sequence_number BETWEEN r.lo AND r.hi \
             ORDER BY e.aggregate_type, e.aggregate_id, e.sequence_number",
            &[&types, &ids, &froms, &tos],
        )
        .await?;
    Ok(rows.iter().map(typed).collect())
}

/// The event id stored at each asked (stream, sequence) that holds one.
pub async fn event_ids_at(
    c: &Client,
    at: &[StreamSeq],
) -> Result<Vec<(StreamSeq, Uuid)>, tokio_postgres::Error> {
    if at.is_empty() {
        return Ok(Vec::new());
    }
    let types: Vec<&str> = at.iter().map(|k| k.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = at.iter().map(|k| k.aggregate_id.as_str()).collect();
    let seqs: Vec<i64> = at.iter().map(|k| k.sequence).collect();
    let rows = c
        .query(
            "SELECT e.aggregate_type, e.aggregate_id, e.sequence_number, e.event_id \
             FROM unnest($1::text[], $2::text[], $3::int8[]) AS k(t, id, s) \
             JOIN events e ON e.aggregate_type = k.t AND e.aggregate_id = k.id \
               AND e.sequence_number = k.s",
            &[&types, &ids, &seqs],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            // Only streams asked for come back, so the type parses; skip it if not.
            let aggregate_type = r.get::<_, String>(0).parse().ok()?;
            Some((
                StreamSeq {
                    aggregate_type,
                    aggregate_id: r.get(1),
                    sequence: r.get(2),
                },
                r.get(3),
            ))
        })
        .collect())
}

/// The durable position recorded for `group` of each of `streams` that has one.
pub async fn read_positions(
    c: &Client,
    group: &str,
    streams: &[StreamId],
) -> Result<Vec<(StreamId, i64)>, tokio_postgres::Error> {
    if streams.is_empty() {
        return Ok(Vec::new());
    }
    let types: Vec<&str> = streams.iter().map(|k| k.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = streams.iter().map(|k| k.aggregate_id.as_str()).collect();
    let rows = c
        .query(
            "SELECT p.aggregate_type, p.aggregate_id, p.sequence \
             FROM unnest($2::text[], $3::text[]) AS k(t, id) \
             JOIN stream_positions p ON p.group_id = $1 AND p.aggregate_type = k.t \
               AND p.aggregate_id = k.id",
            &[&group, &types, &ids],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let aggregate_type = r.get::<_, String>(0).parse().ok()?;
            Some((
                StreamId {
                    aggregate_type,
                    aggregate_id: r.get(1),
                },
                r.get(2),
            ))
        })
        .collect())
}

/// Record durable positions for `group`, keeping the greatest of the stored and the new one
/// (one round trip). At most one position per stream; rows are written in key order, so two
/// members recording overlapping streams at once never deadlock.
pub async fn record_positions(
    c: &Client,
    group: &str,
    positions: &[StreamSeq],
) -> Result<u64, tokio_postgres::Error> {
    if positions.is_empty() {
        return Ok(0);
    }
    let mut sorted: Vec<&StreamSeq> = positions.iter().collect();
    // The greatest of a stream's positions first, so the dedup keeps it.
    sorted.sort_by(|a, b| {
        (a.aggregate_type.as_str(), &a.aggregate_id, b.sequence).cmp(&(
            b.aggregate_type.as_str(),
            &b.aggregate_id,
            a.sequence,
        ))
    });
    sorted
        .dedup_by(|a, b| a.aggregate_type == b.aggregate_type && a.aggregate_id == b.aggregate_id);
    let types: Vec<&str> = sorted.iter().map(|k| k.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = sorted.iter().map(|k| k.aggregate_id.as_str()).collect();
    let seqs: Vec<i64> = sorted.iter().map(|k| k.sequence).collect();
    c.execute(
        "INSERT INTO stream_positions AS p (group_id, aggregate_type, aggregate_id, sequence) \
         SELECT $1, t, id, s FROM unnest($2::text[], $3::text[], $4::int8[]) AS k(t, id, s) \
         ORDER BY t, id \
         ON CONFLICT (group_id, aggregate_type, aggregate_id) \
         DO UPDATE SET sequence = GREATEST(p.sequence, EXCLUDED.sequence)",
        &[&group, &types, &ids, &seqs],
    )
    .await
}
