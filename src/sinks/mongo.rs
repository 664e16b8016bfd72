//! Order views in MongoDB: one document per order (`_id` = order_id).
//!
//! Writes: new documents in `insert` commands (a racing creator makes a statement fail with
//! E11000), the others in `update` commands of `{_id, _rev: expected}` replacements with
//! upsert (a moved token makes the upsert collide on `_id`: E11000 again). Commands of up to
//! 1,000 statements (and 8 MB), several in flight, journaled before they return. Documents
//! are encoded straight from their typed views to BSON, once.

use std::time::Duration;

use futures::TryStreamExt;
use futures::future::try_join_all;
use mongodb::bson::{self, Bson, Document, RawArrayBuf, RawBson, RawDocumentBuf, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use projectors::Doc;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DocStore, DocWrite, Loaded, SinkError, WriteOutcome, with_timeout};
use crate::config::MongoConfig;

const STORE: &str = "mongo";
const DUPLICATE_KEY: i32 = 11000;
/// Statements per write command, and bytes.
const CHUNK_STATEMENTS: usize = 1_000;
/// Replacements per transaction: several transactions of a batch commit side by side, so a
/// batch is written in about the time of its largest one.
const TRANSACTION_STATEMENTS: usize = 1_000;
const CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// The longest `transactionLifetimeLimitSeconds` said to be fine: the sink's transactions
/// take milliseconds, and one the server cuts short is retried.
pub const TRANSACTION_LIFETIME_OK_SECS: i64 = 10;
/// BSON's document limit, less room for the statement around it.
const MAX_DOC_BYTES: usize = 16 * 1024 * 1024 - 16 * 1024;

/// Server codes a retry can get past: elections, shutdowns, interrupted or timed-out work,
/// and the conflicts of concurrent transactions (LockTimeout 24, WriteConflict 112,
/// ConflictingOperationInProgress 117, NoSuchTransaction 251) — a rebalance overlap makes
/// two workers write one document at once.
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 24, 43, 50, 89, 91, 112, 117, 134, 189, 251, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

/// Server codes of a deployment problem: Unauthorized, AuthenticationFailed.
const DEPLOYMENT_CODES: &[i32] = &[13, 18];

#[derive(Clone)]
pub struct MongoSink {
    client: Client,
    db: Database,
    collection: String,
    timeout: Duration,
    /// A replica set (even of one node): updates of a command commit in one transaction,
    /// so one journal write covers them all, not one per document.
    transactions: bool,
    /// Acknowledged by how many members (`mongo.write_concern`).
    w: crate::config::MongoWriteConcern,
}

pub(crate) fn classify(e: &mongodb::error::Error) -> SinkError {
    // The server's own verdict comes first: these labels mean "the same request can succeed".
    let labelled = [
        mongodb::error::TRANSIENT_TRANSACTION_ERROR,
        mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT,
        mongodb::error::RETRYABLE_WRITE_ERROR,
    ]
    .iter()
    .any(|l| e.contains_label(l));
    if labelled {
        return SinkError::transient(STORE, e);
    }
    match e.kind.as_ref() {
        // Unauthorized, AuthenticationFailed: the deployment's problem, not the documents'
        // (every write fails alike): wait, with the circuit open, rather than refuse them.
        ErrorKind::Command(c) if DEPLOYMENT_CODES.contains(&c.code) => {
            SinkError::transient(STORE, e)
        }
        ErrorKind::Command(c) if !TRANSIENT_CODES.contains(&c.code) => {
            SinkError::permanent(STORE, e)
        }
        ErrorKind::Authentication { .. } => SinkError::transient(STORE, e),
        ErrorKind::InvalidArgument { .. } | ErrorKind::InvalidTlsConfig { .. } => {
            SinkError::permanent(STORE, e)
        }
        _ => SinkError::transient(STORE, e),
    }
}

impl MongoSink {
    pub async fn connect(cfg: &MongoConfig, collection: &str) -> Result<MongoSink, SinkError> {
        let sink = MongoSink::connect_unindexed(cfg, collection).await?;
        with_timeout(STORE, sink.timeout, sink.ensure_indexes()).await?;
        Ok(sink)
    }

