//! The consumer of the worker group and the callbacks librdkafka makes on the source thread
//! (rebalances, commit results, statistics, errors).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::config::KafkaConfig;
use crate::kafka::base_client_config;
use crate::runtime::Shared;

/// What a rebalance callback hands to the source loop (which owns the windows).
pub trait RebalanceHandler: Send + Sync {
    fn revoke(&self, consumer: &BaseConsumer<SourceContext>, partitions: &TopicPartitionList);
    fn assign(&self, consumer: &BaseConsumer<SourceContext>, partitions: &TopicPartitionList);
}

pub struct SourceContext {
    pub shared: Arc<Shared>,
    /// The source, weakly: a consumer whose close hangs in librdkafka is left behind at
    /// shutdown, and must not keep the source (and the channels it holds) alive.
    pub handler: Weak<dyn RebalanceHandler>,
    /// Each broker's counters at the last statistics (for what it sent since).
    pub brokers: Mutex<HashMap<String, BrokerCounters>>,
}

impl SourceContext {
    pub fn new(shared: Arc<Shared>, handler: Weak<dyn RebalanceHandler>) -> SourceContext {
        SourceContext {
            shared,
            handler,
            brokers: Mutex::default(),
        }
    }
}

/// A broker's running totals in librdkafka's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerCounters {
    /// Bytes received.
    pub rxbytes: u64,
    /// Fetch requests sent.
    pub fetches: i64,
}

/// The largest fetch response that can have arrived between two statistics of one broker,
/// in bytes: librdkafka counts bytes and requests, not the size of each response, so this is
/// everything the broker sent in the interval. An upper bound: exact when one response
/// carried it all (a backlog from a broker that ignores fetch limits), loose when many fetches
/// answered in the interval (the local broker sends 17 MB/s to a consumer of 1.4 MB/s of
/// events). None when no fetch was sent in the interval (or the counters started again).
pub fn fetch_bytes_bound(before: BrokerCounters, now: BrokerCounters) -> Option<u64> {
    if now.fetches <= before.fetches || now.rxbytes < before.rxbytes {
        return None;
    }
    Some(now.rxbytes - before.rxbytes)
}

pub type SourceConsumer = BaseConsumer<SourceContext>;

/// Errors after which this consumer instance can never work again: re-create it.
pub fn is_fatal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::FencedInstanceId)
    ) || matches!(e, KafkaError::MessageConsumptionFatal(_))
}

impl ClientContext for SourceContext {
    /// librdkafka's own log lines (an offset reset, a broker gone) belong in the worker's
    /// log: the default sends them to the `log` crate, which nothing here listens to.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn stats(&self, s: Statistics) {
        let mut lag_total = 0i64;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let done = self
            .shared
            .newest_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                lag_total += part.consumer_lag;
                let labels = [("topic", topic.clone()), ("partition", p.to_string())];
                metrics::gauge!("projector_consumer_lag_messages", &labels)
                    .set(part.consumer_lag as f64);
                // Caught up: 0. Behind: how old the newest message done here is, which
                // bounds how stale this partition's part of the read models can be. Unknown
                // before this worker finished anything on it.
                let seconds = match done.get(&(topic.clone(), *p)) {
                    _ if part.consumer_lag == 0 => Some(0.0),
                    Some(ts) => Some((now_ms - ts).max(0) as f64 / 1000.0),
                    None => None,
                };
                if let Some(s) = seconds {
                    metrics::gauge!("projector_consumer_lag_seconds", &labels).set(s);
                }
            }
        }
        self.shared.lag_messages.store(lag_total, Ordering::Relaxed);
        self.note_fetches(&s);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF) =
            error
        {
            // Not an error: partition ends pace the fetches (`source::pace`).
            return;
        }
        if is_fatal(&error) {
            tracing::error!(%error, reason, "the consumer failed for good: re-creating it");
            self.shared.recreate.store(true, Ordering::Relaxed);
        } else {
            tracing::warn!(%error, reason, "kafka client error");
        }
    }
}

