//! The Customer-360 layout on a real three-primary Redis Cluster (`scripts/services.sh up
//! rcluster`). Each document's compare-and-set touches one key, so it runs on any slot; loads
//! are split per slot and scans visit every primary. A worker projects a history with
//! duplicates and redeliveries while one primary is hung (SIGSTOP) and another is killed -9
//! and restarted; nobody restarts the worker, and the read models equal the fold.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::faults::{Worker, load, progress, repo, services_sh, wait_until};
use common::{ReadServer, Snapshot};
use projector::config::RedisConfig;
use projector::sinks::redis::RedisCon;

fn ports() -> [u16; 3] {
    let base: u16 = std::env::var("REDIS_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(17101);
    [base, base + 1, base + 2]
}

fn services(args: &[&str]) {
    let out = services_sh(false, args);
    assert!(
        out.status.success(),
        "scripts/services.sh {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn node_pid(port: u16) -> String {
    let f = repo().join(format!(".services/rcluster/{port}/redis.pid"));
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .to_owned()
}

fn signal(sig: &str, port: u16) {
    let ok = Command::new("kill")
        .args([sig, &node_pid(port)])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} the node on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_360_on_a_redis_cluster_survives_a_hung_and_a_killed_primary() {
    services(&["up", "rcluster"]);
    let [a, b, c] = ports();
    let (mut cfg, ns) = common::isolated_config("rcl");
    cfg.redis.cluster = true;
    cfg.redis.url = [a, b, c]
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .join(",");
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    let cluster_env = [
        ("PROJECTOR_REDIS__CLUSTER", "true".to_owned()),
        ("PROJECTOR_REDIS__URL", cfg.redis.url.clone()),
    ];
    let mut extra = cluster_env.to_vec();
    extra.push(("PROJECTOR_WORKER__WINDOW_SIZE", "500".to_owned()));
    let mut worker = Worker::spawn(&cfg, "c0", "redis-cluster", &extra);

    let load = tokio::spawn(load(cfg.clone(), ns.clone(), 16, 500));
    let k = cfg.clone();
    wait_until(
        Duration::from_secs(120),
        "the worker's first commits",
        || progress(&k).is_some_and(|(done, high)| done > 0 && done < high),
    )
    .await;

    // One primary hangs (its slots time out), then another dies and comes back.
    let t0 = Instant::now();
    signal("-STOP", a);
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal("-CONT", a);
    signal("-KILL", b);
    tokio::time::sleep(Duration::from_secs(3)).await;
    services(&["up", "rcluster"]);
    let published = load.await.unwrap();
    common::faults::wait_for_group(
        &cfg,
        &[&worker],
        Duration::from_secs(240),
        "the lag to return to 0",
        |done, high| done == high && high >= published,
    )
    .await;
    eprintln!(
        "CLUSTER: lag 0 {:.1} s after the hang began",
        t0.elapsed().as_secs_f64()
    );
    assert!(worker.running(), "nobody restarted the worker");
    let errors = worker.metric("projector_store_errors_total").await;
    eprintln!("CLUSTER: store errors counted by the worker: {errors}");
    assert_eq!(
        worker.metric("projector_consumer_restarts_total").await,
        0.0,
        "a store fault never costs the consumer its place in the group"
    );

    // Every read model equals the fold (Customer-360 read back by SCAN on every primary and
    // MGET split per slot).
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    // The documents are spread over all three primaries: the layout really runs sharded.
    let prefix = format!("{}*", cfg.views.redis_prefix);
    for port in [a, b, c] {
        let node = RedisConfig {
            url: format!("redis://127.0.0.1:{port}/"),
            cluster: false,
            ..cfg.redis.clone()
        };
        let keys = RedisCon::open(&node, 1)
            .await
            .unwrap()
            .scan(&prefix)
            .await
            .unwrap();
        assert!(!keys.is_empty(), "the primary on {port} holds documents");
    }

    // The read service answers from the cluster too.
    let log = common::event_log_at(&cfg, &ns).await;
    let want: Snapshot = common::fold(&log, &ns);
    let (id, (view, _)) = want.customers.iter().next().unwrap();
    let api = ReadServer::spawn(&cfg, &cluster_env);
    let (status, body) = api.get(&format!("/v1/customers/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"],
        serde_json::to_value(projector::read::types::Customer::from(view.clone())).unwrap()
    );

    // Retiring a version deletes every key under its prefix, on every primary.
    let sinks = common::live_sinks(&cfg).await;
    sinks.redis.delete_all().await.unwrap();
    assert!(
        sinks
            .redis
            .scan_all::<serde_json::Value>()
            .await
            .unwrap()
            .is_empty()
    );
    worker.stop();
    let _ = projector::kafka::delete_topics(&cfg.kafka).await;
}
