use chrono::{Duration, TimeZone, Utc};
use contract::catalogue::*;
use contract::{Event, EventData};
use serde_json::{Map, json};
use uuid::Uuid;

use super::*;
use crate::Step;
use crate::document::{Doc, StreamKey, apply_event};
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
    MemoryViews::fold(&Customer360Projector, events).docs["cus-1"]
        .view
        .clone()
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
    assert_eq!(v.interactions.sentiment_trend, "positive");
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
    assert_eq!(v.interactions.sentiment_trend, "positive");
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
    assert_eq!(v.updated_at, Some(events[9].header.timestamp));
    assert_eq!(v.orders.last_at, Some(events[6].header.timestamp));
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
    let ma = MemoryViews::fold(&Customer360Projector, &a);
    let mb = MemoryViews::fold(&Customer360Projector, &b);
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
    let mut doc = Doc::<Customer360>::default();
    let mut keys = StreamKey::default();
    let steps: Vec<Step> = [&upd, &done]
        .iter()
        .map(|e| apply_event(&p, &mut doc, e, &mut keys))
        .collect();
    assert!(matches!(&steps[0], Step::Rejected(r) if r.reason.contains("before customer.created")));
    assert!(matches!(&steps[1], Step::Rejected(_)));
    assert_eq!(doc, Doc::default(), "a refused event changes nothing");
}

#[test]
fn a_refused_event_parks_its_stream_and_only_that_stream() {
    // ord-9 completes before it was placed: refused; its later events are held, while the
    // customer's other streams go on.
    let events = vec![
        created(),
        order("ord-9", 0, 1, "completed", 0.0),
        order("ord-9", 1, 2, "validated", 0.0),
        order("ord-1", 0, 3, "placed", 2.0),
        interaction(1, 4, Some(0.5)),
    ];
    let m = MemoryViews::fold(&Customer360Projector, &events);
    assert_eq!(m.rejected.len(), 1);
    assert_eq!(m.held, 1);
    assert!(m.parked.get("order/ord-9").is_some());
    let v = &m.docs["cus-1"].view;
    assert_eq!((v.orders.total, v.interactions.total, v.version), (1, 1, 3));
}

#[test]
fn documents_serialise_byte_for_byte_like_a_sorted_json_map() {
    // The earlier, map-based engine stored every object with its keys sorted: the typed
    // views keep exactly those bytes.
    let events = vec![
        created(),
        interaction(1, 1, Some(0.8)),
        order("ord-1", 0, 2, "placed", 3.3),
        order("ord-1", 1, 3, "completed", 0.0),
    ];
    let doc = &MemoryViews::fold(&Customer360Projector, &events).docs["cus-1"];
    let typed = serde_json::to_string(&doc.view).unwrap();
    let sorted = serde_json::to_string(&serde_json::to_value(&doc.view).unwrap()).unwrap();
    assert_eq!(typed, sorted);
}

fn ticket(id: &str, seq: i64, at: chrono::DateTime<Utc>, resolved: bool) -> Event {
    let data = if resolved {
        EventData::TicketResolved(TicketResolved {
            ticket_id: id.into(),
            customer_id: "cus-1".into(),
            resolution: "r".into(),
        })
    } else {
        EventData::TicketCreated(TicketCreated {
            ticket_id: id.into(),
            customer_id: "cus-1".into(),
            subject: "s".into(),
            priority: "p".into(),
            channel: "c".into(),
        })
    };
    Event::new(Uuid::new_v4(), id, seq, data, Map::new(), at).unwrap()
}

#[test]
fn the_trend_is_neutral_before_any_score() {
    let v = view(&[created(), interaction(1, 1, None)]);
    assert_eq!(v.interactions.sentiment_trend, "neutral");
    assert_eq!(v.interactions.sentiment_avg, None);
    // Version 1 documents stored null: they read as neutral.
    let mut json = serde_json::to_value(&v).unwrap();
    json["interactions"]["sentiment_trend"] = serde_json::Value::Null;
    let back: Customer360 = serde_json::from_value(json).unwrap();
    assert_eq!(back.interactions.sentiment_trend, "neutral");
}

#[test]
fn the_mean_resolution_time_is_exact_not_a_mean_of_truncated_seconds() {
    let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
    let ms = chrono::Duration::milliseconds;
    // 0.6 s and 1.7 s: the exact mean is 1.15 s (truncated seconds gave (0 + 1) / 2 = 0.5).
    let v = view(&[
        created(),
        ticket("tkt-1", 0, t0, false),
        ticket("tkt-1", 1, t0 + ms(600), true),
        ticket("tkt-2", 0, t0, false),
        ticket("tkt-2", 1, t0 + ms(1_700), true),
    ]);
    assert_eq!(v.state.resolution_micros_sum, 2_300_000);
    assert_eq!(v.support.avg_resolution_seconds, Some(1));
    // A contract-1 document (whole seconds) keeps its sum on its next write.
    let mut json = serde_json::to_value(&v).unwrap();
    let state = json["_state"].as_object_mut().unwrap();
    state.remove("resolution_micros_sum");
    state.insert("resolution_seconds_sum".into(), json!(2));
    let mut old: Customer360 = serde_json::from_value(json).unwrap();
    Customer360Projector
        .apply(&mut old, &ticket("tkt-3", 0, t0, false))
        .unwrap();
    assert_eq!(old.state.resolution_micros_sum, 2_000_000);
    assert!(
        !serde_json::to_string(&old)
            .unwrap()
            .contains("resolution_seconds_sum")
    );
}

