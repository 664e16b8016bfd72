//! rebuild-projection against the real servers: a rebuilt version equals the live-built
//! read models (refused events included), a rebuild saves its first checkpoint before it
//! writes, a rebuild killed with -9 and resumed equals an uninterrupted one, the handover loses and doubles nothing, and a rebuild that dies in
//! the middle of its handover never leaves the live workers held.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use projector::config::Config;
use projector::rebuild::{self, Checkpoint, RebuildOptions};
use projector::store::EventStore;
use projector::versions::VersionSinks;

fn all() -> Vec<String> {
    projectors::names()
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

fn opts(version: &str) -> RebuildOptions {
    RebuildOptions {
        version: version.to_owned(),
        batch: 500,
        checkpoint_every: 1_000,
    }
}

async fn rebuild_to_end(cfg: &Config, store: &EventStore, version: &str) -> Vec<Checkpoint> {
    rebuild::rebuild(cfg, store, &all(), &opts(version), None, &mut |_, _, _| {})
        .await
        .unwrap()
}

/// The order views' indexes once a version is built.
const INDEXED: [&str; 3] = ["_id_", "by_customer_placed", "by_status_updated"];

/// The index names of `version`'s order views, sorted (read without creating any).
async fn indexes(cfg: &Config, version: &str) -> Vec<String> {
    let views = projector::versions::views_for(cfg, version);
    let sink =
        projector::sinks::mongo::MongoSink::connect_unindexed(&cfg.mongo, &views.mongo_collection)
            .await
            .unwrap();
    let mut names = sink.collection().list_index_names().await.unwrap();
    names.sort();
    names
}

/// A live pod (static member `pod`) as a child process, killed if the test fails early.
struct Pod(std::process::Child);

impl Pod {
    fn spawn(cfg: &Config, pod: &str) -> Pod {
        Pod(Command::new(common::projector_bin())
            .arg("run")
            .envs(common::config_env(cfg))
            .env("PROJECTOR_KAFKA__INSTANCE_ID", pod)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap())
    }

    fn stop(mut self) {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(
            self.0.wait().unwrap().success(),
            "SIGTERM drains and exits 0"
        );
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_equals_the_live_read_models_refused_events_included() {
    let (mut cfg, ns) = common::isolated_config("rb");
    let store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    common::seed_at_head(&cfg, &store, &version).await;
    common::generate(&cfg, &ns, 2_500, 61, 0.05, 0.5).await;
    // Events the projectors refuse (valid contract, impossible in their streams): their
    // streams are parked live, and must be parked the same way by the rebuild.
    let refused = common::append_refused(&cfg, &ns).await;
    common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    let live = common::snapshot(&common::live_sinks(&cfg).await, &ns).await;
    let log = common::event_log(&ns).await;
    common::assert_same(&common::fold(&log, &ns), &live, "live vs fold");

    // A replay cache far too small for the history: views are evicted and read back, and
    // the written-key set is given up early (the resumed test below keeps the default).
    cfg.worker.replay_cache_bytes = 16 << 10;
    let done = rebuild_to_end(&cfg, &store, &version).await;
    let n = 2_500 + refused as i64;
    assert!(
        done.iter()
            .all(|c| c.status == "caught_up" && c.events_applied >= n),
        "{done:?}"
    );
    let rebuilt =
        common::snapshot(&VersionSinks::connect(&cfg, &version).await.unwrap(), &ns).await;
    assert!(!live.customers.is_empty() && !live.orders.is_empty());
    assert_eq!(live.facts.len() as i64, n);
    common::assert_same(&live, &rebuilt, "rebuilt vs live");
    // The live read models were not touched by the rebuild.
    common::assert_same(
        &live,
        &common::snapshot(&common::live_sinks(&cfg).await, &ns).await,
        "live after the rebuild",
    );
}

/// A rebuild saves its first checkpoint before it writes anything, so one stopped before its
/// first periodic checkpoint resumes as a version that holds data, never as a fresh one (a
/// fresh replay takes the views it has not sent writes for as absent; the simulation's
/// rebuilds show what resuming fresh over written views does). Stopped, it stays "building".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_saves_its_first_checkpoint_before_it_writes() {
    let (mut cfg, ns) = common::isolated_config("rf");
    let store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    common::generate(&cfg, &ns, 50, 81, 0.0, 0.0).await;
    // A Redis that never answers: the replay's first write waits, retried, until stopped.
    cfg.redis.url = "redis://127.0.0.1:1/".into();
    let selected = vec!["customer360".to_owned()];
    let stopped = tokio::time::timeout(
        Duration::from_secs(3),
        rebuild::rebuild(
            &cfg,
            &store,
            &selected,
            &opts(&version),
            None,
            &mut |_, _, _| {},
        ),
    )
    .await;
    assert!(
        stopped.is_err(),
        "the rebuild wrote to a Redis that is not there"
    );
    // Dropped, the rebuild leaves its checkpoint building: it never caught up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = projector::versions::scope_key(&cfg, "customer360");
    let c = rebuild::load_checkpoint(&store, &key, &version)
        .await
        .unwrap()
        .expect("a checkpoint saved before the first write");
    assert_eq!(c.status, "building");
    assert_eq!(c.events_applied, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_and_resumed_equals_an_uninterrupted_one() {
    let (cfg, ns) = common::isolated_config("rk");
    let store = common::store().await;
    let id = ns.trim_end_matches('-').replace('-', "_");
    let (interrupted, clean) = (format!("a{id}"), format!("b{id}"));
    let seed = common::seed_at_head(&cfg, &store, &interrupted).await;
    common::seed_at_head(&cfg, &store, &clean).await;
    common::generate(&cfg, &ns, 12_000, 71, 0.0, 0.0).await;
    let head = store.committed_head().await.unwrap();

    rebuild_to_end(&cfg, &store, &clean).await;

    // Three kill -9 of the rebuild process, each landing as soon as it has made progress
    // beyond the last one (so while it is writing, never before it started or after it ended).
    // Each resumes within a minute: a transaction the last one left open holds its documents
    // only for the server's transactionLifetimeLimitSeconds (scripts/services.sh sets 5 s;
    // MongoDB's default 60 s made this wait hit the deadline and retry WriteConflict).
    let key = projector::versions::scope_key(&cfg, "customer360");
    let mut last = seed.position;
    for _ in 0..3 {
        let mut child = Command::new(common::projector_bin())
            .args([
                "rebuild-projection",
                "--all",
                "--no-switch",
                "--version",
                &interrupted,
                "--batch",
                "200",
                "--checkpoint-every",
                "400",
            ])
            .envs(common::config_env(&cfg))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let c = rebuild::load_checkpoint(&store, &key, &interrupted)
                .await
                .unwrap()
                .unwrap();
            if c.position > last {
                last = c.position;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the restarted rebuild made no progress past {last:?} in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = child.kill(); // SIGKILL: mid-page, mid-write, or between checkpoints
        child.wait().unwrap();
    }
    let resumed_from = rebuild::load_checkpoint(&store, &key, &interrupted)
        .await
        .unwrap()
        .unwrap();
    assert!(
        resumed_from.position > seed.position && resumed_from.position < head,
        "the kills landed mid-rebuild: checkpoint {:?}, seed {:?}, head {head:?}",
        resumed_from.position,
        seed.position
    );
    assert_eq!(resumed_from.status, "building");
    // A replay writes without the secondary indexes; the rebuild adds them before it reports
    // the version caught up (the clean one did, the interrupted one not yet).
    assert_eq!(indexes(&cfg, &interrupted).await, ["_id_"]);
    assert_eq!(indexes(&cfg, &clean).await, INDEXED);
    let done = rebuild_to_end(&cfg, &store, &interrupted).await;
    assert!(
        done.iter()
            .all(|c| c.status == "caught_up" && c.position >= head)
    );
    assert_eq!(indexes(&cfg, &interrupted).await, INDEXED);

    let a = common::snapshot(
        &VersionSinks::connect(&cfg, &interrupted).await.unwrap(),
        &ns,
    )
    .await;
    let b = common::snapshot(&VersionSinks::connect(&cfg, &clean).await.unwrap(), &ns).await;
    assert!(!b.customers.is_empty() && b.facts.len() == 12_000);
    common::assert_same(&b, &a, "resumed vs uninterrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_continues_through_a_rebuild_and_the_switch_loses_and_doubles_nothing() {
    let (cfg, ns) = common::isolated_config("sw");
    let mut store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    common::seed_at_head(&cfg, &store, &version).await;
    // A live pod, and traffic before the rebuild.
    let pod = Pod::spawn(&cfg, "pod-0");
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
        rebuild::switch(&cfg, &mut store, &all(), &opts(&version), &mut |_, _, _| {})
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
    for p in projectors::names() {
        assert_eq!(
            versions.of(p),
            version,
            "readers point at the rebuilt version"
        );
    }
    let mut rebuilt = cfg.clone();
    rebuilt.views = cfg.versioned_views(&version);
    let want = common::event_log(&ns).await.len();
    let sinks = common::live_sinks(&rebuilt).await;
    let have = common::wait_for_facts(&sinks, &ns, want).await;
    assert_eq!(
        have, want,
        "the live worker kept the rebuilt version up to date"
    );
    pod.stop();
    // Nothing lost, nothing doubled: the rebuilt version equals the fold of the whole log.
    common::assert_read_models_equal_fold(&rebuilt, &ns).await;

    // After the grace period the replaced version is deleted; the new one is untouched.
    for (projection, old) in &report.replaced {
        assert_eq!(old, projector::versions::LIVE);
        rebuild::retire(&cfg, &store, projection, old)
            .await
            .unwrap();
    }
    let old = common::live_sinks(&cfg).await;
    assert!(
        old.redis
            .scan_all::<projectors::customer360::Customer360>()
            .await
            .unwrap()
            .is_empty(),
        "old Customer-360 keys deleted"
    );
    assert!(
        old.mongo
            .scan_all::<projectors::order_view::OrderView>()
            .await
            .unwrap()
            .is_empty(),
        "old order views dropped"
    );
    assert!(
        old.clickhouse.all_facts().await.unwrap().is_empty(),
        "old facts dropped"
    );
    common::assert_read_models_equal_fold(&rebuilt, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_while_switching_never_leaves_the_workers_held() {
    let (cfg, ns) = common::isolated_config("ks");
    let store = common::store().await;
    let version = format!("v{}", ns.trim_end_matches('-').replace('-', "_"));
    common::seed_at_head(&cfg, &store, &version).await;
    let pod = Pod::spawn(&cfg, "pod-0");
    common::generate(&cfg, &format!("{ns}a-"), 1_000, 95, 0.0, 0.0).await;

    // An open transaction makes the handover wait at its fence, flag raised.
    let (holder, conn) = tokio_postgres::connect(&cfg.postgres.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    let mut child = Command::new(common::projector_bin())
        .args([
            "rebuild-projection",
            "--all",
            "--version",
            &version,
            "--grace-seconds",
            "0",
        ])
        .envs(common::config_env(&cfg))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let live = projector::versions::live_versions(&store, &cfg)
            .await
            .unwrap();
        if live.switching.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the handover never raised its flag"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill(); // the rebuild dies holding the flag
    child.wait().unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();

    // Traffic after the death: the workers hold it until the lease expires, lower the flag,
    // and go on writing the version the pointers still name.
    let died = Instant::now();
    common::generate(&cfg, &format!("{ns}b-"), 1_000, 96, 0.0, 0.0).await;
    loop {
        let live = projector::versions::live_versions(&store, &cfg)
            .await
            .unwrap();
        if live.switching.is_empty() {
            break;
        }
        assert!(
            died.elapsed() < Duration::from_secs(60),
            "the expired flag was never lowered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        died.elapsed() >= Duration::from_secs(5),
        "the flag stayed up while its lease held ({:?})",
        died.elapsed()
    );
    let want = common::event_log(&ns).await.len();
    let have = common::wait_for_facts(&common::live_sinks(&cfg).await, &ns, want).await;
    assert_eq!(
        have, want,
        "the live worker went on after the lease expired"
    );
    let live = projector::versions::live_versions(&store, &cfg)
        .await
        .unwrap();
    for p in projectors::names() {
        assert_eq!(live.of(p), projector::versions::LIVE, "nothing switched");
    }
    pod.stop();
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}
