//! Order view (MongoDB): one document per order, `_id` = order_id, with its status timeline.

use chrono::{DateTime, Utc};
use contract::catalogue::OrderItem;
use contract::{Event, EventData, EventType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Projector, StoreKind};

pub const NAME: &str = "order_view";

// Fields are declared in sorted order (`_id` first): documents serialise exactly as the
// earlier, map-based version wrote them.

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OrderView {
    #[serde(rename = "_id")]
    pub order_id: String,
    pub cancellation: Option<Cancellation>,
    pub currency: Option<String>,
    pub customer_id: String,
    pub items: Vec<OrderItem>,
    pub payment: Option<Payment>,
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub placed_at: Option<DateTime<Utc>>,
    pub shipping: Option<Shipping>,
    pub shipping_address: Map<String, Value>,
    /// created → payment_pending → payment_confirmed → preparing → shipped → delivered,
    /// or validation_failed / cancelled.
    pub status: String,
    pub timeline: Vec<TimelineEntry>,
    pub total_amount: f64,
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub updated_at: Option<DateTime<Utc>>,
    pub validation_failure: Option<ValidationFailure>,
    /// The last applied sequence_number of the order's stream.
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Payment {
    pub amount: f64,
    #[serde(serialize_with = "crate::time::ser")]
    pub confirmed_at: DateTime<Utc>,
    pub payment_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Shipping {
    pub carrier: Option<String>,
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub shipped_at: Option<DateTime<Utc>>,
    pub tracking_number: Option<String>,
    pub warehouse_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Cancellation {
    #[serde(serialize_with = "crate::time::ser")]
    pub at: DateTime<Utc>,
    pub cancelled_by: String,
    pub previous_status: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ValidationFailure {
    pub details: Vec<Value>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TimelineEntry {
    #[serde(serialize_with = "crate::time::ser")]
    pub at: DateTime<Utc>,
    pub event_type: String,
    pub status: String,
}

/// Every status an order view can have.
pub const STATUSES: [&str; 8] = [
    "created",
    "payment_pending",
    "payment_confirmed",
    "preparing",
    "shipped",
    "delivered",
    "cancelled",
    "validation_failed",
];

const TERMINAL: [&str; 3] = ["delivered", "cancelled", "validation_failed"];

pub struct OrderViewProjector;

impl Projector for OrderViewProjector {
    type View = OrderView;

    fn name(&self) -> &'static str {
        NAME
    }
    fn store(&self) -> StoreKind {
        StoreKind::Mongo
    }
    fn handles(&self) -> &'static [EventType] {
        &[
            EventType::OrderPlaced,
            EventType::OrderValidated,
            EventType::OrderValidationFailed,
            EventType::OrderPaymentConfirmed,
            EventType::OrderPreparationStarted,
            EventType::OrderShipped,
            EventType::OrderCompleted,
            EventType::OrderCancelled,
        ]
    }
    fn view_key<'e>(&self, event: &'e Event) -> Option<&'e str> {
        Some(&event.header.aggregate_id)
    }

    fn apply(&self, v: &mut OrderView, event: &Event) -> Result<(), String> {
        let at = event.header.timestamp;
        let placed = !v.order_id.is_empty();
        let status = match (&event.data, placed) {
            (EventData::OrderPlaced(_), true) => return Err("order was already placed".into()),
            (EventData::OrderPlaced(_), false) => "created",
            (_, false) => return Err("order was never placed".into()),
            (_, true) if TERMINAL.contains(&v.status.as_str()) => {
                return Err(format!("order is already {}", v.status));
            }
            (EventData::OrderValidated(_), _) => "payment_pending",
            (EventData::OrderValidationFailed(_), _) => "validation_failed",
            (EventData::OrderPaymentConfirmed(_), _) => "payment_confirmed",
            (EventData::OrderPreparationStarted(_), _) => "preparing",
            (EventData::OrderShipped(_), _) => "shipped",
            (EventData::OrderCompleted(_), _) => "delivered",
            (EventData::OrderCancelled(_), _) => "cancelled",
            _ => return Err("not an order event".into()),
        };
        match &event.data {
            EventData::OrderPlaced(d) => {
                v.order_id = d.order_id.clone();
                v.customer_id = d.customer_id.clone();
                v.items = d.items.clone();
                v.total_amount = d.total_amount;
                v.currency = d.currency.clone();
                v.shipping_address = d.shipping_address.clone();
                v.placed_at = Some(at);
            }
            EventData::OrderValidationFailed(d) => {
                v.validation_failure = Some(ValidationFailure {
                    reason: d.reason.clone(),
                    details: d.details.clone(),
                });
            }
            EventData::OrderPaymentConfirmed(d) => {
                v.payment = Some(Payment {
                    payment_id: d.payment_id.clone(),
                    amount: d.amount,
                    confirmed_at: at,
                });
            }
            EventData::OrderPreparationStarted(d) => {
                v.shipping
                    .get_or_insert_with(Shipping::default)
                    .warehouse_id = Some(d.warehouse_id.clone());
            }
            EventData::OrderShipped(d) => {
                let s = v.shipping.get_or_insert_with(Shipping::default);
                s.carrier = Some(d.carrier.clone());
                s.tracking_number = Some(d.tracking_number.clone());
                s.shipped_at = Some(at);
            }
            EventData::OrderCancelled(d) => {
                v.cancellation = Some(Cancellation {
                    reason: d.reason.clone(),
                    cancelled_by: d.cancelled_by.clone(),
                    previous_status: d.previous_status.clone(),
                    at,
                });
            }
            _ => {}
        }
        v.status = status.to_owned();
        v.timeline.push(TimelineEntry {
            status: status.to_owned(),
            event_type: event.header.event_type.clone(),
            at,
        });
        v.updated_at = Some(at);
        v.version = event.header.sequence_number;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
