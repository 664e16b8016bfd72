//! The live workers' consumer-group lag, asked of the broker in the background: readers take
//! the latest observation and never wait on a slow or absent broker.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;

use super::types::{Lag, PartitionLag};
use crate::config::Config;

const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct LagProbe {
    /// The latest observation per consumer group.
    latest: Arc<RwLock<HashMap<String, Lag>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LagProbe {
    /// Start observing `groups` (every `every`). The probe reads committed offsets and each
    /// group's description only: it never joins a group, so it moves no partition.
    pub fn start(cfg: &Config, groups: &[String], every: Duration) -> Result<LagProbe, KafkaError> {
        let mut observers = Vec::new();
        for g in groups {
            let c: BaseConsumer = crate::source::group::observer(
                &cfg.kafka,
                g,
                rdkafka::consumer::DefaultConsumerContext,
            )?;
            observers.push((g.clone(), Arc::new(c)));
        }
        let latest = Arc::new(RwLock::new(HashMap::new()));
        let topics = crate::kafka::event_topics(&cfg.kafka);
        let task = {
            let latest = latest.clone();
            tokio::spawn(async move {
                loop {
                    for (g, c) in &observers {
                        let (c, t, g) = (c.clone(), topics.clone(), g.clone());
                        match tokio::task::spawn_blocking(move || observe(&c, &t, &g)).await {
                            Ok(Ok(lag)) => {
                                if let Ok(mut slot) = latest.write() {
                                    slot.insert(lag.group.clone(), lag);
                                }
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "consumer lag not observed"),
                            Err(e) => tracing::warn!(error = %e, "lag probe task failed"),
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        Ok(LagProbe { latest, task })
    }

    /// The latest observation of `group` (its `observed_at` says how old it is).
    pub fn latest(&self, group: &str) -> Option<Lag> {
        self.latest.read().ok().and_then(|l| l.get(group).cloned())
    }

    /// The group furthest behind, of those observed.
    pub fn worst(&self) -> Option<Lag> {
        let l = self.latest.read().ok()?;
        l.values()
            .max_by_key(|g| (g.messages, g.unowned_partitions))
            .cloned()
    }

    /// Whether every group has been observed once.
    pub fn observed_all(&self, groups: usize) -> bool {
        self.latest.read().is_ok_and(|l| l.len() >= groups)
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn observe(c: &BaseConsumer, topics: &[String], group: &str) -> Result<Lag, KafkaError> {
    let obs = crate::source::group::observe(c, group, topics, ASK_TIMEOUT)?;
    let mut lag = Lag {
        group: group.to_owned(),
        messages: obs.lag(),
        partitions: Vec::new(),
        unowned_partitions: obs.unowned().len() as u32,
        observed_at: super::now(),
    };
    for ((topic, partition), p) in &obs.partitions {
        if p.lag() > 0 {
            lag.partitions.push(PartitionLag {
                topic: topic.clone(),
                partition: *partition,
                committed: p.committed.unwrap_or(-1),
                high_watermark: p.high,
                lag: p.lag(),
                owner: p.owner.clone(),
            });
        }
    }
    Ok(lag)
}
