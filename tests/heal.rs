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
