//! Parked streams, shared by every worker of a deployment (PostgreSQL `parked_streams`).
//! A stage records the streams it parks before it acknowledges the window that parked them,
//! so they are durable before the offsets that cover the refusal are committed; a worker
//! that takes over partitions reloads them.

pub mod unsaved;

use std::sync::Arc;

use projectors::Parked;
use projectors::parking::ParkFrom;

use crate::store::{Pg, StoreError};

/// Every projector / every version.
pub const ANY: &str = "*";

/// How long a release is acted on: a stage (of this incarnation or one started later) that
/// has not yet taken a live event of the stream since the release splices its stored
/// history first. Far longer than a worker holds stale parks or a restart takes.
pub const RELEASE_MEMORY_SECS: f64 = 86_400.0;

/// One parked stream to record.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkRecord {
    pub projection: String,
    pub version: String,
    pub stream: String,
    pub from: ParkFrom,
    pub reason: String,
}

/// The parks of a deployment at a glance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParkSummary {
    /// (projection, streams parked for it); `*` for parks of every projector.
    pub by_projection: Vec<(String, i64)>,
    pub oldest: Option<OldestPark>,
}

impl ParkSummary {
    pub fn total(&self) -> i64 {
        self.by_projection.iter().map(|(_, n)| n).sum()
    }
}

/// The park that has waited longest for an operator.
#[derive(Debug, Clone, PartialEq)]
pub struct OldestPark {
    pub projection: String,
    pub version: String,
    pub stream: String,
    pub reason: String,
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Clone)]
pub struct ParkStore {
    pg: Arc<Pg>,
    scope: String,
}

impl ParkStore {
    /// `scope`: the deployment the parks belong to (shared by all of its consumer groups).
    pub fn new(pg: Arc<Pg>, scope: &str) -> ParkStore {
        ParkStore {
            pg,
            scope: scope.to_owned(),
        }
    }

    /// The parked streams of `projection` writing `version` (and the ones parked for all).
    pub async fn load(&self, projection: &str, version: &str) -> Result<Parked, StoreError> {
        let (scope, projection, version) = (
            self.scope.clone(),
            projection.to_owned(),
            version.to_owned(),
        );
        let rows = self
            .pg
            .run(|c| async move {
                c.query(
                    "SELECT stream, from_sequence, from_partition, from_offset, reason \
                     FROM parked_streams WHERE scope = $1 AND projection IN ($2, '*') \
                     AND version IN ($3, '*')",
                    &[&scope, &projection, &version],
                )
                .await
            })
            .await?;
        let mut parked = Parked::default();
        for r in rows {
            let stream: String = r.get(0);
            let from = match (
                r.get::<_, Option<i64>>(1),
                r.get::<_, Option<i32>>(2),
                r.get::<_, Option<i64>>(3),
            ) {
                (Some(seq), _, _) => ParkFrom::Sequence(seq),
                (None, Some(partition), Some(offset)) => ParkFrom::Offset { partition, offset },
                _ => continue,
            };
            parked.park(&stream, from, &r.get::<_, String>(4));
        }
        Ok(parked)
    }

