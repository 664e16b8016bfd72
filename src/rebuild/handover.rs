//! Handing a rebuilt version over to readers and live workers, with no gap and no duplicate,
//! and never leaving the workers held if the rebuild dies half-way.
//!
//! 1. Raise `switching` with this rebuild as owner and a lease it keeps renewing; live
//!    workers hold their next batch (see `runtime::targets`). A dead rebuild's lease expires
//!    and the workers lower the flag themselves.
//! 2. Wait until every transaction that began before that has finished: whatever a worker
//!    consumed before it saw the flag is then readable.
//! 3. Take the head *now* and replay up to it, alone (the guards skip what the version has).
//!    Anything committed later was published after the flag rose, so workers hold it and
//!    write it to the new version after the switch: the catch-up never chases a moving head.
//! 4. In one transaction, only while the lease still holds: move the pointers, bump the
//!    epoch, lower the flag. A worker that wrote a batch under the old epoch writes it again
//!    to the new version before it commits.

use std::time::{Duration, Instant};

use super::{Progress, RebuildError, RebuildOptions, rebuild};
use crate::config::Config;
use crate::store::EventStore;
use crate::versions::{LIVE, scope_key};

/// How long the flag holds without renewal; renewed every third of it.
pub const LEASE: Duration = Duration::from_secs(10);

/// What a handover did.
#[derive(Debug, Clone)]
pub struct SwitchReport {
    /// Flag raised → pointers moved: how long live workers held their batches.
    pub switch_time: Duration,
    /// (projection, version it replaced).
    pub replaced: Vec<(String, String)>,
    pub final_catch_up_events: u64,
}

pub async fn switch(
    cfg: &Config,
    store: &mut EventStore,
    selected: &[String],
    opts: &RebuildOptions,
    progress: Progress<'_>,
) -> Result<SwitchReport, RebuildError> {
    crate::versions::validate_version(&opts.version)?;
    let started = Instant::now();
    let owner = format!(
        "rebuild {} pid {} {:x}",
        opts.version,
        std::process::id(),
        rand::random::<u32>()
    );
    let keys: Vec<String> = selected.iter().map(|p| scope_key(cfg, p)).collect();
    let lease_secs = LEASE.as_secs_f64();
    for k in &keys {
        let raised = store
            .client()
            .execute(
                "INSERT INTO projection_versions (projection, live_version, switching, switch_owner, switch_lease_until) \
                 VALUES ($1, $2, true, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (projection) DO UPDATE SET switching = true, switch_owner = $3, \
                   switch_lease_until = now() + make_interval(secs => $4) \
                 WHERE NOT projection_versions.switching \
                    OR COALESCE(projection_versions.switch_lease_until < now(), true)",
                &[k, &LIVE, &owner, &lease_secs],
            )
            .await?;
        if raised == 0 {
            lower(store, &keys, &owner).await;
            return Err(RebuildError::Stuck(format!(
                "another handover of {k} is in progress"
            )));
        }
    }
    // Renew the lease until this handover ends (or this process dies).
    let renew = {
        let url = cfg.postgres.url.clone();
        let (keys, owner) = (keys.clone(), owner.clone());
        tokio::spawn(async move {
            let Ok(s) = EventStore::connect(&url).await else {
                return;
            };
            loop {
                tokio::time::sleep(LEASE / 3).await;
                let r = s
                    .client()
                    .execute(
                        "UPDATE projection_versions SET switch_lease_until = now() + make_interval(secs => $3) \
                         WHERE projection = ANY($1) AND switch_owner = $2 AND switching",
                        &[&keys, &owner, &lease_secs],
                    )
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "renewing the handover lease failed");
                }
            }
        })
    };
    let result = finish(cfg, store, selected, &keys, &owner, opts, progress).await;
    renew.abort();
    if result.is_err() {
        // Never leave the live workers holding: lower the flag, keep the old pointers.
        lower(store, &keys, &owner).await;
    }
    let (replaced, final_catch_up_events) = result?;
    if selected.iter().any(|p| p == projectors::customer360::NAME) {
        announce_redis(cfg, &opts.version).await;
    }
    Ok(SwitchReport {
        switch_time: started.elapsed(),
        replaced,
        final_catch_up_events,
    })
}

