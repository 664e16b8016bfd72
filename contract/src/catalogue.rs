//! Typed `event_data` for every event type of the catalogue (DESIGN §1).
//!
//! Unknown event types are not errors: they decode to [`EventData::Unknown`] with the raw JSON
//! kept, so a newer producer never breaks an older worker.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{AggregateType, ContractError};

/// The catalogue's event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    CustomerCreated,
    CustomerUpdated,
    InteractionRecorded,
    OrderPlaced,
    OrderValidated,
    OrderValidationFailed,
    OrderPaymentConfirmed,
    OrderPreparationStarted,
    OrderShipped,
    OrderCompleted,
    OrderCancelled,
    TicketCreated,
    TicketResolved,
}

impl EventType {
    pub const ALL: [EventType; 13] = [
        Self::CustomerCreated,
        Self::CustomerUpdated,
        Self::InteractionRecorded,
        Self::OrderPlaced,
        Self::OrderValidated,
        Self::OrderValidationFailed,
        Self::OrderPaymentConfirmed,
        Self::OrderPreparationStarted,
        Self::OrderShipped,
        Self::OrderCompleted,
        Self::OrderCancelled,
        Self::TicketCreated,
        Self::TicketResolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CustomerCreated => "customer.created",
            Self::CustomerUpdated => "customer.updated",
            Self::InteractionRecorded => "interaction.recorded",
            Self::OrderPlaced => "order.placed",
            Self::OrderValidated => "order.validated",
            Self::OrderValidationFailed => "order.validation_failed",
            Self::OrderPaymentConfirmed => "order.payment_confirmed",
            Self::OrderPreparationStarted => "order.preparation_started",
            Self::OrderShipped => "order.shipped",
            Self::OrderCompleted => "order.completed",
            Self::OrderCancelled => "order.cancelled",
            Self::TicketCreated => "support.ticket.created",
            Self::TicketResolved => "support.ticket.resolved",
        }
    }

    /// The aggregate whose stream carries this event type.
    pub fn aggregate_type(self) -> AggregateType {
        match self {
            Self::CustomerCreated | Self::CustomerUpdated | Self::InteractionRecorded => {
                AggregateType::Customer
            }
            Self::TicketCreated | Self::TicketResolved => AggregateType::SupportTicket,
            _ => AggregateType::Order,
        }
    }

    /// `None` for a type outside the catalogue (kept as raw JSON, never an error).
    pub fn parse(s: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| ContractError::InvalidValue {
            field: "event_type",
            reason: format!("{s:?} is not in the catalogue"),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerCreated {
    pub customer_id: String,
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub address: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerUpdated {
    pub customer_id: String,
    pub changes: Map<String, Value>,
    #[serde(default)]
    pub previous_values: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InteractionRecorded {
    pub customer_id: String,
    pub agent_id: String,
    pub interaction_id: String,
    pub interaction_type: String,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub sentiment_score: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrderItem {
    pub product_id: String,
    pub quantity: u32,
    pub unit_price: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<OrderItem>,
    pub shipping_address: Map<String, Value>,
    pub total_amount: f64,
    #[serde(default)]
    pub currency: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderValidated {
    pub order_id: String,
    pub customer_id: String,
    #[serde(default)]
    pub validation_details: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderValidationFailed {
    pub order_id: String,
    pub customer_id: String,
    pub reason: String,
    #[serde(default)]
    pub details: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPaymentConfirmed {
    pub order_id: String,
    pub customer_id: String,
    pub payment_id: String,
    pub amount: f64,
    #[serde(default)]
    pub transaction_details: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPreparationStarted {
    pub order_id: String,
    pub customer_id: String,
    pub warehouse_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub order_id: String,
    pub customer_id: String,
    pub carrier: String,
    pub tracking_number: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCompleted {
    pub order_id: String,
    pub customer_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    pub customer_id: String,
    pub reason: String,
    pub cancelled_by: String,
    pub previous_status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketCreated {
    pub ticket_id: String,
    pub customer_id: String,
    pub subject: String,
    pub priority: String,
    pub channel: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketResolved {
    pub ticket_id: String,
    pub customer_id: String,
    pub resolution: String,
}

/// The typed payload of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventData {
    CustomerCreated(CustomerCreated),
    CustomerUpdated(CustomerUpdated),
    InteractionRecorded(InteractionRecorded),
    OrderPlaced(OrderPlaced),
    OrderValidated(OrderValidated),
    OrderValidationFailed(OrderValidationFailed),
    OrderPaymentConfirmed(OrderPaymentConfirmed),
    OrderPreparationStarted(OrderPreparationStarted),
    OrderShipped(OrderShipped),
    OrderCompleted(OrderCompleted),
    OrderCancelled(OrderCancelled),
    TicketCreated(TicketCreated),
    TicketResolved(TicketResolved),
    /// A type outside the catalogue, kept as it came.
    Unknown {
        event_type: String,
        data: Value,
    },
}

fn parse<T: serde::de::DeserializeOwned>(t: EventType, v: &Value) -> Result<T, ContractError> {
    T::deserialize(v).map_err(|e| ContractError::InvalidEventData {
        event_type: t.as_str().to_owned(),
        reason: e.to_string(),
    })
}

fn parse_str<T: serde::de::DeserializeOwned>(t: EventType, s: &str) -> Result<T, ContractError> {
    serde_json::from_str(s).map_err(|e| ContractError::InvalidEventData {
        event_type: t.as_str().to_owned(),
        reason: e.to_string(),
    })
}

fn check(t: EventType, ok: bool, reason: impl FnOnce() -> String) -> Result<(), ContractError> {
    if ok {
        Ok(())
    } else {
        Err(ContractError::InvalidEventData {
            event_type: t.as_str().to_owned(),
            reason: reason(),
        })
    }
}

/// The largest amount of money one event may carry. In cents it stays far below 2^53, so
/// the conversion to integer cents is exact, and sums over millions of events fit an i64.
pub const MAX_AMOUNT: f64 = 1e12;

fn amount(t: EventType, field: &str, v: f64) -> Result<(), ContractError> {
    check(t, v.is_finite() && (0.0..=MAX_AMOUNT).contains(&v), || {
        format!("{field} must be a finite amount within 0..={MAX_AMOUNT}, got {v}")
    })
}

/// Free-form JSON inside a payload (addresses, details) is stored as it came; the document
/// stores hold signed 64-bit integers at most, so a larger integer could never be projected.
fn storable(t: EventType, field: &str, v: &Value) -> Result<(), ContractError> {
    match v {
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => {
            Err(ContractError::InvalidEventData {
                event_type: t.as_str().to_owned(),
                reason: format!("{field} holds the integer {n}, outside the signed 64-bit range"),
            })
        }
        Value::Array(xs) => xs.iter().try_for_each(|x| storable(t, field, x)),
        Value::Object(m) => m.values().try_for_each(|x| storable(t, field, x)),
        _ => Ok(()),
    }
}

fn storable_map(t: EventType, field: &str, m: &Map<String, Value>) -> Result<(), ContractError> {
    m.values().try_for_each(|x| storable(t, field, x))
}

/// Parse each catalogue type with one parser (from a JSON tree or straight from text).
macro_rules! decode_with {
    ($t:expr, $parse:ident, $data:expr) => {{
        let t = $t;
        match t {
            EventType::CustomerCreated => EventData::CustomerCreated($parse(t, $data)?),
            EventType::CustomerUpdated => EventData::CustomerUpdated($parse(t, $data)?),
            EventType::InteractionRecorded => EventData::InteractionRecorded($parse(t, $data)?),
            EventType::OrderPlaced => EventData::OrderPlaced($parse(t, $data)?),
            EventType::OrderValidated => EventData::OrderValidated($parse(t, $data)?),
            EventType::OrderValidationFailed => EventData::OrderValidationFailed($parse(t, $data)?),
            EventType::OrderPaymentConfirmed => EventData::OrderPaymentConfirmed($parse(t, $data)?),
            EventType::OrderPreparationStarted => {
                EventData::OrderPreparationStarted($parse(t, $data)?)
            }
            EventType::OrderShipped => EventData::OrderShipped($parse(t, $data)?),
            EventType::OrderCompleted => EventData::OrderCompleted($parse(t, $data)?),
            EventType::OrderCancelled => EventData::OrderCancelled($parse(t, $data)?),
            EventType::TicketCreated => EventData::TicketCreated($parse(t, $data)?),
            EventType::TicketResolved => EventData::TicketResolved($parse(t, $data)?),
        }
    }};
}

impl EventData {
    /// Decode `event_data` of the given event type. Unknown types never fail.
    pub fn decode(event_type: &str, data: &Value) -> Result<EventData, ContractError> {
        let Some(t) = EventType::parse(event_type) else {
            return Ok(EventData::Unknown {
                event_type: event_type.to_owned(),
                data: data.clone(),
            });
        };
        let d = decode_with!(t, parse, data);
        d.validate(t)?;
        Ok(d)
    }

    /// Decode `event_data` straight from its JSON text (no tree on the way).
    pub fn decode_str(event_type: &str, text: &str) -> Result<EventData, ContractError> {
        let Some(t) = EventType::parse(event_type) else {
            let data = serde_json::from_str(text).map_err(|e| ContractError::InvalidJson {
                reason: e.to_string(),
            })?;
            return Ok(EventData::Unknown {
                event_type: event_type.to_owned(),
                data,
            });
        };
        let d = decode_with!(t, parse_str, text);
        d.validate(t)?;
        Ok(d)
    }

    /// The value rules serde cannot express: ranges, and what the stores can hold.
    fn validate(&self, t: EventType) -> Result<(), ContractError> {
        match self {
            Self::CustomerCreated(d) => {
                if let Some(a) = &d.address {
                    storable(t, "address", a)?;
                }
            }
            Self::CustomerUpdated(d) => {
                storable_map(t, "changes", &d.changes)?;
                storable_map(t, "previous_values", &d.previous_values)?;
            }
            Self::InteractionRecorded(d) => {
                if let Some(s) = d.sentiment_score {
                    check(t, (0.0..=1.0).contains(&s), || {
                        format!("sentiment_score must be within 0..1, got {s}")
                    })?;
                }
            }
            Self::OrderPlaced(d) => {
                amount(t, "total_amount", d.total_amount)?;
                for item in &d.items {
                    amount(t, "unit_price", item.unit_price)?;
                }
                storable_map(t, "shipping_address", &d.shipping_address)?;
            }
            Self::OrderValidated(d) => {
                storable_map(t, "validation_details", &d.validation_details)?
            }
            Self::OrderValidationFailed(d) => d
                .details
                .iter()
                .try_for_each(|x| storable(t, "details", x))?,
            Self::OrderPaymentConfirmed(d) => {
                amount(t, "amount", d.amount)?;
                storable_map(t, "transaction_details", &d.transaction_details)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The catalogue type, `None` for [`EventData::Unknown`].
    pub fn event_type(&self) -> Option<EventType> {
        Some(match self {
            Self::CustomerCreated(_) => EventType::CustomerCreated,
            Self::CustomerUpdated(_) => EventType::CustomerUpdated,
            Self::InteractionRecorded(_) => EventType::InteractionRecorded,
            Self::OrderPlaced(_) => EventType::OrderPlaced,
            Self::OrderValidated(_) => EventType::OrderValidated,
            Self::OrderValidationFailed(_) => EventType::OrderValidationFailed,
            Self::OrderPaymentConfirmed(_) => EventType::OrderPaymentConfirmed,
            Self::OrderPreparationStarted(_) => EventType::OrderPreparationStarted,
            Self::OrderShipped(_) => EventType::OrderShipped,
            Self::OrderCompleted(_) => EventType::OrderCompleted,
            Self::OrderCancelled(_) => EventType::OrderCancelled,
            Self::TicketCreated(_) => EventType::TicketCreated,
            Self::TicketResolved(_) => EventType::TicketResolved,
            Self::Unknown { .. } => return None,
        })
    }

    /// The customer a catalogue event concerns (every catalogue event names one).
    pub fn customer_id(&self) -> Option<&str> {
        Some(match self {
            Self::CustomerCreated(d) => &d.customer_id,
            Self::CustomerUpdated(d) => &d.customer_id,
            Self::InteractionRecorded(d) => &d.customer_id,
            Self::OrderPlaced(d) => &d.customer_id,
            Self::OrderValidated(d) => &d.customer_id,
            Self::OrderValidationFailed(d) => &d.customer_id,
            Self::OrderPaymentConfirmed(d) => &d.customer_id,
            Self::OrderPreparationStarted(d) => &d.customer_id,
            Self::OrderShipped(d) => &d.customer_id,
            Self::OrderCompleted(d) => &d.customer_id,
            Self::OrderCancelled(d) => &d.customer_id,
            Self::TicketCreated(d) => &d.customer_id,
            Self::TicketResolved(d) => &d.customer_id,
            Self::Unknown { .. } => return None,
        })
    }

    /// The id the payload gives its own aggregate (order_id, ticket_id, customer_id).
    pub fn own_aggregate_id(&self) -> Option<&str> {
        Some(match self {
            Self::OrderPlaced(d) => &d.order_id,
            Self::OrderValidated(d) => &d.order_id,
            Self::OrderValidationFailed(d) => &d.order_id,
            Self::OrderPaymentConfirmed(d) => &d.order_id,
            Self::OrderPreparationStarted(d) => &d.order_id,
            Self::OrderShipped(d) => &d.order_id,
            Self::OrderCompleted(d) => &d.order_id,
            Self::OrderCancelled(d) => &d.order_id,
            Self::TicketCreated(d) => &d.ticket_id,
            Self::TicketResolved(d) => &d.ticket_id,
            Self::Unknown { .. } => return None,
            other => other.customer_id()?,
        })
    }

    /// The payload as JSON, as it travels in `event_data`.
    pub fn to_json(&self) -> Value {
        fn j<T: Serialize>(v: &T) -> Value {
            // Serialising these plain structs to a Value cannot fail (no maps with non-string keys).
            serde_json::to_value(v).unwrap_or(Value::Null)
        }
        match self {
            Self::CustomerCreated(d) => j(d),
            Self::CustomerUpdated(d) => j(d),
            Self::InteractionRecorded(d) => j(d),
            Self::OrderPlaced(d) => j(d),
            Self::OrderValidated(d) => j(d),
            Self::OrderValidationFailed(d) => j(d),
            Self::OrderPaymentConfirmed(d) => j(d),
            Self::OrderPreparationStarted(d) => j(d),
            Self::OrderShipped(d) => j(d),
            Self::OrderCompleted(d) => j(d),
            Self::OrderCancelled(d) => j(d),
            Self::TicketCreated(d) => j(d),
            Self::TicketResolved(d) => j(d),
            Self::Unknown { data, .. } => data.clone(),
        }
    }
}
