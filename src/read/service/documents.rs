//! Document answers: a Customer-360, an order view, a customer's orders and the orders in
//! one status (paged).

use mongodb::bson::{Bson, RawDocumentBuf, doc};
use projectors::customer360::Customer360Projector;
use projectors::order_view::{self, OrderView, OrderViewProjector};
use projectors::{Doc, Projector, StoreKind};
use serde::de::DeserializeOwned;

use super::consistency::handles;
use super::{Consistency, ReadError, ReadService, check_id};
use crate::read::types::{Answer, Customer, OrderPage, Sort};
use crate::versions::views_for;

impl ReadService {
    pub(super) async fn version_of(&self, projection: &str) -> String {
        self.versions().await.of(projection).to_owned()
    }

    /// The stored document `id` of `projection`'s `version` (Redis JSON or MongoDB BSON).
    pub(super) async fn load_doc<V: DeserializeOwned>(
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
    pub(super) async fn document<P: Projector>(
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
        f.last_event_at = updated_at(&doc.view).map(crate::read::time);
        let (streams, total) =
            crate::read::types::bounded_streams(doc.guard, &format!("{what}/{id}"));
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
        let list = OrderList::Customer {
            customer_id,
            status: status.map(known_status).transpose()?,
        };
        self.list_orders(list, limit, cursor, c).await
    }

    /// Every order in one status, by when it last changed: newest first, or oldest first (the
    /// orders stuck longest in that status).
    pub async fn orders_by_status(
        &self,
        status: &str,
        sort: Sort,
        limit: Option<usize>,
        cursor: Option<&str>,
        c: &Consistency,
    ) -> Result<Answer<OrderPage>, ReadError> {
        let list = OrderList::Status {
            status: known_status(status)?,
            oldest_first: sort == Sort::Oldest,
        };
        self.list_orders(list, limit, cursor, c).await
    }

    async fn list_orders(
        &self,
        list: OrderList<'_>,
        limit: Option<usize>,
        cursor: Option<&str>,
        c: &Consistency,
    ) -> Result<Answer<OrderPage>, ReadError> {
        let limit = limit.unwrap_or(20);
        if limit == 0 || limit > self.cfg.read.max_page {
            return Err(ReadError::BadRequest(format!(
                "limit must be 1..={}",
                self.cfg.read.max_page
            )));
        }
        let after = cursor.map(decode_cursor).transpose()?;
        // An event about an order affects the list when it is that order's (a new order may
        // belong to the list; its own document says once it exists).
        let mut w = self.begin(c, |e| handles(&OrderViewProjector, e)).await?;
        let (after, list) = (after.as_ref(), &list);
        let (page, version, report) = self
            .answer_after(
                &mut w,
                order_view::NAME,
                |version, e| async move {
                    let key = OrderViewProjector.view_key(&e);
                    self.doc_applied::<OrderView>(StoreKind::Mongo, &version, key, &e)
                        .await
                },
                |version| async move { self.orders_page(&version, list, limit, after).await },
            )
            .await?;
        let mut f = self.base_freshness(order_view::NAME, &version);
        f.last_event_at = page
            .orders
            .iter()
            .filter_map(|o| o.updated_at)
            .max()
            .map(crate::read::time);
        f.consistency = report;
        Ok(Answer {
            data: page,
            freshness: f,
        })
    }

    pub(super) async fn orders_page(
        &self,
        version: &str,
        list: &OrderList<'_>,
        limit: usize,
        after: Option<&(Option<String>, String)>,
    ) -> Result<OrderPage, ReadError> {
        let coll = views_for(&self.cfg, version).mongo_collection;
        let (mut filter, field, dir) = list.query();
        if let Some((value, id)) = after {
            filter.insert("$or", past_cursor(field, dir, value.as_deref(), id));
        }
        let mut cursor = self
            .mongo
            .collection::<RawDocumentBuf>(&coll)
            .find(filter)
            .sort(doc! {field: dir, "_id": dir})
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
                .map(|o: &OrderView| encode_cursor(list.sort_value(o), &o.order_id))
        });
        Ok(OrderPage {
            orders,
            next_cursor: next_cursor.flatten(),
        })
    }
}