    /// For a replay building a version no reader uses yet: only the `_id` index. Secondary
    /// indexes maintained per insert cost a rebuild a third of MongoDB's time (order views:
    /// 13–16 s of its CPU against 9 s for 220,000 events); [`MongoSink::build_indexes`]
    /// adds them once at the end, in about 1.3 s.
    pub async fn connect_unindexed(
        cfg: &MongoConfig,
        collection: &str,
    ) -> Result<MongoSink, SinkError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let options = client_options(cfg, "projector", Duration::MAX)
            .await
            .map_err(|e| SinkError::permanent(STORE, e))?;
        let client = Client::with_options(options).map_err(|e| classify(&e))?;
        let mut sink = MongoSink {
            db: client.database(&cfg.database),
            client,
            collection: collection.to_owned(),
            timeout,
            transactions: false,
            w: cfg.write_concern,
        };
        let hello = with_timeout(STORE, timeout, async {
            sink.db
                .run_command(doc! {"hello": 1})
                .await
                .map_err(|e| classify(&e))
        })
        .await?;
        sink.transactions = hello.get_str("setName").is_ok();
        if sink.transactions {
            sink.warn_on_long_transaction_lifetime().await;
        }
        Ok(sink)
    }

    /// A worker killed between a transaction's update and its commit leaves the documents
    /// locked until the server aborts it (`transactionLifetimeLimitSeconds`, 60 by default):
    /// said at start-up, as the Redis sink says a lossy fsync policy (`projector doctor` too).
    async fn warn_on_long_transaction_lifetime(&self) {
        let asked = transaction_lifetime_secs(&self.client);
        let Ok(Ok(secs)) = tokio::time::timeout(self.timeout, asked).await else {
            return; // not every user may ask; the doctor says so
        };
        if secs > TRANSACTION_LIFETIME_OK_SECS {
            tracing::warn!(
                transaction_lifetime_secs = secs,
                "MongoDB keeps an abandoned transaction for {secs} s: a worker killed \
                 mid-transaction blocks the writes to its documents that long; set \
                 transactionLifetimeLimitSeconds to at most {TRANSACTION_LIFETIME_OK_SECS}"
            );
        }
    }

    pub fn collection(&self) -> Collection<Document> {
        self.db.collection(&self.collection)
    }

    pub fn collection_name(&self) -> &str {
        &self.collection
    }

    /// The secondary indexes, on a collection that may hold many documents already (the end
    /// of a rebuild): built server-side, so given `at_most` rather than the write timeout.
    pub async fn build_indexes(&self, at_most: Duration) -> Result<(), SinkError> {
        with_timeout(STORE, at_most.max(self.timeout), self.ensure_indexes()).await
    }

    /// "Orders of a customer, newest first" and "orders by status", each ending in the read
    /// service's sort (`_id` breaks ties), so a page is read off the index in order rather
    /// than sorted from every match. The compare-and-set filter `{_id, _rev}` is served by the
    /// `_id` index alone.
    async fn ensure_indexes(&self) -> Result<(), SinkError> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.collection()
            .create_indexes([
                index(
                    doc! {"customer_id": 1, "placed_at": -1, "_id": -1},
                    "by_customer_placed",
                ),
                index(
                    doc! {"status": 1, "updated_at": -1, "_id": -1},
                    "by_status_updated",
                ),
            ])
            .await
            .map_err(|e| classify(&e))?;
        // Earlier versions kept a redundant {_id, _rev} index that every write maintained, and
        // the two above without `_id` (every page then sorted all its matches).
        for old in ["cas", "by_customer_newest", "by_status"] {
            let _ = self.collection().drop_index(old).await;
        }
        Ok(())
    }

    /// Drop the collection (retiring an old version).
    pub async fn drop_collection(&self) -> Result<(), SinkError> {
        self.collection().drop().await.map_err(|e| classify(&e))
    }

    /// Every document of the collection (tests, the demo): key → document.
    pub async fn scan_all<V: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, Loaded<V>)>, SinkError> {
        let docs: Vec<RawDocumentBuf> = self
            .db
            .collection::<RawDocumentBuf>(&self.collection)
            .find(doc! {})
            .await
            .map_err(|e| classify(&e))?
            .try_collect()
            .await
            .map_err(|e| classify(&e))?;
        Ok(docs.iter().map(decode).collect())
    }

    /// One unordered, journaled write command; statements are already encoded.
    async fn write_command(
        &self,
        verb: &str,
        field: &str,
        statements: RawArrayBuf,
    ) -> Result<Document, SinkError> {
        let mut command = RawDocumentBuf::new();
        command.append(verb, self.collection.as_str());
        command.append(field, statements);
        command.append("ordered", false);
        let mut wc = RawDocumentBuf::new();
        match self.w {
            crate::config::MongoWriteConcern::Majority => wc.append("w", "majority"),
            crate::config::MongoWriteConcern::Nodes(n) => wc.append("w", n as i32),
        }
        wc.append("j", true);
        command.append("writeConcern", wc);
        with_timeout(STORE, self.timeout, async {
            self.db
                .run_raw_command(command)
                .await
                .map_err(|e| classify(&e))
        })
        .await
    }
}

