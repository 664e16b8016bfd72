use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::config::KafkaConfig;
use crate::kafka::base_client_config;

/// Logs rebalances; the worker commits after every batch, so a revoked partition has
/// nothing in flight to drain by the time the rebalance runs (it runs inside `recv`).
pub struct WorkerContext;

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; the batch will be redelivered");
        }
    }
}

pub type WorkerConsumer = StreamConsumer<WorkerContext>;

/// A consumer in the worker group: manual commits, earliest reset, cooperative-sticky.
pub fn create_consumer(cfg: &KafkaConfig) -> KafkaResult<WorkerConsumer> {
    let mut c = base_client_config(cfg);
    if let Some(id) = cfg.instance_id.as_deref().filter(|s| !s.is_empty()) {
        c.set("group.instance.id", id);
    }
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", &cfg.assignment_strategy)
        // A killed pod's partitions move on quickly.
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", "1000")
        // Also the rebalance timeout: how long a join waits for silent members. The loop
        // polls between batches and while waiting out failures, so this stays well ahead.
        .set("max.poll.interval.ms", "20000")
        .set("enable.partition.eof", "false")
        .create_with_context(WorkerContext)
}