/// Which orders a page lists, and in which order. Each is served by an index whose keys end
/// in the sort (`by_customer_placed`, `by_status_updated`), so a page reads only its own
/// documents however many match.
pub(super) enum OrderList<'a> {
    /// One customer's, newest placed first.
    Customer {
        customer_id: &'a str,
        status: Option<&'a str>,
    },
    /// Every order in one status, by when it last changed.
    Status { status: &'a str, oldest_first: bool },
}

impl OrderList<'_> {
    /// The filter, the field sorted by (then `_id`), and the direction.
    fn query(&self) -> (mongodb::bson::Document, &'static str, i32) {
        match *self {
            OrderList::Customer {
                customer_id,
                status,
            } => {
                let mut filter = doc! {"customer_id": customer_id};
                if let Some(s) = status {
                    filter.insert("status", s);
                }
                (filter, "placed_at", -1)
            }
            OrderList::Status {
                status,
                oldest_first,
            } => (
                doc! {"status": status},
                "updated_at",
                if oldest_first { 1 } else { -1 },
            ),
        }
    }

    /// The sort field's stored value (as the cursor carries it).
    fn sort_value(&self, o: &OrderView) -> Option<String> {
        let at = match self {
            OrderList::Customer { .. } => o.placed_at,
            OrderList::Status { .. } => o.updated_at,
        };
        at.map(crate::read::time_db)
    }
}

fn known_status(s: &str) -> Result<&str, ReadError> {
    if order_view::STATUSES.contains(&s) {
        Ok(s)
    } else {
        Err(ReadError::BadRequest(format!(
            "status {s:?} is not one of {}",
            order_view::STATUSES.join(", ")
        )))
    }
}

/// The documents after the cursor's `(value, id)` in the order `{field: dir, _id: dir}`.
/// MongoDB compares only values of one type (a missing or null value is never `$lt` a
/// string), and sorts null first: a null value is handled as the smallest.
fn past_cursor(field: &str, dir: i32, value: Option<&str>, id: &str) -> Vec<Bson> {
    let beyond = if dir < 0 { "$lt" } else { "$gt" };
    let same = |v: Bson| Bson::Document(doc! {field: v, "_id": {beyond: id}});
    match (value, dir < 0) {
        // Descending: smaller strings, then every null.
        (Some(v), true) => vec![
            Bson::Document(doc! {field: {beyond: v}}),
            same(Bson::String(v.to_owned())),
            Bson::Document(doc! {field: Bson::Null}),
        ],
        // Ascending: larger strings.
        (Some(v), false) => vec![
            Bson::Document(doc! {field: {beyond: v}}),
            same(Bson::String(v.to_owned())),
        ],
        // Descending past a null: only the nulls left.
        (None, true) => vec![same(Bson::Null)],
        // Ascending past a null: the nulls left, then every string.
        (None, false) => vec![
            same(Bson::Null),
            Bson::Document(doc! {field: {"$type": "string"}}),
        ],
    }
}

pub(super) fn decode_doc<V: DeserializeOwned>(d: &RawDocumentBuf) -> Result<Doc<V>, ReadError> {
    crate::sinks::mongo::decode::<V>(d)
        .1
        .map_err(|e| ReadError::store("mongo", e))
}

/// Cursors are opaque to callers: hex of `[placed_at, order_id]` as JSON.
pub(super) fn encode_cursor(placed_at: Option<String>, id: &str) -> String {
    let json = serde_json::to_vec(&(placed_at, id)).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn decode_cursor(s: &str) -> Result<(Option<String>, String), ReadError> {
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
