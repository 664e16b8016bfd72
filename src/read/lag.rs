//! The live workers' consumer-group lag, asked of the broker in the background: readers take
//! the latest observation and never wait on a slow or absent broker.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;

use super::types::{Lag, PartitionLag};
use crate::config::Config;

const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct LagProbe {
    latest: Arc<RwLock<Option<Lag>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LagProbe {
    /// Start observing (every `every`). The probe reads committed offsets and the group's
    /// description only: it never joins the group, so it moves no partition.
    pub fn start(cfg: &Config, every: Duration) -> Result<LagProbe, KafkaError> {
        let consumer: BaseConsumer = crate::source::group::observer(
            &cfg.kafka,
            &cfg.kafka.group_id,
            rdkafka::consumer::DefaultConsumerContext,
        )?;
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
