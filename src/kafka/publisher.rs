//! Publishes committed events to their aggregate's topic, key = aggregate_id.

use contract::EventEnvelope;
use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::base_client_config;
use crate::config::KafkaConfig;

pub struct EventPublisher {
    producer: FutureProducer,
    prefix: String,
}

impl EventPublisher {
    pub fn new(cfg: &KafkaConfig) -> Result<EventPublisher, KafkaError> {
        let producer = base_client_config(cfg)
            // Idempotent: a retried send never writes an event twice, and order per key holds.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        Ok(EventPublisher {
            producer,
            prefix: cfg.topic_prefix.clone(),
        })
    }

    /// Read the cluster's metadata now (topics, leaders), so the first events sent do not
    /// wait for it: a timed load starts with a publisher that is ready.
    pub fn warm_up(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        use rdkafka::producer::Producer;
        self.producer
            .client()
            .fetch_metadata(None, timeout)
            .map(|_| ())
    }

    /// Send every event and wait until the broker has acknowledged all of them.
    pub async fn publish(&self, events: &[EventEnvelope]) -> Result<(), KafkaError> {
        let sends = events.iter().map(|e| {
            let topic = e.aggregate_type.topic(&self.prefix);
            let payload = e.to_json_bytes();
            let headers = super::event_headers(e);
            async move {
                let record = FutureRecord::to(&topic)
                    .key(&e.aggregate_id)
                    .payload(&payload)
                    .headers(headers);
                crate::kafka::send(&self.producer, record).await
            }
        });
        try_join_all(sends).await?;
        Ok(())
    }

    /// Send raw bytes (tests use it to inject poison messages).
    pub async fn publish_raw(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let headers = super::headers(headers.iter().copied());
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        crate::kafka::send(&self.producer, record).await
    }
}
