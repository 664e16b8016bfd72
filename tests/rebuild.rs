//! rebuild-projection against the real servers: a rebuilt version equals the live-built
//! read models, and a rebuild killed with -9 and resumed equals an uninterrupted one.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use projector::apply::Sinks;
use projector::config::Config;
use projector::rebuild::{self, Checkpoint, RebuildOptions};
use projector::sinks::clickhouse::FactRow;
use projector::store::EventStore;
use rand::Rng;

type Docs = BTreeMap<String, (serde_json::Value, BTreeMap<String, i64>)>;

/// What a set of read models holds for one namespace: views and guards, and facts.
async fn snapshot(sinks: &Sinks, ns: &str) -> (Docs, Docs, BTreeMap<String, FactRow>) {
    let docs = |m: std::collections::HashMap<String, projectors::Document>| -> Docs {
        m.into_iter()
            .filter(|(k, _)| k.starts_with(ns))
            .map(|(k, d)| (k, (serde_json::Value::Object(d.view), d.guard)))
            .collect()
    };
    let facts = common::facts_of(sinks, ns).await;
    (
        docs(sinks.redis.scan_all().await.unwrap()),
        docs(sinks.mongo.scan_all().await.unwrap()),
        facts,
    )
}

/// Start `version`'s rebuild at the current head, so the test replays only recent events.
async fn seed_at_head(cfg: &Config, store: &EventStore, version: &str) {
    let head = store.committed_head().await.unwrap();
    for p in projectors::all() {
        rebuild::save_checkpoint(
            store,
            &Checkpoint {
                projection: projector::versions::scope_key(cfg, p.name()),
                version: version.to_owned(),
                position: head,
                events_applied: 0,
                status: "building".into(),
            },
        )
        .await
        .unwrap();
    }
}

