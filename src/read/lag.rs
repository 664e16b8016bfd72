//! The live workers' consumer-group lag, asked of the broker in the background: readers take
//! the latest observation and never wait on a slow or absent broker.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::types::{Lag, PartitionLag};
use crate::config::Config;

const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct LagProbe {
    latest: Arc<RwLock<Option<Lag>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LagProbe {
    /// Start observing (every `every`). The probe reads committed offsets only: it never
    /// joins the group, so it moves no partition.
    pub fn start(cfg: &Config, every: Duration) -> Result<LagProbe, KafkaError> {
        let consumer: BaseConsumer = crate::kafka::base_client_config(&cfg.kafka)
            .set("group.id", &cfg.kafka.group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        let consumer = Arc::new(consumer);
        let latest = Arc::new(RwLock::new(None));
        let (topics, group) = (
            crate::kafka::event_topics(&cfg.kafka),
            cfg.kafka.group_id.clone(),
        );
        let task = {
            let latest = latest.clone();
            tokio::spawn(async move {
                loop {
                    let (c, t, g) = (consumer.clone(), topics.clone(), group.clone());
                    match tokio::task::spawn_blocking(move || observe(&c, &t, &g)).await {
                        Ok(Ok(lag)) => {
                            if let Ok(mut slot) = latest.write() {
                                *slot = Some(lag);
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "consumer lag not observed"),
                        Err(e) => tracing::warn!(error = %e, "lag probe task failed"),
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        Ok(LagProbe { latest, task })
    }

    /// The latest observation (its `observed_at` says how old it is).
    pub fn latest(&self) -> Option<Lag> {
        self.latest.read().ok().and_then(|l| l.clone())
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn observe(c: &BaseConsumer, topics: &[String], group: &str) -> Result<Lag, KafkaError> {
    let metadata = c.fetch_metadata(None, ASK_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        if topics.iter().any(|n| n == t.name()) {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = c.committed_offsets(tpl, ASK_TIMEOUT)?;
    let mut lag = Lag {
        group: group.to_owned(),
        messages: 0,
        partitions: Vec::new(),
        observed_at: super::now(),
    };
    for e in committed.elements() {
        let (low, high) = c.fetch_watermarks(e.topic(), e.partition(), ASK_TIMEOUT)?;
        let done = match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        };
        let behind = (high - done.max(low)).max(0);
        lag.messages += behind;
        if behind > 0 {
            lag.partitions.push(PartitionLag {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                committed: done,
                high_watermark: high,
                lag: behind,
            });
        }
    }
    Ok(lag)
}
