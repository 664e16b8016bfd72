//! The envelope of DESIGN §1 and its strict decoder.
//!
//! Two shapes: [`EventEnvelope`] is the wire/store form (payload as JSON, what the event store
//! holds and the generator publishes); [`Event`] is the validated, typed form the engine
//! works with (a header and a typed payload, no JSON tree). [`Event::decode`] goes straight
//! from bytes to [`Event`] in one typed pass; anything that pass does not accept is decoded
//! again by the strict tree-based decoder, so every error keeps its precise kind and message.

use std::borrow::Cow;

use chrono::{DateTime, Datelike, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::json_type;
use crate::{AggregateType, ContractError, EventData, EventType};

/// Events larger than this are rejected before parsing (a producer bug, or an attack).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Event times outside these years are refused: the analytics store (ClickHouse
/// `DateTime64(3)`) cannot hold them, so they could never be projected.
pub const MIN_YEAR: i32 = 1900;
pub const MAX_YEAR: i32 = 2261;

/// Longest `aggregate_id` / `event_type` accepted.
pub const MAX_ID_BYTES: usize = 256;

/// An event as stored in the event store and carried on Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
    pub sequence_number: i64,
    pub global_position: i64,
    pub event_type: String,
    pub event_data: Value,
    pub metadata: Map<String, Value>,
    pub timestamp: DateTime<Utc>,
}

/// Everything of an event but its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct EventHeader {
    pub event_id: Uuid,
    pub aggregate_type: AggregateType,
    pub aggregate_id: String,
    pub sequence_number: i64,
    pub global_position: i64,
    pub event_type: String,
    pub metadata: Metadata,
    pub timestamp: DateTime<Utc>,
}

/// `metadata` (correlation_id, causation_id, ...) kept as compact JSON text: the engine only
/// reads it for tracing, so it is never turned into a tree on the hot path.
#[derive(Debug, Clone)]
pub struct Metadata(Box<RawValue>);

impl Metadata {
    pub fn empty() -> Metadata {
        Metadata(RawValue::from_string("{}".into()).unwrap_or_else(|_| unreachable!()))
    }

    /// From JSON text (an object; anything else gives an empty object).
    pub fn from_json(text: &str) -> Metadata {
        match RawValue::from_string(text.to_owned()) {
            Ok(raw) if raw.get().trim_start().starts_with('{') => Metadata(raw),
            _ => Metadata::empty(),
        }
    }

    fn from_map(m: &Map<String, Value>) -> Metadata {
        serde_json::value::to_raw_value(m).map_or_else(|_| Metadata::empty(), Metadata)
    }

    /// The metadata as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }

    /// One string entry (e.g. `correlation_id`).
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.to_map().get(key)?.as_str().map(str::to_owned)
    }

    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Metadata {
    /// Semantic equality: the same object, whatever the spacing or key order of its text.
    fn eq(&self, other: &Metadata) -> bool {
        self.0.get() == other.0.get() || self.to_map() == other.to_map()
    }
}

/// A validated event: its header and its typed payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub header: EventHeader,
    pub data: EventData,
}

impl EventEnvelope {
    /// Decode and validate the JSON value of a Kafka message (the strict, tree-based path).
    pub fn decode(bytes: &[u8]) -> Result<EventEnvelope, ContractError> {
        let text = check_bytes(bytes)?;
        Self::decode_text(text)
    }

