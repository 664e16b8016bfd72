//! Fetch control for the poll loop: pacing's pause and resume (`source::pace`), the
//! wake-ups a resume needs, resuming partitions that went silent, and the pause at shutdown.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;

use super::{KafkaSource, poll_failed};
use crate::runtime::commit::Tp;
use crate::source::consumer::SourceConsumer;

/// How often a resume that no fetch has answered yet wakes the broker thread again.
pub(super) const RESUME_WAKE_EVERY: Duration = Duration::from_millis(5);

impl KafkaSource {
    /// Pause every owned partition for `pause`, serving the group's events meanwhile, then
    /// resume them (see `source::pace`; a partition assigned meanwhile was never paused, and
    /// resuming it changes nothing).
    pub(super) fn pause_fetching(&self, consumer: &SourceConsumer, pause: Duration) {
        let Some(paused) = self.pause_owned(consumer) else {
            return;
        };
        metrics::counter!("projector_fetch_pauses_total").increment(1);
        let until = Instant::now() + pause;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            // The open window closes on time, pause or not: its messages wait for no pause.
            let left = self.close_due_and_offer().map_or(left, |c| {
                left.min(c.saturating_duration_since(Instant::now()))
                    .max(Duration::from_millis(1))
            });
            match consumer.poll(left) {
                Some(Ok(m)) => self.push(&m),
                Some(Err(e)) if poll_failed(&e) => {
                    self.shared.recreate.store(true, Ordering::Relaxed);
                    break;
                }
                Some(Err(_)) | None => {}
            }
            if self.shared.shutdown.load(Ordering::Relaxed) {
                break;
            }
        }
        // Exactly what was paused (a partition revoked meanwhile keeps its pause flag in
        // librdkafka and would come back paused if it were assigned again), and whatever is
        // owned now.
        let mut resume = paused;
        if let Ok(owned) = consumer.assignment() {
            for e in owned.elements() {
                if resume.find_partition(e.topic(), e.partition()).is_none() {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
        }
        if crate::runtime::stage::fault_once("lose_a_resume") {
            // Test hook: librdkafka dropping a resume as outdated (`source::pace`).
            let mut kept = TopicPartitionList::new();
            for e in resume.elements().iter().skip(1) {
                kept.add_partition(e.topic(), e.partition());
            }
            resume = kept;
        }
        if let Err(e) = consumer.resume(&resume) {
            tracing::warn!(error = %e, "could not resume the paused partitions");
        }
        self.wake(consumer);
    }

    /// Resume again the partitions that said nothing since their resume or assignment: a
    /// resume librdkafka dropped as outdated leaves a partition paused and silent
    /// (`source::pace`). Resuming a partition that is not paused changes nothing.
    pub(super) fn resume_silent(&self, consumer: &SourceConsumer, silent: Vec<Tp>) {
        if silent.is_empty() {
            return;
        }
        let tpl = self.tpl(silent.iter().map(|tp| (*tp, None)));
        tracing::debug!(
            partitions = silent.len(),
            "resuming silent partitions again"
        );
        metrics::counter!("projector_fetch_silent_resumes_total").increment(silent.len() as u64);
        // No wake-up request here: a broker that is down would hold the loop for its
        // timeout every time, and the broker thread fetches within a second anyway.
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(error = %e, "could not resume the silent partitions");
        }
    }

    /// librdkafka applies a resume off the broker thread, which may sleep up to a second
    /// before it looks at its partitions again; a request through the broker wakes it. The
    /// resume is asynchronous too, so the poll loop wakes it again until a fetch answers.
    pub(super) fn wake(&self, consumer: &SourceConsumer) {
        let topic = self.topics.first().map(String::as_str);
        let _ = consumer.fetch_metadata(topic, Duration::from_millis(100));
    }

    /// Pause every partition owned now; the list paused, or `None` if nothing was.
    pub(super) fn pause_owned(&self, consumer: &SourceConsumer) -> Option<TopicPartitionList> {
        let owned = consumer.assignment().ok()?;
        if let Err(e) = consumer.pause(&owned) {
            tracing::warn!(error = %e, "could not pause the partitions");
            return None;
        }
        Some(owned)
    }
}