/// The document with `_id` = its key (a view that names its own `_id`, like the order
/// view, already has it).
/// The client options every MongoDB client of the project uses (the workers', the read
/// service's, the doctor's): `cfg.uri`, named `app`, giving up on a server after the connect
/// timeout or `at_most`, whichever is shorter. The error names no credentials.
pub async fn client_options(
    cfg: &MongoConfig,
    app: &str,
    at_most: Duration,
) -> Result<ClientOptions, String> {
    let mut options = ClientOptions::parse(&cfg.uri)
        .await
        .map_err(|e| crate::redact::error(&e, &cfg.uri))?;
    let select = Duration::from_millis(cfg.connect_timeout_ms).min(at_most);
    options.server_selection_timeout = Some(select);
    options.connect_timeout = Some(select);
    options.app_name = Some(app.into());
    Ok(options)
}

fn with_id(d: RawDocumentBuf, key: &str) -> RawDocumentBuf {
    if d.get_str("_id").is_ok_and(|id| id == key) {
        return d;
    }
    let mut out = RawDocumentBuf::new();
    out.append("_id", key);
    for (k, v) in d.iter().flatten() {
        if k != "_id" {
            out.append_ref(k, v);
        }
    }
    out
}

/// `{q: {_id, _rev: expected}, u: document, upsert}`: a replacement only while the stored
/// token is the expected one.
fn statement(w: &DocWrite, d: &RawDocumentBuf, upsert: bool) -> RawDocumentBuf {
    let mut q = RawDocumentBuf::new();
    q.append("_id", w.key.as_str());
    q.append("_rev", w.expected.unwrap_or(0) as i64);
    let mut stmt = RawDocumentBuf::new();
    stmt.append("q", q);
    stmt.append("u", d.clone());
    stmt.append("upsert", upsert);
    stmt
}

pub(crate) fn decode<V: DeserializeOwned>(d: &RawDocumentBuf) -> (String, Loaded<V>) {
    let key = d
        .get_str("_id")
        .map(str::to_owned)
        .unwrap_or_else(|_| "?".into());
    let doc = bson::from_slice::<Doc<V>>(d.as_bytes())
        .map_err(|e| format!("stored order view {key} does not decode: {e}"));
    (key, doc)
}

/// The server's `transactionLifetimeLimitSeconds` (the sink's start-up warning, the doctor).
pub(crate) async fn transaction_lifetime_secs(client: &Client) -> Result<i64, String> {
    const NAME: &str = "transactionLifetimeLimitSeconds";
    let reply = client
        .database("admin")
        .run_command(doc! {"getParameter": 1, NAME: 1})
        .await
        .map_err(|e| e.to_string())?;
    number(reply.get(NAME)).ok_or_else(|| "getParameter did not say".to_owned())
}

fn number(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) => Some(*f as i64),
        _ => None,
    }
}

/// Split statements into commands of at most CHUNK_STATEMENTS and CHUNK_BYTES.
fn chunks(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    chunks_of(sizes, CHUNK_STATEMENTS)
}

/// Split statements into commands of at most `max` statements and CHUNK_BYTES.
fn chunks_of(sizes: &[usize], max: usize) -> Vec<std::ops::Range<usize>> {
    super::runs(sizes, max, CHUNK_BYTES)
}

/// Attempts of one transaction before its still-pending statements count as conflicts.
const TRANSACTION_ATTEMPTS: usize = 4;

