//! What the read service answers, typed: the same shapes over HTTP (documented in the OpenAPI
//! document it serves) and as MCP structured content.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use projectors::customer360::{Context, Customer360, Interactions, Orders, Profile, Support};
use projectors::order_view::OrderView;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The most an answer about one customer may weigh, whatever the customer's history.
pub const CUSTOMER_ANSWER_BYTES: usize = 16 * 1024;

/// Entries kept of a map that grows with what the events say (interaction types, profile
/// attributes), before the size check.
const MAP_ENTRIES: usize = 32;

/// A customer as agents read it: the Customer-360 view without its internal state (`_state`
/// holds one entry per order and ticket), at most [`CUSTOMER_ANSWER_BYTES`] serialised. What
/// had to be cut is named in `truncated`; the orders themselves are paged at
/// `/v1/customers/{id}/orders`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Customer {
    pub context: Context,
    pub customer_id: String,
    pub interactions: Interactions,
    pub orders: Orders,
    pub profile: Option<Profile>,
    pub support: Support,
    #[serde(serialize_with = "projectors::time::ser_opt")]
    pub updated_at: Option<DateTime<Utc>>,
    /// How many events this document reflects.
    pub version: u64,
    /// What was cut to keep the answer bounded, each with how many entries it had
    /// (e.g. `interactions.by_type: 250`). Empty when nothing was.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub truncated: BTreeMap<String, usize>,
}

impl From<Customer360> for Customer {
    fn from(v: Customer360) -> Customer {
        let mut c = Customer {
            context: v.context,
            customer_id: v.customer_id,
            interactions: v.interactions,
            orders: v.orders,
            profile: v.profile,
            support: v.support,
            updated_at: v.updated_at,
            version: v.version,
            truncated: BTreeMap::new(),
        };
        c.bound();
        c
    }
}

impl Customer {
    /// Cut what grows with the events until the answer fits: the rarest interaction types
    /// first (the busiest are kept), then profile attributes, then the address, then the
    /// summary line. Counters and times are never cut.
    fn bound(&mut self) {
        let by_type = &mut self.interactions.by_type;
        if by_type.len() > MAP_ENTRIES {
            let n = by_type.len();
            let mut counts: Vec<(String, u64)> = std::mem::take(by_type).into_iter().collect();
            counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            counts.truncate(MAP_ENTRIES);
            *by_type = counts.into_iter().collect();
            self.truncated.insert("interactions.by_type".into(), n);
        }
        if let Some(p) = self.profile.as_mut()
            && p.attributes.len() > MAP_ENTRIES
        {
            let n = p.attributes.len();
            p.attributes = std::mem::take(&mut p.attributes)
                .into_iter()
                .take(MAP_ENTRIES)
                .collect();
            self.truncated.insert("profile.attributes".into(), n);
        }
        let size = |c: &Customer| serde_json::to_vec(c).map_or(usize::MAX, |b| b.len());
        // Room for the freshness beside it.
        let max = CUSTOMER_ANSWER_BYTES - 2 * 1024;
        while size(self) > max {
            if self.interactions.by_type.len() > 1 {
                let n = self.interactions.by_type.len();
                let keep = n / 2;
                let mut counts: Vec<(String, u64)> = std::mem::take(&mut self.interactions.by_type)
                    .into_iter()
                    .collect();
                counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                counts.truncate(keep);
                self.interactions.by_type = counts.into_iter().collect();
                self.truncated
                    .entry("interactions.by_type".into())
                    .or_insert(n);
            } else if let Some(p) = self.profile.as_mut().filter(|p| !p.attributes.is_empty()) {
                let n = p.attributes.len();
                p.attributes.clear();
                self.truncated
                    .entry("profile.attributes".into())
                    .or_insert(n);
            } else if let Some(p) = self.profile.as_mut().filter(|p| p.address.is_some()) {
                p.address = None;
                self.truncated.insert("profile.address".into(), 1);
            } else if self.context.summary.len() > 256 {
                let mut end = 256;
                while !self.context.summary.is_char_boundary(end) {
                    end -= 1;
                }
                self.context.summary.truncate(end);
                self.truncated.insert("context.summary".into(), 1);
            } else {
                // Only fixed fields left (names and ids are bounded by the contract).
                break;
            }
        }
    }
}

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
    /// Documents: the last sequence applied of each source stream (`aggregate_type/id`) still
    /// open for the document (finished ones, an order with its outcome, are not listed):
    /// every one while there are at most 32, else the document's own stream only (a
    /// customer's orders and tickets are streams too; `streams_total` says how many there
    /// are, and `after_stream`/`after_sequence` asks about any one of them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<BTreeMap<String, i64>>,
    /// How many source streams the document has applied, when `streams` lists only its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams_total: Option<usize>,
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

