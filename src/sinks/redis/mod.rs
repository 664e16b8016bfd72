//! Customer-360 documents in Redis: `<prefix><customer_id>` holds the JSON document (view,
//! guard and write token). One key per document, so the compare-and-set touches one key
//! (one slot on a cluster) and no id can ever land on another document's bookkeeping.
//!
//! Writes: one EVALSHA of a compare-and-set script per chunk of a few hundred documents (one
//! log sync per chunk, see [`CAS_MANY`]), several chunks in flight over a few connections. The
//! connection is a `ConnectionManager`: it reconnects by itself after a restart, and every
//! request has a response timeout, so a hung server is a transient error, not a stuck worker.
//!
//! On Redis Cluster (`redis.cluster`) every command names one key and routes by its slot (a
//! pipeline may not cross slots): the same script once per document, `GET` and `UNLINK` per
//! key, many in flight; `SCAN` runs on every primary. The connection is replaced when it goes
//! stale (see `cluster`).
//!
//! `connection` is the connection (one server or a cluster), `script` the compare-and-set
//! and its reply, `durability` what an acknowledged write promises, `errors` which errors
//! are transient.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::try_join_all;
use projectors::Doc;
use redis::{Cmd, Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{DocStore, DocWrite, Loaded, SinkError, WriteOutcome, with_timeout};
use crate::config::RedisConfig;

mod cluster;
mod connection;
mod durability;
mod errors;
mod script;

pub use connection::RedisCon;
use durability::aof_confirmed;
pub use durability::{Durability, ServerDurability, probe_durability, probe_server};
use errors::{classify, transient_code, unexpected};
use script::{CAS_MANY, per_document};

const STORE: &str = "redis";

/// The set of a document's finished streams: `{<document key>}:finished`. The braces make a
/// cluster hash it by the document's key alone, so both live in one slot (one script may
/// touch both). A key with braces of its own would hash otherwise: its document keeps its
/// finished streams in its guard (`None`).
pub fn finished_key(doc_key: &str) -> Option<String> {
    (!doc_key.contains(['{', '}'])).then(|| format!("{{{doc_key}}}:finished"))
}

/// Documents per script (and per pipeline on a single server).
const CHUNK: usize = 256;

/// Bytes of documents per script, at most (far below Redis's 1 GB query buffer, which a
/// chunk of large documents would pass: the server then drops the connection, every time).
const CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// What each write sends: its key, body and finished streams.
fn write_sizes(writes: &[DocWrite]) -> Vec<usize> {
    writes
        .iter()
        .map(|w| w.key.len() + w.body.len() + w.finished.iter().map(String::len).sum::<usize>())
        .collect()
}

/// Connections the chunks of a batch spread over. With `appendfsync always`, Redis syncs its
/// log once per event-loop turn: chunks that complete in the same turn share the sync.
const CONNECTIONS: usize = 4;

/// Redis's own limit on a string value.
const MAX_VALUE_BYTES: usize = 512 * 1024 * 1024;

/// Scripts in flight at once on a cluster (one command per document there).
const CLUSTER_IN_FLIGHT: usize = 512;

#[derive(Clone)]
pub struct RedisSink {
    /// Where the live version is published for agents that read Redis directly.
    pointer_key: Option<Arc<str>>,
    con: RedisCon,
    /// More connections for the write pipelines (the first is `con`; one on a cluster, whose
    /// client holds a connection per node).
    writers: Arc<Vec<RedisCon>>,
    prefix: Arc<str>,
    /// The compare-and-set ([`CAS_MANY`]).
    cas: Arc<Script>,
    timeout: Duration,
    /// What an acknowledged write promises (WAITAOF after every batch when the server has it).
    durability: Durability,
}

impl RedisSink {
    pub async fn connect(cfg: &RedisConfig, prefix: &str) -> Result<RedisSink, SinkError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let n = if cfg.cluster { 1 } else { CONNECTIONS };
        let mut cons = Vec::with_capacity(n);
        for _ in 0..n {
            cons.push(RedisCon::open(cfg, 3).await?);
        }
        let con = cons[0].clone();
        let mut sink = RedisSink {
            pointer_key: None,
            con,
            writers: Arc::new(cons),
            prefix: prefix.into(),
            cas: Arc::new(Script::new(CAS_MANY)),
            timeout,
            durability: Durability::FsyncAlways,
        };
        sink.durability = probe_durability(&mut sink.con.clone()).await;
        if let Durability::Lossy(why) = &sink.durability {
            tracing::warn!(
                reason = %why,
                "Redis acknowledges writes before they are on disk: a Redis crash can lose \
                 acknowledged Customer-360 writes (their offsets are committed). Run it with \
                 appendonly yes and appendfsync always (or Redis 7.2+ for WAITAOF)."
            );
        }
        Ok(sink)
    }

    /// What an acknowledged write of this sink promises.
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// The WAITAOF deadline: inside the response timeout, so a slow fsync is answered
    /// (numlocal 0, a transient failure) rather than cut off.
    fn waitaof(&self) -> Cmd {
        let mut cmd = redis::cmd("WAITAOF");
        cmd.arg(1)
            .arg(0)
            .arg((self.timeout.as_millis() as u64 / 2).max(1));
        cmd
    }

    /// Publish the live version under `key` on `announce` (the live worker's sink).
    pub fn with_pointer(mut self, key: String) -> RedisSink {
        self.pointer_key = Some(key.into());
        self
    }

    /// Remove the live-version pointer `with_pointer` named (a deployment going away, such
    /// as the bench's own).
    pub async fn forget_pointer(&self) -> Result<(), SinkError> {
        let Some(key) = &self.pointer_key else {
            return Ok(());
        };
        let mut con = self.con.clone();
        with_timeout(STORE, self.timeout, async {
            redis::cmd("UNLINK")
                .arg(&**key)
                .query_async::<i64>(&mut con)
                .await
                .map(|_| ())
                .map_err(classify)
        })
        .await
    }

    pub fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn connection(&self) -> RedisCon {
        self.con.clone()
    }

    /// Every key under the prefix.
    async fn keys(&self) -> Result<Vec<String>, SinkError> {
        self.con.clone().scan(&format!("{}*", self.prefix)).await
    }

    /// Delete every key under the prefix, and the sets of finished streams beside them
    /// (retiring an old version).
    pub async fn delete_all(&self) -> Result<(), SinkError> {
        let mut con = self.con.clone();
        let mut keys = self.keys().await?;
        keys.extend(con.scan(&format!("{{{}*", self.prefix)).await?);
        if matches!(con, RedisCon::Cluster(_)) {
            for chunk in keys.chunks(10_000) {
                con.each_key::<i64>("UNLINK", chunk).await?;
            }
            return Ok(());
        }
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut con)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Every document under the prefix (tests, the demo): id → document, whole (its
    /// finished streams back in its guard).
    pub async fn scan_all<V: DeserializeOwned + Send + 'static>(
        &self,
    ) -> Result<Vec<(String, Loaded<V>)>, SinkError> {
        let ids: Vec<String> = self
            .keys()
            .await?
            .into_iter()
            .map(|k| k[self.prefix.len()..].to_owned())
            .collect();
        let mut docs = Vec::with_capacity(ids.len());
        // In chunks: one MGET of every document would outlast the response timeout.
        for chunk in ids.chunks(1000) {
            let mut loaded = self.load::<V>(chunk.to_vec()).await?;
            // The whole document: its finished streams back in its guard.
            let sides: Vec<String> = loaded
                .iter()
                .map(|(k, _)| finished_key(&self.key(k)).unwrap_or_default())
                .collect();
            let members: Vec<Vec<String>> = self.con.each_key("SMEMBERS", &sides).await?;
            for ((_, doc), streams) in loaded.iter_mut().zip(members) {
                if let Ok(doc) = doc {
                    for s in streams {
                        doc.finish(s);
                    }
                }
            }
            docs.extend(loaded);
        }
        Ok(docs)
    }

    /// On a cluster: one script per document, routed by its key, in order of `writes`.
    /// `Err` in a reply: the server refused that document alone.
    async fn write_each(
        &self,
        writes: &[DocWrite],
    ) -> Result<Vec<Result<Value, String>>, SinkError> {
        // Owned arguments: a future that borrows the batch trips the `Send` check of the
        // trait's future (rust-lang/rust#100013).
        let calls: Vec<_> = writes
            .iter()
            .map(|w| {
                let mut con = self.con.clone();
                let inv = self.invocation(std::slice::from_ref(w));
                async move { inv.invoke_async::<Value>(&mut con).await }
            })
            .collect();
        let replies: Vec<redis::RedisResult<Value>> = futures::stream::iter(calls)
            .buffered(CLUSTER_IN_FLIGHT)
            .collect()
            .await;
        replies
            .into_iter()
            .map(|r| match r {
                Ok(v) => Ok(Ok(per_document(v, 1)?.swap_remove(0))),
                Err(e) if e.code().is_some_and(|c| !transient_code(c)) => Ok(Err(e.to_string())),
                Err(e) => Err(classify(e)),
            })
            .collect()
    }

    /// One pipeline on one of the write connections; with WAITAOF, the pipeline ends with it
    /// on that same connection (WAITAOF covers only its own connection's writes).
    async fn write_chunk(&self, n: usize, writes: &[DocWrite]) -> Result<Vec<Value>, SinkError> {
        let mut con = self.writers[n % self.writers.len()].clone();
        let mut pipe = redis::pipe();
        // In every pipeline: a restarted Redis has forgotten the script.
        pipe.load_script(&self.cas).ignore();
        pipe.invoke_script(&self.invocation(writes));
        let wait = self.durability == Durability::WaitAof;
        if wait {
            pipe.add_command(self.waitaof());
        }
        pipe.ignore_errors();
        let mut replies: Vec<Value> = pipe.query_async(&mut con).await.map_err(classify)?;
        if wait {
            let reply = replies
                .pop()
                .ok_or_else(|| unexpected("no reply to WAITAOF"))?;
            aof_confirmed(&reply)?;
        }
        let reply = replies
            .pop()
            .ok_or_else(|| unexpected("no reply to the compare-and-set"))?;
        per_document(reply, writes.len())
    }

    /// The compare-and-set of `writes` in one script ([`CAS_MANY`]).
    fn invocation(&self, writes: &[DocWrite]) -> redis::ScriptInvocation<'_> {
        let mut inv = self.cas.prepare_invoke();
        for w in writes {
            let key = self.key(&w.key);
            let side = finished_key(&key).filter(|_| !w.finished.is_empty());
            inv.key(key);
            inv.arg(w.expected.unwrap_or(0).to_string())
                .arg(w.body.as_ref());
            match side {
                Some(side) => {
                    inv.key(side);
                    inv.arg(w.finished.len());
                    for s in &w.finished {
                        inv.arg(s.as_str());
                    }
                }
                None => {
                    inv.arg(0);
                }
            }
        }
        inv
    }
}

