//! Read-your-writes: find the event a caller names, wait (bounded) until the version read
//! has applied it, then read the answer from that same version.

use std::time::{Duration, Instant};

use crate::sinks::redis::finished_key;
use contract::Event;
use projectors::{FactProjector, Projector, StoreKind};
use serde::de::DeserializeOwned;

use super::{Consistency, ReadError, ReadService};
use crate::read::types::{After, ConsistencyReport, EventRef};
use crate::versions::views_for;

/// A read in progress that may wait for an event.
pub(super) struct Waiter {
    wanted: Option<Wanted>,
    started: Instant,
    budget: Duration,
    pause: Duration,
}

impl Waiter {
    /// The event the answer must include, if the caller named one that affects it.
    pub(super) fn event(&self) -> Option<&Event> {
        self.wanted
            .as_ref()
            .filter(|w| w.report.affects_answer)
            .map(|w| &w.event)
    }
}

pub(super) enum Step {
    Done(Option<ConsistencyReport>),
    Again,
}

/// The event a condition names, and what it takes for an answer to include it.
pub(super) struct Wanted {
    event: Event,
    report: ConsistencyReport,
}

pub(super) const DEFAULT_WAIT_MS: u64 = 3_000;

impl ReadService {
    pub(super) fn wait_budget(&self, c: &Consistency) -> Duration {
        Duration::from_millis(
            c.wait_ms
                .unwrap_or(DEFAULT_WAIT_MS)
                .min(self.cfg.read.max_wait_ms),
        )
    }

    /// Find the event a condition names.
    pub(super) async fn wanted(&self, after: &After) -> Result<Wanted, ReadError> {
        let (sql, label): (&str, String) = match (after.position, &after.stream, after.sequence) {
            (Some(p), None, None) => (
                "global_position = $1::text::bigint",
                format!("at position {p}"),
            ),
            (None, Some(s), Some(q)) => (
                "aggregate_type = $1 AND aggregate_id = $2 AND sequence_number = $3::text::bigint",
                format!("#{q} of {s}"),
            ),
            _ => {
                return Err(ReadError::BadRequest(
                    "name the event either by after_position, or by after_stream \
                     (aggregate_type/aggregate_id) and after_sequence"
                        .into(),
                ));
            }
        };
        let (t, id) = match &after.stream {
            Some(s) => s
                .split_once('/')
                .map(|(t, id)| (t.to_owned(), id.to_owned()))
                .ok_or_else(|| {
                    ReadError::BadRequest(format!(
                        "after_stream {s:?} is not aggregate_type/aggregate_id"
                    ))
                })?,
            None => (String::new(), String::new()),
        };
        let args: Vec<String> = match after.position {
            Some(p) => vec![p.to_string()],
            None => vec![t, id, after.sequence.unwrap_or(0).to_string()],
        };
        let query = format!("{} WHERE {sql}", crate::store::SELECT_EVENT);
        let rows = self
            .pg
            .run(|c| async move {
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
                    .iter()
                    .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                c.query(&query, &params).await
            })
            .await
            .map_err(|e| ReadError::store("postgres", e))?;
        let Some(row) = rows.first() else {
            return Err(ReadError::UnknownEvent(label));
        };
        let event = crate::store::envelope_of(row)
            .map_err(|e| ReadError::store("postgres", e))?
            .into_event()
            .map_err(|e| {
                ReadError::UnknownEvent(format!("{label} (it breaks the contract: {e})"))
            })?;
        let h = &event.header;
        let report = ConsistencyReport {
            requested: after.clone(),
            event: EventRef {
                global_position: h.global_position,
                stream: projectors::document::stream_key(&event),
                sequence: h.sequence_number,
                event_type: h.event_type.to_string(),
            },
            affects_answer: false,
            included: false,
            waited_ms: 0,
            parked: None,
        };
        Ok(Wanted { event, report })
    }

