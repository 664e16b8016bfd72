//! Property tests: round trips of every catalogue event, and no panic on any input.

use chrono::{DateTime, TimeZone, Utc};
use contract::catalogue::*;
use contract::{Event, EventData, EventEnvelope, RequiredHeaders};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use uuid::Uuid;

fn id() -> impl Strategy<Value = String> {
    "[a-z]{3}-[0-9a-f]{1,12}"
}

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, including quotes, escapes and astral planes.
    any::<String>().prop_map(|s| s.chars().take(40).collect())
}

fn money() -> impl Strategy<Value = f64> {
    (0u64..10_000_000).prop_map(|c| c as f64 / 100.0)
}

fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(text(), text(), 0..4)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

/// One payload per catalogue type; returns (aggregate_id, data).
fn payload() -> impl Strategy<Value = (String, EventData)> {
    (id(), id()).prop_flat_map(|(c, o)| {
        prop_oneof![
            (text(), text(), prop::option::of(text())).prop_map({
                let c = c.clone();
                move |(name, email, phone)| {
                    EventData::CustomerCreated(CustomerCreated {
                        customer_id: c.clone(),
                        name,
                        email,
                        phone,
                        address: Some(json!({"city": "Oslo"})),
                    })
                }
            }),
            (object(), object()).prop_map({
                let c = c.clone();
                move |(changes, previous_values)| {
                    EventData::CustomerUpdated(CustomerUpdated {
                        customer_id: c.clone(),
                        changes,
                        previous_values,
                    })
                }
            }),
            (text(), prop::option::of(0.0f64..=1.0)).prop_map({
                let c = c.clone();
                move |(kind, s)| {
                    EventData::InteractionRecorded(InteractionRecorded {
                        customer_id: c.clone(),
                        agent_id: "agent-1".into(),
                        interaction_id: "int-1".into(),
                        interaction_type: kind,
                        channel: None,
                        sentiment_score: s,
                    })
                }
            }),
            (
                prop::collection::vec((id(), 1u32..9, money()), 0..4),
                money(),
                object()
            )
                .prop_map({
                    let (c, o) = (c.clone(), o.clone());
                    move |(items, total, addr)| {
                        EventData::OrderPlaced(OrderPlaced {
                            order_id: o.clone(),
                            customer_id: c.clone(),
                            items: items
                                .into_iter()
                                .map(|(p, q, u)| OrderItem {
                                    product_id: p,
                                    quantity: q,
                                    unit_price: u,
                                })
                                .collect(),
                            shipping_address: addr,
                            total_amount: total,
                            currency: Some("EUR".into()),
                        })
                    }
                }),
            (text(), text()).prop_map({
                let (c, o) = (c.clone(), o.clone());
                move |(reason, by)| {
                    EventData::OrderCancelled(OrderCancelled {
                        order_id: o.clone(),
                        customer_id: c.clone(),
                        reason,
                        cancelled_by: by,
                        previous_status: "created".into(),
                    })
                }
            }),
            (text(), text()).prop_map({
                let (c, o) = (c.clone(), o.clone());
                move |(carrier, tracking_number)| {
                    EventData::OrderShipped(OrderShipped {
                        order_id: o.clone(),
                        customer_id: c.clone(),
                        carrier,
                        tracking_number,
                    })
                }
            }),
            (money(), object()).prop_map({
                let (c, o) = (c.clone(), o.clone());
                move |(amount, td)| {
                    EventData::OrderPaymentConfirmed(OrderPaymentConfirmed {
                        order_id: o.clone(),
                        customer_id: c.clone(),
                        payment_id: "pay-1".into(),
                        amount,
                        transaction_details: td,
                    })
                }
            }),
            (text(), text()).prop_map({
                let (c, o) = (c.clone(), o.clone());
                move |(subject, resolution)| {
                    if subject.len() % 2 == 0 {
                        EventData::TicketCreated(TicketCreated {
                            ticket_id: o.clone(),
                            customer_id: c.clone(),
                            subject,
                            priority: "high".into(),
                            channel: "email".into(),
                        })
                    } else {
                        EventData::TicketResolved(TicketResolved {
                            ticket_id: o.clone(),
                            customer_id: c.clone(),
                            resolution,
                        })
                    }
                }
            }),
        ]
        .prop_map(move |d| {
            let agg = d.own_aggregate_id().unwrap_or_default().to_owned();
            (agg, d)
        })
    })
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    (1_600_000_000_000i64..1_900_000_000_000).prop_map(|ms| Utc.timestamp_millis_opt(ms).unwrap())
}

proptest! {
    #[test]
    fn every_event_round_trips_through_json_and_headers(
        (agg, data) in payload(), seq in 0i64..1_000_000, pos in 1i64..i64::MAX,
        ts in timestamp(), uuid in any::<u128>(), meta in object(),
    ) {
        let mut e = Event::new(Uuid::from_u128(uuid), agg, seq, data.clone(), meta, ts).unwrap();
        e.header.global_position = pos;
        let bytes = e.to_json_bytes();
        let back = Event::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(&back.data, &data);
        let h = RequiredHeaders::for_event(&back.header);
        let pairs = h.pairs();
        let parsed = RequiredHeaders::from_pairs(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap();
        parsed.check_against(&back.header).unwrap();
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Event::decode(&bytes);
    }

    #[test]
    fn mutated_valid_events_never_panic(
        (agg, data) in payload(), field in 0usize..9, junk in prop_oneof![
            Just(Value::Null), any::<i64>().prop_map(Value::from), text().prop_map(Value::from),
            Just(json!([])), Just(json!({})), any::<f64>().prop_map(|f| json!(f))],
    ) {
        let e = Event::new(Uuid::nil(), agg, 0, data, Map::new(), Utc::now()).unwrap();
        let mut v = serde_json::to_value(e.to_envelope()).unwrap();
        let names = ["event_id", "aggregate_type", "aggregate_id", "sequence_number",
            "global_position", "event_type", "event_data", "metadata", "timestamp"];
        v[names[field]] = junk;
        let strict = EventEnvelope::from_value(v.clone()).and_then(|env| env.into_event());
        // The one-pass decoder agrees with the strict one on every input.
        let fast = Event::decode(&serde_json::to_vec(&v).unwrap());
        prop_assert_eq!(fast, strict);
    }
}