async fn rebuild_to_end(cfg: &Config, store: &EventStore, version: &str) -> Vec<Checkpoint> {
    let opts = RebuildOptions {
        version: version.to_owned(),
        batch: 500,
        checkpoint_every: 1_000,
    };
    rebuild::rebuild(cfg, store, &projectors::all(), &opts, &mut |_, _, _| {})
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_equals_the_live_read_models() {
    let (cfg, ns) = common::isolated_config("rb");
    let store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    seed_at_head(&cfg, &store, &version).await;
    common::generate(&cfg, &ns, 2_500, 61, 0.05, 0.5).await;
    common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    let live = snapshot(&projector::worker::connect_sinks(&cfg).await.unwrap(), &ns).await;

    let done = rebuild_to_end(&cfg, &store, &version).await;
    assert!(
        done.iter()
            .all(|c| c.status == "caught_up" && c.events_applied >= 2_500),
        "{done:?}"
    );
    let rebuilt = snapshot(&rebuild::version_sinks(&cfg, &version).await.unwrap(), &ns).await;
    assert!(!live.0.is_empty() && !live.1.is_empty() && live.2.len() == 2_500);
    assert_eq!(rebuilt.0, live.0, "Customer-360");
    assert_eq!(rebuilt.1, live.1, "order views");
    assert!(rebuilt.2 == live.2, "analytics facts");
    // The live read models were not touched by the rebuild.
    assert_eq!(
        snapshot(&projector::worker::connect_sinks(&cfg).await.unwrap(), &ns)
            .await
            .0,
        live.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_and_resumed_equals_an_uninterrupted_one() {
    let (cfg, ns) = common::isolated_config("rk");
    let store = common::store().await;
    let id = ns.trim_end_matches('-').replace('-', "_");
    let (interrupted, clean) = (format!("a{id}"), format!("b{id}"));
    seed_at_head(&cfg, &store, &interrupted).await;
    seed_at_head(&cfg, &store, &clean).await;
    common::generate(&cfg, &ns, 4_000, 71, 0.0, 0.0).await;

    rebuild_to_end(&cfg, &store, &clean).await;

    let mut rng = rand::rng();
    for _ in 0..3 {
        let mut child = Command::new(common::projector_bin())
            .args([
                "rebuild-projection",
                "--all",
                "--version",
                &interrupted,
                "--batch",
                "100",
                "--checkpoint-every",
                "300",
            ])
            .envs(common::config_env(&cfg))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        let _ = child.kill(); // SIGKILL: mid-page, mid-write, or between checkpoints
        child.wait().unwrap();
    }
    let resumed_from = rebuild::load_checkpoint(
        &store,
        &projector::versions::scope_key(&cfg, "customer360"),
        &interrupted,
    )
    .await
    .unwrap()
    .unwrap();
    let done = rebuild_to_end(&cfg, &store, &interrupted).await;
    assert!(done.iter().all(|c| c.status == "caught_up"));
    assert!(done[0].position >= resumed_from.position);

    let a = snapshot(
        &rebuild::version_sinks(&cfg, &interrupted).await.unwrap(),
        &ns,
    )
    .await;
    let b = snapshot(&rebuild::version_sinks(&cfg, &clean).await.unwrap(), &ns).await;
    assert!(!b.0.is_empty() && b.2.len() == 4_000);
    assert_eq!(a.0, b.0, "Customer-360");
    assert_eq!(a.1, b.1, "order views");
    assert!(a.2 == b.2, "analytics facts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_continues_through_a_rebuild_and_the_switch_loses_and_doubles_nothing() {
    let (cfg, ns) = common::isolated_config("sw");
    let mut store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    seed_at_head(&cfg, &store, &version).await;
    // A live pod, and traffic before the rebuild.
    let mut pod = Command::new(common::projector_bin())
        .arg("run")
        .envs(common::config_env(&cfg))
        .env("PROJECTOR_KAFKA__INSTANCE_ID", "pod-0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::generate(&cfg, &format!("{ns}p0-"), 2_000, 80, 0.02, 0.2).await;

    // Traffic keeps coming while the rebuild replays, catches up and switches.
    let traffic = async {
        for i in 1..=4u64 {
            common::generate(&cfg, &format!("{ns}p{i}-"), 600, 80 + i, 0.02, 0.2).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let handover = async {
        rebuild_to_end(&cfg, &store, &version).await;
        let opts = RebuildOptions {
            version: version.clone(),
            batch: 500,
            checkpoint_every: 1_000,
        };
        rebuild::switch(
            &cfg,
            &mut store,
            &projectors::all(),
            &opts,
            &mut |_, _, _| {},
        )
        .await
        .unwrap()
    };
    let ((), report) = tokio::join!(traffic, handover);
    assert_eq!(report.replaced.len(), 3, "{report:?}");
    eprintln!(
        "switch-over: live workers held for {} ms; final catch-up {} events",
        report.switch_time.as_millis(),
        report.final_catch_up_events
    );
    // And after the switch.
    common::generate(&cfg, &format!("{ns}p5-"), 600, 90, 0.02, 0.2).await;

    let versions = projector::versions::live_versions(&store, &cfg)
        .await
        .unwrap();
    for p in ["customer360", "order_view", "analytics"] {
        assert_eq!(
            versions.of(p),
            version,
            "readers point at the rebuilt version"
        );
    }
    let mut rebuilt = cfg.clone();
    rebuilt.views = cfg.versioned_views(&version);
    let want = common::event_log(&ns).await.len();
    let sinks = projector::worker::connect_sinks(&rebuilt).await.unwrap();
    let have = common::wait_for_facts(&sinks, &ns, want).await;
    assert_eq!(
        have, want,
        "the live worker kept the rebuilt version up to date"
    );
    let pid = pod.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(pod.wait().unwrap().success());
    // Nothing lost, nothing doubled: the rebuilt version equals the fold of the whole log.
    common::assert_read_models_equal_fold(&rebuilt, &ns).await;

    // After the grace period the replaced version is deleted; the new one is untouched.
    for (projection, old) in &report.replaced {
        assert_eq!(old, projector::versions::LIVE);
        let p = projectors::by_name(projection).unwrap();
        rebuild::retire(&cfg, &store, &p, old).await.unwrap();
    }
    let old = projector::worker::connect_sinks(&cfg).await.unwrap();
    assert!(
        old.redis.scan_all().await.unwrap().is_empty(),
        "old Customer-360 keys deleted"
    );
    assert!(
        old.mongo.scan_all().await.unwrap().is_empty(),
        "old order views dropped"
    );
    assert!(
        old.clickhouse.all_facts().await.unwrap().is_empty(),
        "old facts dropped"
    );
    common::assert_read_models_equal_fold(&rebuilt, &ns).await;
}
