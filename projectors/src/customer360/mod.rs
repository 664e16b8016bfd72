//! Customer-360 (Redis): one document per customer, fed by all three aggregates.
//!
//! Events of different aggregates reach a document in no fixed order, so every field is
//! order-independent: times are maxima, counters commute, money is summed in integer cents,
//! and the sentiment EMA only sees the customer's own stream (which arrives in sequence).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use contract::{Event, EventData, EventType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Projector, StoreKind};

pub const NAME: &str = "customer360";
/// EMA weight of the newest score.
pub const SENTIMENT_ALPHA: f64 = 0.3;
pub const RECENT_SENTIMENT: usize = 10;

// Fields are declared in sorted order (`_state` sorts first): documents serialise exactly as
// the earlier, map-based version wrote them, byte for byte.

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Customer360 {
    /// Per-order and per-ticket facts the commutative counters are derived from.
    #[serde(rename = "_state", default)]
    pub state: State,
    /// For agents: flags, value tier and a one-line summary, derived only from this view
    /// (set by [`Customer360Projector::seal`] before every write).
    #[serde(default)]
    pub context: Context,
    pub customer_id: String,
    pub interactions: Interactions,
    pub orders: Orders,
    pub profile: Option<Profile>,
    pub support: Support,
    /// The latest event time applied (never the wall clock).
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub updated_at: Option<DateTime<Utc>>,
    /// How many events this document reflects.
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Profile {
    pub address: Option<Value>,
    /// Changed fields outside the fixed profile.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attributes: Map<String, Value>,
    #[serde(serialize_with = "crate::time::ser")]
    pub created_at: DateTime<Utc>,
    pub email: String,
    pub name: String,
    pub phone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Interactions {
    pub by_type: BTreeMap<String, u64>,
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub last_at: Option<DateTime<Utc>>,
    pub recent_sentiment: Vec<SentimentPoint>,
    pub sentiment_avg: Option<f64>,
    /// positive (EMA above 0.6), negative (below 0.4), else neutral, also without any score.
    #[serde(deserialize_with = "neutral_if_null")]
    pub sentiment_trend: String,
    pub total: u64,
}

impl Default for Interactions {
    fn default() -> Self {
        Interactions {
            by_type: BTreeMap::new(),
            last_at: None,
            recent_sentiment: Vec::new(),
            sentiment_avg: None,
            sentiment_trend: NEUTRAL.to_owned(),
            total: 0,
        }
    }
}

const NEUTRAL: &str = "neutral";

/// Documents of contract version 1 stored `null` before the first score.
fn neutral_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(|| NEUTRAL.to_owned()))
}

