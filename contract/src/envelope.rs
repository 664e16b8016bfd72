//! The envelope of DESIGN §1 and its strict decoder.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::json_type;
use crate::{AggregateType, ContractError, EventData, EventType};

/// Events larger than this are rejected before parsing (a producer bug, or an attack).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

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

/// A validated event: the envelope and its typed payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub envelope: EventEnvelope,
    pub data: EventData,
}

impl EventEnvelope {
    /// Decode and validate the JSON value of a Kafka message.
    pub fn decode(bytes: &[u8]) -> Result<EventEnvelope, ContractError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(ContractError::Oversized {
                size: bytes.len(),
                max: MAX_EVENT_BYTES,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| ContractError::InvalidUtf8 {
            offset: e.valid_up_to(),
        })?;
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
        let aggregate_id = non_empty(&obj, "aggregate_id")?.to_owned();
        let sequence_number = int_field(&obj, "sequence_number", 0)?;
        let global_position = int_field(&obj, "global_position", 1)?;
        let event_type = non_empty(&obj, "event_type")?.to_owned();
        let ts_text = str_field(&obj, "timestamp")?;
        let timestamp = DateTime::parse_from_rfc3339(ts_text)
            .map_err(|_| ContractError::InvalidTimestamp {
                field: "timestamp",
                value: ts_text.to_owned(),
            })?
            .with_timezone(&Utc);
        let event_data = match obj.remove("event_data") {
            None => {
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

    /// Check the payload against the catalogue and the envelope it travels in.
    pub fn into_event(self) -> Result<Event, ContractError> {
        let data = EventData::decode(&self.event_type, &self.event_data)?;
        if let Some(t) = data.event_type() {
            let expected = t.aggregate_type();
            if expected != self.aggregate_type {
                return Err(ContractError::AggregateMismatch {
                    event_type: self.event_type.clone(),
                    expected: expected.as_str(),
                    found: self.aggregate_type.as_str(),
                });
            }
        }
        if let Some(own) = data.own_aggregate_id()
            && own != self.aggregate_id
        {
            return Err(ContractError::InvalidValue {
                field: "aggregate_id",
                reason: format!(
                    "envelope names {:?} but event_data names {own:?}",
                    self.aggregate_id
                ),
            });
        }
        Ok(Event {
            envelope: self,
            data,
        })
    }
}

impl Event {
    /// Decode, validate and type a Kafka message value in one step.
    pub fn decode(bytes: &[u8]) -> Result<Event, ContractError> {
        EventEnvelope::decode(bytes)?.into_event()
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

fn non_empty<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, ContractError> {
    let s = str_field(obj, field)?;
    if s.trim().is_empty() {
        return Err(ContractError::InvalidValue {
            field,
            reason: "must not be empty".into(),
        });
    }
    if s.len() > 256 {
        return Err(ContractError::InvalidValue {
            field,
            reason: format!("{} bytes, over the 256-byte limit", s.len()),
        });
    }
    Ok(s)
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