    fn decode_text(text: &str) -> Result<EventEnvelope, ContractError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ContractError::InvalidJson {
            reason: e.to_string(),
        })?;
        Self::from_value(value)
    }

    /// Validate an already parsed JSON value.
    pub fn from_value(value: Value) -> Result<EventEnvelope, ContractError> {
        let Value::Object(mut obj) = value else {
            return Err(ContractError::NotAnObject {
                found: json_type(&value),
            });
        };
        let event_id = uuid_field(&obj, "event_id")?;
        let aggregate_type: AggregateType = str_field(&obj, "aggregate_type")?.parse()?;
        let aggregate_id = non_empty("aggregate_id", str_field(&obj, "aggregate_id")?)?.to_owned();
        let sequence_number = int_field(&obj, "sequence_number", 0)?;
        let global_position = int_field(&obj, "global_position", 1)?;
        let event_type = non_empty("event_type", str_field(&obj, "event_type")?)?.to_owned();
        let timestamp = timestamp("timestamp", str_field(&obj, "timestamp")?)?;
        let event_data = match obj.remove("event_data") {
            None | Some(Value::Null) => {
                return Err(ContractError::MissingField {
                    field: "event_data",
                });
            }
            Some(v @ Value::Object(_)) => v,
            Some(other) => return Err(wrong_type("event_data", "an object", &other)),
        };
        // metadata defaults to {} as in the event store's column.
        let metadata = match obj.remove("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(wrong_type("metadata", "an object", &other)),
        };
        Ok(EventEnvelope {
            event_id,
            aggregate_type,
            aggregate_id,
            sequence_number,
            global_position,
            event_type,
            event_data,
            metadata,
            timestamp,
        })
    }

    /// The Kafka message value.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // An envelope always serialises: its maps have string keys.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The header (everything but the payload).
    pub fn header(&self) -> EventHeader {
        EventHeader {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id.clone(),
            sequence_number: self.sequence_number,
            global_position: self.global_position,
            event_type: self.event_type.clone(),
            metadata: Metadata::from_map(&self.metadata),
            timestamp: self.timestamp.trunc_subsecs(6),
        }
    }

    /// The same envelope, once it is known to honour the contract (the generator's check).
    pub fn checked(self) -> Result<EventEnvelope, ContractError> {
        let data = EventData::decode(&self.event_type, &self.event_data)?;
        finish(self.header(), data)?;
        Ok(self)
    }

    /// Check the payload against the catalogue and the envelope it travels in.
    pub fn into_event(self) -> Result<Event, ContractError> {
        let data = EventData::decode(&self.event_type, &self.event_data)?;
        let header = self.header();
        finish(header, data)
    }
}

/// The checks that relate payload and header, shared by both decoders.
fn finish(header: EventHeader, data: EventData) -> Result<Event, ContractError> {
    if let Some(t) = data.event_type() {
        let expected = t.aggregate_type();
        if expected != header.aggregate_type {
            return Err(ContractError::AggregateMismatch {
                event_type: header.event_type.clone(),
                expected: expected.as_str(),
                found: header.aggregate_type.as_str(),
            });
        }
    }
    if let Some(own) = data.own_aggregate_id()
        && own != header.aggregate_id
    {
        return Err(ContractError::InvalidValue {
            field: "aggregate_id",
            reason: format!(
                "envelope names {:?} but event_data names {own:?}",
                header.aggregate_id
            ),
        });
    }
    Ok(Event { header, data })
}

impl Event {
    /// Decode, validate and type a Kafka message value: one typed pass over the bytes, no
    /// JSON tree. Whatever that pass does not accept goes through the strict tree-based
    /// decoder, which names the precise error.
    pub fn decode(bytes: &[u8]) -> Result<Event, ContractError> {
        let text = check_bytes(bytes)?;
        if let Some(event) = fast::decode(text) {
            return Ok(event);
        }
        EventEnvelope::decode_text(text)?.into_event()
    }

