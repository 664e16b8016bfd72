//! The dead-letter topic: the original message, untouched, plus headers saying why.

use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::kafka::base_client_config;
use crate::source::Poison;

/// One dead letter: a poison message, or an event a projector refused.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub poison: Poison,
    /// `contract error kind`, `rejected` (by a projector) or `parked` (its stream is parked).
    pub kind: String,
    pub reason: String,
    pub projector: Option<&'static str>,
}

pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterQueue {
    pub fn new(cfg: &KafkaConfig) -> Result<DeadLetterQueue, KafkaError> {
        Ok(DeadLetterQueue {
            producer: base_client_config(cfg)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .create()?,
            topic: cfg.dlq_topic.clone(),
        })
    }

    /// Send all and wait for the broker: offsets are committed only after.
    pub async fn send(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let sends = letters.iter().map(|l| {
            let p = &l.poison;
            let partition = p.origin.partition.to_string();
            let offset = p.origin.offset.to_string();
            let original = p
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .map(|h| (h.key, h.value.unwrap_or_default()));
            let why = [
                ("dlq_kind", l.kind.as_bytes()),
                ("dlq_reason", l.reason.as_bytes()),
                ("dlq_source_topic", p.origin.topic.as_bytes()),
                ("dlq_source_partition", partition.as_bytes()),
                ("dlq_source_offset", offset.as_bytes()),
                ("dlq_projector", l.projector.unwrap_or("").as_bytes()),
            ];
            let headers = crate::kafka::headers(original.chain(why));
            async move {
                let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
                if let Some(k) = &p.origin.key {
                    record = record.key(k.as_slice());
                }
                if let Some(v) = &p.payload {
                    record = record.payload(v.as_slice());
                }
                crate::kafka::send(&self.producer, record).await
            }
        });
        try_join_all(sends).await?;
        Ok(())
    }
}