#[test]
fn the_agents_context_is_derived_from_the_view_alone() {
    let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
    let calm = view(&[created(), order("ord-1", 0, 1, "placed", 1_500.0)]);
    assert_eq!(calm.context.attention, "low");
    assert!(calm.context.flags.is_empty());
    assert_eq!(calm.context.value_tier, "high");
    assert_eq!(
        calm.context.summary,
        "Ada (cus-1): high value, 1 orders worth 1500.00 (1 open, 0 completed, 0 cancelled, 0 failed); \
         0 of 0 tickets open; 0 interactions, sentiment not scored; attention low."
    );
    let events = vec![
        created(),
        interaction(1, 1, Some(0.1)),
        order("ord-1", 0, 2, "placed", 20.0),
        order("ord-1", 1, 3, "cancelled", 0.0),
        ticket("tkt-1", 0, t0, false),
    ];
    let upset = view(&events);
    assert_eq!(
        upset.context.flags,
        ["negative_sentiment", "open_tickets", "cancelled_orders"]
    );
    assert_eq!(upset.context.attention, "high");
    assert_eq!(upset.context.value_tier, "low");
    // Any arrival order of the streams gives the same context (it is part of the document).
    let mut reversed = events.clone();
    reversed.reverse();
    reversed.sort_by_key(|e| e.header.sequence_number);
    assert_eq!(view(&reversed).context, upset.context);
    let orphan = MemoryViews::fold(&Customer360Projector, &events[2..4]).docs["cus-1"]
        .view
        .clone();
    assert_eq!(orphan.context.flags, ["cancelled_orders", "no_profile"]);
    assert_eq!(orphan.context.attention, "medium");
    assert!(
        orphan
            .context
            .summary
            .starts_with("unknown customer (cus-1)")
    );
}

#[test]
fn a_finished_order_leaves_the_document_and_its_stream_takes_nothing_more() {
    let p = Customer360Projector;
    let placed = order("ord-1", 0, 1, "placed", 4.0);
    let validated = order("ord-1", 1, 2, "validated", 0.0);
    let completed = order("ord-1", 2, 3, "completed", 0.0);
    let late = order("ord-1", 3, 4, "validated", 0.0);
    let mut doc = Doc::<Customer360>::default();
    let mut keys = StreamKey::default();
    let mut apply = |e: &Event| apply_event(&p, &mut doc, e, &mut keys);
    for e in [&placed, &validated, &completed] {
        assert_eq!(apply(e), Step::Applied);
    }
    // Redelivered, or after the outcome: all duplicates now, whatever their sequence.
    for e in [&placed, &completed, &late] {
        assert_eq!(apply(e), Step::Duplicate);
    }
    assert!(doc.view.state.open_orders.is_empty());
    assert_eq!(doc.guard["order/ord-1"], crate::document::FINISHED);
    // A store that keeps finished streams apart takes them out of the document...
    let mut stored = doc.clone();
    assert_eq!(stored.take_finished(), vec!["order/ord-1".to_owned()]);
    assert!(stored.guard.is_empty());
    // ...and brings them back when a batch asks: the redelivery is still a duplicate.
    stored.finish("order/ord-1".into());
    assert_eq!(
        apply_event(&p, &mut stored, &placed, &mut StreamKey::default()),
        Step::Duplicate
    );
}

#[test]
fn a_customer_document_does_not_grow_with_its_finished_orders() {
    let size = |orders: usize| {
        let mut events = vec![created()];
        for i in 0..orders {
            let id = format!("ord-{i}");
            let outcome = if i % 3 == 0 { "cancelled" } else { "completed" };
            events.push(order(&id, 0, i as i64, "placed", 1.25));
            events.push(order(&id, 1, i as i64, outcome, 0.0));
        }
        let m = MemoryViews::fold(&Customer360Projector, &events);
        let mut doc = m.docs["cus-1"].clone();
        doc.take_finished();
        (serde_json::to_vec(&doc).unwrap().len(), doc.view.orders)
    };
    let (small, _) = size(10);
    let (large, orders) = size(3_000);
    assert_eq!(
        (
            orders.total,
            orders.completed,
            orders.cancelled,
            orders.open
        ),
        (3_000, 2_000, 1_000, 0)
    );
    assert_eq!(orders.total_value, 3_750.0);
    // Only the digits of the counters grow.
    assert!(
        large <= small + 32,
        "{small} bytes with 10 orders, {large} with 3,000"
    );
}

#[test]
fn a_contract_2_document_keeps_its_open_orders() {
    let v = view(&[
        created(),
        order("ord-1", 0, 1, "placed", 1.0),
        order("ord-2", 0, 2, "placed", 2.0),
        order("ord-2", 1, 3, "completed", 0.0),
    ]);
    // Contract 2 stored every order with its status.
    let mut json = serde_json::to_value(&v).unwrap();
    let state = json["_state"].as_object_mut().unwrap();
    state.remove("open_orders");
    state.insert(
        "orders".into(),
        json!({"ord-1": "open", "ord-2": "completed"}),
    );
    let mut old: Customer360 = serde_json::from_value(json).unwrap();
    Customer360Projector
        .apply(&mut old, &order("ord-1", 1, 4, "cancelled", 0.0))
        .unwrap();
    Customer360Projector.seal(&mut old);
    assert_eq!(
        (old.orders.open, old.orders.completed, old.orders.cancelled),
        (0, 1, 1)
    );
    let state = &serde_json::to_value(&old).unwrap()["_state"];
    assert_eq!(state["open_orders"], json!([]));
    assert!(state.get("orders").is_none());
}
