//! Decode: the raw messages of a window → typed events (or poison, with why). Pure; a large
//! window is decoded on every core at once.

use contract::{AggregateType, ContractError, Event, RequiredHeaders};

use super::window::{Arena, Item, Origin, Poison, RawRef};

/// A polled message not decoded yet.
#[derive(Debug, Clone)]
pub struct RawItem {
    pub origin: Origin,
    pub raw: RawRef,
}

/// Below this many messages a window is decoded on the calling thread.
const PARALLEL_FROM: usize = 512;

/// Decode every message of a window, in order.
pub fn decode_all(
    raw: Vec<RawItem>,
    arena: &Arena,
    topics: &[String],
    topic_prefix: &str,
) -> Vec<Item> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if raw.len() < PARALLEL_FROM || threads < 2 {
        return raw
            .into_iter()
            .map(|r| decode_one(r, arena, topics, topic_prefix))
            .collect();
    }
    let per = raw.len().div_ceil(threads);
    let mut chunks: Vec<Vec<RawItem>> = Vec::new();
    let mut it = raw.into_iter();
    loop {
        let c: Vec<RawItem> = it.by_ref().take(per).collect();
        if c.is_empty() {
            break;
        }
        chunks.push(c);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    c.into_iter()
                        .map(|r| decode_one(r, arena, topics, topic_prefix))
                        .collect::<Vec<Item>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Validate headers and body of one message; never panics, never fails the window.
pub fn decode_one(r: RawItem, arena: &Arena, topics: &[String], topic_prefix: &str) -> Item {
    let headers = || r.raw.headers.as_ref().map(|h| arena.headers(h));
    let result = (|| {
        let payload = r
            .raw
            .payload
            .as_ref()
            .ok_or(ContractError::MissingField { field: "value" })?;
        let h = headers().ok_or(ContractError::MissingHeader(contract::HEADER_EVENT_TYPE))?;
        let required = RequiredHeaders::from_pairs(h)?;
        let event = Event::decode(arena.get(payload))?;
        required.check_against(&event.header)?;
        Ok(event)
    })();
    let decoded = result.map_err(|error| {
        let sequence = headers().and_then(|h| {
            h.into_iter()
                .find(|(k, _)| *k == contract::HEADER_SEQUENCE)
                .and_then(|(_, v)| std::str::from_utf8(v?).ok()?.parse().ok())
        });
        Poison {
            stream: stream_of(&r, arena, topics, topic_prefix),
            sequence,
            error,
        }
    });
    Item {
        origin: r.origin,
        decoded,
        raw: r.raw,
    }
}

/// The stream a message belongs to, from its topic and key (the body may be unreadable).
fn stream_of(r: &RawItem, arena: &Arena, topics: &[String], topic_prefix: &str) -> Option<String> {
    let Origin::Kafka { topic, .. } = r.origin else {
        return None;
    };
    let agg: AggregateType = topics
        .get(topic as usize)?
        .strip_prefix(topic_prefix)?
        .parse()
        .ok()?;
    let key = std::str::from_utf8(arena.get(r.raw.key.as_ref()?)).ok()?;
    Some(format!("{agg}/{key}"))
}
