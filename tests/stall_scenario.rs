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

/// One step of the fault schedule, at a second after the first commits.
#[derive(Clone, Copy)]
enum Step {
    /// kill -9 worker N (no drain, no commit, no leave)…
    KillWorker(usize),
    /// …and start it again under the same instance id, as a StatefulSet does.
    StartWorker(usize),
    Hang(&'static str),
    Resume(&'static str),
    Kill(&'static str),
    Restart(&'static str),
}

/// The schedule of the issue: each worker killed and restarted, Redis hung for 20 s, MongoDB,
/// ClickHouse and Redis killed and restarted.
const SCHEDULE: &[(u64, Step)] = &[
    (7, Step::KillWorker(0)),
    (9, Step::StartWorker(0)),
    (15, Step::Hang("redis")),
    (35, Step::Resume("redis")),
    (40, Step::Kill("mongo")),
    (43, Step::Restart("mongo")),
    (49, Step::KillWorker(1)),
    (51, Step::StartWorker(1)),
    (58, Step::Kill("clickhouse")),
    (61, Step::Restart("clickhouse")),
    (66, Step::Kill("redis")),
    (69, Step::Restart("redis")),
];

/// The workers as shipped: a client id of their own per consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_stores_killed_under_load_leave_no_partition_behind() {
    scenario("stall", &[], &[]).await;
}

/// Both workers configured with one client id: the local broker then hands a rejoining
/// member the other one's partitions (about one same-id restart in two), and only the group
/// watch's heal brings them back. Four more worker restarts make that likely in every run;
/// the heals are counted from the workers' logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_client_id_heal_the_brokers_misassignment() {
    scenario(
        "stallshared",
        &[("PROJECTOR_KAFKA__CLIENT_ID", "projector".into())],
        &[
            (21, Step::KillWorker(1)),
            (23, Step::StartWorker(1)),
            (28, Step::KillWorker(0)),
            (30, Step::StartWorker(0)),
            (55, Step::KillWorker(0)),
            (57, Step::StartWorker(0)),
            (62, Step::KillWorker(1)),
            (64, Step::StartWorker(1)),
        ],
    )
    .await;
}

async fn scenario(tag: &str, more: &[(&str, String)], more_steps: &[(u64, Step)]) {
    let set = FaultSet::up();
    let (cfg, ns) = set.isolated(tag);
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    let mut extra = vec![
        ("PROJECTOR_KAFKA__MAX_POLL_INTERVAL_MS", "8000".to_owned()),
        ("PROJECTOR_WORKER__WINDOW_SIZE", "500".to_owned()),
    ];
    extra.extend(more.iter().cloned());
    let names = ["w0", "w1"];
    let mut starts = 0;
    let mut spawn = |i: usize| {
        starts += 1;
        Worker::spawn(&cfg, names[i], &format!("{tag}-{starts}"), &extra)
    };
    let mut workers = [spawn(0), spawn(1)];

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
    let mut steps: Vec<(u64, Step)> = SCHEDULE.iter().chain(more_steps).copied().collect();
    steps.sort_by_key(|(t, _)| *t);
    for (t, step) in steps {
        at(t0, t).await;
        match step {
            Step::KillWorker(i) => {
                let _ = workers[i].child.kill();
                let _ = workers[i].child.wait();
            }
            Step::StartWorker(i) => workers[i] = spawn(i),
            Step::Hang(svc) => set.hang(svc),
            Step::Resume(svc) => set.resume(svc),
            Step::Kill(svc) => set.kill9(svc),
            Step::Restart(svc) => set.restart(svc),
        }
    }
    let [mut w0, mut w1] = workers;

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
    // Heals of every worker process of the run, killed ones included (their logs remain).
    let heals: usize = (1..=starts)
        .flat_map(|n| {
            names.map(|w| {
                common::faults::repo().join(format!("target/fault-logs/{tag}-{n}-{w}.log"))
            })
        })
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|log| log.matches("disagreed with the coordinator").count())
        .sum();
    eprintln!("{tag}: {heals} heals over {starts} worker processes");
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    w0.stop();
    w1.stop();
    let _ = projector::kafka::delete_topics(&cfg.kafka).await;
}
