//! A connection to one Redis server or to a cluster, reconnecting by itself, every request
//! under a deadline.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Client, Cmd, Pipeline, RedisFuture, Value};

use super::cluster::Supervised;
use super::errors::{classify, unexpected};
use super::{CLUSTER_IN_FLIGHT, STORE, SinkError, with_timeout};
use crate::config::RedisConfig;

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
    pub(super) async fn on_one_node(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
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
pub(super) async fn routed(
    s: &Arc<Supervised>,
    cmd: Cmd,
    to: RoutingInfo,
) -> redis::RedisResult<Value> {
    let watch = s.watch();
    let r = s.current().route_command(cmd, to).await;
    watch.outcome(&r);
    r
}

/// The primaries in a `CLUSTER NODES` answer (`<id> <ip:port@bus> <flags> ...` per line).
pub(super) fn primaries(nodes: &str) -> Result<Vec<(String, u16)>, SinkError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
