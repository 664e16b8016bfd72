//! Never stall silently: two workers (static members `w0`, `w1`) under continuous load are
//! each killed (-9) and restarted under the same id, as a StatefulSet does, while Redis hangs
//! for 20 s and MongoDB, ClickHouse and Redis are killed and restarted. The local broker may
//! then hand a rejoining member the other one's partitions, leaving some consumed by nobody;
//! the group watch must see it and heal it. Nobody restarts anything but the killed workers
//! themselves: the group's lag, read from the broker, reaches 0 and the read models equal the
//! fold of the event log.
//!
//! Runs in the `faults` test group, on the fault-test server set.

mod common;

use std::time::{Duration, Instant};

use common::faults::{FaultSet, Worker, load, progress, wait_until};

async fn at(t0: Instant, secs: u64) {
    let when = t0 + Duration::from_secs(secs);
    tokio::time::sleep(when.saturating_duration_since(Instant::now())).await;
}

/// The workers as shipped: a client id of their own per consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_stores_killed_under_load_leave_no_partition_behind() {
    scenario("stall", &[]).await;
}

/// Both workers configured with one client id: the local broker then hands a rejoining
/// member the other one's partitions, and only the group watch's heal brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_client_id_heal_the_brokers_misassignment() {
    scenario(
        "stallshared",
        &[("PROJECTOR_KAFKA__CLIENT_ID", "projector".into())],
    )
    .await;
}

async fn scenario(tag: &str, more: &[(&str, String)]) {
    let set = FaultSet::up();
    let (cfg, ns) = set.isolated(tag);
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    let mut extra = vec![
        ("PROJECTOR_KAFKA__MAX_POLL_INTERVAL_MS", "8000".to_owned()),
        ("PROJECTOR_WORKER__WINDOW_SIZE", "500".to_owned()),
    ];
    extra.extend(more.iter().cloned());
    let mut w0 = Worker::spawn(&cfg, "w0", tag, &extra);
    let mut w1 = Worker::spawn(&cfg, "w1", tag, &extra);

    // About 41k messages in 25 rounds, with duplicates and redeliveries on the wire.
    let load = tokio::spawn(load(cfg.clone(), ns.clone(), 25, 1_500));
    let c = cfg.clone();
    wait_until(
        Duration::from_secs(120),
        "the workers' first commits",
        || progress(&c).is_some_and(|(done, _)| done > 0),
    )
    .await;
    let t0 = Instant::now();
    let kill_worker = |w: &mut Worker| {
        let _ = w.child.kill(); // SIGKILL: no drain, no commit, no leave
        let _ = w.child.wait();
    };
    at(t0, 7).await;
    kill_worker(&mut w0);
    at(t0, 9).await;
    w0 = Worker::spawn(&cfg, "w0", &format!("{tag}-2"), &extra);
    at(t0, 15).await;
    set.hang("redis");
    at(t0, 35).await;
    set.resume("redis");
    at(t0, 40).await;
    set.kill9("mongo");
    at(t0, 43).await;
    set.restart("mongo");
    at(t0, 49).await;
    kill_worker(&mut w1);
    at(t0, 51).await;
    w1 = Worker::spawn(&cfg, "w1", &format!("{tag}-2"), &extra);
    at(t0, 58).await;
    set.kill9("clickhouse");
    at(t0, 61).await;
    set.restart("clickhouse");
    at(t0, 66).await;
    set.kill9("redis");
    at(t0, 69).await;
    set.restart("redis");

    let published = load.await.unwrap();
    let t1 = Instant::now();
    let c = cfg.clone();
    wait_until(
        Duration::from_secs(300),
        "the group's lag to reach 0",
        || progress(&c).is_some_and(|(done, high)| done == high && high >= published),
    )
    .await;
    eprintln!(
        "{published} messages published; the group's lag reached 0 {:.1} s after the load ended",
        t1.elapsed().as_secs_f64()
    );
    for w in [&mut w0, &mut w1] {
        assert!(w.running(), "{} is still running", w.name);
        let heals = w.metric("projector_assignment_heals_total").await;
        let restarts = w.metric("projector_consumer_restarts_total").await;
        eprintln!(
            "{}: {heals} heals, consumer re-created {restarts} times",
            w.name
        );
        // Every member sees the whole group: nothing unowned, nothing behind, itself in
        // agreement with the coordinator.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let unowned = w.metric("projector_group_unowned_partitions").await;
            let lag = w.metric("projector_group_lag_messages").await;
            let mismatch = w.metric("projector_assignment_mismatch").await;
            if unowned == 0.0 && lag == 0.0 && mismatch == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: unowned {unowned}, group lag {lag}, mismatch {mismatch}",
                w.name
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (code, _) = common::http_get(&w.http, "/healthz")
            .await
            .unwrap_or((0, String::new()));
        assert_eq!(code, 200, "{} is live once caught up", w.name);
    }
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    w0.stop();
    w1.stop();
    let _ = projector::kafka::delete_topics(&cfg.kafka).await;
}
