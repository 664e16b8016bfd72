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
//! stale (see `redis_cluster`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::try_join_all;
use projectors::Doc;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Client, Cmd, Pipeline, RedisFuture, Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::redis_cluster::Supervised;
use super::{DocStore, DocWrite, Loaded, SinkError, WriteOutcome, with_timeout};
use crate::config::RedisConfig;

const STORE: &str = "redis";

/// The compare-and-set of many documents in one command (on a cluster, of one document: a
/// command may not cross slots). The stored token sits at the very end of a document
/// (`..."_rev":123}`), so the script reads it from the last bytes without parsing the JSON;
/// "0" stands for an absent key. A document's finished streams join the set of them in the
/// same script (atomic with the document). With `appendfsync always`, Redis syncs its log once per event-loop turn that executed a
/// write, and a turn reads 16 KB of a client's pipeline: a chunk sent as one script per
/// document was synced a dozen times or more, each sync 13 ms at the median and up to 145 ms
/// while the other servers wrote (`LATENCY HISTORY aof-fsync-always`). As one command it
/// runs, and is synced, once.
///
/// Per document, in order: KEYS its key, then its finished set if it has finished streams;
/// ARGV the expected token, the body, the number n of finished streams, then those n. The
/// reply has one element per document: 1 written, 0 the token moved on, or the error that
/// document alone met (`pcall`: the others are still written).
const CAS_MANY: &str = r#"
local out = {}
local k, a = 1, 1
local function failed(r) return type(r) == 'table' and r.err end
while a <= #ARGV do
  local key, expected, body, n = KEYS[k], ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  k = k + 1
  a = a + 3
  local side = nil
  if n > 0 then
    side = KEYS[k]
    k = k + 1
  end
  local cur = redis.pcall('GET', key)
  local verdict = 1
  if failed(cur) then
    verdict = cur
  else
    local rev = '0'
    if cur then
      rev = string.match(string.sub(cur, -40), '"_rev":(%d+)}$') or '?'
    end
    if rev ~= expected then
      verdict = 0
    else
      local r = redis.pcall('SET', key, body)
      if failed(r) then
        verdict = r
      elseif side then
        for i = a, a + n - 1, 500 do
          r = redis.pcall('SADD', side, unpack(ARGV, i, math.min(i + 499, a + n - 1)))
          if failed(r) then
            verdict = r
            break
          end
        end
      end
    end
  end
  out[#out + 1] = verdict
  a = a + n
end
return out"#;

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

/// A connection to one server or to a cluster. Commands with keys route by slot on a
/// cluster, so most callers need not know which it is.
#[derive(Clone)]
pub enum RedisCon {
    Single(ConnectionManager),
    Cluster(Arc<Supervised>),
}

impl ConnectionLike for RedisCon {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisCon::Single(c) => c.req_packed_command(cmd),
            RedisCon::Cluster(s) => {
                let (mut c, watch) = (s.current(), s.watch());
                Box::pin(async move {
                    let r = c.req_packed_command(cmd).await;
                    watch.outcome(&r);
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisCon::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisCon::Cluster(s) => {
                let (mut c, watch) = (s.current(), s.watch());
                Box::pin(async move {
                    let r = c.req_packed_commands(pipeline, offset, count).await;
                    watch.outcome(&r);
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisCon::Single(c) => c.get_db(),
            RedisCon::Cluster(s) => s.current().get_db(),
        }
    }
}

impl RedisCon {
    /// Open a connection that reconnects by itself; every request has `cfg.timeout_ms`.
    pub async fn open(cfg: &RedisConfig, retries: usize) -> Result<RedisCon, SinkError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let connect = Duration::from_millis(cfg.connect_timeout_ms);
        // The deadline covers a server that accepts the connection and then hangs.
        with_timeout(STORE, connect + timeout, async {
            if cfg.cluster {
                let con = Supervised::connect(cfg, retries as u32)
                    .await
                    .map_err(classify)?;
                Ok(RedisCon::Cluster(con))
            } else {
                let client =
                    Client::open(cfg.url.as_str()).map_err(|e| SinkError::permanent(STORE, e))?;
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(connect))
                    // Reconnect attempts per failure; each later request triggers new attempts.
                    .set_number_of_retries(retries)
                    .set_max_delay(Duration::from_secs(2));
                let con = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(classify)?;
                Ok(RedisCon::Single(con))
            }
        })
        .await
    }

    /// A command without keys, answered by one server (on a cluster: any primary).
    async fn on_one_node(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        match self {
            RedisCon::Single(c) => cmd.query_async(c).await,
            RedisCon::Cluster(s) => routed(s, cmd.clone(), any).await,
        }
    }

    /// `cmd <key>` once per key, many in flight, answers in the order of `keys`. On a cluster
    /// this replaces multi-key commands: the client's own split of `MGET` across slots was
    /// seen answering "Mismatch in the number of multi-slot results" after a primary
    /// restarted, on every retry; a single-key command routes by its slot alone.
    pub async fn each_key<T: redis::FromRedisValue>(
        &self,
        cmd: &str,
        keys: &[String],
    ) -> Result<Vec<T>, SinkError> {
        let cmds = keys.iter().map(|k| {
            let mut c = redis::cmd(cmd);
            c.arg(k);
            c
        });
        self.each(cmds).await
    }

    /// Single-key commands, many in flight, answers in their order (see [`Self::each_key`]).
    pub async fn each<T: redis::FromRedisValue>(
        &self,
        cmds: impl IntoIterator<Item = Cmd>,
    ) -> Result<Vec<T>, SinkError> {
        let calls: Vec<_> = cmds
            .into_iter()
            .map(|c| {
                let mut con = self.clone();
                async move { c.query_async::<T>(&mut con).await.map_err(classify) }
            })
            .collect();
        futures::stream::iter(calls)
            .buffered(CLUSTER_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// `SCAN` `pattern` on every primary: every key that matches.
    pub async fn scan(&mut self, pattern: &str) -> Result<Vec<String>, SinkError> {
        let nodes = match self {
            RedisCon::Single(_) => vec![None],
            RedisCon::Cluster(_) => {
                let v = self
                    .on_one_node(redis::cmd("CLUSTER").arg("NODES"))
                    .await
                    .map_err(classify)?;
                let text: String = redis::from_redis_value(v).map_err(unexpected)?;
                primaries(&text)?.into_iter().map(Some).collect()
            }
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let reply = match (&mut *self, &node) {
                    (RedisCon::Cluster(s), Some((host, port))) => {
                        let at = SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        };
                        routed(s, cmd, RoutingInfo::SingleNode(at)).await
                    }
                    (con, _) => cmd.query_async(con).await,
                };
                let (next, batch): (u64, Vec<String>) =
                    redis::from_redis_value(reply.map_err(classify)?).map_err(unexpected)?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }
}

/// A command sent to the node(s) `to` of a cluster, watched like every other request.
async fn routed(s: &Arc<Supervised>, cmd: Cmd, to: RoutingInfo) -> redis::RedisResult<Value> {
    let watch = s.watch();
    let r = s.current().route_command(cmd, to).await;
    watch.outcome(&r);
    r
}

/// The primaries in a `CLUSTER NODES` answer (`<id> <ip:port@bus> <flags> ...` per line).
fn primaries(nodes: &str) -> Result<Vec<(String, u16)>, SinkError> {
    let mut out = Vec::new();
    for line in nodes.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let (addr, flags) = (f.nth(1), f.next());
        let (Some(addr), Some(flags)) = (addr, flags) else {
            return Err(SinkError::transient(
                STORE,
                format!("CLUSTER NODES line {line:?}"),
            ));
        };
        if !flags.split(',').any(|x| x == "master") {
            continue;
        }
        let hostport = addr.split(['@', ',']).next().unwrap_or(addr);
        let parsed = hostport
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)));
        match parsed {
            Some(hp) => out.push(hp),
            None => {
                return Err(SinkError::transient(
                    STORE,
                    format!("CLUSTER NODES address {addr:?}"),
                ));
            }
        }
    }
    Ok(out)
}

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

/// What the server promises about an acknowledged write, found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Redis 7.2+ with the AOF on: every connection that wrote waits (WAITAOF, numlocal 1)
    /// until its writes are fsynced before the batch counts as written.
    WaitAof,
    /// No WAITAOF, but the AOF is fsynced before each reply (`appendfsync always`).
    FsyncAlways,
    /// A Redis crash can lose acknowledged writes; why.
    Lossy(String),
}