impl MongoSink {
    /// Replace documents in one transaction (one journal write for all of them). A statement
    /// whose token moved matches nothing, so the matched count tells whether all of them hold;
    /// if not, the transaction is abandoned, the moved ones are found and reported as
    /// conflicts, and the rest is tried again. Returns (conflicts, refused) by write index.
    async fn update_in_transaction(
        &self,
        writes: &[DocWrite],
        mut pending: Vec<(usize, RawDocumentBuf)>,
    ) -> Result<(Vec<usize>, Vec<(usize, String)>), SinkError> {
        use mongodb::options::{Acknowledgment, WriteConcern};
        let mut conflicts = Vec::new();
        let mut refused = Vec::new();
        for _ in 0..TRANSACTION_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let mut updates = RawArrayBuf::new();
            for (i, d) in &pending {
                updates.push(RawBson::Document(statement(&writes[*i], d, false)));
            }
            let mut command = RawDocumentBuf::new();
            command.append("update", self.collection.as_str());
            command.append("updates", updates);
            command.append("ordered", false);
            let w = match self.w {
                crate::config::MongoWriteConcern::Majority => Acknowledgment::Majority,
                crate::config::MongoWriteConcern::Nodes(n) => Acknowledgment::Nodes(n),
            };
            let wc = WriteConcern::builder().w(w).journal(true).build();
            let outcome = with_timeout(STORE, self.timeout, async {
                let mut session = self
                    .client
                    .start_session()
                    .await
                    .map_err(|e| classify(&e))?;
                session
                    .start_transaction()
                    .write_concern(wc)
                    .await
                    .map_err(|e| classify(&e))?;
                let reply = self
                    .db
                    .run_raw_command(command)
                    .session(&mut session)
                    .await
                    .map_err(|e| classify(&e))?;
                let errors: Vec<(usize, i32, String)> = reply
                    .get_array("writeErrors")
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| match e {
                                Bson::Document(e) => Some((
                                    number(e.get("index")).unwrap_or(-1) as usize,
                                    number(e.get("code")).unwrap_or(-1) as i32,
                                    e.get_str("errmsg").unwrap_or("").to_owned(),
                                )),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let matched = number(reply.get("n")).unwrap_or(-1);
                if errors.is_empty() && matched == pending.len() as i64 {
                    session
                        .commit_transaction()
                        .await
                        .map_err(|e| classify(&e))?;
                    return Ok(None);
                }
                let _ = session.abort_transaction().await;
                Ok(Some(errors))
            })
            .await?;
            let Some(errors) = outcome else {
                return Ok((conflicts, refused));
            };
            // Statements the server refused for good leave; then find whose token moved.
            let mut drop_now = Vec::new();
            for (at, code, msg) in errors {
                if TRANSIENT_CODES.contains(&code) {
                    return Err(SinkError::transient(
                        STORE,
                        format!("write error {code}: {msg}"),
                    ));
                }
                if let Some((i, _)) = pending.get(at) {
                    refused.push((*i, format!("mongo write error {code}: {msg}")));
                    drop_now.push(*i);
                }
            }
            pending.retain(|(i, _)| !drop_now.contains(i));
            let keys: Vec<&str> = pending
                .iter()
                .map(|(i, _)| writes[*i].key.as_str())
                .collect();
            let stored: Vec<Document> = with_timeout(STORE, self.timeout, async {
                self.collection()
                    .find(doc! {"_id": {"$in": &keys}})
                    .projection(doc! {"_rev": 1})
                    .await
                    .map_err(|e| classify(&e))?
                    .try_collect()
                    .await
                    .map_err(|e| classify(&e))
            })
            .await?;
            let current: std::collections::HashMap<&str, i64> = stored
                .iter()
                .filter_map(|d| Some((d.get_str("_id").ok()?, number(d.get("_rev"))?)))
                .collect();
            pending.retain(|(i, _)| {
                let w = &writes[*i];
                let holds = current.get(w.key.as_str()).copied() == w.expected.map(|r| r as i64);
                if !holds {
                    conflicts.push(*i);
                }
                holds
            });
        }
        // Still contended after every attempt: let the caller reload and fold again.
        conflicts.extend(pending.iter().map(|(i, _)| *i));
        Ok((conflicts, refused))
    }
}

