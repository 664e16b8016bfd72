//! Which version of its read model each projector writes, and the handover rule.
//!
//! A stage writes a batch to the version the pointers name, then, before it acknowledges the
//! batch, reads the pointers again (a read that starts after its writes finished):
//! - not switching, same epoch: everything it consumed was committed to the event store
//!   before any handover began, so a rebuild's final catch-up includes it: acknowledge;
//! - switching (lease valid): hold, reading again, until the handover ends;
//! - a new epoch: write the batch again, to the new version, then acknowledge;
//! - switching with an expired lease (the rebuild died): lower the flag, go on.
//!
//! Before a batch is written the pointers are never older than [`MAX_AGE`], and never
//! assumed: a stage that has not read them yet reads them first (a restarted worker must not
//! fall back to `live` when a rebuild retired it). A version the deployment retired is never
//! a target: a pointer to one is an error, and a store is never opened for one.
//!
//! Concurrent reads are coalesced: a caller reuses a result only if that query started
//! after the caller asked, so every caller sees the pointers as of after its request.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::store::{Pg, StoreError};
use crate::versions::{LIVE, VersionError, validate_version};

/// Pointers older than this are read again before a batch is folded: a worker that was idle
/// while a rebuild switched and retired a version must not write one batch to it first.
pub const MAX_AGE: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum PointerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pointer names an invalid or a retired version: never written, read again later.
    #[error(transparent)]
    Version(#[from] VersionError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    pub version: String,
    pub epoch: i64,
    pub switching: bool,
    pub lease_expired: bool,
}

impl Pointer {
    fn live() -> Pointer {
        Pointer {
            version: LIVE.into(),
            epoch: 0,
            switching: false,
            lease_expired: false,
        }
    }
}

/// What a stage writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub version: String,
    pub epoch: i64,
}

/// The result of checking the pointers for one projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Write(Target),
    /// A handover is under way: hold.
    Hold,
}

/// The deployment's pointers and retired versions, as read at one instant.
#[derive(Debug, Default)]
pub struct PointerSet {
    pub pointers: HashMap<String, Pointer>,
    /// Projections whose pointer names an invalid version: never used in a store name.
    pub invalid: HashMap<String, VersionError>,
    /// (projection, version) pairs the deployment retired.
    pub retired: HashSet<(String, String)>,
}

impl PointerSet {
    pub fn is_retired(&self, projection: &str, version: &str) -> bool {
        self.retired
            .contains(&(projection.to_owned(), version.to_owned()))
    }
}

type Snapshot = Arc<PointerSet>;

/// The last read and when it began; `None` until the first read.
type Last = Option<(Instant, Snapshot)>;

/// The last read, if it may stand in for a fresh one: never when nothing was read yet (an
/// empty snapshot would mean "no rebuild ever switched": `live`), nor when it is old.
pub fn reusable(last: &Last, now: Instant) -> Option<Snapshot> {
    let (at, snap) = last.as_ref()?;
    (now.saturating_duration_since(*at) < MAX_AGE).then(|| snap.clone())
}

pub struct Pointers {
    pg: Arc<Pg>,
    /// `<deployment>/`: pointers belong to one deployment, whatever the consumer group.
    prefix: String,
    ticket: AtomicU64,
    state: Mutex<(u64, Last)>,
}

/// The retired versions of a deployment, asked of PostgreSQL when a store is opened.
#[derive(Clone)]
pub struct Retirements {
    pg: Arc<Pg>,
    prefix: String,
}

impl Retirements {
    pub fn new(pg: Arc<Pg>, deployment: &str) -> Retirements {
        Retirements {
            pg,
            prefix: format!("{deployment}/"),
        }
    }

    /// `Err(Retired)` when the deployment retired `version` of `projection`: its store must
    /// not be opened (opening creates collections and tables) nor written.
    pub async fn admit(&self, projection: &str, version: &str) -> Result<(), PointerError> {
        validate_version(version)?;
        let key = format!("{}{projection}", self.prefix);
        let v = version.to_owned();
        let retired = self
            .pg
            .run(|c| async move {
                c.query_opt(
                    "SELECT 1 FROM projection_checkpoints \
                     WHERE projection = $1 AND version = $2 AND status = 'retired'",
                    &[&key, &v],
                )
                .await
            })
            .await?
            .is_some();
        if retired {
            return Err(VersionError::Retired {
                projection: projection.to_owned(),
                version: version.to_owned(),
            }
            .into());
        }
        Ok(())
    }
}

impl Pointers {
    pub fn new(pg: Arc<Pg>, deployment: &str) -> Pointers {
        Pointers {
            pg,
            prefix: format!("{deployment}/"),
            ticket: AtomicU64::new(0),
            state: Mutex::new((0, None)),
        }
    }

