//! A scenario of worker kills (and, on the fault set, store faults) under continuous load,
//! shared by the stall tests: the group must catch up by itself and the read models equal the
//! fold.

use std::time::{Duration, Instant};

use super::faults::{FaultSet, Worker, load, progress, repo, wait_until};

async fn at(t0: Instant, secs: u64) {
    let when = t0 + Duration::from_secs(secs);
    tokio::time::sleep(when.saturating_duration_since(Instant::now())).await;
}

/// One step of the fault schedule, at a second after the first commits.
#[derive(Clone, Copy)]
pub enum Step {
    /// kill -9 worker N (no drain, no commit, no leave)…
    KillWorker(usize),
    /// …and start it again under the same instance id, as a StatefulSet does.
    StartWorker(usize),
    Hang(&'static str),
    Resume(&'static str),
    Kill(&'static str),
    Restart(&'static str),
}

/// Two workers (static members `w0`, `w1`, with `more` in their environment) under
/// continuous load (`rounds` of 1,500 events with duplicates and redeliveries) while `steps`
/// run, at seconds after their first commits; store steps need the fault set `set`. Then the
/// group's lag, read from the broker, must reach 0 with nothing restarted by hand, every
/// member must see nothing unowned, behind or mismatched, and the read models must equal the
/// fold. Returns (and prints) the heals of every worker process of the run, from their logs.
pub async fn scenario(
    set: Option<&FaultSet>,
    (cfg, ns): (super::Isolated, String),
    tag: &str,
    rounds: usize,
    more: &[(&str, String)],
    steps: &[(u64, Step)],
) -> usize {
    // Its topics and stores are cleaned below, once the run equals the fold.
    let cfg = cfg.keep();
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
    let load = tokio::spawn(load(cfg.clone(), ns.clone(), rounds, 1_500));
    let c = cfg.clone();
    wait_until(
        Duration::from_secs(120),
        "the workers' first commits",
        || progress(&c).is_some_and(|(done, _)| done > 0),
    )
    .await;
    let t0 = Instant::now();
    let mut steps = steps.to_vec();
    steps.sort_by_key(|(t, _)| *t);
    let set = || set.expect("store faults need the fault set");
    for (t, step) in steps {
        at(t0, t).await;
        match step {
            Step::KillWorker(i) => {
                let _ = workers[i].child.kill();
                let _ = workers[i].child.wait();
            }
            Step::StartWorker(i) => workers[i] = spawn(i),
            Step::Hang(svc) => set().hang(svc),
            Step::Resume(svc) => set().resume(svc),
            Step::Kill(svc) => set().kill9(svc),
            Step::Restart(svc) => set().restart(svc),
        }
    }
    let [mut w0, mut w1] = workers;

    let published = load.await.unwrap();
    let t1 = Instant::now();
    super::faults::wait_for_group(
        &cfg,
        &[&w0, &w1],
        Duration::from_secs(300),
        "the group's lag to reach 0",
        |done, high| done == high && high >= published,
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
        let (code, _) = super::http_get(&w.http, "/healthz")
            .await
            .unwrap_or((0, String::new()));
        assert_eq!(code, 200, "{} is live once caught up", w.name);
    }
    // Heals of every worker process of the run, killed ones included (their logs remain).
    let heals: usize = (1..=starts)
        .flat_map(|n| names.map(|w| repo().join(format!("target/fault-logs/{tag}-{n}-{w}.log"))))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|log| log.matches("disagreed with the coordinator").count())
        .sum();
    eprintln!("{tag}: {heals} heals over {starts} worker processes");
    super::assert_read_models_equal_fold(&cfg, &ns).await;
    w0.stop();
    w1.stop();
    let _ = projector::kafka::delete_topics(&cfg.kafka).await;
    super::cleanup::delete_deployment(&cfg, &cfg.deployment, &ns).await;
    heals
}
