//! The heal, against the real broker: two workers configured with one client id (as plain
//! librdkafka consumers share `rdkafka`), so the local broker hands a rejoining static member
//! the other one's partitions, leaving some consumed by nobody (`tests/static_membership.rs`
//! shows it with plain consumers). Under load, each worker in turn is killed (-9) and
//! restarted under its own id; only the group watch's heal (re-creating a consumer whose
//! assignment disagrees with the coordinator's) can bring the orphaned partitions back.
//! Nobody restarts anything else: the group's lag reaches 0 and the read models equal the
//! fold. On the default server set (no store is touched), beside the other tests.

mod common;

use common::scenario::{Step, scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_client_id_heal_the_brokers_misassignment() {
    let steps: Vec<(u64, Step)> = (0..6u64)
        .flat_map(|i| {
            let w = (i % 2) as usize;
            [
                (4 + 7 * i, Step::KillWorker(w)),
                (6 + 7 * i, Step::StartWorker(w)),
            ]
        })
        .collect();
    scenario(
        None,
        common::isolated_config("heal"),
        "heal",
        20,
        &[("PROJECTOR_KAFKA__CLIENT_ID", "projector".into())],
        &steps,
    )
    .await;
}

/// The local broker can lose a joining member's JoinGroup answer (librdkafka's `cgrp` debug
/// shows the request never answered). When the other member is then killed (-9, so it never
/// leaves), the group stays in `CompletingRebalance` for good: in one run here, 18 partitions
/// unowned for over 3 minutes, although the newcomer re-created its consumer three times (a
/// heal I tried and withdrew). Apache Kafka would expire the dead member's session and
/// complete the rebalance. What this
/// worker owes then is not to stall silently: either the newcomer takes every partition, or
/// its group watch reports partitions stalled, which an alert names. Dynamic members, on the default server set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_takes_every_partition_or_says_they_stall() {
    use common::faults::{Worker, partitions};
    use std::time::{Duration, Instant};
    let (cfg, ns) = common::isolated_config("join");
    common::generate(&cfg, &ns, 500, 3, 0.0, 0.0).await;
    // An empty instance id: dynamic membership. A short stall, to see it within the test.
    let extra = [
        ("PROJECTOR_KAFKA__INSTANCE_ID", String::new()),
        ("PROJECTOR_WORKER__PARTITION_STALL_SECS", "10".into()),
    ];
    let mut a = Worker::spawn(&cfg, "a", &cfg.deployment, &extra);
    let sinks = common::live_sinks(&cfg).await;
    let want = common::event_log(&ns).await.len();
    assert_eq!(common::wait_for_facts(&sinks, &ns, want).await, want);
    let b = Worker::spawn(&cfg, "b", &cfg.deployment, &extra);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // More to do, which only b can take. (A namespace of its own under this one: a second
    // history, read with the first.)
    common::generate(&cfg, &format!("{ns}more-"), 200, 4, 0.0, 0.0).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // (A partition may hold no message at all.)
        let caught_up = partitions(&cfg).is_some_and(|ps| {
            ps.iter().all(|p| p.committed == p.high) && ps.iter().any(|p| p.high > 0)
        });
        if caught_up {
            eprintln!("the broker answered: b took every partition");
            common::assert_read_models_equal_fold(&cfg, &ns).await;
            break;
        }
        // Stalled is what the alert reads. Unowned depends on the broker's description: a
        // wedged group lists no owner, while a dead member the broker never expires (seen
        // once: the join answered, b took 9 partitions) still owns its 9.
        let unowned = b.metric("projector_group_unowned_partitions").await;
        let stalled = b.metric("projector_group_stalled_partitions").await;
        if stalled > 0.0 {
            eprintln!("the group is stuck: b reports {stalled} stalled, {unowned} unowned");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "neither taken over nor reported as stalled:\n{}",
            b.report().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.stop();
}