/// Which end of a list of orders comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// The most recent first.
    #[default]
    Newest,
    /// The least recent first (for orders in a status: those stuck in it longest).
    Oldest,
}

/// One page of orders (a customer's, newest first; or those in one status).
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

/// The streams an answer lists (see [`Freshness::streams`]): all of `guard` while it is
/// small, else only `own`, with the total.
pub fn bounded_streams(
    guard: projectors::Guard,
    own: &str,
) -> (BTreeMap<String, i64>, Option<usize>) {
    const MAX: usize = 32;
    // Finished streams are not listed (a store may keep them inline, marked finished).
    let mut guard = guard;
    guard.retain(|_, seq| *seq != projectors::document::FINISHED);
    if guard.len() <= MAX {
        return (guard, None);
    }
    let total = guard.len();
    let mine = guard
        .into_iter()
        .filter(|(s, _)| s == own)
        .collect::<BTreeMap<_, _>>();
    (mine, Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use projectors::customer360::Customer360;

    #[test]
    fn a_customer_answer_is_bounded_whatever_the_history() {
        let mut v = Customer360 {
            customer_id: "c1".into(),
            ..Default::default()
        };
        for i in 0..20_000 {
            v.state.open_orders.insert(format!("ord-{i}"));
        }
        for i in 0..5_000 {
            v.interactions
                .by_type
                .insert(format!("type-{i:05}-{}", "x".repeat(40)), i);
        }
        v.profile = Some(Profile {
            address: Some(serde_json::json!({"street": "y".repeat(30_000)})),
            attributes: (0..500)
                .map(|i| (format!("a{i}"), serde_json::json!("z".repeat(200))))
                .collect(),
            created_at: chrono::Utc::now(),
            email: "e@x".into(),
            name: "N".into(),
            phone: None,
        });
        let c = Customer::from(v);
        let bytes = serde_json::to_vec(&c).unwrap();
        assert!(
            bytes.len() <= CUSTOMER_ANSWER_BYTES - 2 * 1024,
            "{} bytes",
            bytes.len()
        );
        assert!(!String::from_utf8_lossy(&bytes).contains("_state"));
        assert_eq!(c.truncated["interactions.by_type"], 5_000);
        assert_eq!(c.truncated["profile.attributes"], 500);
        // The busiest interaction types are the ones kept.
        assert!(c.interactions.by_type.values().all(|n| *n >= 4_968));
    }

    #[test]
    fn a_small_customer_is_answered_whole() {
        let mut v = Customer360 {
            customer_id: "c1".into(),
            ..Default::default()
        };
        v.interactions.by_type.insert("chat".into(), 3);
        v.state.open_orders.insert("o1".into());
        let c = Customer::from(v.clone());
        assert!(c.truncated.is_empty());
        assert_eq!(c.interactions, v.interactions);
    }

    #[test]
    fn many_streams_list_only_the_documents_own() {
        let guard: projectors::Guard = (0..100)
            .map(|i| (format!("order/o{i}"), 3))
            .chain([("customer/c1".to_owned(), 7)])
            .collect();
        let (streams, total) = bounded_streams(guard.clone(), "customer/c1");
        assert_eq!(streams.len(), 1);
        assert_eq!(total, Some(101));
        let small: projectors::Guard = guard.into_iter().take(5).collect();
        let (streams, total) = bounded_streams(small.clone(), "customer/c1");
        assert_eq!((streams, total), (small, None));
    }
}
