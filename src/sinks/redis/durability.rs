//! What an acknowledged write promises: found at start from the server's settings, and
//! checked after every batch where the server can confirm it (WAITAOF).

use redis::Value;

use super::errors::unexpected;
use super::{RedisCon, STORE, SinkError};

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
pub(super) fn durability_of(
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
pub(super) fn aof_confirmed(reply: &Value) -> Result<(), SinkError> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::RedisSink;
    use super::*;
    use crate::config::RedisConfig;

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
}