impl DocStore for RedisSink {
    fn name(&self) -> &'static str {
        STORE
    }

    fn location(&self) -> &str {
        &self.prefix
    }

    fn max_doc_bytes(&self) -> usize {
        MAX_VALUE_BYTES
    }

    fn encode<V: Serialize>(&self, doc: &Doc<V>) -> Result<Vec<u8>, String> {
        serde_json::to_vec(doc).map_err(|e| e.to_string())
    }

    async fn load<V: DeserializeOwned + Send + 'static>(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Loaded<V>)>, SinkError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = if matches!(self.con, RedisCon::Cluster(_)) {
            let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
            with_timeout(STORE, self.timeout, self.con.each_key("GET", &full)).await?
        } else {
            let chunks = keys.chunks(CHUNK * 2).map(|chunk| {
                let mut con = self.con.clone();
                let full: Vec<String> = chunk.iter().map(|k| self.key(k)).collect();
                async move {
                    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(&full)
                        .query_async(&mut con)
                        .await
                        .map_err(classify)?;
                    Ok::<_, SinkError>(values)
                }
            });
            with_timeout(STORE, self.timeout, try_join_all(chunks))
                .await?
                .into_iter()
                .flatten()
                .collect()
        };
        let mut out = Vec::new();
        for (k, v) in keys.into_iter().zip(values) {
            if let Some(bytes) = v {
                let doc = serde_json::from_slice::<Doc<V>>(&bytes).map_err(|e| {
                    format!("stored document {}{k} does not decode: {e}", self.prefix)
                });
                out.push((k, doc));
            }
        }
        Ok(out)
    }

    /// As [`finished_key`] decides for the document's key, without building it (once per
    /// event of a batch whose stream the view's guard lacks).
    fn finished_apart(&self, key: &str) -> bool {
        !self.prefix.contains(['{', '}']) && !key.contains(['{', '}'])
    }

    async fn finished(
        &self,
        asks: Vec<(String, Vec<String>)>,
    ) -> Result<Vec<(String, Vec<String>)>, SinkError> {
        let asks: Vec<(String, String, Vec<String>)> = asks
            .into_iter()
            .filter_map(|(k, streams)| {
                let side = finished_key(&self.key(&k))?;
                (!streams.is_empty()).then_some((k, side, streams))
            })
            .collect();
        if asks.is_empty() {
            return Ok(Vec::new());
        }
        let command = |side: &str, streams: &[String]| {
            let mut c = redis::cmd("SMISMEMBER");
            c.arg(side).arg(streams);
            c
        };
        let replies: Vec<Vec<i64>> = if matches!(self.con, RedisCon::Cluster(_)) {
            // One command per document, routed by its slot (see `each_key`).
            let cmds = asks.iter().map(|(_, side, streams)| command(side, streams));
            with_timeout(STORE, self.timeout, self.con.each(cmds)).await?
        } else {
            let mut pipe = redis::pipe();
            for (_, side, streams) in &asks {
                pipe.add_command(command(side, streams));
            }
            let mut con = self.con.clone();
            with_timeout(STORE, self.timeout, async {
                pipe.query_async(&mut con).await.map_err(classify)
            })
            .await?
        };
        Ok(asks
            .into_iter()
            .zip(replies)
            .map(|((k, _, streams), found)| {
                let finished = streams
                    .into_iter()
                    .zip(found)
                    .filter(|(_, f)| *f == 1)
                    .map(|(s, _)| s)
                    .collect();
                (k, finished)
            })
            .collect())
    }

    async fn write(&self, writes: &[DocWrite]) -> Result<WriteOutcome, SinkError> {
        if writes.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let replies = if matches!(self.con, RedisCon::Cluster(_)) {
            with_timeout(STORE, self.timeout, self.write_each(writes)).await?
        } else {
            with_timeout(
                STORE,
                self.timeout,
                try_join_all(
                    super::runs(&write_sizes(writes), CHUNK, CHUNK_BYTES)
                        .into_iter()
                        .enumerate()
                        .map(|(n, r)| self.write_chunk(n, &writes[r])),
                ),
            )
            .await?
            .into_iter()
            .flatten()
            .map(Ok)
            .collect()
        };
        let mut out = WriteOutcome::default();
        for (i, reply) in replies.into_iter().enumerate() {
            match reply {
                Ok(Value::Int(1)) => {}
                Ok(Value::Int(_)) => out.conflicts.push(i),
                Ok(Value::ServerError(e)) if transient_code(e.code()) => {
                    return Err(SinkError::transient(STORE, format!("{e}")));
                }
                Ok(Value::ServerError(e)) => out.refused.push((i, format!("redis: {e}"))),
                Err(e) => out.refused.push((i, format!("redis: {e}"))),
                Ok(other) => {
                    return Err(SinkError::transient(
                        STORE,
                        format!("unexpected reply to the compare-and-set: {other:?}"),
                    ));
                }
            }
        }
        // On a cluster the client routes WAITAOF to every primary, each on the connection
        // the scripts went through; a single server waited in each pipeline (`write_chunk`).
        if self.durability == Durability::WaitAof && matches!(self.con, RedisCon::Cluster(_)) {
            let mut con = self.con.clone();
            let reply: Value = with_timeout(STORE, self.timeout, async {
                self.waitaof().query_async(&mut con).await.map_err(classify)
            })
            .await?;
            aof_confirmed(&reply)?;
        }
        Ok(out)
    }

    async fn announce(&self, version: &str) -> Result<(), SinkError> {
        let Some(key) = &self.pointer_key else {
            return Ok(());
        };
        let pointer = serde_json::json!({
            "version": version,
            "prefix": &*self.prefix,
            "contract_version": projectors::CONTRACT_VERSION,
        });
        let mut con = self.con.clone();
        let _: () = with_timeout(STORE, self.timeout, async {
            redis::cmd("SET")
                .arg(&**key)
                .arg(pointer.to_string())
                .query_async(&mut con)
                .await
                .map_err(classify)
        })
        .await?;
        Ok(())
    }
}