/// The verdict from `INFO server`'s version and `CONFIG GET appendonly`/`appendfsync`
/// (`None`: the server would not say, e.g. CONFIG renamed away).
fn durability_of(
    version: Option<&str>,
    appendonly: Option<&str>,
    appendfsync: Option<&str>,
) -> Durability {
    let parts: Vec<u32> = version
        .unwrap_or("0")
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect();
    let has_waitaof = parts.as_slice() >= [7, 2].as_slice();
    match appendonly {
        // Without the AOF nothing is fsynced per write (and WAITAOF numlocal 1 is refused).
        Some(a) if a != "yes" => {
            return Durability::Lossy(format!("appendonly is {a:?}: writes are not logged"));
        }
        // Unknown: WAITAOF itself fails (and the batch is retried) if the AOF is off.
        None if !has_waitaof => {
            return Durability::Lossy("appendonly is unknown (CONFIG GET refused)".into());
        }
        _ => {}
    }
    if has_waitaof {
        return Durability::WaitAof;
    }
    match appendfsync {
        Some("always") => Durability::FsyncAlways,
        other => Durability::Lossy(format!(
            "appendfsync is {:?} and Redis {} has no WAITAOF",
            other.unwrap_or("unknown"),
            version.unwrap_or("?")
        )),
    }
}

