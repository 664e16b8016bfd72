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
//! Concurrent reads are coalesced: a caller reuses a result only if that query started
//! after the caller asked, so every caller sees the pointers as of after its request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;

use crate::store::{Pg, StoreError};
use crate::versions::LIVE;

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

type Snapshot = Arc<HashMap<String, Pointer>>;

pub struct Pointers {
    pg: Arc<Pg>,
    /// `<group>/`: pointers belong to one deployment.
    prefix: String,
    ticket: AtomicU64,
    state: Mutex<(u64, Snapshot)>,
}

impl Pointers {
    pub fn new(pg: Arc<Pg>, group: &str) -> Pointers {
        Pointers {
            pg,
            prefix: format!("{group}/"),
            ticket: AtomicU64::new(0),
            state: Mutex::new((0, Arc::new(HashMap::new()))),
        }
    }

    /// The pointers as of after this call began.
    pub async fn fresh(&self) -> Result<Snapshot, StoreError> {
        let mine = self.ticket.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = self.state.lock().await;
        if st.0 >= mine {
            return Ok(st.1.clone());
        }
        let covers = self.ticket.load(Ordering::SeqCst);
        let prefix = self.prefix.clone();
        let rows = self
            .pg
            .run(|c| async move {
                c.query(
                    "SELECT projection, live_version, epoch, switching, \
                       COALESCE(switch_lease_until < now(), true) \
                     FROM projection_versions WHERE starts_with(projection, $1)",
                    &[&prefix],
                )
                .await
            })
            .await?;
        let mut map = HashMap::new();
        for r in rows {
            let scoped: String = r.get(0);
            map.insert(
                scoped[self.prefix.len()..].to_owned(),
                Pointer {
                    version: r.get(1),
                    epoch: r.get(2),
                    switching: r.get(3),
                    lease_expired: r.get(4),
                },
            );
        }
        let snap = Arc::new(map);
        *st = (covers, snap.clone());
        Ok(snap)
    }

    /// The last pointers read (no query).
    pub async fn cached(&self) -> Snapshot {
        self.state.lock().await.1.clone()
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
    pub async fn check(&self, projection: &str, fresh: bool) -> Result<Check, StoreError> {
        let snap = if fresh {
            self.fresh().await?
        } else {
            self.cached().await
        };
        let p = snap.get(projection).cloned().unwrap_or_else(Pointer::live);
        if p.switching {
            if p.lease_expired && self.lower_expired(projection).await? {
                return Box::pin(self.check(projection, true)).await;
            }
            return Ok(Check::Hold);
        }
        Ok(Check::Write(Target {
            version: p.version,
            epoch: p.epoch,
        }))
    }
}
