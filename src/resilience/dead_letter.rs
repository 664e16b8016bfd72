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

    /// The letter as sent, under `max` bytes whole: key, headers (the original's and ours),
    /// reason and payload. What does not fit is cut from the end of each, in this order of
    /// sacrifice — the payload, then the original's headers, then the key, then the reason —
    /// and a header says what was cut (the whole message stays in its source topic at the
    /// offset named).
    pub fn fit(&self, max: usize) -> Fitted<'_> {
        /// Our own headers besides the reason and the cut notes: names, numbers, a projector.
        const OURS: usize = 512;
        let m = &self.original;
        let max = max.max(2 * OURS);
        let mut room = max - OURS;
        let mut notes = Vec::new();
        let reason = cut(&self.reason, (room / 4).min(16 * 1024));
        if reason.len() < self.reason.len() {
            notes.push(("dlq_truncated_reason_from_bytes", self.reason.len()));
        }
        room -= reason.len();
        let key = m.key.as_deref().map(|k| {
            let keep = k.len().min(room / 4);
            if keep < k.len() {
                notes.push(("dlq_truncated_key_from_bytes", k.len()));
            }
            &k[..keep]
        });
        room -= key.map_or(0, <[u8]>::len);
        let mut headers = Vec::new();
        let mut budget = room / 2;
        for (k, v) in &m.headers {
            let size = k.len() + v.as_ref().map_or(0, Vec::len) + 8;
            if size > budget {
                notes.push(("dlq_dropped_headers", m.headers.len() - headers.len()));
                break;
            }
            budget -= size;
            room -= size;
            headers.push((k.as_str(), v.as_deref()));
        }
        room = room.saturating_sub(notes.len() * 48 + 48);
        let payload = m.payload.as_deref().map(|p| {
            if p.len() > room {
                notes.push(("dlq_truncated_from_bytes", p.len()));
                &p[..room]
            } else {
                p
            }
        });
        Fitted {
            key,
            payload,
            headers,
            reason,
            notes: notes.into_iter().map(|(k, n)| (k, n.to_string())).collect(),
        }
    }

    /// The same letter with only its coordinates and reason: what is sent when the broker
    /// refuses the fitted letter for good (its limit is below `dlq_max_bytes`).
    pub fn bare(&self) -> DeadLetter {
        let mut l = self.clone();
        l.reason = cut(&self.reason, 1024).to_owned();
        l.original.payload = None;
        l.original.headers.clear();
        l.original.key = l.original.key.map(|k| k[..k.len().min(256)].to_vec());
        l
    }
}

/// The head of `s`, at most `max` bytes, cut on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A dead letter cut to fit (see [`DeadLetter::fit`]).
#[derive(Debug)]
pub struct Fitted<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// The original's headers kept.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    pub reason: &'a str,
    /// (header, original size or count) of what was cut.
    pub notes: Vec<(&'static str, String)>,
}

impl Fitted<'_> {
    /// Bytes on the wire, about: what the broker's limit is compared with.
    pub fn size(&self) -> usize {
        self.key.map_or(0, <[u8]>::len)
            + self.payload.map_or(0, <[u8]>::len)
            + self.reason.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len) + 8)
                .sum::<usize>()
            + self
                .notes
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
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

    /// The dead-letter topic's partitions and their leaders, as this very producer's client
    /// sees them (`projector doctor`: a topic it can write). Blocks up to `timeout`.
    pub fn leaders(&self, timeout: std::time::Duration) -> Result<Vec<(i32, i32)>, KafkaError> {
        use rdkafka::producer::Producer;
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| (p.id(), p.leader())))
            .collect())
    }

    /// Send all and wait for the broker: the offsets they cover are committed only after.
    pub async fn send(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        let sends = letters.iter().map(|l| async move {
            let f = l.fit(self.max_bytes);
            let m = &l.original;
            let partition = m.partition.to_string();
            let offset = m.offset.to_string();
            let mut pairs = f.headers.clone();
            pairs.extend([
                ("dlq_kind", Some(l.kind.as_bytes())),
                ("dlq_reason", Some(f.reason.as_bytes())),
                ("dlq_source_topic", Some(m.topic.as_bytes())),
                ("dlq_source_partition", Some(partition.as_bytes())),
                ("dlq_source_offset", Some(offset.as_bytes())),
                ("dlq_projector", Some(l.projector.unwrap_or("").as_bytes())),
            ]);
            for (k, v) in &f.notes {
                pairs.push((k, Some(v.as_bytes())));
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
                .headers(crate::kafka::headers_opt(pairs));
            if let Some(k) = f.key {
                record = record.key(k);
            }
            if let Some(v) = f.payload {
                record = record.payload(v);
            }
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
        let f = big.fit(900_000);
        assert!(f.payload.unwrap().len() < 900_000);
        assert!(f.size() <= 900_000);
        assert_eq!(
            f.notes,
            vec![("dlq_truncated_from_bytes", "2000000".to_owned())]
        );
        let small = letter(1_000);
        let f = small.fit(900_000);
        assert_eq!(f.payload.unwrap().len(), 1_000);
        assert!(f.notes.is_empty());
        assert_eq!(f.key, Some(&b"ord-1"[..]));
    }

    #[test]
    fn a_letter_fits_whatever_its_key_headers_and_reason_weigh() {
        let mut l = letter(10_000);
        l.original.key = Some(vec![b'k'; 3_000_000]);
        l.original.headers = (0..5_000)
            .map(|i| (format!("h{i}"), Some(vec![b'v'; 1_000])))
            .collect();
        l.reason = "é".repeat(1_000_000);
        for max in [1_000, 64 * 1024, 1_000_000] {
            let f = l.fit(max);
            assert!(f.size() <= max.max(1024), "{max}: {} bytes", f.size());
            let cut: Vec<&str> = f.notes.iter().map(|(k, _)| *k).collect();
            assert!(
                cut.contains(&"dlq_truncated_key_from_bytes"),
                "{max}: {cut:?}"
            );
            assert!(cut.contains(&"dlq_dropped_headers"), "{max}: {cut:?}");
            assert!(
                cut.contains(&"dlq_truncated_reason_from_bytes"),
                "{max}: {cut:?}"
            );
            assert!(std::str::from_utf8(f.reason.as_bytes()).is_ok());
        }
        let bare = l.bare();
        assert!(bare.original.payload.is_none() && bare.original.headers.is_empty());
        assert!(bare.fit(1_000).size() <= 1_024);
    }
}
