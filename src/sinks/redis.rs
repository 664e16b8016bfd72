//! Customer-360 documents in Redis: `<prefix><customer_id>` holds the JSON document (view,
//! guard and revision), `<prefix><customer_id>:rev` its revision. A Lua script checks the
//! revision and writes both, atomically; all writes of a batch go in one pipeline.

use std::collections::HashMap;

use projectors::Document;
use redis::aio::MultiplexedConnection;
use redis::{Client, Script};

use super::{DocumentSink, SinkError, Write};

const CAS: &str = r"
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[2])
return 1";

#[derive(Clone)]
pub struct RedisSink {
    con: MultiplexedConnection,
    prefix: String,
    cas: Script,
}

impl RedisSink {
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisSink, SinkError> {
        let con = Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(RedisSink {
            con,
            prefix: prefix.to_owned(),
            cas: Script::new(CAS),
        })
    }

    pub fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    pub fn connection(&self) -> MultiplexedConnection {
        self.con.clone()
    }

    /// Every key under the prefix (documents and their `:rev` keys).
    async fn keys(&self) -> Result<Vec<String>, SinkError> {
        let mut con = self.con.clone();
        let pattern = format!("{}*", self.prefix);
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Delete every key under the prefix (retiring an old version).
    pub async fn delete_all(&self) -> Result<(), SinkError> {
        let mut con = self.con.clone();
        for chunk in self.keys().await?.chunks(1000) {
            let _: () = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut con)
                .await?;
        }
        Ok(())
    }

    /// Every document under the prefix (tests, the demo): key → document.
    pub async fn scan_all(&self) -> Result<HashMap<String, Document>, SinkError> {
        let ids: Vec<String> = self
            .keys()
            .await?
            .into_iter()
            .filter(|k| !k.ends_with(":rev"))
            .map(|k| k[self.prefix.len()..].to_owned())
            .collect();
        // In chunks: one MGET of every document would outlast the response timeout.
        let mut docs = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            docs.extend(self.load(chunk).await?);
        }
        Ok(docs)
    }
}

impl DocumentSink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn load(&self, keys: &[String]) -> Result<HashMap<String, Document>, SinkError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut con = self.con.clone();
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(&full).query_async(&mut con).await?;
        let mut out = HashMap::with_capacity(keys.len());
        for (k, v) in keys.iter().zip(values) {
            if let Some(json) = v {
                let doc = serde_json::from_str(&json).map_err(|e| SinkError::Corrupt {
                    key: self.key(k),
                    reason: e.to_string(),
                })?;
                out.insert(k.clone(), doc);
            }
        }
        Ok(out)
    }

    async fn store(&self, writes: &[Write]) -> Result<Vec<String>, SinkError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        // Loaded in the same pipeline: a restarted Redis has forgotten the script.
        pipe.load_script(&self.cas).ignore();
        for w in writes {
            let key = self.key(&w.key);
            let json = serde_json::to_string(&w.document).map_err(|e| SinkError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            pipe.invoke_script(
                self.cas
                    .key(&key)
                    .key(format!("{key}:rev"))
                    .arg(w.expected_rev)
                    .arg(w.document.rev)
                    .arg(json),
            );
        }
        let applied: Vec<i64> = pipe.query_async(&mut con).await?;
        Ok(writes
            .iter()
            .zip(applied)
            .filter(|(_, ok)| *ok == 0)
            .map(|(w, _)| w.key.clone())
            .collect())
    }
}
