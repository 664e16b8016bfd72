//! The Kubernetes layout, run locally against the real servers: one worker per read model,
//! each in its own consumer group, the read service and the rebuild, all in one deployment.
//! A rebuild that switches and retires `live` while the workers run moves every worker and
//! the readers together; a restarted worker never writes the retired version; readers never
//! see a frozen version. Also the rules under it: pointers are read before the first write,
//! retired versions are refused, deployments never see each other's pointers.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::ReadServer;
use projector::config::Config;
use projector::runtime::targets::{Check, PointerError, Pointers, Retirements, Target};
use projector::store::{EventStore, Pg};
use projector::versions::{LIVE, VersionError, VersionSinks, live_versions, scope_key};
use projectors::customer360::Customer360Projector;
use projectors::order_view::OrderViewProjector;
use projectors::{Projector, analytics, customer360, order_view};
use serde_json::Value;

/// A worker pod of one read model's StatefulSet: its own consumer group, static member `pod`,
/// the deployment's settings otherwise. Killed if the test ends early.
struct Pod {
    child: Child,
    projection: &'static str,
}

impl Pod {
    fn group(cfg: &Config, projection: &str) -> String {
        format!("{}-{projection}", cfg.kafka.group_id)
    }

    fn spawn(cfg: &Config, projection: &'static str) -> Pod {
        let child = Command::new(common::projector_bin())
            .args(["run", "--projectors", projection])
            .envs(common::config_env(cfg))
            .env("PROJECTOR_KAFKA__GROUP_ID", Self::group(cfg, projection))
            .env("PROJECTOR_KAFKA__INSTANCE_ID", format!("{projection}-0"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn worker");
        Pod { child, projection }
    }

    /// kill -9 and start again under the same instance id (a rescheduled pod).
    fn restart(&mut self, cfg: &Config) {
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
        *self = Pod::spawn(cfg, self.projection);
    }

    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "SIGTERM drains and exits 0"
        );
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rebuild_cli(cfg: &Config, args: &[&str]) -> Output {
    let out = Command::new(common::projector_bin())
        .arg("rebuild-projection")
        .args(args)
        .envs(common::config_env(cfg))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    eprintln!(
        "$ rebuild-projection {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Each round writes its own streams.
fn ns_round(ns: &str, round: u64) -> String {
    format!("{ns}r{round}-")
}

/// The latest position of an event of `ns` that `p` folds into some view, and that view.
fn last_view<P: Projector>(p: &P, log: &[contract::Event], ns: &str) -> (String, i64) {
    log.iter()
        .filter(|e| e.event_type().is_some_and(|t| p.handles().contains(&t)))
        .filter_map(|e| Some((p.view_key(e)?.to_owned(), e.header.global_position)))
        .filter(|(k, _)| k.starts_with(ns))
        .max_by_key(|(_, pos)| *pos)
        .expect("the round has events for the view")
}

/// GET `path` (which waits for an event): 200, from `version`, the event included, with the
/// lag of `group` (the group that writes it, not one nobody consumes in). Returns the body.
async fn included(api: &ReadServer, path: &str, version: &str, group: Option<String>) -> Value {
    let (status, body) = api.get(path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["freshness"]["version"], version, "{body}");
    assert_eq!(body["freshness"]["consistency"]["included"], true, "{body}");
    if let Some(g) = group {
        assert_eq!(body["freshness"]["lag"]["group"], g, "{body}");
    }
    body
}

/// The read service answers every read model from `version`, with `round`'s last events
/// included (it waits for them), and the answers equal the fold.
async fn readers_see(api: &ReadServer, cfg: &Config, ns: &str, version: &str) {
    let log = common::event_log_at(cfg, ns).await;
    let want = common::fold(&log, ns);
    let (customer, at) = last_view(&Customer360Projector, &log, ns);
    let path = format!("/v1/customers/{customer}?after_position={at}&wait_ms=120000");
    let group = Some(Pod::group(cfg, "customer360"));
    let body = included(api, &path, version, group).await;
    assert_eq!(
        body["data"],
        serde_json::to_value(projector::read::types::Customer::from(
            want.customers[&customer].0.clone()
        ))
        .unwrap()
    );
    let (order, at) = last_view(&OrderViewProjector, &log, ns);
    let path = format!("/v1/orders/{order}?after_position={at}&wait_ms=120000");
    let body = included(api, &path, version, None).await;
    assert_eq!(
        body["data"],
        serde_json::to_value(&want.orders[&order].0).unwrap()
    );
    let last = log.last().unwrap().header.global_position;
    let path = format!("/v1/analytics/funnel?after_position={last}&wait_ms=120000");
    included(api, &path, version, Some(Pod::group(cfg, "analytics"))).await;
}

/// Nothing of `version` exists in any store: no Redis key under its prefix, no MongoDB
/// collection, no ClickHouse table.
async fn gone(cfg: &Config, live: &VersionSinks, version: &str, when: &str) {
    let views = projector::versions::views_for(cfg, version);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", views.redis_prefix))
        .query_async(&mut live.redis.connection())
        .await
        .unwrap();
    assert!(
        keys.is_empty(),
        "{when}: {} Redis keys under the retired prefix {}",
        keys.len(),
        views.redis_prefix
    );
    let ns = live.mongo.collection().namespace();
    let names = live
        .mongo
        .collection()
        .client()
        .database(&ns.db)
        .list_collection_names()
        .await
        .unwrap();
    assert!(
        !names.contains(&views.mongo_collection),
        "{when}: the retired MongoDB collection came back"
    );
    let exists: u8 = live
        .clickhouse
        .client()
        .query(&format!("EXISTS TABLE {}", views.clickhouse_table))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(exists, 0, "{when}: the retired ClickHouse table came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_layout_follows_a_rebuild_and_never_writes_the_retired_version() {
    let (cfg, ns) = common::isolated_config("k8s");
    let store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    // The rebuild starts at today's head: it replays this test's history only.
    common::seed_at_head(&cfg, &store, &version).await;
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();

    // One StatefulSet per read model, each in its own group; the read service; one deployment.
    let mut pods: Vec<Pod> = projectors::names()
        .iter()
        .map(|p| Pod::spawn(&cfg, p))
        .collect();
    // The read service knows each read model's group, as deploy/k8s/config.yaml says.
    let groups = format!(
        "{{customer360=\"{}\",order_view=\"{}\",analytics=\"{}\"}}",
        Pod::group(&cfg, "customer360"),
        Pod::group(&cfg, "order_view"),
        Pod::group(&cfg, "analytics")
    );
    let api = ReadServer::spawn(
        &cfg,
        &[
            ("PROJECTOR_READ__MAX_WAIT_MS", "120000".into()),
            ("PROJECTOR_READ__GROUPS", groups),
        ],
    );
    common::generate(&cfg, &ns_round(&ns, 0), 1_500, 41, 0.02, 0.2).await;
    readers_see(&api, &cfg, &ns_round(&ns, 0), LIVE).await;

    // Rebuild, switch and retire `live` at once, while the workers run and events arrive.
    let rebuild = {
        let (cfg, version) = (cfg.clone(), version.clone());
        tokio::task::spawn_blocking(move || {
            rebuild_cli(
                &cfg,
                &["--all", "--version", &version, "--grace-seconds", "0"],
            )
        })
    };
    for i in 1..=3u64 {
        common::generate(&cfg, &ns_round(&ns, i), 400, 41 + i, 0.02, 0.2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = rebuild.await.unwrap();
    assert!(out.status.success(), "the rebuild switched and retired");
    let live = live_versions(&store, &cfg).await.unwrap();
    for p in projectors::names() {
        assert_eq!(live.of(p), version, "{p}: the deployment's pointer moved");
    }
    let sinks = VersionSinks::connect(&cfg, &version).await.unwrap();
    gone(&cfg, &sinks, LIVE, "just after the retire").await;

    // Events after the rebuild: every group follows, readers are not frozen.
    common::generate(&cfg, &ns_round(&ns, 4), 600, 50, 0.02, 0.2).await;
    readers_see(&api, &cfg, &ns_round(&ns, 4), &version).await;
    gone(&cfg, &sinks, LIVE, "after events following the rebuild").await;

    // Every pod is rescheduled (kill -9, same instance id), and more events arrive: the
    // restarted workers read the pointers before their first write.
    for pod in &mut pods {
        pod.restart(&cfg);
    }
    common::generate(&cfg, &ns_round(&ns, 5), 600, 51, 0.02, 0.2).await;
    readers_see(&api, &cfg, &ns_round(&ns, 5), &version).await;
    readers_see(&api, &cfg, &ns, &version).await;
    for pod in &mut pods {
        pod.stop();
    }
    gone(&cfg, &sinks, LIVE, "after the workers restarted").await;

    // The retired version is recorded as such, for every projection of the deployment.
    let retired: Vec<String> = projector::rebuild::versions_in_scope(&cfg, &store)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.version == LIVE)
        .map(|c| format!("{} {}", c.projection, c.status))
        .collect();
    assert_eq!(retired.len(), 3, "{retired:?}");
    assert!(
        retired.iter().all(|r| r.ends_with(" retired")),
        "{retired:?}"
    );
    // Agents that read Redis directly find the deployment's live version.
    let pointer: Option<String> = redis::cmd("GET")
        .arg(cfg.redis_pointer_key())
        .query_async(&mut sinks.redis.connection())
        .await
        .unwrap();
    let pointer: serde_json::Value = serde_json::from_str(&pointer.expect("announced")).unwrap();
    assert_eq!(pointer["version"], version.as_str());

    // Every read model of the new version equals the fold of the whole log.
    let mut rebuilt = cfg.clone();
    rebuilt.views = cfg.versioned_views(&version);
    common::assert_read_models_equal_fold(&rebuilt, &ns).await;

    // A retired version is never built again either.
    let refused = rebuild_cli(&cfg, &["--all", "--version", LIVE, "--no-switch"]);
    assert!(!refused.status.success(), "rebuilding a retired version");
    gone(&cfg, &sinks, LIVE, "after a refused rebuild").await;
    for p in projectors::names() {
        projector::rebuild::retire(&cfg, &store, p, &version)
            .await
            .ok();
    }
}

async fn point(store: &EventStore, cfg: &Config, projection: &str, version: &str) {
    store
        .client()
        .execute(
            "INSERT INTO projection_versions (projection, live_version, epoch) VALUES ($1, $2, 1) \
             ON CONFLICT (projection) DO UPDATE SET live_version = $2, epoch = 1",
            &[&scope_key(cfg, projection), &version],
        )
        .await
        .unwrap();
}

async fn mark_retired(store: &EventStore, cfg: &Config, projection: &str, version: &str) {
    store
        .client()
        .execute(
            "INSERT INTO projection_checkpoints (projection, version, status) VALUES ($1, $2, 'retired') \
             ON CONFLICT (projection, version) DO UPDATE SET status = 'retired'",
            &[&scope_key(cfg, projection), &version],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointers_are_read_before_the_first_write_and_retired_versions_are_refused() {
    let (cfg, _) = common::isolated_config("ptr");
    let store = common::store().await;
    let pg = Arc::new(Pg::from_config(&cfg.postgres));
    // A rebuild switched customer360 to v2 and retired live; order_view was never rebuilt.
    point(&store, &cfg, customer360::NAME, "v2").await;
    mark_retired(&store, &cfg, customer360::NAME, LIVE).await;

    // A worker that just started has read nothing: its first check must not assume `live`.
    let pointers = Pointers::new(pg.clone(), &cfg.deployment);
    let want = |v: &str, epoch| {
        Check::Write(Target {
            version: v.to_owned(),
            epoch,
        })
    };
    assert_eq!(
        pointers.check(customer360::NAME, false).await.unwrap(),
        want("v2", 1)
    );
    assert_eq!(
        pointers.check(order_view::NAME, false).await.unwrap(),
        want(LIVE, 0)
    );

    // Another deployment sharing the event store (any consumer group) sees none of it.
    let mut other = cfg.clone();
    other.deployment = format!("{}_other", cfg.deployment);
    let theirs = Pointers::new(pg.clone(), &other.deployment);
    assert_eq!(
        theirs.check(customer360::NAME, false).await.unwrap(),
        want(LIVE, 0)
    );
    // ...while a second consumer group of the same deployment sees it all.
    let mut group2 = cfg.clone();
    group2.kafka.group_id = format!("{}-customer360", cfg.kafka.group_id);
    assert_eq!(
        live_versions(&store, &group2)
            .await
            .unwrap()
            .of(customer360::NAME),
        "v2"
    );

    // Opening a retired version's store is refused; the live one is admitted.
    let retirements = Retirements::new(pg.clone(), &cfg.deployment);
    assert!(matches!(
        retirements.admit(customer360::NAME, LIVE).await,
        Err(PointerError::Version(VersionError::Retired { .. }))
    ));
    retirements.admit(customer360::NAME, "v2").await.unwrap();
    retirements.admit(order_view::NAME, LIVE).await.unwrap();
    Retirements::new(pg.clone(), &other.deployment)
        .admit(customer360::NAME, LIVE)
        .await
        .unwrap();
    assert!(matches!(
        retirements
            .admit(analytics::NAME, "v1`; DROP TABLE x")
            .await,
        Err(PointerError::Version(VersionError::InvalidName { .. }))
    ));

    // A pointer to a retired version (no rebuild switched, `live` dropped) is never a target.
    mark_retired(&store, &cfg, order_view::NAME, LIVE).await;
    let pointers = Pointers::new(pg.clone(), &cfg.deployment);
    assert!(matches!(
        pointers.check(order_view::NAME, false).await,
        Err(PointerError::Version(VersionError::Retired { .. }))
    ));
    // A pointer read back with an invalid name is refused, never used as a store name.
    point(&store, &cfg, analytics::NAME, "v1`x").await;
    assert!(matches!(
        pointers.check(analytics::NAME, true).await,
        Err(PointerError::Version(VersionError::InvalidName { .. }))
    ));
    assert_eq!(
        live_versions(&store, &cfg)
            .await
            .unwrap()
            .by_projection
            .get(analytics::NAME),
        None,
        "readers ignore it"
    );
    // A retired version stays retired: a checkpoint saved later does not revive it.
    projector::rebuild::save_checkpoint(
        &store,
        &projector::rebuild::Checkpoint {
            projection: scope_key(&cfg, customer360::NAME),
            version: LIVE.into(),
            position: Default::default(),
            events_applied: 0,
            status: "building".into(),
        },
    )
    .await
    .unwrap();
    retirements
        .admit(customer360::NAME, LIVE)
        .await
        .expect_err("still retired");
}