    /// Why a stream is held back in a projection's version, if it is.
    pub(super) async fn parked(
        &self,
        projection: &str,
        version: &str,
        stream: &str,
        sequence: i64,
    ) -> Option<String> {
        let (scope, projection, version, stream) = (
            self.cfg.deployment.clone(),
            projection.to_owned(),
            version.to_owned(),
            stream.to_owned(),
        );
        self.pg
            .run(|c| async move {
                c.query_opt(
                    "SELECT reason FROM parked_streams WHERE scope = $1 AND projection IN ($2, '*') \
                     AND version IN ($3, '*') AND stream = $4 \
                     AND (from_sequence IS NULL OR from_sequence <= $5)",
                    &[&scope, &projection, &version, &stream, &sequence],
                )
                .await
            })
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    /// Start a read that may have to wait for an event (`affects`: whether that event
    /// changes this answer at all).
    pub(super) async fn begin(
        &self,
        c: &Consistency,
        affects: impl Fn(&Event) -> bool,
    ) -> Result<Waiter, ReadError> {
        let wanted = match &c.after {
            Some(after) => {
                let mut w = self.wanted(after).await?;
                w.report.affects_answer = affects(&w.event);
                Some(w)
            }
            None => None,
        };
        Ok(Waiter {
            wanted,
            started: Instant::now(),
            budget: self.wait_budget(c),
            pause: Duration::from_millis(5),
        })
    }

    /// After one read: done (with the report), or wait and read again, or `NotYet` once the
    /// budget is spent or the event's stream is parked.
    pub(super) async fn settle(
        &self,
        w: &mut Waiter,
        projection: &str,
        version: &str,
        included: bool,
    ) -> Result<Step, ReadError> {
        let Some(wanted) = w.wanted.as_mut() else {
            return Ok(Step::Done(None));
        };
        wanted.report.waited_ms = w.started.elapsed().as_millis() as u64;
        if included || !wanted.report.affects_answer {
            wanted.report.included = true;
            return Ok(Step::Done(Some(wanted.report.clone())));
        }
        let r = &wanted.report.event;
        let parked = self
            .parked(projection, version, &r.stream, r.sequence)
            .await;
        if parked.is_some() || w.started.elapsed() + w.pause > w.budget {
            wanted.report.parked = parked;
            let mut f = self.base_freshness(projection, version);
            f.consistency = Some(wanted.report.clone());
            return Err(ReadError::NotYet(Box::new(f)));
        }
        tokio::time::sleep(w.pause).await;
        w.pause = (w.pause * 2).min(Duration::from_millis(100));
        Ok(Step::Again)
    }

    /// Read an answer that may have to include the caller's event: wait until `version` of
    /// `projection` has applied it (`applied`), then read the answer (`read`) from that same
    /// version, so `included: true` always describes data read after the event landed
    /// (reading first and checking after could pair rows read before the event with a check
    /// that saw it). Every answer goes through here.
    pub(super) async fn answer_after<T, A, AF, R, RF>(
        &self,
        w: &mut Waiter,
        projection: &str,
        applied: A,
        read: R,
    ) -> Result<(T, String, Option<ConsistencyReport>), ReadError>
    where
        A: Fn(String, Event) -> AF,
        AF: std::future::Future<Output = Result<bool, ReadError>>,
        R: Fn(String) -> RF,
        RF: std::future::Future<Output = Result<T, ReadError>>,
    {
        loop {
            let version = self.version_of(projection).await;
            let included = match w.event() {
                Some(e) => applied(version.clone(), e.clone()).await?,
                None => true,
            };
            if let Step::Done(report) = self.settle(w, projection, &version, included).await? {
                let data = read(version.clone()).await?;
                return Ok((data, version, report));
            }
        }
    }

    /// Whether the document `key` of `version` (Redis or MongoDB) has applied `e`.
    pub(super) async fn doc_applied<V: DeserializeOwned>(
        &self,
        store: StoreKind,
        version: &str,
        key: Option<&str>,
        e: &Event,
    ) -> Result<bool, ReadError> {
        // An event that folds into no document (none of this projector's) is trivially in.
        let Some(key) = key else { return Ok(true) };
        let doc = self.load_doc::<V>(store, version, key).await?;
        let stream = projectors::document::stream_key(e);
        if store == StoreKind::Redis && doc.as_ref().is_some_and(|d| !d.guard.contains_key(&stream))
        {
            // A finished stream left the guard for the set beside the document.
            let views = views_for(&self.cfg, version);
            if let Some(side) = finished_key(&format!("{}{key}", views.redis_prefix)) {
                let mut con = self.redis().await?;
                let finished: bool = redis::cmd("SISMEMBER")
                    .arg(side)
                    .arg(&stream)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| ReadError::store("redis", e))?;
                if finished {
                    return Ok(true);
                }
            }
        }
        Ok(guard_has(doc.as_ref().map(|d| &d.guard), e))
    }
}

