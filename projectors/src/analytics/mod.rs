//! Analytics (ClickHouse): one fact row per event, deduplicated by event_id in the store.
//! Aggregates (revenue, funnel, sentiment, resolution times) are queries over the facts.

use chrono::{DateTime, Utc};
use contract::{Event, EventData, EventType};
use serde::{Deserialize, Serialize};

use crate::FactProjector;

pub const NAME: &str = "analytics";

/// One row of the `event_facts` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub event_id: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence_number: i64,
    pub global_position: i64,
    pub customer_id: String,
    /// Event time, milliseconds since the epoch.
    pub ts_ms: i64,
    /// Money moved by the event in cents (order total when placed, amount when paid).
    pub amount_cents: i64,
    pub interaction_type: String,
    /// -1 when the event carries no sentiment score.
    pub sentiment: f64,
}

pub struct AnalyticsProjector;

impl FactProjector for AnalyticsProjector {
    fn name(&self) -> &'static str {
        NAME
    }
    fn handles(&self) -> &'static [EventType] {
        &EventType::ALL
    }

    fn fact(&self, event: &Event) -> Result<Fact, String> {
        let e = &event.header;
        // Amounts are bounded by the contract, so integer cents are exact.
        let (amount_cents, interaction_type, sentiment) = match &event.data {
            EventData::OrderPlaced(d) => ((d.total_amount * 100.0).round() as i64, "", -1.0),
            EventData::OrderPaymentConfirmed(d) => ((d.amount * 100.0).round() as i64, "", -1.0),
            EventData::InteractionRecorded(d) => (
                0,
                d.interaction_type.as_str(),
                d.sentiment_score.unwrap_or(-1.0),
            ),
            _ => (0, "", -1.0),
        };
        Ok(Fact {
            event_id: e.event_id.to_string(),
            event_type: e.event_type.clone(),
            aggregate_type: e.aggregate_type.to_string(),
            aggregate_id: e.aggregate_id.clone(),
            sequence_number: e.sequence_number,
            global_position: e.global_position,
            customer_id: event.data.customer_id().unwrap_or_default().to_owned(),
            ts_ms: e.timestamp.timestamp_millis(),
            amount_cents,
            interaction_type: interaction_type.to_owned(),
            sentiment,
        })
    }
}

/// Event time of a fact.
pub fn fact_time(f: &Fact) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(f.ts_ms)
}
