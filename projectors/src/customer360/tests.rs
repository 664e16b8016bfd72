use chrono::{Duration, TimeZone, Utc};
use contract::catalogue::*;
use contract::{Event, EventData};
use serde_json::{Map, json};
use uuid::Uuid;

use super::*;
use crate::DynProjector;
use crate::memory::MemoryViews;

fn ev(agg: &str, seq: i64, minute: i64, data: EventData) -> Event {
    let t = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap() + Duration::minutes(minute);
    Event::new(Uuid::new_v4(), agg, seq, data, Map::new(), t).unwrap()
}

fn interaction(seq: i64, minute: i64, score: Option<f64>) -> Event {
    ev(
        "cus-1",
        seq,
        minute,
        EventData::InteractionRecorded(InteractionRecorded {
            customer_id: "cus-1".into(),
            agent_id: "a".into(),
            interaction_id: format!("i{seq}"),
            interaction_type: if seq % 2 == 0 {
                "chat".into()
            } else {
                "call".into()
            },
            channel: None,
            sentiment_score: score,
        }),
    )
}

fn created() -> Event {
    ev(
        "cus-1",
        0,
        0,
        EventData::CustomerCreated(CustomerCreated {
            customer_id: "cus-1".into(),
            name: "Ada".into(),
            email: "ada@x".into(),
            phone: None,
            address: None,
        }),
    )
}

fn view(events: &[Event]) -> Customer360 {
    let mut m = MemoryViews::default();
    m.apply(&Customer360Projector, events).unwrap();
    serde_json::from_value(serde_json::Value::Object(m.docs["cus-1"].view.clone())).unwrap()
}

#[test]
fn sentiment_ema_takes_the_first_score_as_is_then_weights_new_scores_by_0_3() {
    let v = view(&[
        created(),
        interaction(1, 1, Some(0.8)),
        interaction(2, 2, None),
        interaction(3, 3, Some(0.2)),
    ]);
    let avg = v.interactions.sentiment_avg.unwrap();
    assert!((avg - (0.3 * 0.2 + 0.7 * 0.8)).abs() < 1e-12, "{avg}");
    assert_eq!(v.interactions.sentiment_trend.as_deref(), Some("positive"));
    assert_eq!(v.interactions.total, 3);
    assert_eq!(v.interactions.by_type["call"], 2);
    assert_eq!(v.interactions.recent_sentiment.len(), 2);
}

#[test]
fn trend_thresholds() {
    assert_eq!(trend(0.61), "positive");
    assert_eq!(trend(0.6), "neutral");
    assert_eq!(trend(0.4), "neutral");
    assert_eq!(trend(0.39), "negative");
}

#[test]
fn recent_sentiment_keeps_the_last_ten() {
    let mut events = vec![created()];
    events.extend((1..=15).map(|i| interaction(i, i, Some(i as f64 / 20.0))));
    let v = view(&events);
    let scores: Vec<f64> = v
        .interactions
        .recent_sentiment
        .iter()
        .map(|p| p.score)
        .collect();
    assert_eq!(
        scores,
        (6..=15).map(|i| i as f64 / 20.0).collect::<Vec<_>>()
    );
    assert_eq!(v.interactions.sentiment_trend.as_deref(), Some("positive"));
}

fn order(id: &str, seq: i64, minute: i64, kind: &str, total: f64) -> Event {
    let (o, c) = (id.to_owned(), "cus-1".to_owned());
    let data = match kind {
        "placed" => EventData::OrderPlaced(OrderPlaced {
            order_id: o,
            customer_id: c,
            items: vec![],
            shipping_address: Map::new(),
            total_amount: total,
            currency: None,
        }),
        "completed" => EventData::OrderCompleted(OrderCompleted {
            order_id: o,
            customer_id: c,
        }),
        "cancelled" => EventData::OrderCancelled(OrderCancelled {
            order_id: o,
            customer_id: c,
            reason: "r".into(),
            cancelled_by: "c".into(),
            previous_status: "created".into(),
        }),
        _ => EventData::OrderValidated(OrderValidated {
            order_id: o,
            customer_id: c,
            validation_details: Map::new(),
        }),
    };
    ev(id, seq, minute, data)
}

