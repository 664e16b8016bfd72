//! Every server fails in production. Two workers (static members `w0`, `w1`) project a
//! history with duplicates and redeliveries while one server is hung (SIGSTOP for longer than
//! `max.poll.interval.ms`) or killed with -9 and restarted, landing while writes are in
//! flight. No worker is restarted by the test: afterwards the lag returns to 0 by itself,
//! nobody was fenced or re-created, and the read models equal the fold of the event log.
//!
//! These tests run one at a time (nextest group `faults`) on a server set of their own.

mod common;

use std::time::{Duration, Instant};

use common::faults::{FaultSet, Worker, load, progress, wait_until};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Hang(Duration),
    Kill { down: Duration },
}

async fn survive(svc: &'static str, fault: Fault) {
    let set = FaultSet::up();
    let tag = format!("f{}{}", &svc[..2], matches!(fault, Fault::Hang(_)) as u8);
    let (cfg, ns) = set.isolated(&tag);
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    // A window that waits out a 10 s hang outlives the group's poll interval.
    let extra = [
        ("PROJECTOR_KAFKA__MAX_POLL_INTERVAL_MS", "8000".to_owned()),
        ("PROJECTOR_WORKER__WINDOW_SIZE", "500".to_owned()),
    ];
    let mut w0 = Worker::spawn(&cfg, "w0", &format!("{tag}-{svc}"), &extra);
    let mut w1 = Worker::spawn(&cfg, "w1", &format!("{tag}-{svc}"), &extra);

    // Load arrives in rounds before, during and after the fault; the fault lands as soon as
    // the workers have committed something, while they write the rest.
    let load = tokio::spawn(load(cfg.clone(), ns.clone(), 24, 500));
    let c = cfg.clone();
    wait_until(
        Duration::from_secs(120),
        "the workers' first commits",
        || progress(&c).is_some_and(|(done, high)| done > 0 && done < high),
    )
    .await;
    // …and lands while a worker holds polled messages it has not committed yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = w0.metric("projector_in_flight_messages").await
            + w1.metric("projector_in_flight_messages").await;
        if held > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workers never had messages in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (busy, high) = progress(&cfg).unwrap();
    let t0 = Instant::now();
    match fault {
        Fault::Hang(d) => {
            set.hang(svc);
            tokio::time::sleep(d).await;
            set.resume(svc);
        }
        Fault::Kill { down } => {
            set.kill9(svc);
            tokio::time::sleep(down).await;
            set.restart(svc);
        }
    }
    let during = t0.elapsed();
    let t1 = Instant::now();
    let at_end = progress(&cfg).map_or(busy, |p| p.0);
    let published = load.await.unwrap();
    let load_done = t1.elapsed();
    let broker_lost = svc == "kafka" && matches!(fault, Fault::Kill { .. });
    if broker_lost {
        // The local broker persists by periodic full snapshots: kill -9 loses messages it had
        // acknowledged, and committed offsets (Apache Kafka keeps both). Publish the history
        // again from the event store, as an outbox relay would; the workers must converge.
        let log = common::event_log_at(&cfg, &ns).await;
        let envs: Vec<_> = log.iter().map(|e| e.to_envelope()).collect();
        projector::kafka::EventPublisher::new(&cfg.kafka)
            .unwrap()
            .publish(&envs)
            .await
            .unwrap();
    }
    let c = cfg.clone();
    wait_until(Duration::from_secs(240), "the lag to return to 0", || {
        progress(&c).is_some_and(|(done, high)| {
            done == high && high > 0 && (broker_lost || high >= published)
        })
    })
    .await;
    let to_zero = t1.elapsed();
    let (done, _) = progress(&cfg).unwrap();
    eprintln!(
        "FAULT {svc} {fault:?}: {} messages uncommitted when it began; {:.0} msg/s during, \
         {:.0} msg/s after; lag 0 {:.1} s after the fault ended (the load went on for {:.1} s \
         after it)",
        high - busy,
        (at_end - busy) as f64 / during.as_secs_f64(),
        (done - at_end) as f64 / to_zero.as_secs_f64(),
        to_zero.as_secs_f64(),
        load_done.as_secs_f64(),
    );
    for w in [&mut w0, &mut w1] {
        assert!(
            w.running(),
            "{} is still running: nobody restarted it",
            w.name
        );
        let restarts = w.metric("projector_consumer_restarts_total").await;
        if svc == "kafka" {
            // A broker that went away may fence a static member's old session when it
            // rejoins: the worker re-creates its consumer under the same identity.
            eprintln!("{}: consumer re-created {restarts} times", w.name);
        } else {
            assert_eq!(
                restarts, 0.0,
                "{}: a store fault never costs the consumer its place in the group",
                w.name
            );
        }
    }
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    w0.stop();
    w1.stop();
    // The local broker keeps everything in memory: leave it as small as it was.
    let _ = projector::kafka::delete_topics(&cfg.kafka).await;
}

const HANG: Fault = Fault::Hang(Duration::from_secs(10));
const KILL: Fault = Fault::Kill {
    down: Duration::from_secs(3),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_longer_than_the_poll_interval() {
    survive("redis", HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    survive("redis", KILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_hung() {
    survive("mongo", HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_killed_and_restarted() {
    survive("mongo", KILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_hung() {
    survive("clickhouse", HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_and_restarted() {
    survive("clickhouse", KILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hung() {
    survive("postgres", HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_and_restarted() {
    survive("postgres", KILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_hung() {
    survive("kafka", HANG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_and_restarted() {
    survive("kafka", KILL).await;
}
