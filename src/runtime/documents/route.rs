//! Route (pure): which events of a batch a document stage folds, into which view, and which
//! unreadable messages hold a stream. Nothing here reads a store or the cache.

use projectors::Projector;
use projectors::parking::ParkFrom;

use super::shard_of;
use crate::runtime::stage::{Batch, EventRef};

/// An unreadable message that tells its stream: the stream is held from `from` (the poison
/// stage records the park; a document stage holds the stream's later events meanwhile).
#[derive(Debug, Clone, PartialEq)]
pub struct PoisonMark {
    pub window: u64,
    pub stream: String,
    pub from: ParkFrom,
    pub reason: String,
}

/// A batch and the plan for it.
pub struct Routed {
    pub batch: Batch,
    /// This projector's events of this shard, in arrival order, with the view each names
    /// (`None`: it names none; only shard 0 takes those, to refuse them once).
    pub events: Vec<(EventRef, Option<String>)>,
    pub poison: Vec<PoisonMark>,
}

impl Routed {
    /// Whether an event of this batch goes to one of `keys`' views.
    pub fn touches(&self, mut has: impl FnMut(&str) -> bool) -> bool {
        self.events
            .iter()
            .any(|(_, k)| k.as_deref().is_some_and(&mut has))
    }
}

/// Route `batch` for projector `p`, shard `shard` of `shards`.
pub fn route<P: Projector>(p: &P, batch: Batch, shard: usize, shards: usize) -> Routed {
    let mut events = Vec::new();
    let mut poison = Vec::new();
    for (wi, w) in batch.windows.iter().enumerate() {
        for (ii, item) in w.items.iter().enumerate() {
            let e = match &item.decoded {
                Err(bad) => {
                    // Unreadable messages park their stream for every projector.
                    if let (Some(stream), Some(from)) = (&bad.stream, bad.park_from(&item.origin)) {
                        poison.push(PoisonMark {
                            window: w.id,
                            stream: stream.clone(),
                            from,
                            reason: bad.error.to_string(),
                        });
                    }
                    continue;
                }
                Ok(e) => e,
            };
            if !e.event_type().is_some_and(|t| p.handles().contains(&t)) {
                continue;
            }
            let r = (wi as u32, ii as u32);
            match p.view_key(e) {
                None if shard == 0 => events.push((r, None)),
                None => {}
                Some(k) if shard_of(k, shards) == shard => events.push((r, Some(k.to_owned()))),
                Some(_) => {}
            }
        }
    }
    Routed {
        batch,
        events,
        poison,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use contract::catalogue::{CustomerCreated, OrderPlaced};
    use contract::{Event, EventData};
    use projectors::customer360::Customer360Projector;
    use projectors::order_view::OrderViewProjector;
    use uuid::Uuid;

    use super::*;
    use crate::source::window::{Arena, Item, Origin, RawRef, Window};

    fn customer(id: &str) -> Event {
        Event::new(
            Uuid::new_v4(),
            id,
            0,
            EventData::CustomerCreated(CustomerCreated {
                customer_id: id.to_owned(),
                name: "A".into(),
                email: format!("{id}@example.com"),
                phone: None,
                address: None,
            }),
            Default::default(),
            chrono::Utc::now(),
        )
        .expect("a catalogue event")
    }

    fn batch(events: Vec<Event>) -> Batch {
        let items = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| Item {
                origin: Origin::Kafka {
                    topic: 0,
                    partition: 0,
                    offset: i as i64,
                    epoch: 1,
                    timestamp_ms: None,
                },
                decoded: Ok(e),
                raw: RawRef::default(),
            })
            .collect();
        let w = Window {
            id: 7,
            generation: 1,
            items,
            arena: Arena::default(),
            topics: Arc::new(vec!["events.customer".into()]),
            opened: std::time::Instant::now(),
            span: tracing::Span::none(),
        };
        Batch {
            windows: vec![Arc::new(w)],
            span: tracing::Span::none(),
        }
    }

    #[test]
    fn each_shard_takes_its_own_views_in_arrival_order() {
        let ids = ["c1", "c2", "c3", "c4", "c5", "c6", "c1"];
        let all = || batch(ids.iter().map(|i| customer(i)).collect());
        let mut seen = Vec::new();
        for shard in 0..3 {
            let r = route(&Customer360Projector, all(), shard, 3);
            for (at, key) in &r.events {
                let key = key.clone().expect("customer events name their view");
                assert_eq!(shard_of(&key, 3), shard);
                seen.push((*at, key));
            }
        }
        seen.sort();
        let keys: Vec<&str> = seen.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(keys, ids, "every event routed once, to one shard");
    }

    #[test]
    fn events_a_projector_does_not_handle_are_not_routed() {
        let placed = Event::new(
            Uuid::new_v4(),
            "o1",
            0,
            EventData::OrderPlaced(OrderPlaced {
                order_id: "o1".into(),
                customer_id: "c1".into(),
                items: Vec::new(),
                shipping_address: Default::default(),
                total_amount: 1.0,
                currency: None,
            }),
            Default::default(),
            chrono::Utc::now(),
        )
        .expect("a catalogue event");
        let r = route(
            &OrderViewProjector,
            batch(vec![customer("c1"), placed]),
            0,
            1,
        );
        assert_eq!(r.events, vec![((0, 1), Some("o1".to_owned()))]);
        assert!(r.touches(|k| k == "o1"));
        assert!(!r.touches(|k| k == "c1"));
    }
}