    /// Build a catalogue event from its typed payload (the generator and tests use this).
    pub fn new(
        event_id: Uuid,
        aggregate_id: impl Into<String>,
        sequence_number: i64,
        data: EventData,
        metadata: Map<String, Value>,
        timestamp: DateTime<Utc>,
    ) -> Result<Event, ContractError> {
        let Some(event_type) = data.event_type() else {
            return Err(ContractError::InvalidValue {
                field: "event_type",
                reason: "only catalogue events can be built from typed data".into(),
            });
        };
        EventEnvelope {
            event_id,
            aggregate_type: event_type.aggregate_type(),
            aggregate_id: aggregate_id.into(),
            sequence_number,
            // Assigned by the event store on append.
            global_position: 1,
            event_type: event_type.as_str().to_owned(),
            event_data: data.to_json(),
            metadata,
            timestamp,
        }
        .into_event()
    }

    pub fn event_type(&self) -> Option<EventType> {
        self.data.event_type()
    }

    /// Join a header and a payload decoded apart (the event store's replay), with the same
    /// checks as decoding a message.
    pub fn from_parts(header: EventHeader, data: EventData) -> Result<Event, ContractError> {
        finish(header, data)
    }

    /// The wire/store form.
    pub fn to_envelope(&self) -> EventEnvelope {
        let h = &self.header;
        EventEnvelope {
            event_id: h.event_id,
            aggregate_type: h.aggregate_type,
            aggregate_id: h.aggregate_id.clone(),
            sequence_number: h.sequence_number,
            global_position: h.global_position,
            event_type: h.event_type.clone(),
            event_data: self.data.to_json(),
            metadata: h.metadata.to_map(),
            timestamp: h.timestamp,
        }
    }

    /// The Kafka message value.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        self.to_envelope().to_json_bytes()
    }
}

fn check_bytes(bytes: &[u8]) -> Result<&str, ContractError> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(ContractError::Oversized {
            size: bytes.len(),
            max: MAX_EVENT_BYTES,
        });
    }
    std::str::from_utf8(bytes).map_err(|e| ContractError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })
}

/// The typed single pass. `None` means "not accepted here": the caller then runs the strict
/// decoder, so this pass never has to produce errors and never accepts what that one refuses.
mod fast {
    use super::*;

    #[derive(Deserialize)]
    struct Wire<'a> {
        #[serde(borrow)]
        event_id: Cow<'a, str>,
        #[serde(borrow)]
        aggregate_type: Cow<'a, str>,
        #[serde(borrow)]
        aggregate_id: Cow<'a, str>,
        sequence_number: i64,
        global_position: i64,
        #[serde(borrow)]
        event_type: Cow<'a, str>,
        #[serde(borrow)]
        event_data: &'a RawValue,
        #[serde(borrow, default)]
        metadata: Option<&'a RawValue>,
        #[serde(borrow)]
        timestamp: Cow<'a, str>,
    }

    fn is_object(raw: &RawValue) -> bool {
        raw.get().trim_start().starts_with('{')
    }

    pub(super) fn decode(text: &str) -> Option<Event> {
        let w: Wire<'_> = serde_json::from_str(text).ok()?;
        let event_id = Uuid::parse_str(&w.event_id).ok()?;
        let aggregate_type: AggregateType = w.aggregate_type.parse().ok()?;
        let aggregate_id = non_empty("aggregate_id", &w.aggregate_id).ok()?.to_owned();
        let event_type = non_empty("event_type", &w.event_type).ok()?.to_owned();
        if w.sequence_number < 0 || w.global_position < 1 || !is_object(w.event_data) {
            return None;
        }
        let metadata = match w.metadata {
            None => Metadata::empty(),
            Some(m) if is_object(m) => Metadata(m.to_owned()),
            Some(_) => return None,
        };
        let timestamp = timestamp("timestamp", &w.timestamp).ok()?;
        let data = EventData::decode_str(&event_type, w.event_data.get()).ok()?;
        let header = EventHeader {
            event_id,
            aggregate_type,
            aggregate_id,
            sequence_number: w.sequence_number,
            global_position: w.global_position,
            event_type,
            metadata,
            timestamp,
        };
        finish(header, data).ok()
    }
}