/// What an agent should know first about a customer, derived only from the view (a rebuild
/// gives the same bytes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Context {
    /// low (no flag but `no_profile`), medium (one), high (two or more, or negative
    /// sentiment with an open ticket).
    pub attention: String,
    /// In this order, those that hold: negative_sentiment, open_tickets, cancelled_orders,
    /// failed_orders, slow_support (mean resolution of a day or more), no_profile.
    pub flags: Vec<String>,
    /// One line for a prompt.
    pub summary: String,
    /// By the value of orders placed: none (0), low (< 100), medium (< 1,000), high.
    pub value_tier: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SentimentPoint {
    #[serde(serialize_with = "crate::time::ser")]
    pub at: DateTime<Utc>,
    pub score: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Orders {
    pub cancelled: u64,
    pub completed: u64,
    pub failed: u64,
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub last_at: Option<DateTime<Utc>>,
    pub open: u64,
    pub total: u64,
    pub total_value: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Support {
    pub avg_resolution_seconds: Option<i64>,
    #[serde(serialize_with = "crate::time::ser_opt")]
    pub last_at: Option<DateTime<Utc>>,
    pub open_tickets: u64,
    pub total_tickets: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct State {
    /// Orders placed and not yet completed, cancelled or failed. A finished order leaves:
    /// its outcome is counted in `orders`, and its stream is finished for the view (see
    /// [`Customer360Projector::finishes`]), so the state holds open work, not history.
    #[serde(default)]
    pub open_orders: BTreeSet<String>,
    /// ticket_id → creation time, while open.
    #[serde(serialize_with = "crate::time::ser_map")]
    pub open_tickets: BTreeMap<String, DateTime<Utc>>,
    pub order_value_cents: i64,
    /// Contract 2 kept every order with its status: read from an older document, its open
    /// orders are carried into `open_orders` (its counters already hold the others).
    #[serde(default, rename = "orders", skip_serializing)]
    pub legacy_orders: Option<BTreeMap<String, String>>,
    /// Exact durations (microseconds), so the mean is exact.
    #[serde(default)]
    pub resolution_micros_sum: i64,
    /// Contract 1 kept whole seconds: read from an older document, carried into
    /// `resolution_micros_sum` on its next write.
    #[serde(default, rename = "resolution_seconds_sum", skip_serializing)]
    pub legacy_resolution_seconds: Option<i64>,
    pub resolved_tickets: u64,
}

pub fn trend(avg: f64) -> &'static str {
    if avg > 0.6 {
        "positive"
    } else if avg < 0.4 {
        "negative"
    } else {
        "neutral"
    }
}

/// Integer cents of an amount. The contract bounds amounts (`MAX_AMOUNT`), so this is exact.
fn cents(amount: f64) -> i64 {
    (amount * 100.0).round() as i64
}

fn max_time(slot: &mut Option<DateTime<Utc>>, t: DateTime<Utc>) {
    if slot.is_none_or(|cur| t > cur) {
        *slot = Some(t);
    }
}

pub struct Customer360Projector;

impl Projector for Customer360Projector {
    type View = Customer360;

    fn name(&self) -> &'static str {
        NAME
    }
    fn store(&self) -> StoreKind {
        StoreKind::Redis
    }
    fn handles(&self) -> &'static [EventType] {
        &EventType::ALL
    }
    fn view_key<'e>(&self, event: &'e Event) -> Option<&'e str> {
        event.data.customer_id()
    }

    fn seal(&self, v: &mut Customer360) {
        carry_legacy(v);
        derive_counters(v);
        v.context = context(v);
    }

    /// An order's stream ends with its outcome, a ticket's with its resolution.
    fn finishes(&self, event: &Event) -> bool {
        matches!(
            event.data,
            EventData::OrderCompleted(_)
                | EventData::OrderCancelled(_)
                | EventData::OrderValidationFailed(_)
                | EventData::TicketResolved(_)
        )
    }

    fn apply(&self, v: &mut Customer360, event: &Event) -> Result<(), String> {
        carry_legacy(v);
        let at = event.header.timestamp;
        let Some(customer_id) = event.data.customer_id() else {
            return Err("not a catalogue event".into());
        };
        match &event.data {
            EventData::CustomerCreated(d) => {
                v.profile = Some(Profile {
                    name: d.name.clone(),
                    email: d.email.clone(),
                    phone: d.phone.clone(),
                    address: d.address.clone(),
                    created_at: at,
                    attributes: Map::new(),
                });
            }
            EventData::CustomerUpdated(d) => {
                let Some(p) = v.profile.as_mut() else {
                    return Err("customer.updated before customer.created".into());
                };
                for (field, value) in &d.changes {
                    let text = || value.as_str().map(str::to_owned);
                    match field.as_str() {
                        "name" => p.name = text().unwrap_or_else(|| p.name.clone()),
                        "email" => p.email = text().unwrap_or_else(|| p.email.clone()),
                        "phone" => p.phone = text(),
                        "address" => p.address = (!value.is_null()).then(|| value.clone()),
                        _ => {
                            p.attributes.insert(field.clone(), value.clone());
                        }
                    }
                }
            }
            EventData::InteractionRecorded(d) => {
                let i = &mut v.interactions;
                i.total += 1;
                max_time(&mut i.last_at, at);
                *i.by_type.entry(d.interaction_type.clone()).or_default() += 1;
                if let Some(score) = d.sentiment_score {
                    let avg = match i.sentiment_avg {
                        None => score,
                        Some(prev) => SENTIMENT_ALPHA * score + (1.0 - SENTIMENT_ALPHA) * prev,
                    };
                    i.sentiment_avg = Some(avg);
                    i.sentiment_trend = trend(avg).to_owned();
                    i.recent_sentiment.push(SentimentPoint { at, score });
                    let excess = i.recent_sentiment.len().saturating_sub(RECENT_SENTIMENT);
                    i.recent_sentiment.drain(..excess);
                }
            }
            EventData::OrderPlaced(d) => {
                let value = v
                    .state
                    .order_value_cents
                    .checked_add(cents(d.total_amount))
                    .ok_or("the customer's order value overflows")?;
                v.state.open_orders.insert(d.order_id.clone());
                v.state.order_value_cents = value;
                v.orders.total += 1;
            }
            EventData::OrderCompleted(d) => v.orders.completed += close_order(v, &d.order_id)?,
            EventData::OrderCancelled(d) => v.orders.cancelled += close_order(v, &d.order_id)?,
            EventData::OrderValidationFailed(d) => v.orders.failed += close_order(v, &d.order_id)?,
            EventData::OrderValidated(_)
            | EventData::OrderPaymentConfirmed(_)
            | EventData::OrderPreparationStarted(_)
            | EventData::OrderShipped(_) => {}
            EventData::TicketCreated(d) => {
                v.state.open_tickets.insert(d.ticket_id.clone(), at);
                v.support.total_tickets += 1;
            }
            EventData::TicketResolved(d) => {
                let Some(opened) = v.state.open_tickets.get(&d.ticket_id) else {
                    return Err(format!("ticket {} is not open", d.ticket_id));
                };
                let sum = (at - *opened)
                    .num_microseconds()
                    .and_then(|d| v.state.resolution_micros_sum.checked_add(d))
                    .ok_or("the resolution time sum overflows")?;
                v.state.open_tickets.remove(&d.ticket_id);
                v.state.resolved_tickets += 1;
                v.state.resolution_micros_sum = sum;
            }
            EventData::Unknown { .. } => return Err("not a catalogue event".into()),
        }
        if event.header.aggregate_type == contract::AggregateType::Order {
            max_time(&mut v.orders.last_at, at);
        }
        if event.header.aggregate_type == contract::AggregateType::SupportTicket {
            max_time(&mut v.support.last_at, at);
        }
        v.customer_id = customer_id.to_owned();
        v.version += 1;
        max_time(&mut v.updated_at, at);
        Ok(())
    }
}

