//! The dead-letter topic: the original message (key, value, headers) plus headers saying
//! why (`dlq_kind`, `dlq_reason`, `dlq_projector`) and where it came from
//! (`dlq_source_topic`, `dlq_source_partition`, `dlq_source_offset`).

use futures::future::try_join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::kafka::base_client_config;
use crate::sinks::SinkError;
use crate::source::window::{Item, Origin, Window};

/// A Kafka message as it was: where it is, key, payload and headers (a dead letter's
/// original, or a message read back by the operators' tools).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Message {
    /// A record to `topic` with this message's key, the given payload and headers.
    pub fn record<'a>(
        &'a self,
        topic: &'a str,
        payload: Option<&'a [u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = &self.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = payload {
            record = record.payload(v);
        }
        record
    }
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// A contract error kind (poison), `rejected` (a projector refused it), `parked` (its
    /// stream is parked), `store_refused` (the store refused its document), `corrupt_view`
    /// (the stored document it applies to does not decode).
    pub kind: String,
    pub reason: String,
    pub projector: Option<&'static str>,
    /// The message refused, as it arrived.
    pub original: Message,
}

impl DeadLetter {
    /// A letter for one message of a window (its original bytes). `None` for events that did
    /// not come from Kafka (a replay records its refusals as parks only). An event filled
    /// from the event store into a live window has a letter too, with its topic but no
    /// position of its own (partition and offset -1): its bytes are the stored event.
    pub fn of(
        w: &Window,
        item: &Item,
        kind: &str,
        reason: String,
        projector: Option<&'static str>,
    ) -> Option<DeadLetter> {
        let (partition, offset) = match item.origin {
            Origin::Kafka {
                partition, offset, ..
            } => (partition, offset),
            Origin::Gap { .. } => (-1, -1),
            Origin::Replay { .. } => return None,
        };
        let a = &w.arena;
        Some(DeadLetter {
            kind: kind.to_owned(),
            reason,
            projector,
            original: Message {
                topic: w.topic(&item.origin).to_owned(),
                partition,
                offset,
                key: item.raw.key.as_ref().map(|r| a.get(r).to_vec()),
                payload: item.raw.payload.as_ref().map(|r| a.get(r).to_vec()),
                headers: item
                    .raw
                    .headers
                    .as_ref()
                    .map(|r| {
                        a.headers(r)
                            .map(|(k, v)| (k.to_owned(), v.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        })
    }

    /// Keep the letter under `max` bytes: an oversized payload keeps its head only, and says
    /// so (the whole message stays in its source topic at the offset named).
    fn fit(&self, max: usize) -> (Option<&[u8]>, Option<String>) {
        let m = &self.original;
        let Some(p) = m.payload.as_deref() else {
            return (None, None);
        };
        let overhead: usize = self.reason.len()
            + m.key.as_ref().map_or(0, Vec::len)
            + m.headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
            + 1024;
        let room = max.saturating_sub(overhead);
        if p.len() <= room {
            (Some(p), None)
        } else {
            (Some(&p[..room]), Some(p.len().to_string()))
        }
    }
}

pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    max_bytes: usize,
}

impl DeadLetterQueue {
    pub fn new(cfg: &KafkaConfig) -> Result<DeadLetterQueue, KafkaError> {
        Ok(DeadLetterQueue {
            producer: base_client_config(cfg)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.timeout.ms", "30000")
                .create()?,
            topic: cfg.dlq_topic.clone(),
            max_bytes: cfg.dlq_max_bytes,
        })
    }

    /// Send all and wait for the broker: the offsets they cover are committed only after.
    pub async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        let sends = letters.iter().map(|l| async move {
            let (payload, truncated) = l.fit(self.max_bytes);
            let m = &l.original;
            let partition = m.partition.to_string();
            let offset = m.offset.to_string();
            let mut pairs: Vec<(&str, Option<&[u8]>)> = m
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            pairs.extend([
                ("dlq_kind", Some(l.kind.as_bytes())),
                ("dlq_reason", Some(l.reason.as_bytes())),
                ("dlq_source_topic", Some(m.topic.as_bytes())),
                ("dlq_source_partition", Some(partition.as_bytes())),
                ("dlq_source_offset", Some(offset.as_bytes())),
                ("dlq_projector", Some(l.projector.unwrap_or("").as_bytes())),
            ]);
            if let Some(size) = &truncated {
                pairs.push(("dlq_truncated_from_bytes", Some(size.as_bytes())));
            }
            let record = m.record(&self.topic, payload, crate::kafka::headers_opt(pairs));
            crate::kafka::send(&self.producer, record).await
        });
        try_join_all(sends).await.map(|_| ()).map_err(|e| {
            let too_large = matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            );
            if too_large {
                SinkError::permanent("dead-letter topic", e)
            } else {
                SinkError::transient("dead-letter topic", e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: usize) -> DeadLetter {
        DeadLetter {
            kind: "oversized".into(),
            reason: "too big".into(),
            projector: None,
            original: Message {
                topic: "events.order".into(),
                partition: 1,
                offset: 7,
                key: Some(b"ord-1".to_vec()),
                payload: Some(vec![b'x'; payload]),
                headers: vec![("event_type".into(), Some(b"order.placed".to_vec()))],
            },
        }
    }

    #[test]
    fn oversized_letters_keep_the_head_of_their_payload_and_say_so() {
        let big = letter(2_000_000);
        let (p, t) = big.fit(900_000);
        assert!(p.unwrap().len() < 900_000);
        assert_eq!(t.as_deref(), Some("2000000"));
        let small = letter(1_000);
        let (p, t) = small.fit(900_000);
        assert_eq!(p.unwrap().len(), 1_000);
        assert!(t.is_none());
    }
}
