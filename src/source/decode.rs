use contract::{AggregateType, ContractError, Event, RequiredHeaders};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers, OwnedHeaders};

/// Where a message came from: enough to commit past it and to dead-letter it.
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The message's create time (ms since the epoch): latency is measured from it.
    pub timestamp_ms: Option<i64>,
}

/// A message that cannot be projected, with why.
#[derive(Debug, Clone)]
pub struct Poison {
    pub origin: Origin,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
    pub error: ContractError,
    /// The stream it belongs to, when the topic and key tell (`aggregate_type/aggregate_id`).
    pub stream: Option<String>,
}

/// A consumed message, decoded.
#[derive(Debug, Clone)]
pub enum Incoming {
    Event(Box<(Origin, Event)>),
    Poison(Box<Poison>),
}

/// Validate headers and body of one message; never panics, never fails the batch.
pub fn decode_message(msg: &BorrowedMessage<'_>, topic_prefix: &str) -> Incoming {
    let origin = Origin {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        timestamp_ms: msg.timestamp().to_millis(),
    };
    let result = (|| {
        let payload = msg
            .payload()
            .ok_or(ContractError::MissingField { field: "value" })?;
        let headers = msg
            .headers()
            .ok_or(ContractError::MissingHeader(contract::HEADER_EVENT_TYPE))?;
        let required = RequiredHeaders::from_pairs(headers.iter().map(|h| (h.key, h.value)))?;
        let event = Event::decode(payload)?;
        required.check_against(&event.envelope)?;
        Ok(event)
    })();
    match result {
        Ok(event) => Incoming::Event(Box::new((origin, event))),
        Err(error) => {
            let stream = stream_of(&origin, topic_prefix);
            Incoming::Poison(Box::new(Poison {
                payload: msg.payload().map(<[u8]>::to_vec),
                headers: msg.headers().map(|h| h.detach()),
                origin,
                error,
                stream,
            }))
        }
    }
}

/// The stream a message belongs to, from its topic and key (the body may be unreadable).
fn stream_of(origin: &Origin, topic_prefix: &str) -> Option<String> {
    let agg: AggregateType = origin.topic.strip_prefix(topic_prefix)?.parse().ok()?;
    let key = std::str::from_utf8(origin.key.as_deref()?).ok()?;
    Some(format!("{agg}/{key}"))
}
