//! Document answers: a Customer-360, an order view, a customer's orders (paged).

use mongodb::bson::{Bson, RawDocumentBuf, doc};
use projectors::customer360::Customer360Projector;
use projectors::order_view::{self, OrderView, OrderViewProjector};
use projectors::{Doc, Projector, StoreKind};
use serde::de::DeserializeOwned;

use super::consistency::handles;
use super::{Consistency, ReadError, ReadService, check_id};
use crate::read::types::{Answer, Customer, OrderPage};
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
            orders.last().map(|o: &OrderView| {
                encode_cursor(o.placed_at.map(crate::read::time_db), &o.order_id)
            })
        });
        Ok(OrderPage {
            orders,
            next_cursor: next_cursor.flatten(),
        })
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
