//! Kafka plumbing shared by the generator, the worker and the dead-letter queue.

mod admin;
mod publisher;

pub use admin::{delete_topics, ensure_topics};
pub use publisher::EventPublisher;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;

/// Settings every client of ours starts from.
pub fn base_client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "projector")
        // The local broker ignores fetch size limits: a fetch after a pause can return a
        // partition's whole backlog, so the client must accept responses that large.
        .set(
            "receive.message.max.bytes",
            cfg.receive_message_max_bytes.to_string(),
        )
        // With a broker that honours it, this bounds each fetch response (and the memory).
        .set("fetch.max.bytes", cfg.fetch_max_bytes.to_string());
    c
}

/// The topics of the live feed, one per aggregate type.
pub fn event_topics(cfg: &KafkaConfig) -> Vec<String> {
    contract::AggregateType::ALL
        .iter()
        .map(|t| t.topic(&cfg.topic_prefix))
        .collect()
}

/// Kafka headers from `(name, value)` pairs.
pub fn headers<K: AsRef<str>, V: AsRef<[u8]>>(
    pairs: impl IntoIterator<Item = (K, V)>,
) -> OwnedHeaders {
    pairs.into_iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k.as_ref(),
            value: Some(v.as_ref()),
        })
    })
}

/// Kafka headers from `(name, value)` pairs, where a value may be null.
pub fn headers_opt<'a>(
    pairs: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header { key, value })
        })
}

/// The headers of an event as published (DESIGN §1).
pub fn event_headers(e: &contract::EventEnvelope) -> OwnedHeaders {
    headers(contract::RequiredHeaders::for_event(e).pairs())
}

/// Send one record and wait for the broker's acknowledgement (retrying a full queue for 30 s).
pub async fn send<K, P>(
    producer: &FutureProducer,
    record: FutureRecord<'_, K, P>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    producer
        .send(record, std::time::Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(err, _)| err)
}
