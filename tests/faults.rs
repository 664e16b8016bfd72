//! Every server fails in production. Two workers (static members `w0`, `w1`) project a
//! history with duplicates and redeliveries while one server is hung (SIGSTOP for longer than
//! `max.poll.interval.ms`) or killed with -9 and restarted, landing while writes are in
//! flight. No worker is restarted by the test: afterwards the lag returns to 0 by itself,
//! nobody was fenced or re-created, and the read models equal the fold of the event log.
//!
//! These tests run one at a time (nextest group `faults`) on a server set of their own.

mod common;

use std::time::{Duration, Instant};

use common::faults::{FaultSet, Worker, progress};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Hang(Duration),
    Kill { down: Duration },
}

async fn wait_until<F: FnMut() -> bool>(limit: Duration, what: &str, mut f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

    // Load, then the fault as soon as the workers are busy writing it.
    generate_on(&set, &cfg, &format!("{ns}a-"), 8_000, 1).await;
    let c = cfg.clone();
    wait_until(Duration::from_secs(120), "the workers to be busy", || {
        progress(&c).is_some_and(|(done, high)| done > 0 && done < high)
    })
    .await;
    let (busy, total) = progress(&cfg).unwrap();
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
    // More load after the fault, then wait for the lag to return to 0 by itself.
    generate_on(&set, &cfg, &format!("{ns}b-"), 3_000, 2).await;
    let c = cfg.clone();
    wait_until(Duration::from_secs(240), "the lag to return to 0", || {
        progress(&c).is_some_and(|(done, high)| done == high && high > total)
    })
    .await;
    let to_zero = t1.elapsed();
    let (done, _) = progress(&cfg).unwrap();
    eprintln!(
        "FAULT {svc} {fault:?}: in flight at the fault {} of {total}; {:.0} events/s during, \
         {:.0} events/s after; lag 0 {:.1} s after the fault ended",
        total - busy,
        (at_end - busy) as f64 / during.as_secs_f64(),
        (done - at_end) as f64 / to_zero.as_secs_f64(),
        to_zero.as_secs_f64(),
    );
    for w in [&mut w0, &mut w1] {
        assert!(w.running(), "{} is still running: nobody restarted it", w.name);
        assert_eq!(
            w.metric("projector_consumer_restarts_total").await,
            0.0,
            "{}: the consumer stayed in its group (never fenced, never re-created)",
            w.name
        );
    }
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    w0.stop();
    w1.stop();
}

/// Append and publish a seeded history on the fault-test servers (3 % duplicates, 5 %
/// redeliveries), retrying while a server is still coming back.
async fn generate_on(set: &FaultSet, cfg: &projector::config::Config, ns: &str, n: u64, seed: u64) {
    let _ = set;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let mut store = projector::store::EventStore::connect(&cfg.postgres.url).await?;
            store.migrate().await?;
            let publisher = projector::kafka::EventPublisher::new(&cfg.kafka)?;
            let opts = projector::generator::GenerateOptions {
                seed,
                events: n,
                namespace: ns.to_owned(),
                batch_size: 1_000,
                duplicate_rate: 0.03,
                redelivery_rate: 0.05,
            };
            projector::generator::generate(&mut [store], Some(&publisher), &opts, |_| {}).await?;
            Ok::<_, anyhow::Error>(())
        };
        match attempt.await {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("load generator: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("load generator: {e}"),
        }
    }
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
