//! Order views in MongoDB: one document per order (`_id` = order_id). A batch is one
//! `update` command of version-guarded replacements: `{_id, _rev: expected}` with upsert, so a
//! document whose revision moved on fails with E11000 and is reported as a conflict.

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::bson::{self, Bson, doc};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, Database, IndexModel};
use projectors::Document;

use super::{DocumentSink, SinkError, Write};

const DUPLICATE_KEY: i64 = 11000;

#[derive(Clone)]
pub struct MongoSink {
    db: Database,
    collection: String,
}

impl MongoSink {
    pub async fn connect(
        uri: &str,
        database: &str,
        collection: &str,
    ) -> Result<MongoSink, SinkError> {
        let client = Client::with_uri_str(uri).await?;
        let sink = MongoSink {
            db: client.database(database),
            collection: collection.to_owned(),
        };
        sink.ensure_indexes().await?;
        Ok(sink)
    }

    pub fn collection(&self) -> Collection<bson::Document> {
        self.db.collection(&self.collection)
    }

    /// "Orders of a customer, newest first" and "orders by status".
    async fn ensure_indexes(&self) -> Result<(), SinkError> {
        let c = self.collection();
        let named = |n: &str| IndexOptions::builder().name(n.to_owned()).build();
        c.create_index(
            IndexModel::builder()
                .keys(doc! {"customer_id": 1, "placed_at": -1})
                .options(named("by_customer_newest"))
                .build(),
        )
        .await?;
        c.create_index(
            IndexModel::builder()
                .keys(doc! {"status": 1, "updated_at": -1})
                .options(named("by_status"))
                .build(),
        )
        .await?;
        Ok(())
    }

    /// Every document of the collection (tests, the demo): key → document.
    pub async fn scan_all(&self) -> Result<HashMap<String, Document>, SinkError> {
        let docs: Vec<bson::Document> =
            self.collection().find(doc! {}).await?.try_collect().await?;
        docs.into_iter().map(decode).collect()
    }
}

fn decode(d: bson::Document) -> Result<(String, Document), SinkError> {
    let key = d.get_str("_id").unwrap_or_default().to_owned();
    let doc = bson::from_document(d).map_err(|e| SinkError::Corrupt {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    Ok((key, doc))
}

impl DocumentSink for MongoSink {
    fn name(&self) -> &'static str {
        "mongo"
    }

    async fn load(&self, keys: &[String]) -> Result<HashMap<String, Document>, SinkError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let docs: Vec<bson::Document> = self
            .collection()
            .find(doc! {"_id": {"$in": keys}})
            .await?
            .try_collect()
            .await?;
        docs.into_iter().map(decode).collect()
    }

    async fn store(&self, writes: &[Write]) -> Result<Vec<String>, SinkError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut updates = Vec::with_capacity(writes.len());
        for w in writes {
            let mut replacement =
                bson::to_document(&w.document).map_err(|e| SinkError::Corrupt {
                    key: w.key.clone(),
                    reason: e.to_string(),
                })?;
            replacement.insert("_id", &w.key);
            updates.push(doc! {
                "q": {"_id": &w.key, "_rev": w.expected_rev},
                "u": replacement,
                "upsert": true,
            });
        }
        let reply = self
            .db
            .run_command(doc! {
                "update": &self.collection,
                "updates": updates,
                "ordered": false,
                // Journaled: offsets are committed only after this returns.
                "writeConcern": {"w": 1, "j": true},
            })
            .await?;
        let mut conflicts = Vec::new();
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors {
                let Bson::Document(e) = e else { continue };
                let index = number(e.get("index")).unwrap_or(-1);
                let code = number(e.get("code")).unwrap_or(-1);
                let Some(w) = usize::try_from(index).ok().and_then(|i| writes.get(i)) else {
                    continue;
                };
                if code == DUPLICATE_KEY {
                    conflicts.push(w.key.clone());
                } else {
                    return Err(SinkError::Corrupt {
                        key: w.key.clone(),
                        reason: format!(
                            "write error {code}: {}",
                            e.get_str("errmsg").unwrap_or("")
                        ),
                    });
                }
            }
        }
        Ok(conflicts)
    }
}

fn number(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) => Some(*f as i64),
        _ => None,
    }
}