/// An open order reaches its outcome (once: its stream is finished then): 1, to count it.
fn close_order(v: &mut Customer360, order_id: &str) -> Result<u64, String> {
    if v.state.open_orders.remove(order_id) {
        Ok(1)
    } else {
        Err(format!("order {order_id} is not open"))
    }
}

/// Carry what older contracts stored into today's state (once, on the first use).
fn carry_legacy(v: &mut Customer360) {
    if let Some(orders) = v.state.legacy_orders.take() {
        let open = orders.into_iter().filter(|(_, s)| s == "open");
        v.state.open_orders.extend(open.map(|(id, _)| id));
    }
    if let Some(secs) = v.state.legacy_resolution_seconds.take() {
        v.state.resolution_micros_sum = v
            .state
            .resolution_micros_sum
            .saturating_add(secs.saturating_mul(1_000_000));
    }
}

/// Counters derived from the open orders and tickets, once per write: commutative, and O(1)
/// in the customer's history.
fn derive_counters(v: &mut Customer360) {
    v.orders.open = v.state.open_orders.len() as u64;
    v.orders.total_value = v.state.order_value_cents as f64 / 100.0;
    v.support.open_tickets = v.state.open_tickets.len() as u64;
    // The exact mean (of exact durations), rounded to the nearest second.
    v.support.avg_resolution_seconds = (v.state.resolved_tickets > 0).then(|| {
        (v.state.resolution_micros_sum as f64 / v.state.resolved_tickets as f64 / 1e6).round()
            as i64
    });
}

/// The agents' context of a view.
pub fn context(v: &Customer360) -> Context {
    let (i, o, s) = (&v.interactions, &v.orders, &v.support);
    let negative = i.sentiment_trend == "negative";
    let checks = [
        (negative, "negative_sentiment"),
        (s.open_tickets > 0, "open_tickets"),
        (o.cancelled > 0, "cancelled_orders"),
        (o.failed > 0, "failed_orders"),
        (
            s.avg_resolution_seconds.is_some_and(|a| a >= 86_400),
            "slow_support",
        ),
        (v.profile.is_none(), "no_profile"),
    ];
    let flags: Vec<String> = checks
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| (*f).to_owned())
        .collect();
    let serious = flags.iter().filter(|f| *f != "no_profile").count();
    let attention = if serious >= 2 || (negative && s.open_tickets > 0) {
        "high"
    } else if serious == 1 {
        "medium"
    } else {
        "low"
    };
    let value_tier = match v.state.order_value_cents {
        0 => "none",
        c if c < 10_000 => "low",
        c if c < 100_000 => "medium",
        _ => "high",
    };
    let name = v
        .profile
        .as_ref()
        .map_or("unknown customer", |p| p.name.as_str());
    let sentiment = match i.sentiment_avg {
        Some(a) => format!("{} ({a:.2})", i.sentiment_trend),
        None => "not scored".to_owned(),
    };
    let summary = format!(
        "{name} ({}): {value_tier} value, {} orders worth {:.2} ({} open, {} completed, {} cancelled, {} failed); {} of {} tickets open; {} interactions, sentiment {sentiment}; attention {attention}.",
        v.customer_id,
        o.total,
        o.total_value,
        o.open,
        o.completed,
        o.cancelled,
        o.failed,
        s.open_tickets,
        s.total_tickets,
        i.total,
    );
    Context {
        attention: attention.to_owned(),
        flags,
        summary,
        value_tier: value_tier.to_owned(),
    }
}

#[cfg(test)]
mod tests;
