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
    decode_all_with(raw, arena, topics, topic_prefix, &Event::decode)
}

/// [`decode_all`] with the body decoder as a parameter (tests inject one that panics).
fn decode_all_with<D>(
    raw: Vec<RawItem>,
    arena: &Arena,
    topics: &[String],
    topic_prefix: &str,
    decode: &D,
) -> Vec<Item>
where
    D: Fn(&[u8]) -> Result<Event, ContractError> + Sync,
{
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if raw.len() < PARALLEL_FROM || threads < 2 {
        return raw
            .into_iter()
            .map(|r| decode_one_with(r, arena, topics, topic_prefix, decode))
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
            .iter()
            .map(|c| {
                s.spawn(move || {
                    c.iter()
                        .map(|r| decode_one_with(r.clone(), arena, topics, topic_prefix, decode))
                        .collect::<Vec<Item>>()
                })
            })
            .collect();
        // A decode never panics (caught per message), but should a chunk's thread die all the
        // same, its messages are decoded again here, one by one: none may vanish, or its
        // offset would be committed with nothing applied and no dead letter.
        handles
            .into_iter()
            .zip(&chunks)
            .flat_map(|(h, c)| {
                h.join().unwrap_or_else(|_| {
                    c.iter()
                        .map(|r| decode_one_with(r.clone(), arena, topics, topic_prefix, decode))
                        .collect()
                })
            })
            .collect()
    })
}

/// Validate headers and body of one message; never panics, never fails the window.
pub fn decode_one(r: RawItem, arena: &Arena, topics: &[String], topic_prefix: &str) -> Item {
    decode_one_with(r, arena, topics, topic_prefix, &Event::decode)
}

fn decode_one_with<D>(
    r: RawItem,
    arena: &Arena,
    topics: &[String],
    topic_prefix: &str,
    decode: &D,
) -> Item
where
    D: Fn(&[u8]) -> Result<Event, ContractError>,
{
    let headers = || r.raw.headers.as_ref().map(|h| arena.headers(h));
    // A panic in the decoder (a bug) makes this one message poison, with the panic as its
    // reason; the rest of the window goes on. Unwind-safe enough: the closure only reads the
    // arena, and whatever it built is dropped with the panic.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let payload = r
            .raw
            .payload
            .as_ref()
            .ok_or(ContractError::MissingField { field: "value" })?;
        let h = headers().ok_or(ContractError::MissingHeader(contract::HEADER_EVENT_TYPE))?;
        let required = RequiredHeaders::from_pairs(h)?;
        let event = decode(arena.get(payload))?;
        required.check_against(&event.header)?;
        Ok(event)
    }))
    .unwrap_or_else(|panic| {
        Err(ContractError::DecoderPanic {
            reason: panic_message(panic.as_ref()),
        })
    });
    let decoded = result.map_err(|error| {
        // Header and topic parsing are plain reads, but a poison item must come out even
        // if they too hit a bug (then it is dead-lettered without a stream to park).
        let (stream, sequence) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let sequence = headers().and_then(|h| {
                h.into_iter()
                    .find(|(k, _)| *k == contract::HEADER_SEQUENCE)
                    .and_then(|(_, v)| std::str::from_utf8(v?).ok()?.parse().ok())
            });
            (stream_of(&r, arena, topics, topic_prefix), sequence)
        }))
        .unwrap_or((None, None));
        Poison {
            stream,
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

/// What a panic said (its payload is a `&str` or a `String` when raised by `panic!`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
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

#[cfg(test)]
mod tests {
    use contract::RequiredHeaders;

    use super::*;

    /// `n` valid `order.shipped` messages (one stream per message) on topic 1 (`order`).
    fn window(n: usize) -> (Vec<RawItem>, Arena, Vec<String>) {
        let topics: Vec<String> = AggregateType::ALL
            .iter()
            .map(|a| a.topic("events."))
            .collect();
        let order = AggregateType::ALL
            .iter()
            .position(|a| *a == AggregateType::Order)
            .expect("order is an aggregate type") as u16;
        let mut arena = Arena::with_capacity(n * 600);
        let mut raw = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("ord-{i}");
            let body = serde_json::json!({
                "event_id": format!("0b6c7c1e-8d3f-4a53-9a43-{i:012x}"),
                "aggregate_type": "order",
                "aggregate_id": id,
                "sequence_number": 3,
                "global_position": 1000 + i,
                "event_type": "order.shipped",
                "event_data": {"order_id": id, "customer_id": "cus-7", "carrier": "UPS",
                               "tracking_number": "1Z999"},
                "metadata": {"correlation_id": "c-1", "causation_id": "c-0"},
                "timestamp": "2026-11-22T10:00:00.123Z"
            });
            let headers = RequiredHeaders {
                event_type: "order.shipped".into(),
                aggregate_type: AggregateType::Order,
                sequence: 3,
            }
            .pairs();
            let r = RawRef {
                key: Some(arena.push(id.as_bytes())),
                payload: Some(arena.push(&serde_json::to_vec(&body).expect("json"))),
                headers: Some(
                    arena.push_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                ),
            };
            raw.push(RawItem {
                origin: Origin::Kafka {
                    topic: order,
                    partition: 0,
                    offset: i as i64,
                    epoch: 0,
                    timestamp_ms: None,
                },
                raw: r,
            });
        }
        (raw, arena, topics)
    }

    /// A decoder that panics on one message (`ord-<bad>`) and decodes the others.
    fn panicking_on(bad: usize) -> impl Fn(&[u8]) -> Result<Event, ContractError> + Sync {
        let needle = format!(r#""aggregate_id":"ord-{bad}""#);
        move |bytes: &[u8]| {
            if std::str::from_utf8(bytes).is_ok_and(|s| s.contains(&needle)) {
                panic!("injected decoder bug");
            }
            Event::decode(bytes)
        }
    }

    /// A decoder panic loses no message: the others decode, the one it hit becomes poison
    /// (`decoder_panic`, with its stream and sequence, so it is dead-lettered and parked).
    #[test]
    fn a_decoder_panic_becomes_poison_and_drops_nothing() {
        // Small (on the calling thread) and large (in chunks on threads) windows.
        for n in [PARALLEL_FROM * 4, 10] {
            let bad = n / 2 + 1;
            let (raw, arena, topics) = window(n);
            let items = decode_all_with(raw, &arena, &topics, "events.", &panicking_on(bad));
            assert_eq!(items.len(), n, "window of {n}: a message vanished");
            for (i, item) in items.iter().enumerate() {
                assert_eq!(item.origin.position(), Some((0, i as i64)), "order kept");
                match &item.decoded {
                    Ok(e) if i != bad => assert_eq!(e.header.aggregate_id, format!("ord-{i}")),
                    Err(p) if i == bad => {
                        assert_eq!(p.error.kind(), "decoder_panic");
                        assert!(p.error.to_string().contains("injected decoder bug"));
                        assert_eq!(p.stream.as_deref(), Some(&*format!("order/ord-{i}")));
                        assert_eq!(p.sequence, Some(3));
                    }
                    other => panic!("window of {n}, message {i}: {other:?}"),
                }
            }
        }
    }
}
