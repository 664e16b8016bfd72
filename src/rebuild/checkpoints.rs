//! Rebuild checkpoints (`projection_checkpoints`): where each projection's rebuild of a
//! version stands. Saved only after the writes they cover are durable.

use crate::store::{EventStore, ReplayPosition};

use super::RebuildError;

/// Where one projection's rebuild stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub projection: String,
    pub version: String,
    pub position: ReplayPosition,
    pub events_applied: i64,
    /// building | caught_up | live | retired
    pub status: String,
}

fn row_to(r: &tokio_postgres::Row, projection: String, version: String, at: usize) -> Checkpoint {
    Checkpoint {
        projection,
        version,
        position: ReplayPosition {
            transaction_id: r.get::<_, String>(at).parse().unwrap_or(0),
            global_position: r.get(at + 1),
        },
        events_applied: r.get(at + 2),
        status: r.get(at + 3),
    }
}

/// The checkpoint of (projection, version), if that rebuild was started.
pub async fn load_checkpoint(
    store: &EventStore,
    projection: &str,
    version: &str,
) -> Result<Option<Checkpoint>, RebuildError> {
    let row = store
        .client()
        .query_opt(
            "SELECT transaction_id::text, position, events_applied, status FROM projection_checkpoints \
             WHERE projection = $1 AND version = $2",
            &[&projection, &version],
        )
        .await?;
    Ok(row.map(|r| row_to(&r, projection.to_owned(), version.to_owned(), 0)))
}

/// Save (or create) a checkpoint. A retired version stays retired: nothing revives it.
pub async fn save_checkpoint(store: &EventStore, c: &Checkpoint) -> Result<(), RebuildError> {
    store
        .client()
        .execute(
            "INSERT INTO projection_checkpoints (projection, version, position, transaction_id, events_applied, status) \
             VALUES ($1, $2, $3, $4::text::xid8, $5, $6) \
             ON CONFLICT (projection, version) DO UPDATE SET position = EXCLUDED.position, \
               transaction_id = EXCLUDED.transaction_id, events_applied = EXCLUDED.events_applied, \
               status = EXCLUDED.status, updated_at = now() \
             WHERE projection_checkpoints.status <> 'retired'",
            &[
                &c.projection,
                &c.version,
                &c.position.global_position,
                &c.position.transaction_id.to_string(),
                &c.events_applied,
                &c.status,
            ],
        )
        .await?;
    Ok(())
}

/// Every checkpoint, newest first (the `status` view).
pub async fn all_checkpoints(store: &EventStore) -> Result<Vec<Checkpoint>, RebuildError> {
    let rows = store
        .client()
        .query(
            "SELECT projection, version, transaction_id::text, position, events_applied, status \
             FROM projection_checkpoints ORDER BY updated_at DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| row_to(r, r.get(0), r.get(1), 2))
        .collect())
}

/// This deployment's checkpoints, newest first, with plain
/// projection names.
pub async fn versions_in_scope(
    cfg: &crate::config::Config,
    store: &EventStore,
) -> Result<Vec<Checkpoint>, RebuildError> {
    let scope = crate::versions::scope_key(cfg, "");
    Ok(all_checkpoints(store)
        .await?
        .into_iter()
        .filter_map(|mut c| {
            c.projection = c.projection.strip_prefix(&scope)?.to_owned();
            Some(c)
        })
        .collect())
}

/// Versions readers do not use and nothing retired (`building` or `caught_up`, not live):
/// they hold storage until someone switches to, resumes or drops them.
pub fn orphaned<'a>(
    checkpoints: &'a [Checkpoint],
    live: &crate::versions::LiveVersions,
) -> Vec<&'a Checkpoint> {
    checkpoints
        .iter()
        .filter(|c| {
            matches!(c.status.as_str(), "building" | "caught_up")
                && live.of(&c.projection) != c.version
        })
        .collect()
}

/// What to do about an orphaned version.
pub fn orphan_hint(c: &Checkpoint) -> String {
    if c.status == "building" {
        format!(
            "running, or interrupted: resume with `rebuild-projection {} --version {}`, or `rebuild-projection drop {}`",
            c.projection, c.version, c.version
        )
    } else {
        format!(
            "`rebuild-projection switch {}` or `rebuild-projection drop {}`",
            c.version, c.version
        )
    }
}
