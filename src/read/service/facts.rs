//! Analytics answers from the live facts table: revenue, funnel, sentiment, resolution.

use projectors::analytics;

use super::consistency::handles_facts;
use super::{Consistency, Range, ReadError, ReadService, check_id};
use crate::read::types::{Answer, Funnel, Resolution, RevenuePoint, SentimentPoint};
use crate::versions::views_for;

/// An analytics query: SQL with `{table}` for the live table, and its bound values.
pub(super) struct Query {
    sql: String,
    binds: Vec<String>,
}

impl ReadService {
    /// The live facts table, as a quoted identifier for the SQL it goes into.
    pub(super) fn facts_table(&self, version: &str) -> String {
        crate::sinks::clickhouse::quote_ident(&views_for(&self.cfg, version).clickhouse_table)
    }

    /// Analytics answers: every query runs with bound parameters, on the live table; an
    /// event is in once its fact is.
    pub(super) async fn analytics<T>(
        &self,
        c: &Consistency,
        query: Query,
    ) -> Result<Answer<Vec<T>>, ReadError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let mut w = self
            .begin(c, |e| handles_facts(&analytics::AnalyticsProjector, e))
            .await?;
        let query = &query;
        let (data, version, report) = self
            .answer_after(
                &mut w,
                analytics::NAME,
                |version, e| async move {
                    let n = self
                        .ch
                        .query(&format!(
                            "SELECT count() FROM {} WHERE event_type = ? AND event_id = ?",
                            self.facts_table(&version)
                        ))
                        .bind(e.header.event_type.as_str())
                        .bind(e.header.event_id.to_string())
                        .fetch_one::<u64>()
                        .await;
                    match n {
                        Ok(n) => Ok(n > 0),
                        Err(e) if missing_table(&e) => Ok(false),
                        Err(e) => Err(ReadError::store("clickhouse", e)),
                    }
                },
                |version| async move {
                    let table = self.facts_table(&version);
                    self.rows::<T>(query.sql.replace("{table}", &table), query.binds.clone())
                        .await
                },
            )
            .await?;
        let mut f = self.base_freshness(analytics::NAME, &version);
        if let Ok((pos, ts)) = self
            .ch
            .query(&format!(
                "SELECT max(global_position), toUnixTimestamp64Milli(max(ts)) FROM {}",
                self.facts_table(&version)
            ))
            .fetch_one::<(i64, i64)>()
            .await
        {
            f.max_global_position = Some(pos);
            f.last_event_at = chrono::DateTime::from_timestamp_millis(ts).map(crate::read::time);
        }
        f.consistency = report;
        Ok(Answer { data, freshness: f })
    }

    pub(super) fn range_sql(&self, r: &Range) -> Result<(String, Vec<String>), ReadError> {
        range_sql(r)
    }

    pub(super) async fn rows<T>(&self, sql: String, binds: Vec<String>) -> Result<Vec<T>, ReadError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        // One row past the cap tells the cap was hit, without reading everything.
        let mut q = self
            .ch
            .query(&format!("{sql} LIMIT {}", self.cfg.read.max_rows + 1));
        for b in binds {
            q = q.bind(b);
        }
        let rows: Vec<T> = match q.fetch_all().await {
            Ok(rows) => rows,
            // No table yet: nothing has been projected.
            Err(e) if missing_table(&e) => Vec::new(),
            Err(e) => return Err(ReadError::store("clickhouse", e)),
        };
        if rows.len() > self.cfg.read.max_rows {
            return Err(ReadError::BadRequest(format!(
                "{} rows: more than read.max_rows ({}); narrow the range or coarsen the granularity",
                rows.len(),
                self.cfg.read.max_rows
            )));
        }
        Ok(rows)
    }

    /// Revenue of orders placed per period (optionally one customer's).
    pub async fn revenue(
        &self,
        r: &Range,
        c: &Consistency,
    ) -> Result<Answer<Vec<RevenuePoint>>, ReadError> {
        let (cond, binds) = self.range_sql(r)?;
        let f = r.granularity.function();
        self.analytics(
            c,
            Query {
                sql: format!(
                    "SELECT toString(toDate({f}(ts))) AS period, count() AS orders, \
                     sum(amount_cents) AS revenue_cents FROM {{table}} FINAL \
                     WHERE event_type = 'order.placed'{cond} GROUP BY period ORDER BY period"
                ),
                binds,
            },
        )
        .await
    }

    /// Orders placed in the range and how many of those reached each step (an order counts
    /// once per step, however often a step's event was delivered; steps of orders placed
    /// outside the range, or never placed, are not counted).
    pub async fn funnel(&self, r: &Range, c: &Consistency) -> Result<Answer<Funnel>, ReadError> {
        let (cond, binds) = self.range_sql(r)?;
        let mut a: Answer<Vec<Funnel>> = self
            .analytics(
                c,
                Query {
                    sql: funnel_sql(&cond),
                    binds,
                },
            )
            .await?;
        Ok(Answer {
            data: a.data.pop().unwrap_or_default(),
            freshness: a.freshness,
        })
    }

    /// Interactions and mean sentiment per period and interaction type.
    pub async fn sentiment(
        &self,
        r: &Range,
        c: &Consistency,
    ) -> Result<Answer<Vec<SentimentPoint>>, ReadError> {
        let (cond, binds) = self.range_sql(r)?;
        let f = r.granularity.function();
        self.analytics(
            c,
            Query {
                sql: format!(
                    "SELECT toString(toDate({f}(ts))) AS period, interaction_type, count() AS interactions, \
                     countIf(sentiment >= 0) AS scored, \
                     if(scored = 0, NULL, avgIf(sentiment, sentiment >= 0)) AS avg_sentiment \
                     FROM {{table}} FINAL WHERE event_type = 'interaction.recorded'{cond} \
                     GROUP BY period, interaction_type ORDER BY period, interaction_type"
                ),
                binds,
            },
        )
        .await
    }

    /// Resolution time percentiles of tickets resolved in the range.
    pub async fn resolution(
        &self,
        r: &Range,
        c: &Consistency,
    ) -> Result<Answer<Resolution>, ReadError> {
        let (cond, binds) = self.range_sql(r)?;
        let mut a: Answer<Vec<Resolution>> = self
            .analytics(
                c,
                Query {
                    sql: format!(
                        "SELECT count() AS resolved, \
                         ifNotFinite(quantileExact(0.5)(secs), 0) AS p50_seconds, \
                         ifNotFinite(quantileExact(0.9)(secs), 0) AS p90_seconds, \
                         ifNotFinite(quantileExact(0.99)(secs), 0) AS p99_seconds FROM ( \
                           SELECT aggregate_id, \
                             toFloat64(dateDiff('millisecond', \
                               minIf(ts, event_type = 'support.ticket.created'), \
                               maxIf(ts, event_type = 'support.ticket.resolved'))) / 1000 AS secs \
                           FROM {{table}} FINAL WHERE aggregate_type = 'support_ticket' \
                             AND aggregate_id IN (SELECT aggregate_id FROM {{table}} FINAL \
                                                  WHERE event_type = 'support.ticket.resolved'{cond}) \
                           GROUP BY aggregate_id \
                           HAVING countIf(event_type = 'support.ticket.created') > 0)"
                    ),
                    binds,
                },
            )
            .await?;
        Ok(Answer {
            data: a.data.pop().unwrap_or(Resolution {
                resolved: 0,
                p50_seconds: 0.0,
                p90_seconds: 0.0,
                p99_seconds: 0.0,
            }),
            freshness: a.freshness,
        })
    }
}