impl DocStore for MongoSink {
    fn name(&self) -> &'static str {
        STORE
    }

    fn location(&self) -> &str {
        &self.collection
    }

    fn max_doc_bytes(&self) -> usize {
        MAX_DOC_BYTES
    }

    fn encode<V: Serialize>(&self, doc: &Doc<V>) -> Result<Vec<u8>, String> {
        bson::to_vec(doc).map_err(|e| e.to_string())
    }

    async fn load<V: DeserializeOwned + Send + 'static>(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Loaded<V>)>, SinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let coll = self.db.collection::<RawDocumentBuf>(&self.collection);
        let finds = keys.chunks(CHUNK_STATEMENTS).map(|chunk| {
            let coll = coll.clone();
            async move {
                let docs: Vec<RawDocumentBuf> = coll
                    .find(doc! {"_id": {"$in": chunk}})
                    .await
                    .map_err(|e| classify(&e))?
                    .try_collect()
                    .await
                    .map_err(|e| classify(&e))?;
                Ok::<_, SinkError>(docs)
            }
        });
        let found = with_timeout(STORE, self.timeout, try_join_all(finds)).await?;
        Ok(found.iter().flatten().map(decode).collect())
    }

    async fn write(&self, writes: &[DocWrite]) -> Result<WriteOutcome, SinkError> {
        let mut out = WriteOutcome::default();
        let (mut new, mut existing) = (Vec::new(), Vec::new());
        for (i, w) in writes.iter().enumerate() {
            match RawDocumentBuf::from_bytes(w.body.to_vec()).map(|d| with_id(d, &w.key)) {
                Ok(d) if w.expected.is_none() => new.push((i, d)),
                Ok(d) => existing.push((i, d)),
                Err(e) => out.refused.push((i, format!("not a BSON document: {e}"))),
            }
        }
        let mut commands = Vec::new();
        let sizes: Vec<usize> = new.iter().map(|(_, d)| d.as_bytes().len()).collect();
        for range in chunks(&sizes) {
            let mut docs = RawArrayBuf::new();
            for (_, d) in &new[range.clone()] {
                docs.push(RawBson::Document(d.clone()));
            }
            let idx: Vec<usize> = new[range].iter().map(|(i, _)| *i).collect();
            commands.push(("insert", "documents", docs, idx));
        }
        let sizes: Vec<usize> = existing.iter().map(|(_, d)| d.as_bytes().len()).collect();
        let mut in_transactions = Vec::new();
        if self.transactions {
            for range in chunks_of(&sizes, TRANSACTION_STATEMENTS) {
                in_transactions.push(existing[range].to_vec());
            }
        }
        for range in chunks(&sizes).into_iter().filter(|_| !self.transactions) {
            let mut updates = RawArrayBuf::new();
            for (i, d) in &existing[range.clone()] {
                let w = &writes[*i];
                updates.push(RawBson::Document(statement(w, d, true)));
            }
            let idx: Vec<usize> = existing[range].iter().map(|(i, _)| *i).collect();
            commands.push(("update", "updates", updates, idx));
        }
        let transactional = try_join_all(
            in_transactions
                .into_iter()
                .map(|stmts| self.update_in_transaction(writes, stmts)),
        );
        let plain = try_join_all(commands.into_iter().map(
            |(verb, field, stmts, idx)| async move {
                self.write_command(verb, field, stmts)
                    .await
                    .map(|reply| (reply, idx))
            },
        ));
        let (replies, transactional) = tokio::join!(plain, transactional);
        for (conflicts, refused) in transactional? {
            out.conflicts.extend(conflicts);
            out.refused.extend(refused);
        }
        let replies = replies?;
        for (reply, idx) in replies {
            if let Ok(wce) = reply.get_document("writeConcernError") {
                return Err(SinkError::transient(STORE, format!("write concern: {wce}")));
            }
            let Ok(errors) = reply.get_array("writeErrors") else {
                continue;
            };
            for e in errors {
                let Bson::Document(e) = e else { continue };
                let Some(i) = number(e.get("index"))
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| idx.get(i).copied())
                else {
                    continue;
                };
                let code = number(e.get("code")).unwrap_or(-1) as i32;
                let msg = e.get_str("errmsg").unwrap_or("");
                if code == DUPLICATE_KEY {
                    out.conflicts.push(i);
                } else if TRANSIENT_CODES.contains(&code) {
                    return Err(SinkError::transient(
                        STORE,
                        format!("write error {code}: {msg}"),
                    ));
                } else {
                    out.refused
                        .push((i, format!("mongo write error {code}: {msg}")));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_hold_at_most_a_thousand_statements_and_eight_megabytes() {
        assert_eq!(chunks(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(
            chunks(&vec![10; 2_500]),
            vec![0..1000, 1000..2000, 2000..2500]
        );
        let big = 3 * 1024 * 1024;
        assert_eq!(chunks(&[big, big, big, 5]), vec![0..2, 2..4]);
        // One document over the byte budget still goes alone.
        assert_eq!(chunks(&[20 * 1024 * 1024, 1]), vec![0..1, 1..2]);
    }
}