/// Publish the new Customer-360 version for agents that read Redis directly (live workers
/// announce it too whenever they open a version; this covers a deployment with no traffic).
async fn announce_redis(cfg: &Config, version: &str) {
    use crate::sinks::DocStore;
    let views = crate::versions::views_for(cfg, version);
    for attempt in 0..5u32 {
        let r = match crate::sinks::redis::RedisSink::connect(&cfg.redis, &views.redis_prefix).await
        {
            Ok(s) => {
                s.with_pointer(cfg.redis_pointer_key())
                    .announce(version)
                    .await
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "announcing the new version in Redis failed");
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
    }
}

async fn lower(store: &EventStore, keys: &[String], owner: &str) {
    let _ = store
        .client()
        .execute(
            "UPDATE projection_versions SET switching = false, switch_owner = NULL, switch_lease_until = NULL \
             WHERE projection = ANY($1) AND switch_owner = $2",
            &[&keys, &owner],
        )
        .await;
}

async fn finish(
    cfg: &Config,
    store: &mut EventStore,
    selected: &[String],
    keys: &[String],
    owner: &str,
    opts: &RebuildOptions,
    progress: Progress<'_>,
) -> Result<(Vec<(String, String)>, u64), RebuildError> {
    let fence: String = store
        .client()
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !store
        .client()
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8",
            &[&fence],
        )
        .await?
        .get::<_, bool>(0)
    {
        if Instant::now() > deadline {
            return Err(RebuildError::Stuck(
                "a transaction older than the handover stayed open for 5 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Everything a worker may have consumed is readable now: catch up to this head only.
    let head = store.committed_head().await?;
    let done = rebuild(cfg, store, selected, opts, Some(head), progress).await?;
    let final_events = done
        .iter()
        .map(|c| c.events_applied as u64)
        .max()
        .unwrap_or(0);
    let tx = store.client_mut().transaction().await?;
    let mut replaced = Vec::new();
    for (p, key) in selected.iter().zip(keys) {
        let row = tx
            .query_one(
                "SELECT live_version, switch_owner = $2 AND switching AND switch_lease_until > now() \
                 FROM projection_versions WHERE projection = $1 FOR UPDATE",
                &[key, &owner],
            )
            .await?;
        let (old, holds): (String, Option<bool>) = (row.get(0), row.get(1));
        if holds != Some(true) {
            return Err(RebuildError::Stuck(format!(
                "the handover lease of {key} was lost (a worker lowered an expired flag): nothing switched"
            )));
        }
        tx.execute(
            "UPDATE projection_versions SET previous_version = live_version, live_version = $2, \
             epoch = epoch + 1, switching = false, switch_owner = NULL, switch_lease_until = NULL, \
             switched_at = now() WHERE projection = $1",
            &[key, &opts.version],
        )
        .await?;
        tx.execute(
            "UPDATE projection_checkpoints SET status = 'live', updated_at = now() \
             WHERE projection = $1 AND version = $2 AND status <> 'retired'",
            &[key, &opts.version],
        )
        .await?;
        if old != opts.version {
            replaced.push((p.clone(), old));
        }
    }
    tx.commit().await?;
    Ok((replaced, final_events))
}

/// How long a retire waits between recording the version retired and deleting it: a live
/// batch folded on pointers read just before a switch (at most `MAX_AGE` old) lands first,
/// and is deleted with the rest.
const RETIRE_FENCE: Duration = Duration::from_secs(1);

/// Delete a replaced version of a projection's read model (after the grace period), and the
/// streams parked in it. The version is recorded retired *first*: from then on no worker or
/// rebuild of the deployment opens (and so re-creates) its store again.
pub async fn retire(
    cfg: &Config,
    store: &EventStore,
    projection: &str,
    version: &str,
) -> Result<(), RebuildError> {
    crate::versions::validate_version(version)?;
    let key = scope_key(cfg, projection);
    store
        .client()
        .execute(
            "INSERT INTO projection_checkpoints (projection, version, status) VALUES ($1, $2, 'retired') \
             ON CONFLICT (projection, version) DO UPDATE SET status = 'retired', updated_at = now()",
            &[&key, &version],
        )
        .await?;
    tokio::time::sleep(RETIRE_FENCE).await;
    // Only this projection's store is touched: connecting the others would recreate, empty,
    // what retiring their projections already dropped.
    let views = crate::versions::views_for(cfg, version);
    match projectors::registry::info(projection).map(|i| i.store) {
        Some(projectors::StoreKind::Redis) => {
            crate::sinks::redis::RedisSink::connect(&cfg.redis, &views.redis_prefix)
                .await?
                .delete_all()
                .await?
        }
        Some(projectors::StoreKind::Mongo) => {
            // Without building indexes on a collection about to be dropped.
            crate::sinks::mongo::MongoSink::connect_unindexed(&cfg.mongo, &views.mongo_collection)
                .await?
                .drop_collection()
                .await?
        }
        Some(projectors::StoreKind::ClickHouse) => {
            crate::sinks::clickhouse::ClickHouseSink::connect(
                &cfg.clickhouse,
                &views.clickhouse_table,
            )
            .await?
            .drop_table()
            .await?
        }
        None => {
            return Err(RebuildError::UnknownProjection(
                projection.to_owned(),
                projectors::names().join(", "),
            ));
        }
    }
    store
        .client()
        .execute(
            "DELETE FROM parked_streams WHERE scope = $1 AND projection = $2 AND version = $3",
            &[&cfg.deployment, &projection, &version],
        )
        .await?;
    tracing::info!(projection, version, "old version retired");
    Ok(())
}
