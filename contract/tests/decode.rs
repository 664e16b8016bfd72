//! Every class of bad input gets its own typed error; good input round-trips.

use contract::{
    AggregateType, ContractError, Event, EventData, EventEnvelope, EventType, MAX_EVENT_BYTES,
    RequiredHeaders,
};
use serde_json::{Value, json};

fn valid() -> Value {
    json!({
        "event_id": "0b6c7c1e-8d3f-4a53-9a43-8f1f0f0f0f01",
        "aggregate_type": "order",
        "aggregate_id": "ord-42",
        "sequence_number": 3,
        "global_position": 1234,
        "event_type": "order.shipped",
        "event_data": {"order_id": "ord-42", "customer_id": "cus-7", "carrier": "UPS", "tracking_number": "1Z999"},
        "metadata": {"correlation_id": "c-1", "causation_id": "c-0"},
        "timestamp": "2026-11-22T10:00:00.123Z"
    })
}

fn as_refs<'a>(p: &'a [(&'static str, String)]) -> Vec<(&'static str, Option<&'a [u8]>)> {
    p.iter().map(|(k, v)| (*k, Some(v.as_bytes()))).collect()
}

fn decode(v: &Value) -> Result<Event, ContractError> {
    Event::decode(&serde_json::to_vec(v).unwrap())
}

fn with(field: &str, value: Value) -> Value {
    let mut v = valid();
    v[field] = value;
    v
}

fn without(field: &str) -> Value {
    let mut v = valid();
    v.as_object_mut().unwrap().remove(field);
    v
}

#[test]
fn the_design_example_decodes_to_typed_data() {
    let e = decode(&valid()).unwrap();
    assert_eq!(e.header.aggregate_type, AggregateType::Order);
    assert_eq!(e.header.sequence_number, 3);
    assert_eq!(e.header.global_position, 1234);
    match e.data {
        EventData::OrderShipped(d) => {
            assert_eq!(d.carrier, "UPS");
            assert_eq!(d.tracking_number, "1Z999");
        }
        other => panic!("wrong variant {other:?}"),
    }
}

#[test]
fn missing_fields_are_named() {
    for field in [
        "event_id",
        "aggregate_type",
        "aggregate_id",
        "sequence_number",
        "global_position",
        "event_type",
        "event_data",
        "timestamp",
    ] {
        assert_eq!(
            decode(&without(field)),
            Err(ContractError::MissingField { field }),
            "{field}"
        );
    }
}

#[test]
fn metadata_defaults_to_empty_like_the_store_column() {
    assert!(
        decode(&without("metadata"))
            .unwrap()
            .header
            .metadata
            .to_map()
            .is_empty()
    );
    assert_eq!(
        decode(&with("metadata", json!([1]))).unwrap_err().kind(),
        "wrong_type"
    );
}

#[test]
fn ill_typed_fields_are_rejected() {
    let cases = [
        ("sequence_number", json!("3")),
        ("sequence_number", json!(3.5)),
        ("global_position", json!(true)),
        ("aggregate_id", json!(42)),
        ("event_type", json!({})),
        ("event_data", json!("x")),
        ("timestamp", json!(1700000000)),
    ];
    for (field, value) in cases {
        let err = decode(&with(field, value.clone())).unwrap_err();
        assert!(
            matches!(err, ContractError::WrongType { field: f, .. } if f == field),
            "{field}={value}: {err:?}"
        );
    }
}

#[test]
fn out_of_range_and_empty_values_are_rejected() {
    assert_eq!(
        decode(&with("sequence_number", json!(-1)))
            .unwrap_err()
            .kind(),
        "invalid_value"
    );
    assert_eq!(
        decode(&with("global_position", json!(0)))
            .unwrap_err()
            .kind(),
        "invalid_value"
    );
    assert_eq!(
        decode(&with("aggregate_id", json!("  ")))
            .unwrap_err()
            .kind(),
        "invalid_value"
    );
    let long = "x".repeat(300);
    assert_eq!(
        decode(&with("aggregate_id", json!(long)))
            .unwrap_err()
            .kind(),
        "invalid_value"
    );
}

#[test]
fn unknown_aggregate_types_are_rejected() {
    assert_eq!(
        decode(&with("aggregate_type", json!("invoice"))),
        Err(ContractError::UnknownAggregateType("invoice".into()))
    );
}

#[test]
fn bad_uuids_and_timestamps_are_rejected() {
    assert!(matches!(
        decode(&with("event_id", json!("not-a-uuid"))),
        Err(ContractError::InvalidUuid {
            field: "event_id",
            ..
        })
    ));
    assert!(matches!(
        decode(&with("timestamp", json!("yesterday"))),
        Err(ContractError::InvalidTimestamp { .. })
    ));
}

#[test]
fn invalid_utf8_is_rejected_with_its_offset() {
    let mut bytes = serde_json::to_vec(&valid()).unwrap();
    bytes[10] = 0xff;
    assert_eq!(
        Event::decode(&bytes),
        Err(ContractError::InvalidUtf8 { offset: 10 })
    );
}

#[test]
fn non_json_and_non_objects_are_rejected() {
    assert_eq!(
        Event::decode(b"{\"event_id\":").unwrap_err().kind(),
        "invalid_json"
    );
    assert_eq!(Event::decode(b"").unwrap_err().kind(), "invalid_json");
    assert_eq!(
        Event::decode(b"[1,2]"),
        Err(ContractError::NotAnObject { found: "an array" })
    );
}

#[test]
fn oversized_payloads_are_rejected_before_parsing() {
    let mut v = valid();
    v["metadata"]["blob"] = json!("x".repeat(MAX_EVENT_BYTES));
    let bytes = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        Event::decode(&bytes),
        Err(ContractError::Oversized { .. })
    ));
}