    /// Record parks by the rule of [`projectors::Parked::park`], which every stage applies in
    /// memory: an earlier sequence replaces a later one; a mark after an unreadable message's
    /// offset stays; anything else is kept.
    pub async fn save(&self, records: &[ParkRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let scope = self.scope.clone();
        let records = records.to_vec();
        self.pg
            .run(|c| async move {
                for r in &records {
                    let (seq, part, off) = match r.from {
                        ParkFrom::Sequence(s) => (Some(s), None, None),
                        ParkFrom::Offset { partition, offset } => (None, Some(partition), Some(offset)),
                    };
                    c.execute(
                        "INSERT INTO parked_streams (scope, projection, version, stream, from_sequence, \
                           from_partition, from_offset, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                         ON CONFLICT (scope, projection, version, stream) DO UPDATE \
                           SET from_sequence = EXCLUDED.from_sequence, from_partition = NULL, \
                               from_offset = NULL, reason = EXCLUDED.reason, parked_at = now() \
                         WHERE EXCLUDED.from_sequence IS NOT NULL \
                           AND parked_streams.from_sequence IS NOT NULL \
                           AND EXCLUDED.from_sequence < parked_streams.from_sequence",
                        &[&scope, &r.projection, &r.version, &r.stream, &seq, &part, &off, &r.reason],
                    )
                    .await?;
                }
                Ok(())
            })
            .await
    }

    /// Forget a park (the operator fixed the cause); returns whether there was one. The
    /// stream is noted released in the same statement ([`ParkStore::released`]), so a worker
    /// that reads the release and then the parks never sees the park still there.
    pub async fn unpark(
        &self,
        projection: &str,
        version: &str,
        stream: &str,
    ) -> Result<bool, StoreError> {
        let (scope, projection, version, stream) = (
            self.scope.clone(),
            projection.to_owned(),
            version.to_owned(),
            stream.to_owned(),
        );
        let n: i64 = self
            .pg
            .run(|c| async move {
                let row = c
                    .query_one(
                        "WITH gone AS (DELETE FROM parked_streams WHERE scope = $1 \
                           AND projection IN ($2, '*') AND version IN ($3, '*') AND stream = $4 \
                           RETURNING 1), \
                         noted AS (INSERT INTO released_streams (scope, stream) VALUES ($1, $4) \
                           ON CONFLICT (scope, stream) DO UPDATE SET released_at = now() \
                           RETURNING 1), \
                         pruned AS (DELETE FROM released_streams WHERE scope = $1 \
                           AND released_at < now() - make_interval(secs => $5) RETURNING 1) \
                         SELECT count(*) FROM gone",
                        &[&scope, &projection, &version, &stream, &RELEASE_MEMORY_SECS],
                    )
                    .await?;
                Ok(row.get::<_, i64>(0))
            })
            .await?;
        Ok(n > 0)
    }

    /// Streams unparked within [`RELEASE_MEMORY_SECS`]: (stream, when, in microseconds since
    /// the epoch, which tells one release from a later one of the same stream).
    pub async fn released(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let scope = self.scope.clone();
        let rows = self
            .pg
            .run(|c| async move {
                c.query(
                    "SELECT stream, (extract(epoch FROM released_at) * 1000000)::int8 \
                     FROM released_streams WHERE scope = $1 \
                       AND released_at > now() - make_interval(secs => $2)",
                    &[&scope, &RELEASE_MEMORY_SECS],
                )
                .await
            })
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// How many streams are parked, per projection, and the oldest park (`projector doctor`).
    pub async fn summary(&self) -> Result<ParkSummary, StoreError> {
        let scope = self.scope.clone();
        let (counts, oldest) = self
            .pg
            .run(|c| async move {
                let counts = c
                    .query(
                        "SELECT projection, count(*) FROM parked_streams WHERE scope = $1 \
                         GROUP BY projection ORDER BY projection",
                        &[&scope],
                    )
                    .await?;
                let oldest = c
                    .query_opt(
                        "SELECT projection, version, stream, reason, parked_at FROM parked_streams \
                         WHERE scope = $1 ORDER BY parked_at LIMIT 1",
                        &[&scope],
                    )
                    .await?;
                Ok((counts, oldest))
            })
            .await?;
        Ok(ParkSummary {
            by_projection: counts.iter().map(|r| (r.get(0), r.get(1))).collect(),
            oldest: oldest.map(|r| OldestPark {
                projection: r.get(0),
                version: r.get(1),
                stream: r.get(2),
                reason: r.get(3),
                parked_at: r.get(4),
            }),
        })
    }

    /// Every park of the deployment: (projection, version, stream, reason).
    pub async fn list(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        let scope = self.scope.clone();
        let rows = self
            .pg
            .run(|c| async move {
                c.query(
                    "SELECT projection, version, stream, reason FROM parked_streams \
                     WHERE scope = $1 ORDER BY parked_at",
                    &[&scope],
                )
                .await
            })
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}
