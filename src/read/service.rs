//! The queries behind every endpoint and tool: resolve the live version, read the store,
//! attach freshness, and for read-your-writes wait (bounded) until the answer includes the
//! caller's event.
//!
//! Read-only by construction: the service holds read clients of its own (ClickHouse with
//! `readonly=1`, a PostgreSQL session in read-only mode) and issues no write command.

use std::time::{Duration, Instant};

use crate::sinks::redis::{RedisCon, finished_key};
use contract::Event;
use mongodb::bson::{Bson, RawDocumentBuf, doc};
use projectors::customer360::Customer360Projector;
use projectors::order_view::{self, OrderView, OrderViewProjector};
use projectors::{Doc, FactProjector, Projector, StoreKind, analytics};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use super::lag::LagProbe;
use super::types::*;
use crate::config::Config;
use crate::store::Pg;
use crate::versions::{LiveVersions, live_versions_on, views_for};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("no event {0} in the event store")]
    UnknownEvent(String),
    /// The caller asked for an answer that includes an event, and it is not in yet.
    #[error("the read model does not include the event yet")]
    NotYet(Box<Freshness>),
    #[error("{store} unavailable: {message}")]
    Unavailable {
        store: &'static str,
        message: String,
    },
}

impl ReadError {
    fn store(store: &'static str, e: impl std::fmt::Display) -> ReadError {
        ReadError::Unavailable {
            store,
            message: e.to_string(),
        }
    }
}

/// Query options shared by every answer: the read-your-writes condition and how long to wait.
#[derive(Debug, Clone, Default)]
pub struct Consistency {
    pub after: Option<After>,
    /// Milliseconds to wait for `after` (capped by `read.max_wait_ms`).
    pub wait_ms: Option<u64>,
}

/// Read-your-writes parameters, as every endpoint and tool takes them.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    /// Answer only once the read model includes the event at this global position (an
    /// event the caller caused).
    pub after_position: Option<i64>,
    /// With after_sequence: the event's stream, `aggregate_type/aggregate_id`.
    pub after_stream: Option<String>,
    /// With after_stream: the event's sequence_number.
    pub after_sequence: Option<i64>,
    /// How long to wait for that event, in milliseconds (default 3000, at most
    /// `read.max_wait_ms`); then the answer is `not_yet` with where the projection stands.
    pub wait_ms: Option<u64>,
}

impl Wait {
    pub fn consistency(&self) -> Consistency {
        let named = self.after_position.is_some()
            || self.after_stream.is_some()
            || self.after_sequence.is_some();
        Consistency {
            after: named.then(|| After {
                position: self.after_position,
                stream: self.after_stream.clone(),
                sequence: self.after_sequence,
            }),
            wait_ms: self.wait_ms,
        }
    }
}

/// Parameters of the analytics queries.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// Inclusive, `YYYY-MM-DD` (UTC).
    pub from: Option<String>,
    /// Exclusive, `YYYY-MM-DD` (UTC).
    pub to: Option<String>,
    pub granularity: Granularity,
    pub customer_id: Option<String>,
}

pub struct ReadService {
    cfg: Config,
    pg: Pg,
    redis: Mutex<Option<RedisCon>>,
    mongo: mongodb::Database,
    ch: clickhouse::Client,
    pointers: Mutex<Option<(Instant, LiveVersions)>>,
    lag: Option<LagProbe>,
}

/// An analytics query: SQL with `{table}` for the live table, and its bound values.
struct Query {
    sql: String,
    binds: Vec<String>,
}

/// A read in progress that may wait for an event.
struct Waiter {
    wanted: Option<Wanted>,
    started: Instant,
    budget: Duration,
    pause: Duration,
}

impl Waiter {
    /// The event the answer must include, if the caller named one that affects it.
    fn event(&self) -> Option<&Event> {
        self.wanted
            .as_ref()
            .filter(|w| w.report.affects_answer)
            .map(|w| &w.event)
    }
}

enum Step {
    Done(Option<ConsistencyReport>),
    Again,
}

/// The event a condition names, and what it takes for an answer to include it.
struct Wanted {
    event: Event,
    report: ConsistencyReport,
}

const DEFAULT_WAIT_MS: u64 = 3_000;