/// Ask the server what an acknowledged write promises (on a cluster, one primary speaks for
/// all: they are deployed alike).
pub async fn probe_durability(con: &mut RedisCon) -> Durability {
    probe_server(con).await.durability
}

/// What the server said about itself and the verdict drawn from it (`projector doctor`
/// shows both). `None`: the server would not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDurability {
    pub version: Option<String>,
    pub appendonly: Option<String>,
    pub appendfsync: Option<String>,
    pub durability: Durability,
}

/// `INFO server`'s version and `CONFIG GET appendonly`/`appendfsync`, with their verdict.
pub async fn probe_server(con: &mut RedisCon) -> ServerDurability {
    let info = con.on_one_node(redis::cmd("INFO").arg("server")).await;
    let info: Option<String> = info.ok().and_then(|v| redis::from_redis_value(v).ok());
    let version = info.and_then(|i| {
        i.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_owned())
    });
    let appendonly = config_get(con, "appendonly").await;
    let appendfsync = config_get(con, "appendfsync").await;
    let durability = durability_of(
        version.as_deref(),
        appendonly.as_deref(),
        appendfsync.as_deref(),
    );
    ServerDurability {
        version,
        appendonly,
        appendfsync,
        durability,
    }
}

/// `CONFIG GET name`, if the server answers it.
async fn config_get(con: &mut RedisCon, name: &str) -> Option<String> {
    let reply = con
        .on_one_node(redis::cmd("CONFIG").arg("GET").arg(name))
        .await
        .ok()?;
    // A map in RESP3, `[name, value]` in RESP2: both read as a map.
    let mut pairs: std::collections::HashMap<String, String> =
        redis::from_redis_value(reply).ok()?;
    pairs.remove(name)
}

