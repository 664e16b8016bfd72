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
    /// The deadline of a drain that starts now (`worker.drain_timeout_ms`).
    pub(super) fn drain_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.cfg.worker.drain_timeout_ms)
    }

    /// Wait until the tracker has everything up to `upto` (or `deadline` passes), then commit
    /// `parts` synchronously.
    pub(super) fn drain_and_commit(
        &self,
        consumer: &SourceConsumer,
        parts: Vec<Tp>,
        upto: Option<u64>,
        deadline: Instant,
    ) {
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
        // One deadline for the hand-over and the drain: the rebalance waits at most
        // `drain_timeout_ms` in all, however long the pipeline took to take the windows.
        // The close after the final commit at shutdown: all is drained and committed.
        if !self.final_commit_made.load(Ordering::Relaxed) {
            let deadline = self.drain_deadline();
            let last = self.flush(deadline);
            self.drain_and_commit(consumer, parts.clone(), last, deadline);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Weak};
    use std::time::{Duration, Instant};

    use rdkafka::ClientConfig;
    use rdkafka::TopicPartitionList;
    use tokio::sync::mpsc;

    use super::super::{KafkaSource, RawWindow};
    use crate::runtime::Shared;
    use crate::runtime::commit::TrackerMsg;
    use crate::source::consumer::{RebalanceHandler, SourceConsumer, SourceContext};
    use crate::source::window::Arena;

    fn window(id: u64) -> RawWindow {
        RawWindow {
            id,
            generation: 0,
            items: Vec::new(),
            arena: Arena::with_capacity(0),
            opened: Instant::now(),
        }
    }

    /// A pipeline that takes nothing and a store that acknowledges nothing: the revoke must
    /// still let the partitions go within one `drain_timeout_ms`, not one to hand the
    /// windows over and another to drain them.
    #[test]
    fn a_stuck_revoke_waits_one_drain_timeout_in_all() {
        let mut cfg = crate::config::Config::load_for_tests().expect("config/local.toml");
        cfg.worker.drain_timeout_ms = 1_000;
        let shared = Arc::new(Shared::default());
        let (tracker, mut inbox) = mpsc::unbounded_channel();
        // The pipeline's inbox is full and nobody reads it.
        let (windows, _pipeline) = mpsc::channel(1);
        windows.try_send(window(1)).expect("room for one");
        let topics = Arc::new(vec!["t".to_owned()]);
        let source = KafkaSource::new(&cfg, shared.clone(), tracker, windows, topics);
        {
            let mut st = source.state();
            st.ready.push_back(window(2));
            st.last_registered = Some(2);
        }
        // The commit tracker answers a drain at its deadline with nothing committable, as it
        // does when acknowledgements never come.
        let answering = std::thread::spawn(move || {
            while let Some(msg) = inbox.blocking_recv() {
                if let TrackerMsg::Drain {
                    deadline, reply, ..
                } = msg
                {
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    let _ = reply.send(Vec::new());
                }
            }
        });
        let handler: Weak<dyn RebalanceHandler> = Arc::downgrade(&source) as _;
        // Offline: no broker is needed to create a client, and nothing is committed.
        let consumer: SourceConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "stuck-revoke")
            .create_with_context(SourceContext::new(shared, handler))
            .expect("an offline consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);

        let started = Instant::now();
        RebalanceHandler::revoke(source.as_ref(), &consumer, &tpl);
        let took = started.elapsed();
        drop(consumer);
        drop(source);
        let _ = answering.join();
        assert!(
            took >= Duration::from_millis(900),
            "the revoke waited for the pipeline and the tracker ({took:?})"
        );
        // Two deadlines one after the other take at least 2 s; one takes 1 s and slack.
        assert!(
            took < Duration::from_millis(1_900),
            "the revoke waited {took:?}, more than one drain_timeout_ms (1 s) and slack"
        );
    }
}
