//! Operators' side of the dead-letter topic: read the letters back (with their reasons and
//! origins), fetch a letter's original message from its source topic, and send it again to
//! that topic so it goes through the normal, guarded path (a duplicate changes nothing).
//! Nothing here joins the workers' group or commits offsets: it is safe while workers run.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

pub use super::dead_letter::Message;
use crate::config::KafkaConfig;
use crate::kafka::base_client_config;

const ASK: Duration = Duration::from_secs(5);

impl Message {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The original message's headers (without the dead-letter ones).
    pub fn original_headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        self.headers
            .iter()
            .filter(|(k, _)| !k.starts_with("dlq_"))
            .cloned()
            .collect()
    }
}

/// A dead letter, decoded from its headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    pub message: Message,
    pub kind: String,
    pub reason: String,
    pub projector: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// `aggregate_type/aggregate_id` and sequence, when the original headers and key say.
    pub stream: Option<String>,
    pub sequence: Option<i64>,
    pub event_type: Option<String>,
    /// The letter holds only the head of a payload this large.
    pub truncated_from: Option<usize>,
}

impl Letter {
    pub fn of(raw: Message) -> Letter {
        let h = |n: &str| raw.header(n);
        let key = raw
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let stream = match (h(contract::headers::HEADER_AGGREGATE_TYPE), key) {
            (Some(t), Some(id)) => Some(format!("{t}/{id}")),
            _ => None,
        };
        Letter {
            kind: h("dlq_kind").unwrap_or_default(),
            reason: h("dlq_reason").unwrap_or_default(),
            projector: h("dlq_projector").unwrap_or_default(),
            source_topic: h("dlq_source_topic").unwrap_or_default(),
            source_partition: h("dlq_source_partition")
                .and_then(|p| p.parse().ok())
                .unwrap_or(-1),
            source_offset: h("dlq_source_offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(-1),
            stream,
            sequence: h(contract::headers::HEADER_SEQUENCE).and_then(|s| s.parse().ok()),
            event_type: h(contract::headers::HEADER_EVENT_TYPE),
            truncated_from: h("dlq_truncated_from_bytes").and_then(|s| s.parse().ok()),
            message: raw,
        }
    }

    /// `partition:offset` in the dead-letter topic: how commands name a letter.
    pub fn id(&self) -> String {
        format!("{}:{}", self.message.partition, self.message.offset)
    }
}

fn reader(cfg: &KafkaConfig) -> Result<BaseConsumer, KafkaError> {
    base_client_config(cfg)
        // A group of its own, never committed: reading moves nobody's offsets.
        .set(
            "group.id",
            format!("projector-dlq-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
}

fn message_of<M: rdkafka::message::Message>(m: &M) -> Message {
    Message {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Every letter of the dead-letter topic, oldest first per partition (blocking).
pub fn read_letters(cfg: &KafkaConfig) -> Result<Vec<Letter>, KafkaError> {
    let c = reader(cfg)?;
    let topic = &cfg.dlq_topic;
    let metadata = c.fetch_metadata(Some(topic), ASK)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(topic, p.id(), ASK)?;
            if high > low {
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
                ends.push((p.id(), high));
            }
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = |out: &[Letter]| {
        ends.iter().all(|(p, high)| {
            out.iter()
                .any(|l| l.message.partition == *p && l.message.offset + 1 >= *high)
        })
    };
    while !done(&out) && Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(Letter::of(message_of(&m))),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    out.sort_by_key(|l| (l.message.partition, l.message.offset));
    Ok(out)
}

/// The message at (topic, partition, offset), if it is still there (blocking).
pub fn read_message(
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<Message>, KafkaError> {
    let c = reader(cfg)?;
    let (low, high) = c.fetch_watermarks(topic, partition, ASK)?;
    if offset < low || offset >= high {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    c.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == offset => return Ok(Some(message_of(&m))),
            Some(Ok(_)) | None => {}
            Some(Err(e)) => return Err(e),
        }
    }
    Ok(None)
}

/// Send a message again to its topic, with its key and headers.
pub async fn republish(cfg: &KafkaConfig, m: &Message) -> Result<(), KafkaError> {
    let producer: FutureProducer = base_client_config(cfg)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let headers =
        crate::kafka::headers_opt(m.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
    crate::kafka::send(&producer, m.record(&m.topic, m.payload.as_deref(), headers)).await
}