    /// The pointers as of after this call began.
    pub async fn fresh(&self) -> Result<Snapshot, StoreError> {
        let mine = self.ticket.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = self.state.lock().await;
        if st.0 >= mine
            && let Some((_, snap)) = &st.1
        {
            return Ok(snap.clone());
        }
        let covers = self.ticket.load(Ordering::SeqCst);
        let began = Instant::now();
        let prefix = self.prefix.clone();
        let (rows, retired) = self
            .pg
            .run(|c| async move {
                // Both queries in one round trip (tokio-postgres pipelines futures polled
                // together): every live batch waits for this read before it is acknowledged.
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&prefix];
                let pointers = c.query(
                    "SELECT projection, live_version, epoch, switching, \
                       COALESCE(switch_lease_until < now(), true) \
                     FROM projection_versions WHERE starts_with(projection, $1)",
                    &params,
                );
                let retired = c.query(
                    "SELECT projection, version FROM projection_checkpoints \
                     WHERE starts_with(projection, $1) AND status = 'retired'",
                    &params,
                );
                tokio::try_join!(pointers, retired)
            })
            .await?;
        let mut set = PointerSet::default();
        let unscoped = |scoped: String| scoped[self.prefix.len()..].to_owned();
        for r in rows {
            let projection = unscoped(r.get(0));
            let version: String = r.get(1);
            if let Err(e) = validate_version(&version) {
                set.invalid.insert(projection, e);
                continue;
            }
            set.pointers.insert(
                projection,
                Pointer {
                    version,
                    epoch: r.get(2),
                    switching: r.get(3),
                    lease_expired: r.get(4),
                },
            );
        }
        for r in retired {
            set.retired.insert((unscoped(r.get(0)), r.get(1)));
        }
        let snap = Arc::new(set);
        *st = (covers, Some((began, snap.clone())));
        Ok(snap)
    }

    /// The pointers as of at most [`MAX_AGE`] ago; read now if never read or older.
    pub async fn recent(&self) -> Result<Snapshot, StoreError> {
        let last = self.state.lock().await.1.clone();
        match reusable(&last, Instant::now()) {
            Some(snap) => Ok(snap),
            None => self.fresh().await,
        }
    }

    /// Lower a flag whose lease expired (its rebuild died); true if this call lowered it.
    pub async fn lower_expired(&self, projection: &str) -> Result<bool, StoreError> {
        let key = format!("{}{projection}", self.prefix);
        let n = self
            .pg
            .run(|c| async move {
                c.execute(
                    "UPDATE projection_versions SET switching = false, switch_owner = NULL, \
                       switch_lease_until = NULL \
                     WHERE projection = $1 AND switching \
                       AND COALESCE(switch_lease_until < now(), true)",
                    &[&key],
                )
                .await
            })
            .await?;
        if n > 0 {
            tracing::warn!(
                projection,
                "a handover's owner stopped renewing its lease: flag lowered, pointers unchanged"
            );
        }
        Ok(n > 0)
    }

    /// Check one projection: write (to which version) or hold. Lowers an expired flag.
    /// `fresh`: read the pointers now; else reuse a read younger than [`MAX_AGE`].
    pub async fn check(&self, projection: &str, fresh: bool) -> Result<Check, PointerError> {
        let snap = if fresh {
            self.fresh().await?
        } else {
            self.recent().await?
        };
        if let Some(e) = snap.invalid.get(projection) {
            return Err(e.clone().into());
        }
        let p = snap
            .pointers
            .get(projection)
            .cloned()
            .unwrap_or_else(Pointer::live);
        if p.switching {
            if p.lease_expired && self.lower_expired(projection).await? {
                return Box::pin(self.check(projection, true)).await;
            }
            return Ok(Check::Hold);
        }
        if snap.is_retired(projection, &p.version) {
            // E.g. `live` retired while no pointer row names another version.
            return Err(VersionError::Retired {
                projection: projection.to_owned(),
                version: p.version,
            }
            .into());
        }
        Ok(Check::Write(Target {
            version: p.version,
            epoch: p.epoch,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_never_read_are_never_assumed() {
        let now = Instant::now();
        // The first check of a stage reads PostgreSQL: no snapshot stands for "live".
        assert!(reusable(&None, now).is_none());
        let snap = Arc::new(PointerSet::default());
        assert!(reusable(&Some((now, snap.clone())), now).is_some());
        let old = now.checked_sub(MAX_AGE).unwrap_or(now);
        if old != now {
            assert!(
                reusable(&Some((old, snap)), now).is_none(),
                "a read MAX_AGE old is read again"
            );
        }
    }

    #[test]
    fn retired_versions_are_known_by_projection() {
        let mut set = PointerSet::default();
        set.retired.insert(("customer360".into(), LIVE.into()));
        assert!(set.is_retired("customer360", LIVE));
        assert!(!set.is_retired("order_view", LIVE));
        assert!(!set.is_retired("customer360", "v2"));
    }
}