pub(super) fn handles<P: Projector>(p: &P, e: &Event) -> bool {
    e.event_type().is_some_and(|t| p.handles().contains(&t))
}

pub(super) fn handles_facts<P: FactProjector>(p: &P, e: &Event) -> bool {
    e.event_type().is_some_and(|t| p.handles().contains(&t))
}

/// A document includes an event when its guard has the event's stream at or past its sequence.
pub(super) fn guard_has(guard: Option<&projectors::Guard>, e: &Event) -> bool {
    guard
        .and_then(|g| g.get(&projectors::document::stream_key(e)))
        .is_some_and(|&s| s >= e.header.sequence_number)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use projectors::order_view;

    use super::*;
    use crate::config::Config;

    fn event() -> Event {
        let body = serde_json::json!({
            "event_id": "0b6c7c1e-8d3f-4a53-9a43-8f1f0f0f0f77",
            "aggregate_type": "order",
            "aggregate_id": "ord-ryw-order-test",
            "sequence_number": 3,
            "global_position": 1234,
            "event_type": "order.shipped",
            "event_data": {"order_id": "ord-ryw-order-test", "customer_id": "cus-7",
                           "carrier": "UPS", "tracking_number": "1Z999"},
            "metadata": {"correlation_id": "c-1", "causation_id": "c-0"},
            "timestamp": "2026-11-22T10:00:00.123Z"
        });
        Event::decode(&serde_json::to_vec(&body).expect("json")).expect("a valid event")
    }

    /// The caller's event lands in the store right after the first time anyone looks (a
    /// worker applying it between two reads). An answer that says `included: true` must have
    /// been read after that, whichever read comes first.
    #[tokio::test]
    async fn an_included_answer_is_read_after_the_event_landed() {
        let cfg = Config::load_for_tests().expect("config/local.toml must load");
        let svc = ReadService::new(&cfg).await.expect("read service");
        let event = event();
        let report = ConsistencyReport {
            requested: After {
                position: Some(event.header.global_position),
                stream: None,
                sequence: None,
            },
            event: EventRef {
                global_position: event.header.global_position,
                stream: projectors::document::stream_key(&event),
                sequence: event.header.sequence_number,
                event_type: event.header.event_type.to_string(),
            },
            affects_answer: true,
            included: false,
            waited_ms: 0,
            parked: None,
        };
        let mut w = Waiter {
            wanted: Some(Wanted { event, report }),
            started: Instant::now(),
            budget: Duration::from_secs(5),
            pause: Duration::from_millis(5),
        };
        let landed = AtomicBool::new(false);
        // What a look at the store sees: whether the event is in; it lands once looked at.
        let look = || landed.swap(true, Ordering::SeqCst);
        let (rows, _, report) = svc
            .answer_after(
                &mut w,
                order_view::NAME,
                |_, _| {
                    let seen = look();
                    async move { Ok(seen) }
                },
                |_| {
                    let rows = if look() { "with the event" } else { "stale" };
                    async move { Ok(rows) }
                },
            )
            .await
            .expect("an answer");
        let report = report.expect("a consistency report");
        assert!(report.included);
        assert_eq!(
            rows, "with the event",
            "included: true about rows read before"
        );
    }
}
