use chrono::{Duration, TimeZone, Utc};
use contract::catalogue::*;
use contract::{Event, EventData};
use serde_json::Map;
use uuid::Uuid;

use super::*;
use crate::Step;
use crate::document::{Doc, StreamKey, apply_event};
use crate::memory::MemoryViews;

fn ev(seq: i64, data: EventData) -> Event {
    let t = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap() + Duration::minutes(seq);
    Event::new(Uuid::new_v4(), "ord-1", seq, data, Map::new(), t).unwrap()
}

fn ids() -> (String, String) {
    ("ord-1".into(), "cus-1".into())
}

fn lifecycle() -> Vec<Event> {
    let (o, c) = ids();
    vec![
        ev(
            0,
            EventData::OrderPlaced(OrderPlaced {
                order_id: o.clone(),
                customer_id: c.clone(),
                items: vec![OrderItem {
                    product_id: "p".into(),
                    quantity: 2,
                    unit_price: 5.0,
                }],
                shipping_address: Map::new(),
                total_amount: 10.0,
                currency: Some("EUR".into()),
            }),
        ),
        ev(
            1,
            EventData::OrderValidated(OrderValidated {
                order_id: o.clone(),
                customer_id: c.clone(),
                validation_details: Map::new(),
            }),
        ),
        ev(
            2,
            EventData::OrderPaymentConfirmed(OrderPaymentConfirmed {
                order_id: o.clone(),
                customer_id: c.clone(),
                payment_id: "pay".into(),
                amount: 10.0,
                transaction_details: Map::new(),
            }),
        ),
        ev(
            3,
            EventData::OrderPreparationStarted(OrderPreparationStarted {
                order_id: o.clone(),
                customer_id: c.clone(),
                warehouse_id: "wh".into(),
            }),
        ),
        ev(
            4,
            EventData::OrderShipped(OrderShipped {
                order_id: o.clone(),
                customer_id: c.clone(),
                carrier: "UPS".into(),
                tracking_number: "1Z".into(),
            }),
        ),
        ev(
            5,
            EventData::OrderCompleted(OrderCompleted {
                order_id: o,
                customer_id: c,
            }),
        ),
    ]
}

fn fold(events: &[Event]) -> (OrderView, MemoryViews<OrderView>) {
    let m = MemoryViews::fold(&OrderViewProjector, events);
    (m.docs["ord-1"].view.clone(), m)
}

#[test]
fn the_lifecycle_walks_every_status_with_a_timeline() {
    let events = lifecycle();
    let (v, _) = fold(&events);
    let statuses: Vec<&str> = v.timeline.iter().map(|t| t.status.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "created",
            "payment_pending",
            "payment_confirmed",
            "preparing",
            "shipped",
            "delivered"
        ]
    );
    assert_eq!(v.status, "delivered");
    assert_eq!(v.version, 5);
    assert_eq!(v.payment.unwrap().payment_id, "pay");
    let s = v.shipping.unwrap();
    assert_eq!(
        (s.warehouse_id.as_deref(), s.carrier.as_deref()),
        (Some("wh"), Some("UPS"))
    );
    assert_eq!(v.placed_at, Some(events[0].header.timestamp));
    assert_eq!(v.updated_at, Some(events[5].header.timestamp));
}

#[test]
fn replays_and_duplicates_change_nothing() {
    let events = lifecycle();
    let mut twice = events.clone();
    twice.extend(events.iter().cloned());
    twice.insert(3, events[1].clone());
    let (a, ma) = fold(&events);
    let (b, mb) = fold(&twice);
    assert_eq!(a, b);
    assert_eq!(ma.docs, mb.docs);
    assert_eq!(mb.duplicates, 7);
}

#[test]
fn a_cancelled_order_refuses_later_steps() {
    let (o, c) = ids();
    let mut events = lifecycle()[..2].to_vec();
    events.push(ev(
        2,
        EventData::OrderCancelled(OrderCancelled {
            order_id: o.clone(),
            customer_id: c.clone(),
            reason: "r".into(),
            cancelled_by: "customer".into(),
            previous_status: "payment_pending".into(),
        }),
    ));
    let (v, _) = fold(&events);
    assert_eq!(v.status, "cancelled");
    assert_eq!(
        v.cancellation.as_ref().unwrap().previous_status,
        "payment_pending"
    );
    let mut doc: Doc<OrderView> =
        MemoryViews::fold(&OrderViewProjector, &events).docs["ord-1"].clone();
    let before = doc.clone();
    let late = ev(
        3,
        EventData::OrderShipped(OrderShipped {
            order_id: o,
            customer_id: c,
            carrier: "x".into(),
            tracking_number: "y".into(),
        }),
    );
    let step = apply_event(
        &OrderViewProjector,
        &mut doc,
        &late,
        &mut StreamKey::default(),
    );
    assert!(matches!(&step, Step::Rejected(r) if r.reason.contains("already cancelled")));
    assert_eq!(doc, before);
}

#[test]
fn documents_serialise_byte_for_byte_like_a_sorted_json_map() {
    let (v, _) = fold(&lifecycle());
    let typed = serde_json::to_string(&v).unwrap();
    let sorted = serde_json::to_string(&serde_json::to_value(&v).unwrap()).unwrap();
    assert_eq!(typed, sorted);
}