#[test]
fn orders_and_tickets_are_counted_from_their_own_streams() {
    let events = vec![
        created(),
        order("ord-1", 0, 1, "placed", 10.10),
        order("ord-2", 0, 2, "placed", 0.2),
        order("ord-1", 1, 3, "validated", 0.0),
        order("ord-1", 2, 4, "completed", 0.0),
        order("ord-3", 0, 5, "placed", 5.0),
        order("ord-3", 1, 6, "cancelled", 0.0),
        ev(
            "tkt-1",
            0,
            10,
            EventData::TicketCreated(TicketCreated {
                ticket_id: "tkt-1".into(),
                customer_id: "cus-1".into(),
                subject: "s".into(),
                priority: "p".into(),
                channel: "c".into(),
            }),
        ),
        ev(
            "tkt-1",
            1,
            100,
            EventData::TicketResolved(TicketResolved {
                ticket_id: "tkt-1".into(),
                customer_id: "cus-1".into(),
                resolution: "r".into(),
            }),
        ),
        ev(
            "tkt-2",
            0,
            101,
            EventData::TicketCreated(TicketCreated {
                ticket_id: "tkt-2".into(),
                customer_id: "cus-1".into(),
                subject: "s".into(),
                priority: "p".into(),
                channel: "c".into(),
            }),
        ),
    ];
    let v = view(&events);
    assert_eq!(
        (
            v.orders.total,
            v.orders.open,
            v.orders.completed,
            v.orders.cancelled
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(v.orders.total_value, 15.3);
    assert_eq!(v.support.total_tickets, 2);
    assert_eq!(v.support.open_tickets, 1);
    assert_eq!(v.support.avg_resolution_seconds, Some(90 * 60));
    assert_eq!(v.version, 10);
    assert_eq!(v.updated_at, Some(events[9].envelope.timestamp));
    assert_eq!(v.orders.last_at, Some(events[6].envelope.timestamp));
    assert_eq!(v.profile.unwrap().name, "Ada");
}

#[test]
fn streams_interleaved_in_any_order_give_the_byte_same_document() {
    let a = vec![
        created(),
        interaction(1, 1, Some(0.5)),
        order("ord-1", 0, 2, "placed", 3.3),
        order("ord-1", 1, 3, "completed", 0.0),
    ];
    // Same per-stream order, other interleaving, plus redelivered duplicates.
    let b = vec![
        a[2].clone(),
        a[0].clone(),
        a[2].clone(),
        a[3].clone(),
        a[1].clone(),
        a[0].clone(),
        a[3].clone(),
    ];
    let (mut ma, mut mb) = (MemoryViews::default(), MemoryViews::default());
    ma.apply(&Customer360Projector, &a).unwrap();
    mb.apply(&Customer360Projector, &b).unwrap();
    let ja = serde_json::to_string(&ma.docs["cus-1"].view).unwrap();
    let jb = serde_json::to_string(&mb.docs["cus-1"].view).unwrap();
    assert_eq!(ja, jb);
    assert_eq!(ma.docs["cus-1"].guard, mb.docs["cus-1"].guard);
    assert_eq!(mb.duplicates, 3);
}

#[test]
fn impossible_events_are_rejected_and_change_nothing() {
    let p = Customer360Projector;
    let upd = ev(
        "cus-1",
        1,
        1,
        EventData::CustomerUpdated(CustomerUpdated {
            customer_id: "cus-1".into(),
            changes: Map::from_iter([("name".into(), json!("B"))]),
            previous_values: Map::new(),
        }),
    );
    let done = order("ord-9", 1, 2, "completed", 0.0);
    let out = p.fold(None, &[&upd, &done]).unwrap();
    assert_eq!(out.rejected.len(), 2);
    assert!(out.document.is_none());
    assert!(out.rejected[0].1.reason.contains("before customer.created"));
}
