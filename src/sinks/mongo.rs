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
        let index = |keys: bson::Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.collection()
            .create_indexes([
                index(
                    doc! {"customer_id": 1, "placed_at": -1},
                    "by_customer_newest",
                ),
                index(doc! {"status": 1, "updated_at": -1}, "by_status"),
                // The compare-and-set filter is {_id, _rev}: an index on both keeps it a point lookup.
                index(doc! {"_id": 1, "_rev": 1}, "cas"),
            ])
            .await?;
        Ok(())
    }

    /// One unordered, journaled write command (`insert`/`update`); `None` when there is
    /// nothing to send. Offsets are committed only after it returns.
    async fn write_command(
        &self,
        verb: &str,
        field: &str,
        statements: Vec<bson::Document>,
    ) -> Result<Option<bson::Document>, mongodb::error::Error> {
        if statements.is_empty() {
            return Ok(None);
        }
        let mut command = bson::Document::new();
        command.insert(verb, &self.collection);
        command.insert(field, statements);
        command.insert("ordered", false);
        command.insert("writeConcern", doc! {"w": 1, "j": true});
        self.db.run_command(command).await.map(Some)
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

    /// New documents go in one `insert` (a racing creator makes it fail with E11000), the
    /// others in one `update` of `{_id, _rev: expected}` replacements (a moved revision makes
    /// the upsert collide on `_id`: E11000 again). Both are journaled before they return.
    async fn store(&self, writes: &[Write]) -> Result<Vec<String>, SinkError> {
        let (new, existing): (Vec<&Write>, Vec<&Write>) =
            writes.iter().partition(|w| w.expected_rev == 0);
        let mut inserts = Vec::with_capacity(new.len());
        for w in &new {
            inserts.push(replacement(w)?);
        }
        let mut updates = Vec::with_capacity(existing.len());
        for w in &existing {
            updates.push(doc! {
                "q": {"_id": &w.key, "_rev": w.expected_rev},
                "u": replacement(w)?,
                "upsert": true,
            });
        }
        let (inserted, updated) = tokio::join!(
            self.write_command("insert", "documents", inserts),
            self.write_command("update", "updates", updates)
        );
        let mut conflicts = Vec::new();
        if let Some(reply) = inserted? {
            conflicts.extend(conflicts_of(&reply, &new)?);
        }
        if let Some(reply) = updated? {
            conflicts.extend(conflicts_of(&reply, &existing)?);
        }
        Ok(conflicts)
    }
}

fn replacement(w: &Write) -> Result<bson::Document, SinkError> {
    let mut d = bson::to_document(&w.document).map_err(|e| SinkError::Corrupt {
        key: w.key.clone(),
        reason: e.to_string(),
    })?;
    d.insert("_id", &w.key);
    Ok(d)
}

/// The keys whose statement hit E11000 (a concurrent writer); any other error fails the batch.
fn conflicts_of(reply: &bson::Document, writes: &[&Write]) -> Result<Vec<String>, SinkError> {
    let mut conflicts = Vec::new();
    let Ok(errors) = reply.get_array("writeErrors") else {
        return Ok(conflicts);
    };
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
                reason: format!("write error {code}: {}", e.get_str("errmsg").unwrap_or("")),
            });
        }
    }
    Ok(conflicts)
}

fn number(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) => Some(*f as i64),
        _ => None,
    }
}