#[test]
fn a_known_type_with_a_bad_payload_is_poison() {
    let mut v = valid();
    v["event_data"] = json!({"order_id": "ord-42", "customer_id": "cus-7"});
    let err = decode(&v).unwrap_err();
    assert!(
        matches!(&err, ContractError::InvalidEventData { event_type, reason }
        if event_type == "order.shipped" && reason.contains("carrier")),
        "{err:?}"
    );

    let mut v = valid();
    v["event_type"] = json!("order.placed");
    v["event_data"] = json!({"order_id": "ord-42", "customer_id": "c", "items": [],
        "shipping_address": {}, "total_amount": -5.0});
    assert_eq!(decode(&v).unwrap_err().kind(), "invalid_event_data");
}

#[test]
fn sentiment_outside_zero_to_one_is_poison() {
    let v = json!({
        "event_id": "0b6c7c1e-8d3f-4a53-9a43-8f1f0f0f0f02", "aggregate_type": "customer",
        "aggregate_id": "cus-1", "sequence_number": 1, "global_position": 9,
        "event_type": "interaction.recorded",
        "event_data": {"customer_id": "cus-1", "agent_id": "a", "interaction_id": "i",
                       "interaction_type": "chat", "sentiment_score": 1.5},
        "timestamp": "2026-11-22T10:00:00Z"});
    assert_eq!(decode(&v).unwrap_err().kind(), "invalid_event_data");
}

#[test]
fn event_type_must_belong_to_the_aggregate() {
    let err = decode(&with("aggregate_type", json!("customer"))).unwrap_err();
    assert!(matches!(
        err,
        ContractError::AggregateMismatch {
            expected: "order",
            found: "customer",
            ..
        }
    ));
}

