//! The questions agents ask the read models, answered from the stores.

use clickhouse::Row;
use serde::Deserialize;

use crate::sinks::SinkError;
use crate::sinks::clickhouse::ClickHouseSink;

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct RevenueDay {
    pub day: String,
    pub orders: u64,
    pub revenue_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Default, Row, Deserialize)]
pub struct Funnel {
    pub placed: u64,
    pub validated: u64,
    pub paid: u64,
    pub shipped: u64,
    pub delivered: u64,
    pub cancelled: u64,
    pub validation_failed: u64,
}

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct SentimentDay {
    pub day: String,
    pub interaction_type: String,
    pub interactions: u64,
    pub avg_sentiment: f64,
}

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct ResolutionPercentiles {
    pub resolved: u64,
    pub p50_seconds: f64,
    pub p90_seconds: f64,
    pub p99_seconds: f64,
}

impl ClickHouseSink {
    /// Revenue (order totals placed) and order count per day.
    pub async fn revenue_per_day(&self) -> Result<Vec<RevenueDay>, SinkError> {
        self
            .client()
            .query(&format!(
                "SELECT toString(toDate(ts)) AS day, count() AS orders, sum(amount_cents) AS revenue_cents
                 FROM {} FINAL WHERE event_type = 'order.placed' GROUP BY day ORDER BY day",
                self.table()
            ))
            .fetch_all()
            .await
            .map_err(crate::sinks::clickhouse::classify)
    }

    /// Orders that reached each step of the funnel.
    pub async fn funnel(&self) -> Result<Funnel, SinkError> {
        self.client()
            .query(&format!(
                "SELECT countIf(event_type = 'order.placed') AS placed,
                        countIf(event_type = 'order.validated') AS validated,
                        countIf(event_type = 'order.payment_confirmed') AS paid,
                        countIf(event_type = 'order.shipped') AS shipped,
                        countIf(event_type = 'order.completed') AS delivered,
                        countIf(event_type = 'order.cancelled') AS cancelled,
                        countIf(event_type = 'order.validation_failed') AS validation_failed
                 FROM {} FINAL WHERE aggregate_type = 'order'",
                self.table()
            ))
            .fetch_one()
            .await
            .map_err(crate::sinks::clickhouse::classify)
    }

    /// Mean sentiment per day and interaction type (interactions with a score).
    pub async fn sentiment_per_day(&self) -> Result<Vec<SentimentDay>, SinkError> {
        self.client()
            .query(&format!(
                "SELECT toString(toDate(ts)) AS day, interaction_type, count() AS interactions,
                        avg(sentiment) AS avg_sentiment
                 FROM {} FINAL WHERE event_type = 'interaction.recorded' AND sentiment >= 0
                 GROUP BY day, interaction_type ORDER BY day, interaction_type",
                self.table()
            ))
            .fetch_all()
            .await
            .map_err(crate::sinks::clickhouse::classify)
    }

    /// Ticket resolution time percentiles (created → resolved, per ticket).
    pub async fn resolution_percentiles(&self) -> Result<ResolutionPercentiles, SinkError> {
        self.client()
            .query(&format!(
                "SELECT count() AS resolved,
                        quantileExact(0.5)(secs) AS p50_seconds,
                        quantileExact(0.9)(secs) AS p90_seconds,
                        quantileExact(0.99)(secs) AS p99_seconds
                 FROM (
                    SELECT aggregate_id,
                           toFloat64(dateDiff('millisecond',
                               minIf(ts, event_type = 'support.ticket.created'),
                               maxIf(ts, event_type = 'support.ticket.resolved'))) / 1000 AS secs
                    FROM {} FINAL WHERE aggregate_type = 'support_ticket'
                    GROUP BY aggregate_id
                    HAVING countIf(event_type = 'support.ticket.resolved') > 0
                       AND countIf(event_type = 'support.ticket.created') > 0)",
                self.table()
            ))
            .fetch_one()
            .await
            .map_err(crate::sinks::clickhouse::classify)
    }
}