impl SourceContext {
    /// The largest fetch response (bounded above, see [`fetch_bytes_bound`]) and the most
    /// bytes librdkafka's fetch queues held, as gauges: what the client buffers ahead of the
    /// pipeline, which the worker's memory bound has to allow for.
    fn note_fetches(&self, s: &Statistics) {
        let mut largest = 0u64;
        {
            let mut seen = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
            for (name, b) in &s.brokers {
                let now = BrokerCounters {
                    rxbytes: b.rxbytes,
                    fetches: b.req.get("Fetch").copied().unwrap_or(0),
                };
                let before = seen.insert(name.clone(), now).unwrap_or_default();
                largest = largest.max(fetch_bytes_bound(before, now).unwrap_or(0));
            }
        }
        let queued: u64 = s
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|(p, _)| **p >= 0)
            .map(|(_, part)| part.fetchq_size)
            .sum();
        let shared = &self.shared;
        let response = shared
            .fetch_response_bytes_max
            .fetch_max(largest, Ordering::Relaxed)
            .max(largest);
        let queues = shared
            .fetch_queue_bytes_max
            .fetch_max(queued, Ordering::Relaxed)
            .max(queued);
        metrics::gauge!("projector_fetch_response_bytes_max").set(response as f64);
        metrics::gauge!("projector_fetch_queue_bytes").set(queued as f64);
        metrics::gauge!("projector_fetch_queue_bytes_max").set(queues as f64);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(
                    partitions = tpl.count(),
                    "partitions revoked: draining them"
                );
                if let Some(h) = self.handler.upgrade() {
                    h.revoke(consumer, tpl);
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                if is_fatal(e) {
                    self.shared.recreate.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
            if let Some(h) = self.handler.upgrade() {
                h.assign(consumer, tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("projector_commits_total", "outcome" => outcome).increment(1);
        if let Err(e) = result {
            if is_fatal(&e) {
                tracing::error!(error = %e, "offset commit refused for good: re-creating the consumer");
                self.shared.recreate.store(true, Ordering::Relaxed);
            } else {
                tracing::warn!(error = %e, "offset commit failed; the next one covers it");
            }
        }
    }
}

/// The member id the group coordinator gave this consumer (none before it joined). It names
/// the member in the coordinator's description whatever its client id.
pub fn member_id<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<String> {
    // SAFETY: the client pointer lives as long as `consumer`; librdkafka returns a copy of
    // the id (or null), which we own and release with rd_kafka_mem_free.
    unsafe {
        let client = consumer.client().native_ptr();
        let p = rdkafka::bindings::rd_kafka_memberid(client);
        if p.is_null() {
            return None;
        }
        let id = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        rdkafka::bindings::rd_kafka_mem_free(client, p.cast());
        Some(id).filter(|s| !s.is_empty())
    }
}

/// Commit `tpl` without waiting, the broker's answer queued on the consumer's own queue,
/// where `poll` hands it to the context's `commit_callback`. (`commit(.., Async)` names no
/// callback or queue to answer on, so librdkafka drops the answer: a failed or fenced
/// commit went unseen, measured as no answer at all over a whole run.)
pub fn commit_answered<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    use rdkafka::bindings as rd;
    // SAFETY: the client pointer lives as long as `consumer`. The queue handle is ours to
    // destroy once the commit is queued (the commit holds a reference of its own to the
    // queue), and librdkafka copies `tpl`.
    let err = unsafe {
        let rk = consumer.client().native_ptr();
        let q = rd::rd_kafka_queue_get_consumer(rk);
        if q.is_null() {
            return consumer.commit(tpl, rdkafka::consumer::CommitMode::Async);
        }
        let err = rd::rd_kafka_commit_queue(rk, tpl.ptr(), q, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(q);
        err
    };
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(KafkaError::ConsumerCommit(err.into()))
    }
}

/// A client id no other consumer has (unless `kafka.client_id` sets one): the coordinator's
/// description names members by it, so the group watch can tell which one is this consumer.
pub fn unique_client_id(cfg: &KafkaConfig) -> String {
    if let Some(id) = cfg.client_id.as_deref().filter(|s| !s.is_empty()) {
        return id.to_owned();
    }
    let who = cfg
        .instance_id
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("member");
    format!("projector-{who}-{}", uuid::Uuid::new_v4().simple())
}

/// A consumer in the worker group: manual commits, earliest reset, cooperative-sticky.
pub fn create_consumer(
    cfg: &KafkaConfig,
    client_id: &str,
    ctx: SourceContext,
) -> KafkaResult<SourceConsumer> {
    let mut c = base_client_config(cfg);
    c.set("client.id", client_id);
    if let Some(id) = cfg.instance_id.as_deref().filter(|s| !s.is_empty()) {
        c.set("group.instance.id", id);
    }
    if let Some(d) = cfg.debug.as_deref().filter(|s| !s.is_empty()) {
        // (librdkafka drops debug lines below its own log level, which rust-rdkafka sets
        // from the `log` crate's, unused here.)
        c.set("debug", d)
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", &cfg.assignment_strategy)
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", "1000")
        // Also the rebalance timeout. The source thread polls every few milliseconds,
        // whatever the stores do, so only a wedged process can exceed it.
        .set("max.poll.interval.ms", cfg.max_poll_interval_ms.to_string())
        // Partition ends pace the fetches of a caught-up member (`source::pace`).
        .set("enable.partition.eof", "true")
        // What librdkafka prefetches per partition queue (the pipeline reads a queue only
        // while it has room, so this is the whole buffer ahead of it; a fetch may pass it by
        // one response). Measured: 5,000 events/s is 3.5 MB/s over 18 partitions, so 1 MiB
        // holds 5 s of each; draining at 17,000/s the broker's answers kept each queue fed.
        // 8 MiB each was 144 MiB for 18 partitions from a broker that honours fetch limits.
        .set("queued.max.messages.kbytes", "1024")
        // …and messages: each queued one costs librdkafka a 268-byte op besides its bytes
        // (54 MB for a 200,000-message backlog fetched at once).
        .set("queued.min.messages", "2000")
        .set("statistics.interval.ms", "5000")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", cfg.fetch_min_bytes.to_string())
        .create_with_context(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rxbytes: u64, fetches: i64) -> BrokerCounters {
        BrokerCounters { rxbytes, fetches }
    }

    #[test]
    fn a_fetch_response_is_bounded_by_what_its_broker_sent_in_the_interval() {
        assert_eq!(fetch_bytes_bound(at(100, 3), at(5_100, 4)), Some(5_000));
        assert_eq!(fetch_bytes_bound(at(100, 3), at(5_100, 9)), Some(5_000));
        // No fetch in the interval: heartbeats and commits are not fetch responses.
        assert_eq!(fetch_bytes_bound(at(100, 3), at(900, 3)), None);
        // A re-created connection or consumer starts its counters again.
        assert_eq!(fetch_bytes_bound(at(5_000, 3), at(100, 9)), None);
        assert_eq!(
            fetch_bytes_bound(BrokerCounters::default(), at(7, 1)),
            Some(7)
        );
    }
}
