//! Kafka plumbing shared by the generator, the worker and the dead-letter queue.

mod admin;
mod publisher;

pub use admin::ensure_topics;
pub use publisher::EventPublisher;

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// Settings every client of ours starts from.
pub fn base_client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "projector")
        // Allow large fetches after a long pause (the local broker ignores fetch limits).
        .set("receive.message.max.bytes", "1000000000");
    c
}

/// The topics of the live feed, one per aggregate type.
pub fn event_topics(cfg: &KafkaConfig) -> Vec<String> {
    contract::AggregateType::ALL
        .iter()
        .map(|t| t.topic(&cfg.topic_prefix))
        .collect()
}