/// The read service's ClickHouse client: every query in a `readonly=1` session
/// (`projector doctor` checks the server enforces it through this very client).
pub fn clickhouse_client(cfg: &Config) -> clickhouse::Client {
    let mut ch = clickhouse::Client::default()
        .with_url(&cfg.clickhouse.url)
        .with_database(&cfg.clickhouse.database)
        .with_setting("readonly", "1");
    if let Some(u) = &cfg.clickhouse.user {
        ch = ch.with_user(u);
    }
    if let Some(p) = &cfg.clickhouse.password {
        ch = ch.with_password(p);
    }
    ch
}

impl ReadService {
    /// Nothing is connected yet: the service starts (and answers what it can) while a store
    /// is down.
    pub async fn new(cfg: &Config) -> Result<ReadService, ReadError> {
        let options =
            crate::sinks::mongo::client_options(&cfg.mongo, "projector-read", Duration::MAX)
                .await
                .map_err(|e| ReadError::store("mongo", e))?;
        let mongo = mongodb::Client::with_options(options)
            .map_err(|e| ReadError::store("mongo", e))?
            .database(&cfg.mongo.database);
        let ch = clickhouse_client(cfg);
        // Each read model's group: answers carry the lag of the group that writes them.
        let groups = cfg.groups();
        let lag = LagProbe::start(
            cfg,
            &groups,
            Duration::from_millis(cfg.read.cache_ms.max(200)),
        )
        .map_err(|e| tracing::warn!(error = %e, "no consumer lag: the broker client failed"))
        .ok();
        // The first answers should carry a lag too: give the first observations a moment.
        for _ in 0..40 {
            if lag.as_ref().is_none_or(|l| l.observed_all(groups.len())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ReadService {
            cfg: cfg.clone(),
            pg: Pg::from_config(&cfg.postgres),
            redis: Mutex::new(None),
            mongo,
            ch,
            pointers: Mutex::new(None),
            lag,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The live versions, read at most every `read.cache_ms`; while PostgreSQL is away the
    /// last ones read are kept (every answer names the version it read).
    pub async fn versions(&self) -> LiveVersions {
        let mut slot = self.pointers.lock().await;
        if let Some((at, v)) = slot.as_ref()
            && at.elapsed() < Duration::from_millis(self.cfg.read.cache_ms)
        {
            return v.clone();
        }
        let cfg = self.cfg.clone();
        match self
            .pg
            .run(|c| async move { live_versions_on(&c, &cfg).await })
            .await
        {
            Ok(v) => {
                *slot = Some((Instant::now(), v.clone()));
                v
            }
            Err(e) => {
                tracing::warn!(error = %e, "version pointers not read; using the last known");
                slot.as_ref().map(|(_, v)| v.clone()).unwrap_or_default()
            }
        }
    }

    async fn redis(&self) -> Result<RedisCon, ReadError> {
        let mut slot = self.redis.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let con = RedisCon::open(&self.cfg.redis, 1)
            .await
            .map_err(|e| ReadError::store("redis", e))?;
        *slot = Some(con.clone());
        Ok(con)
    }

    fn base_freshness(&self, projection: &str, version: &str) -> Freshness {
        Freshness {
            projection: projection.to_owned(),
            version: version.to_owned(),
            lag: self
                .lag
                .as_ref()
                .and_then(|l| l.latest(self.cfg.group_of(projection))),
            read_at: super::now(),
            ..Freshness::default()
        }
    }

    fn wait_budget(&self, c: &Consistency) -> Duration {
        Duration::from_millis(
            c.wait_ms
                .unwrap_or(DEFAULT_WAIT_MS)
                .min(self.cfg.read.max_wait_ms),
        )
    }

    /// Find the event a condition names.
    async fn wanted(&self, after: &After) -> Result<Wanted, ReadError> {
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
    async fn parked(
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
    async fn begin(
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
    async fn settle(
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
    async fn answer_after<T, A, AF, R, RF>(
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
    async fn doc_applied<V: DeserializeOwned>(
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

    async fn version_of(&self, projection: &str) -> String {
        self.versions().await.of(projection).to_owned()
    }

    /// The stored document `id` of `projection`'s `version` (Redis JSON or MongoDB BSON).
    async fn load_doc<V: DeserializeOwned>(
        &self,
        store: StoreKind,
        version: &str,
        id: &str,
    ) -> Result<Option<Doc<V>>, ReadError> {
        let views = views_for(&self.cfg, version);
        match store {
            StoreKind::Redis => {
                let key = format!("{}{id}", views.redis_prefix);
                let mut con = self.redis().await?;
                let raw: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| ReadError::store("redis", e))?;
                raw.map(|b| {
                    serde_json::from_slice::<Doc<V>>(&b).map_err(|e| {
                        ReadError::store(
                            "redis",
                            format!("stored document {key} does not decode: {e}"),
                        )
                    })
                })
                .transpose()
            }
            StoreKind::Mongo => {
                let raw = self
                    .mongo
                    .collection::<RawDocumentBuf>(&views.mongo_collection)
                    .find_one(doc! {"_id": id})
                    .await
                    .map_err(|e| ReadError::store("mongo", e))?;
                raw.map(|d| decode_doc(&d)).transpose()
            }
            StoreKind::ClickHouse => Err(ReadError::BadRequest(
                "analytics keeps facts, not documents".into(),
            )),
        }
    }

    /// One document of a document projector, with its guard as freshness; `id_name` names
    /// the id in errors, `updated_at` is the view's newest event time.
    async fn document<P: Projector>(
        &self,
        p: &P,
        id_name: &str,
        id: &str,
        c: &Consistency,
        updated_at: fn(&P::View) -> Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Answer<P::View>, ReadError> {
        check_id(id_name, id)?;
        let mut w = self
            .begin(c, |e| handles(p, e) && p.view_key(e) == Some(id))
            .await?;
        let (doc, version, report) = self
            .answer_after(
                &mut w,
                p.name(),
                |version, e| async move {
                    self.doc_applied::<P::View>(p.store(), &version, p.view_key(&e), &e)
                        .await
                },
                |version| async move { self.load_doc::<P::View>(p.store(), &version, id).await },
            )
            .await?;
        let what = id_name.trim_end_matches("_id");
        let doc = doc.ok_or_else(|| ReadError::NotFound(format!("{what} {id}")))?;
        let mut f = self.base_freshness(p.name(), &version);
        f.last_event_at = updated_at(&doc.view).map(super::time);
        let (streams, total) = super::types::bounded_streams(doc.guard, &format!("{what}/{id}"));
        f.streams = Some(streams);
        f.streams_total = total;
        f.consistency = report;
        Ok(Answer {
            data: doc.view,
            freshness: f,
        })
    }

    /// A customer's Customer-360 view.
    pub async fn customer(&self, id: &str, c: &Consistency) -> Result<Answer<Customer>, ReadError> {
        let a = self
            .document(&Customer360Projector, "customer_id", id, c, |v| {
                v.updated_at
            })
            .await?;
        Ok(Answer {
            data: Customer::from(a.data),
            freshness: a.freshness,
        })
    }

    /// One order view.
    pub async fn order(&self, id: &str, c: &Consistency) -> Result<Answer<OrderView>, ReadError> {
        self.document(&OrderViewProjector, "order_id", id, c, |v| v.updated_at)
            .await
    }

    /// A customer's orders, newest first (`placed_at`, then order id), optionally of one status.
    pub async fn customer_orders(
        &self,
        customer_id: &str,
        status: Option<&str>,
        limit: Option<usize>,
        cursor: Option<&str>,
        c: &Consistency,
    ) -> Result<Answer<OrderPage>, ReadError> {
        check_id("customer_id", customer_id)?;
        if let Some(s) = status
            && !order_view::STATUSES.contains(&s)
        {
            return Err(ReadError::BadRequest(format!(
                "status {s:?} is not one of {}",
                order_view::STATUSES.join(", ")
            )));
        }
        let limit = limit.unwrap_or(20);
        if limit == 0 || limit > self.cfg.read.max_page {
            return Err(ReadError::BadRequest(format!(
                "limit must be 1..={}",
                self.cfg.read.max_page
            )));
        }
        let after = cursor.map(decode_cursor).transpose()?;
        // An event about an order affects the list when it is that order's (a new order may
        // be this customer's; its own document says once it exists).
        let mut w = self.begin(c, |e| handles(&OrderViewProjector, e)).await?;
        let after = after.as_ref();
        let (page, version, report) = self
            .answer_after(
                &mut w,
                order_view::NAME,
                |version, e| async move {
                    let key = OrderViewProjector.view_key(&e);
                    self.doc_applied::<OrderView>(StoreKind::Mongo, &version, key, &e)
                        .await
                },
                |version| async move {
                    self.orders_page(&version, customer_id, status, limit, after)
                        .await
                },
            )
            .await?;
        let mut f = self.base_freshness(order_view::NAME, &version);
        f.last_event_at = page
            .orders
            .iter()
            .filter_map(|o| o.updated_at)
            .max()
            .map(super::time);
        f.consistency = report;
        Ok(Answer {
            data: page,
            freshness: f,
        })
    }

    async fn orders_page(
        &self,
        version: &str,
        customer_id: &str,
        status: Option<&str>,
        limit: usize,
        after: Option<&(Option<String>, String)>,
    ) -> Result<OrderPage, ReadError> {
        let coll = views_for(&self.cfg, version).mongo_collection;
        let mut filter = doc! {"customer_id": customer_id};
        if let Some(s) = status {
            filter.insert("status", s);
        }
        if let Some((placed, id)) = after {
            let placed = placed.clone().map_or(Bson::Null, Bson::String);
            filter.insert(
                "$or",
                vec![
                    Bson::Document(doc! {"placed_at": {"$lt": placed.clone()}}),
                    Bson::Document(doc! {"placed_at": placed, "_id": {"$lt": id.as_str()}}),
                ],
            );
        }
        let mut cursor = self
            .mongo
            .collection::<RawDocumentBuf>(&coll)
            .find(filter)
            .sort(doc! {"placed_at": -1, "_id": -1})
            .limit(limit as i64 + 1)
            .await
            .map_err(|e| ReadError::store("mongo", e))?;
        let mut orders = Vec::with_capacity(limit);
        let mut bytes = 0;
        let mut more = false;
        while cursor
            .advance()
            .await
            .map_err(|e| ReadError::store("mongo", e))?
        {
            let raw = cursor.current();
            if orders.len() == limit
                || (bytes + raw.as_bytes().len() > self.cfg.read.max_bytes && !orders.is_empty())
            {
                more = true;
                break;
            }
            bytes += raw.as_bytes().len();
            let doc = decode_doc::<OrderView>(&raw.to_raw_document_buf())?;
            orders.push(doc.view);
        }
        let next_cursor = more.then(|| {
            orders
                .last()
                .map(|o: &OrderView| encode_cursor(o.placed_at.map(super::time_db), &o.order_id))
        });
        Ok(OrderPage {
            orders,
            next_cursor: next_cursor.flatten(),
        })
    }

    /// The live facts table, as a quoted identifier for the SQL it goes into.
    fn facts_table(&self, version: &str) -> String {
        crate::sinks::clickhouse::quote_ident(&views_for(&self.cfg, version).clickhouse_table)
    }

    /// Analytics answers: every query runs with bound parameters, on the live table; an
    /// event is in once its fact is.
    async fn analytics<T>(&self, c: &Consistency, query: Query) -> Result<Answer<Vec<T>>, ReadError>
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
            f.last_event_at = chrono::DateTime::from_timestamp_millis(ts).map(super::time);
        }
        f.consistency = report;
        Ok(Answer { data, freshness: f })
    }

    fn range_sql(&self, r: &Range) -> Result<(String, Vec<String>), ReadError> {
        range_sql(r)
    }

    async fn rows<T>(&self, sql: String, binds: Vec<String>) -> Result<Vec<T>, ReadError>
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

    /// Where every projection stands: live version, handover, rebuilds with rate and ETA,
    /// the event store's head and the group's lag.
    pub async fn status(&self) -> Result<Status, ReadError> {
        let versions = self.versions().await;
        let scope = crate::versions::scope_key(&self.cfg, "");
        let rows = self
            .pg
            .run(|c| async move {
                let head = c
                    .query_one(
                        "SELECT COALESCE((SELECT e.global_position FROM events e \
                          WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                          ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1), 0)",
                        &[],
                    )
                    .await?;
                let checkpoints = c
                    .query(
                        "SELECT projection, version, status, position, events_applied, \
                         started_at, updated_at FROM projection_checkpoints \
                         WHERE starts_with(projection, $1) ORDER BY updated_at DESC",
                        &[&scope],
                    )
                    .await?;
                Ok((head.get::<_, i64>(0), checkpoints))
            })
            .await
            .map_err(|e| ReadError::store("postgres", e))?;
        let (head, checkpoints) = rows;
        let prefix = crate::versions::scope_key(&self.cfg, "");
        let mut projections = Vec::new();
        for info in projectors::registry::infos() {
            let mut rebuilds = Vec::new();
            for r in &checkpoints {
                let p: String = r.get(0);
                if p.strip_prefix(&prefix) != Some(info.name) {
                    continue;
                }
                let started: chrono::DateTime<chrono::Utc> = r.get(5);
                let updated: chrono::DateTime<chrono::Utc> = r.get(6);
                let (status, position, applied): (String, i64, i64) =
                    (r.get(2), r.get(3), r.get(4));
                let secs = (updated - started).as_seconds_f64();
                let rate = (status == "building" && secs > 0.0).then(|| applied as f64 / secs);
                rebuilds.push(RebuildProgress {
                    version: r.get(1),
                    eta_seconds: rate.map(|r| (head - position).max(0) as f64 / r.max(1e-9)),
                    rate_per_second: rate,
                    status,
                    position,
                    events_applied: applied,
                    started_at: super::time(started),
                    updated_at: super::time(updated),
                });
            }
            projections.push(ProjectionStatus {
                projection: info.name.to_owned(),
                store: info.store.as_str().to_owned(),
                live_version: versions.of(info.name).to_owned(),
                switching: versions.switching.iter().any(|s| s == info.name),
                rebuilds,
            });
        }
        Ok(Status {
            event_store_head: head,
            projections,
            lag: self.lag.as_ref().and_then(LagProbe::worst),
            read_at: super::now(),
        })
    }
}

/// The funnel applies the order view's own rule: a step counts when the order was placed and
/// the step came no later than the order's first final event (completed, cancelled or
/// validation failed); the order view refuses anything after that.
fn funnel_sql(placed_cond: &str) -> String {
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

fn missing_table(e: &clickhouse::error::Error) -> bool {
    e.to_string().contains("UNKNOWN_TABLE")
}

fn handles<P: Projector>(p: &P, e: &Event) -> bool {
    e.event_type().is_some_and(|t| p.handles().contains(&t))
}

fn handles_facts<P: FactProjector>(p: &P, e: &Event) -> bool {
    e.event_type().is_some_and(|t| p.handles().contains(&t))
}

/// A document includes an event when its guard has the event's stream at or past its sequence.
fn guard_has(guard: Option<&projectors::Guard>, e: &Event) -> bool {
    guard
        .and_then(|g| g.get(&projectors::document::stream_key(e)))
        .is_some_and(|&s| s >= e.header.sequence_number)
}

fn check_id(what: &str, id: &str) -> Result<(), ReadError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(ReadError::BadRequest(format!(
            "{what} must be 1 to 256 printable characters"
        )));
    }
    Ok(())
}

fn decode_doc<V: DeserializeOwned>(d: &RawDocumentBuf) -> Result<Doc<V>, ReadError> {
    crate::sinks::mongo::decode::<V>(d)
        .1
        .map_err(|e| ReadError::store("mongo", e))
}

/// Cursors are opaque to callers: hex of `[placed_at, order_id]` as JSON.
fn encode_cursor(placed_at: Option<String>, id: &str) -> String {
    let json = serde_json::to_vec(&(placed_at, id)).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(s: &str) -> Result<(Option<String>, String), ReadError> {
    let bad = || ReadError::BadRequest("cursor is not one this service gave".into());
    if !s.len().is_multiple_of(2) || s.len() > 2048 {
        return Err(bad());
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// The WHERE conditions of a date range (from inclusive, to exclusive) and a customer.
fn range_sql(r: &Range) -> Result<(String, Vec<String>), ReadError> {
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

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

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