/// The funnel applies the order view's own rule: a step counts when the order was placed and
/// the step came no later than the order's first final event (completed, cancelled or
/// validation failed); the order view refuses anything after that.
pub(super) fn funnel_sql(placed_cond: &str) -> String {
    let step =
        |t: &str| format!("countIf(arrayExists(e -> e.1 = 'order.{t}' AND e.2 <= last, evs))");
    let in_range = if placed_cond.is_empty() {
        String::new()
    } else {
        format!(
            " AND aggregate_id IN (SELECT aggregate_id FROM {{table}} FINAL \
             WHERE event_type = 'order.placed'{placed_cond})"
        )
    };
    format!(
        "SELECT count() AS placed, {} AS validated, {} AS paid, {} AS shipped, {} AS delivered, \
         {} AS cancelled, {} AS validation_failed FROM ( \
           SELECT aggregate_id, groupArray((toString(event_type), sequence_number)) AS evs, \
             ifNull(minIfOrNull(sequence_number, event_type IN \
               ('order.completed', 'order.cancelled', 'order.validation_failed')), \
               9223372036854775807) AS last \
           FROM {{table}} FINAL WHERE aggregate_type = 'order'{in_range} \
           GROUP BY aggregate_id HAVING countIf(event_type = 'order.placed') > 0)",
        step("validated"),
        step("payment_confirmed"),
        step("shipped"),
        step("completed"),
        step("cancelled"),
        step("validation_failed"),
    )
}

pub(super) fn missing_table(e: &clickhouse::error::Error) -> bool {
    e.to_string().contains("UNKNOWN_TABLE")
}

/// The WHERE conditions of a date range (from inclusive, to exclusive) and a customer.
pub(super) fn range_sql(r: &Range) -> Result<(String, Vec<String>), ReadError> {
    let mut sql = String::new();
    let mut binds = Vec::new();
    let mut dates = Vec::new();
    for (bound, op) in [(&r.from, ">="), (&r.to, "<")] {
        if let Some(d) = bound {
            let date = chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .map_err(|_| ReadError::BadRequest(format!("{d:?} is not a date (YYYY-MM-DD)")))?;
            dates.push(date);
            sql.push_str(&format!(" AND ts {op} toDateTime64(?, 3, 'UTC')"));
            binds.push(format!("{d} 00:00:00"));
        }
    }
    // An empty range is a caller's mistake, not an empty answer.
    if let (Some(from), Some(to)) = (&r.from, &r.to)
        && dates.len() == 2
        && dates[0] > dates[1]
    {
        return Err(ReadError::BadRequest(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    if let Some(c) = &r.customer_id {
        check_id("customer_id", c)?;
        sql.push_str(" AND customer_id = ?");
        binds.push(c.clone());
    }
    Ok((sql, binds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_whose_from_is_after_its_to_is_a_bad_request() {
        let r = |from: &str, to: &str| Range {
            from: Some(from.into()),
            to: Some(to.into()),
            ..Default::default()
        };
        assert!(matches!(
            range_sql(&r("2026-12-05", "2026-12-01")),
            Err(ReadError::BadRequest(m)) if m.contains("after")
        ));
        assert!(range_sql(&r("2026-12-01", "2026-12-05")).is_ok());
        assert!(range_sql(&r("2026-12-01", "2026-12-01")).is_ok());
    }
}