/// A WAITAOF reply (`[numlocal, numreplicas]`; on a cluster, one per primary): the writes of
/// the connection are on disk only when numlocal is at least 1. Anything else fails the
/// write, transiently: the batch is retried and the guards absorb what already landed.
fn aof_confirmed(reply: &Value) -> Result<(), SinkError> {
    match reply {
        Value::Array(v) => match v.first() {
            Some(Value::Int(n)) if *n >= 1 => Ok(()),
            Some(Value::Int(n)) => Err(SinkError::transient(
                STORE,
                format!("WAITAOF: the writes were not fsynced in time (numlocal {n})"),
            )),
            _ => Err(unexpected(format!("WAITAOF answered {reply:?}"))),
        },
        Value::Map(per_node) if !per_node.is_empty() => {
            per_node.iter().try_for_each(|(_, r)| aof_confirmed(r))
        }
        Value::ServerError(e) => Err(SinkError::transient(STORE, format!("WAITAOF: {e}"))),
        other => Err(unexpected(format!("WAITAOF answered {other:?}"))),
    }
}

/// One reply per document from the reply of a [`CAS_MANY`] chunk of `n`. An error for the
/// whole command (out of memory, say) is every document's.
fn per_document(reply: Value, n: usize) -> Result<Vec<Value>, SinkError> {
    match reply {
        Value::Array(v) if v.len() == n => Ok(v),
        Value::ServerError(e) => Ok(vec![Value::ServerError(e); n]),
        other => Err(unexpected(format!(
            "{n} documents written, the script answered {other:?}"
        ))),
    }
}

/// A reply of another shape than the command's (a server of another version, say).
fn unexpected(e: impl std::fmt::Display) -> SinkError {
    SinkError::transient(STORE, format!("unexpected reply: {e}"))
}

fn classify(e: redis::RedisError) -> SinkError {
    // Credentials or permissions fail every write alike: the deployment's problem, not the
    // documents'. Wait (the circuit opens, the alert fires) rather than dead-letter them all.
    let deployment = matches!(
        e.kind(),
        redis::ErrorKind::AuthenticationFailed
            | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
    ) || e.code().is_some_and(transient_code);
    if deployment {
        return SinkError::transient(STORE, e);
    }
    match e.retry_method() {
        redis::RetryMethod::NoRetry if !e.is_timeout() && !e.is_io_error() => {
            SinkError::permanent(STORE, e)
        }
        _ => SinkError::transient(STORE, e),
    }
}

