//! Every server fails in production. Two workers (static members `w0`, `w1`) project a
//! history with duplicates and redeliveries while one server is hung (SIGSTOP for longer than
//! `max.poll.interval.ms`), and then killed with -9 and restarted, each fault landing while
//! writes are in flight. No worker is restarted by the test: afterwards the lag returns to 0 by itself,
//! nobody was fenced or re-created, and the read models equal the fold of the event log.
//!
//! These tests run one at a time (nextest group `faults`) on a server set of their own.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::faults::{FaultSet, Worker, load_until, progress, wait_until};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Hang(Duration),
    Kill { down: Duration },
}

async fn survive(svc: &'static str, faults: &[Fault]) {
    let set = FaultSet::up();
    let tag = format!("f{}", &svc[..2]);
    let (cfg, ns) = set.isolated(&tag);
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    // A window that waits out a 10 s hang outlives the group's poll interval.
    let extra = [
        ("PROJECTOR_KAFKA__MAX_POLL_INTERVAL_MS", "8000".to_owned()),
        ("PROJECTOR_WORKER__WINDOW_SIZE", "500".to_owned()),
    ];
    let mut w0 = Worker::spawn(&cfg, "w0", &format!("{tag}-{svc}"), &extra);
    let mut w1 = Worker::spawn(&cfg, "w1", &format!("{tag}-{svc}"), &extra);

    // Load arrives in rounds before, between and after the faults (one continuous load for
    // all of them: what each fault costs is the recovery, not a new set-up); each fault lands
    // as soon as the workers have committed something since the last one, while they hold
    // polled messages they have not committed yet.
    // The load ends a few rounds after the last fault: what follows a fault is under load too.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load_until(cfg.clone(), ns.clone(), 500, stop.clone(), 4));
    let mut t0 = Instant::now();
    let mut busy = 0;
    let mut high = 0;
    for (i, &fault) in faults.iter().enumerate() {
        let c = cfg.clone();
        let since = busy;
        wait_until(
            Duration::from_secs(120),
            "the workers' commits before the fault",
            || progress(&c).is_some_and(|(done, high)| done > since && done < high),
        )
        .await;
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
        (busy, high) = progress(&cfg).unwrap();
        t0 = Instant::now();
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
        eprintln!(
            "FAULT {svc} #{i} {fault:?} ended after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let during = t0.elapsed();
    let t1 = Instant::now();
    let at_end = progress(&cfg).map_or(busy, |p| p.0);
    let published = load.await.unwrap();
    let load_done = t1.elapsed();
    let broker_lost = svc == "kafka" && faults.iter().any(|f| matches!(f, Fault::Kill { .. }));
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
    common::faults::wait_for_group(
        &cfg,
        &[&w0, &w1],
        Duration::from_secs(240),
        "the lag to return to 0",
        |done, high| done == high && high > 0 && (broker_lost || high >= published),
    )
    .await;
    let to_zero = t1.elapsed();
    let (done, _) = progress(&cfg).unwrap();
    eprintln!(
        "FAULT {svc} {faults:?}: {} messages uncommitted when the last began; {:.0} msg/s during it, \
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
        // The broker's answers to the worker's commits reach it (they once never did).
        let answered = w.metric("projector_commits_total").await;
        eprintln!(
            "{}: {answered} commits answered, {} of them failed",
            w.name,
            w.metric("projector_commits_total{outcome=\"failed\"}")
                .await
        );
        assert!(answered > 0.0, "{}: no commit answered", w.name);
        let restarts = w.metric("projector_consumer_restarts_total").await;
        if svc == "kafka" {
            // A broker that went away may fence a static member's old session when it
            // rejoins: the worker re-creates its consumer under the same identity.
            eprintln!(
                "{}: consumer re-created {restarts} times; {} partition resumes made again; \
                 {} partition logs went back",
                w.name,
                w.metric("projector_fetch_silent_resumes_total").await,
                w.metric("projector_log_rewinds_total").await,
            );
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
async fn redis_hung_longer_than_the_poll_interval_then_killed() {
    survive("redis", &[HANG, KILL]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_hung_then_killed() {
    survive("mongo", &[HANG, KILL]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_hung_then_killed() {
    survive("clickhouse", &[HANG, KILL]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hung_then_killed() {
    survive("postgres", &[HANG, KILL]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_hung_then_killed() {
    survive("kafka", &[HANG, KILL]).await;
}
