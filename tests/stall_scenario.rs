//! Never stall silently: two workers (static members `w0`, `w1`) under continuous load are
//! each killed (-9) and restarted under the same id, as a StatefulSet does, while Redis hangs
//! for 20 s and MongoDB, ClickHouse and Redis are killed and restarted. Nobody restarts
//! anything but the killed workers themselves: the group's lag, read from the broker, reaches
//! 0, every member sees nothing unowned or mismatched, and the read models equal the fold of
//! the event log.
//!
//! Runs in the `faults` test group, on the fault-test server set.

mod common;

use common::faults::FaultSet;
use common::scenario::{Step, scenario};

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
    let set = FaultSet::up();
    scenario(
        Some(&set),
        set.isolated("stall"),
        "stall",
        25,
        &[],
        SCHEDULE,
    )
    .await;
}