fn wrong_type(field: &'static str, expected: &'static str, v: &Value) -> ContractError {
    ContractError::WrongType {
        field,
        expected,
        found: json_type(v),
    }
}

fn get<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a Value, ContractError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ContractError::MissingField { field }),
        Some(v) => Ok(v),
    }
}

fn str_field<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, ContractError> {
    let v = get(obj, field)?;
    v.as_str().ok_or_else(|| wrong_type(field, "a string", v))
}

fn non_empty<'s>(field: &'static str, s: &'s str) -> Result<&'s str, ContractError> {
    if s.trim().is_empty() {
        return Err(ContractError::InvalidValue {
            field,
            reason: "must not be empty".into(),
        });
    }
    if s.len() > MAX_ID_BYTES {
        return Err(ContractError::InvalidValue {
            field,
            reason: format!("{} bytes, over the {MAX_ID_BYTES}-byte limit", s.len()),
        });
    }
    Ok(s)
}

/// Event times keep microseconds, as the event store does: an event read back from the
/// store and the same event off the wire fold into the same bytes.
fn timestamp(field: &'static str, text: &str) -> Result<DateTime<Utc>, ContractError> {
    let t = DateTime::parse_from_rfc3339(text)
        .map_err(|_| ContractError::InvalidTimestamp {
            field,
            value: text.to_owned(),
        })?
        .with_timezone(&Utc)
        .trunc_subsecs(6);
    if !(MIN_YEAR..=MAX_YEAR).contains(&t.year()) {
        return Err(ContractError::InvalidValue {
            field,
            reason: format!("{text} is outside the years {MIN_YEAR}..={MAX_YEAR}"),
        });
    }
    Ok(t)
}

fn uuid_field(obj: &Map<String, Value>, field: &'static str) -> Result<Uuid, ContractError> {
    let s = str_field(obj, field)?;
    Uuid::parse_str(s).map_err(|_| ContractError::InvalidUuid {
        field,
        value: s.to_owned(),
    })
}

fn int_field(
    obj: &Map<String, Value>,
    field: &'static str,
    min: i64,
) -> Result<i64, ContractError> {
    let v = get(obj, field)?;
    let n = v
        .as_i64()
        .ok_or_else(|| wrong_type(field, "an integer", v))?;
    if n < min {
        return Err(ContractError::InvalidValue {
            field,
            reason: format!("must be >= {min}, got {n}"),
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_compact_event_takes_the_fast_path_with_equal_metadata() {
        let text = r#"{ "event_id": "0b6c7c1e-8d3f-4a53-9a43-8f1f0f0f0f01", "aggregate_type": "order",
            "aggregate_id": "ord-42", "sequence_number": 3, "global_position": 1234,
            "event_type": "order.shipped",
            "event_data": {"order_id": "ord-42", "customer_id": "cus-7", "carrier": "UPS", "tracking_number": "1Z"},
            "metadata": { "b": 1, "a": "x" }, "timestamp": "2026-11-22T10:00:00.123Z" }"#;
        let fast = fast::decode(text).expect("fast path");
        let slow = EventEnvelope::decode(text.as_bytes())
            .unwrap()
            .into_event()
            .unwrap();
        assert_eq!(fast, slow);
        assert_eq!(fast.header.metadata.get_str("a").as_deref(), Some("x"));
    }

    #[test]
    fn escaped_strings_decode_on_the_fast_path() {
        let text = r#"{"event_id":"0b6c7c1e-8d3f-4a53-9a43-8f1f0f0f0f01","aggregate_type":"customer",
            "aggregate_id":"cus-\"7\"","sequence_number":0,"global_position":1,"event_type":"customer.created",
            "event_data":{"customer_id":"cus-\"7\"","name":"A\u00e9","email":"e"},"timestamp":"2026-11-22T10:00:00Z"}"#;
        let e = fast::decode(text).expect("fast path");
        assert_eq!(e.header.aggregate_id, "cus-\"7\"");
    }
}