/// Server errors a later retry can get past (loading, busy script, out of memory for now).
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "BUSY"
            | "TRYAGAIN"
            | "MASTERDOWN"
            | "CLUSTERDOWN"
            | "OOM"
            | "READONLY"
            | "NOSCRIPT"
            | "MOVED"
            | "ASK"
            // The deployment's problems, not the document's: persistence failing (MISCONF),
            // credentials or permissions. Every write would fail alike; wait for them.
            | "MISCONF"
            | "NOAUTH"
            | "WRONGPASS"
            | "NOPERM"
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_permissions_wait_rather_than_refuse() {
        let auth =
            redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "bad password"));
        assert!(classify(auth).is_transient());
        let noperm = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "no permissions to run 'evalsha'",
        ));
        assert!(classify(noperm).is_transient());
        let refused = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "string exceeds maximum allowed size",
        ));
        assert!(!classify(refused).is_transient());
    }

    fn pair(local: i64, replicas: i64) -> Value {
        Value::Array(vec![Value::Int(local), Value::Int(replicas)])
    }

    #[test]
    fn waitaof_confirms_only_a_local_fsync() {
        assert!(aof_confirmed(&pair(1, 0)).is_ok());
        assert!(aof_confirmed(&pair(1, 2)).is_ok());
        // Timed out before the fsync: not written, and worth retrying.
        let e = aof_confirmed(&pair(0, 0)).unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("numlocal 0"), "{e}");
        assert!(aof_confirmed(&pair(0, 1)).unwrap_err().is_transient());
        // Of another shape (a server of another version, say).
        assert!(aof_confirmed(&Value::Nil).unwrap_err().is_transient());
        assert!(
            aof_confirmed(&Value::Array(vec![]))
                .unwrap_err()
                .is_transient()
        );
        assert!(aof_confirmed(&Value::Int(1)).unwrap_err().is_transient());
        // A cluster answers per primary: every one must confirm.
        let node = |a: &str| Value::SimpleString(a.into());
        let all = Value::Map(vec![(node("a:1"), pair(1, 0)), (node("b:2"), pair(1, 0))]);
        assert!(aof_confirmed(&all).is_ok());
        let one_late = Value::Map(vec![(node("a:1"), pair(1, 0)), (node("b:2"), pair(0, 0))]);
        assert!(aof_confirmed(&one_late).unwrap_err().is_transient());
        assert!(
            aof_confirmed(&Value::Map(vec![]))
                .unwrap_err()
                .is_transient()
        );
    }

    #[test]
    fn durability_needs_the_aof_and_a_sync_per_write() {
        let d = |v, a, f| durability_of(v, a, f);
        assert_eq!(
            d(Some("7.2.4"), Some("yes"), Some("everysec")),
            Durability::WaitAof
        );
        assert_eq!(d(Some("8.0.0"), None, None), Durability::WaitAof);
        assert_eq!(
            d(Some("7.0.15"), Some("yes"), Some("always")),
            Durability::FsyncAlways
        );
        for (v, a, f) in [
            // The old check looked at appendfsync alone: `always` without the AOF loses all.
            (Some("7.0.15"), Some("no"), Some("always")),
            (Some("7.4.0"), Some("no"), Some("always")),
            (Some("7.0.15"), Some("yes"), Some("everysec")),
            (Some("7.0.15"), Some("yes"), None),
            (Some("7.0.15"), None, Some("always")),
            (None, None, None),
        ] {
            assert!(
                matches!(d(v, a, f), Durability::Lossy(_)),
                "{v:?} {a:?} {f:?}"
            );
        }
    }

    /// A free port on 127.0.0.1.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// The start-up check against a real server without the AOF (a private one: the shared
    /// server must keep its settings) says acknowledged writes can be lost.
    #[tokio::test]
    async fn a_server_without_the_aof_is_reported_lossy() {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("projector-redis-noaof-{port}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "no",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let cfg = RedisConfig {
            url: format!("redis://127.0.0.1:{port}"),
            cluster: false,
            timeout_ms: 2_000,
            connect_timeout_ms: 500,
        };
        let mut sink = None;
        for _ in 0..50 {
            if let Ok(s) = RedisSink::connect(&cfg, "t:").await {
                sink = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let verdict = sink.map(|s| s.durability().clone());
        let _ = server.kill();
        let _ = server.wait();
        let _ = std::fs::remove_dir_all(&dir);
        match verdict {
            Some(Durability::Lossy(why)) => assert!(why.contains("appendonly"), "{why}"),
            other => panic!("appendonly no must be reported lossy, got {other:?}"),
        }
    }

    #[test]
    fn a_chunk_reply_is_one_verdict_per_document() {
        let v = per_document(Value::Array(vec![Value::Int(1), Value::Int(0)]), 2).unwrap();
        assert_eq!(v, vec![Value::Int(1), Value::Int(0)]);
        // Refused as a whole (out of memory, say): every document's error.
        let err = redis::parse_redis_value(b"-OOM command not allowed\r\n").unwrap();
        assert!(matches!(err, Value::ServerError(_)), "{err:?}");
        let v = per_document(err.clone(), 3).unwrap();
        assert_eq!(v, vec![err.clone(), err.clone(), err]);
        // Any other shape, or a count that does not match, is not guessed at.
        assert!(per_document(Value::Array(vec![Value::Int(1)]), 2).is_err());
        assert!(per_document(Value::Nil, 1).is_err());
    }

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
fb62 127.0.0.1:17102@27102 master - 0 1795457413358 2 connected 5461-10922
7939 127.0.0.1:17103@27103,host-c master - 0 1795457412355 3 connected 10923-16383
2ec0 127.0.0.1:17101@27101 myself,master - 0 1795457410000 1 connected 0-5460
9a9a 127.0.0.1:17104@27104 slave 2ec0 0 1795457410000 1 connected
";
        let got = primaries(nodes).unwrap();
        assert_eq!(
            got,
            [17102, 17103, 17101].map(|p| ("127.0.0.1".to_owned(), p))
        );
        assert!(primaries("garbage").is_err());
    }
}
