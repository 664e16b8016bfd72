//! What the read service answers, typed: the same shapes over HTTP (documented in the OpenAPI
//! document it serves) and as MCP structured content.

use std::collections::BTreeMap;

use projectors::order_view::OrderView;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An answer and how fresh it is.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Answer<T> {
    pub data: T,
    pub freshness: Freshness,
}

/// How far the read model behind an answer has come.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct Freshness {
    /// The projection answering (customer360, order_view, analytics).
    pub projection: String,
    /// The read-model version read (`live`, or a rebuilt `vYYYYMMDDHHMMSS` after a switch).
    pub version: String,
    /// Documents: the last sequence applied of each source stream (`aggregate_type/id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<BTreeMap<String, i64>>,
    /// The newest event time the answer reflects (event time, not the wall clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<String>,
    /// Analytics: the highest global position projected into the table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_global_position: Option<i64>,
    /// The consumer-group lag of the workers that write this projection (`read.groups`; null
    /// when the broker could not be asked).
    pub lag: Option<Lag>,
    /// When the service read the answer (UTC).
    pub read_at: String,
    /// The read-your-writes condition the caller asked for, and whether the answer meets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencyReport>,
}

/// Messages published but not yet applied by the deployment's consumer group.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Lag {
    pub group: String,
    /// Sum over partitions of (high watermark - committed offset).
    pub messages: i64,
    /// Per topic partition, only those with a lag.
    pub partitions: Vec<PartitionLag>,
    /// Partitions no member of the group owns, as the group coordinator says: their lag does
    /// not shrink until a member takes them.
    #[serde(default)]
    pub unowned_partitions: u32,
    /// When the broker was asked (UTC); lag is reused for `read.cache_ms`.
    pub observed_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (-1: none yet).
    pub committed: i64,
    pub high_watermark: i64,
    pub lag: i64,
    /// The client id of the member the coordinator assigned it to (none: nobody consumes it).
    #[serde(default)]
    pub owner: Option<String>,
}

/// "Answer only once this event is in": the event a caller caused, by its global position
/// or by its stream and sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct After {
    /// The event's `global_position` in the event store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    /// The event's stream, `aggregate_type/aggregate_id` (e.g. `order/ord-17`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The event's `sequence_number` in that stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ConsistencyReport {
    pub requested: After,
    /// The event it names, as found in the event store.
    pub event: EventRef,
    /// Whether that event changes this answer at all (an event about another customer does
    /// not: the answer then meets the condition trivially).
    pub affects_answer: bool,
    /// Whether the answer includes the event.
    pub included: bool,
    pub waited_ms: u64,
    /// Set when the projection holds the event's stream back (a refused event before it):
    /// waiting will not help until an operator unparks the stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EventRef {
    pub global_position: i64,
    pub stream: String,
    pub sequence: i64,
    pub event_type: String,
}

/// A customer's orders, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OrderPage {
    pub orders: Vec<OrderView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Granularity of a time series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    #[default]
    Day,
    Week,
    Month,
}

impl Granularity {
    /// The ClickHouse function that starts a period.
    pub fn function(self) -> &'static str {
        match self {
            Granularity::Day => "toStartOfDay",
            Granularity::Week => "toMonday",
            Granularity::Month => "toStartOfMonth",
        }
    }
}

/// Revenue of orders placed, per period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clickhouse::Row)]
pub struct RevenuePoint {
    /// The period's first day (YYYY-MM-DD, UTC).
    pub period: String,
    pub orders: u64,
    pub revenue_cents: i64,
}

/// Orders placed in the range, and how many of them reached each later step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, clickhouse::Row)]
pub struct Funnel {
    pub placed: u64,
    pub validated: u64,
    pub paid: u64,
    pub shipped: u64,
    pub delivered: u64,
    pub cancelled: u64,
    pub validation_failed: u64,
}

/// Interactions and their mean sentiment per period and type (scored interactions only
/// count toward the mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clickhouse::Row)]
pub struct SentimentPoint {
    pub period: String,
    pub interaction_type: String,
    pub interactions: u64,
    pub scored: u64,
    pub avg_sentiment: Option<f64>,
}

/// Ticket resolution times (created → resolved), tickets resolved in the range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clickhouse::Row)]
pub struct Resolution {
    pub resolved: u64,
    pub p50_seconds: f64,
    pub p90_seconds: f64,
    pub p99_seconds: f64,
}

/// Where one projection stands.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ProjectionStatus {
    pub projection: String,
    pub store: String,
    /// The version readers use.
    pub live_version: String,
    /// A rebuild is handing readers over right now.
    pub switching: bool,
    /// Rebuilds of this projection (newest first), with progress.
    pub rebuilds: Vec<RebuildProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RebuildProgress {
    pub version: String,
    /// building | caught_up | live | retired
    pub status: String,
    /// Every event at or below this global position is applied.
    pub position: i64,
    pub events_applied: i64,
    pub started_at: String,
    pub updated_at: String,
    /// Events per second since it started (while building).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Seconds to the event store's head at that rate (an estimate: positions have gaps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Status {
    /// The event store's head: the last committed event in commit order.
    pub event_store_head: i64,
    pub projections: Vec<ProjectionStatus>,
    /// The lag of the read models' consumer group furthest behind (`read.groups`).
    pub lag: Option<Lag>,
    pub read_at: String,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// not_found | bad_request | unauthorized | not_yet | unknown_event | busy | unavailable
    pub error: String,
    pub message: String,
    /// With `not_yet`: where the projection stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freshness: Option<Freshness>,
}
