//! Embedded, ordered, idempotent schema migrations, applied under an advisory lock so that
//! several pods starting together do not race.

use super::{EventStore, StoreError};

/// `(version, name, sql)` in the order they apply.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "events", include_str!("migrations/0001_events.sql")),
    (
        2,
        "checkpoints",
        include_str!("migrations/0002_checkpoints.sql"),
    ),
    (
        3,
        "commit_order",
        include_str!("migrations/0003_commit_order.sql"),
    ),
    (
        4,
        "switching",
        include_str!("migrations/0004_switching.sql"),
    ),
    (
        5,
        "handover_lease_and_parking",
        include_str!("migrations/0005_handover_lease_and_parking.sql"),
    ),
    (
        6,
        "stream_positions",
        include_str!("migrations/0006_stream_positions.sql"),
    ),
    (
        7,
        "released_streams",
        include_str!("migrations/0007_released_streams.sql"),
    ),
];

/// Any fixed number shared by every pod of this service.
const MIGRATION_LOCK: i64 = 0x7072_6f6a_6563_746f;

impl EventStore {
    /// Apply the migrations that are not applied yet; returns how many were applied.
    pub async fn migrate(&mut self) -> Result<usize, StoreError> {
        let tx = self.client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
               version INT PRIMARY KEY, name TEXT NOT NULL,
               applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await?;
        let applied: Vec<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut count = 0;
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            tracing::info!(version, name, "applied migration");
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    }
}
