//! The rebalance callbacks: a revoked partition is drained (its windows written and
//! committed) before it is let go; an assigned one gets a new epoch.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use super::KafkaSource;
use crate::runtime::commit::{Tp, TrackerMsg};
use crate::source::consumer::{RebalanceHandler, SourceConsumer, SourceContext};

impl KafkaSource {
    /// Wait until the tracker has everything up to `upto`, then commit `parts` synchronously.
    pub(super) fn drain_and_commit(
        &self,
        consumer: &SourceConsumer,
        parts: Vec<Tp>,
        upto: Option<u64>,
    ) {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.worker.drain_timeout_ms);
        let offsets = match upto {
            None => Vec::new(),
            Some(upto) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let _ = self.tracker.send(TrackerMsg::Drain {
                    upto,
                    partitions: parts,
                    deadline,
                    reply: tx,
                });
                rx.recv_timeout(
                    deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1),
                )
                .unwrap_or_default()
            }
        };
        if offsets.is_empty() {
            return;
        }
        let tpl = self.tpl(offsets.iter().map(|(tp, o)| (*tp, Some(*o))));
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "final commit of revoked partitions failed; their new owner redelivers");
        }
    }
}

impl RebalanceHandler for KafkaSource {
    fn revoke(&self, consumer: &BaseConsumer<SourceContext>, partitions: &TopicPartitionList) {
        let parts: Vec<Tp> = partitions
            .elements()
            .iter()
            .filter_map(|e| self.tp_of(e.topic(), e.partition()))
            .collect();
        let deadline = Instant::now() + Duration::from_millis(self.cfg.worker.drain_timeout_ms);
        let last = self.flush(deadline);
        self.drain_and_commit(consumer, parts.clone(), last);
        {
            let mut st = self.state();
            for tp in &parts {
                st.owned.remove(tp);
                st.removed.push(*tp);
                st.added.retain(|t| t != tp);
            }
        }
        let _ = self.tracker.send(TrackerMsg::Revoked(parts));
        self.shared.assignment_gen.fetch_add(1, Ordering::Relaxed);
    }

    fn assign(&self, _consumer: &BaseConsumer<SourceContext>, partitions: &TopicPartitionList) {
        let mut assigned = Vec::new();
        {
            let mut st = self.state();
            for e in partitions.elements() {
                if let Some(tp) = self.tp_of(e.topic(), e.partition()) {
                    let epoch = st.new_epoch(tp, None);
                    st.added.push(tp);
                    st.removed.retain(|t| *t != tp);
                    assigned.push((tp, epoch));
                }
            }
        }
        let _ = self.tracker.send(TrackerMsg::Assigned(assigned));
        self.shared.assignment_gen.fetch_add(1, Ordering::Relaxed);
        self.shared.assigned.store(true, Ordering::Relaxed);
    }
}