#[test]
fn payload_must_name_the_envelope_aggregate() {
    let err = decode(&with("aggregate_id", json!("ord-43"))).unwrap_err();
    assert!(
        matches!(
            err,
            ContractError::InvalidValue {
                field: "aggregate_id",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn unknown_event_types_are_kept_raw_not_rejected() {
    let mut v = valid();
    v["event_type"] = json!("order.gift_wrapped");
    v["event_data"] = json!({"paper": "gold"});
    let e = decode(&v).unwrap();
    assert_eq!(e.event_type(), None);
    assert_eq!(
        e.data,
        EventData::Unknown {
            event_type: "order.gift_wrapped".into(),
            data: json!({"paper": "gold"})
        }
    );
}

#[test]
fn headers_are_required_and_must_match_the_body() {
    let env = EventEnvelope::from_value(valid()).unwrap();
    let h = RequiredHeaders::for_event(&env);
    let pairs = h.pairs();

    let parsed = RequiredHeaders::from_pairs(as_refs(&pairs)).unwrap();
    assert_eq!(parsed, h);
    parsed.check_against(&env).unwrap();

    for missing in ["event_type", "aggregate_type", "sequence"] {
        let p: Vec<_> = as_refs(&pairs)
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        assert_eq!(
            RequiredHeaders::from_pairs(p).unwrap_err().kind(),
            "missing_header"
        );
    }
    let null = vec![
        ("event_type", None),
        ("aggregate_type", Some(&b"order"[..])),
        ("sequence", Some(&b"3"[..])),
    ];
    assert_eq!(
        RequiredHeaders::from_pairs(null).unwrap_err().kind(),
        "missing_header"
    );
    let bad = vec![
        ("event_type", Some(&b"order.shipped"[..])),
        ("aggregate_type", Some(&b"order"[..])),
        ("sequence", Some(&b"three"[..])),
    ];
    assert_eq!(
        RequiredHeaders::from_pairs(bad).unwrap_err().kind(),
        "invalid_header"
    );
    let bad_utf8 = vec![
        ("event_type", Some(&b"\xff"[..])),
        ("aggregate_type", Some(&b"order"[..])),
        ("sequence", Some(&b"3"[..])),
    ];
    assert_eq!(
        RequiredHeaders::from_pairs(bad_utf8).unwrap_err().kind(),
        "invalid_header"
    );

    let other = RequiredHeaders {
        sequence: 4,
        ..h.clone()
    };
    assert_eq!(
        other.check_against(&env).unwrap_err().kind(),
        "header_mismatch"
    );
}

#[test]
fn every_catalogue_type_names_its_aggregate_and_round_trips_its_name() {
    for t in EventType::ALL {
        assert_eq!(EventType::parse(t.as_str()), Some(t));
        let topic = t.aggregate_type().topic("events.");
        assert!(topic.starts_with("events."));
    }
}

#[test]
fn integers_the_stores_cannot_hold_are_poison() {
    let mut v = valid();
    v["event_type"] = json!("order.placed");
    v["event_data"] = json!({"order_id": "ord-42", "customer_id": "c", "items": [],
        "shipping_address": {"zip": {"n": 18446744073709551615u64}}, "total_amount": 5.0});
    let err = decode(&v).unwrap_err();
    assert_eq!(err.kind(), "invalid_event_data", "{err}");
    assert!(err.to_string().contains("signed 64-bit"), "{err}");
    // i64::MAX itself is fine.
    v["event_data"]["shipping_address"] = json!({"zip": i64::MAX});
    decode(&v).unwrap();
}

#[test]
fn amounts_are_bounded_so_money_arithmetic_cannot_overflow() {
    let mut v = valid();
    v["event_type"] = json!("order.placed");
    v["event_data"] = json!({"order_id": "ord-42", "customer_id": "c", "items": [],
        "shipping_address": {}, "total_amount": 1e300});
    assert_eq!(decode(&v).unwrap_err().kind(), "invalid_event_data");
    v["event_data"]["total_amount"] = json!(contract::catalogue::MAX_AMOUNT);
    decode(&v).unwrap();
}

#[test]
fn event_times_outside_what_the_stores_hold_are_rejected() {
    for t in [
        "1899-12-31T23:59:59Z",
        "2262-01-01T00:00:00Z",
        "9999-01-01T00:00:00Z",
    ] {
        let err = decode(&with("timestamp", json!(t))).unwrap_err();
        assert_eq!(err.kind(), "invalid_value", "{t}: {err}");
    }
    decode(&with("timestamp", json!("1900-01-01T00:00:00Z"))).unwrap();
}
