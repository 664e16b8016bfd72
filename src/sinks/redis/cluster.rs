//! A Redis Cluster connection that is replaced when it stops answering.
//!
//! The cluster client reconnects to nodes by itself, yet after one primary was hung and
//! another killed and restarted, it was seen timing out on every request for minutes
//! while all three primaries answered (stale node connections; redis-rs #2277 is of that
//! family). So after [`STALE_AFTER`] consecutive timeouts or connection errors, a new client
//! connects from the seed nodes in the background, at most once per [`REBUILD_EVERY`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, RedisResult};

use crate::config::RedisConfig;

/// Consecutive failed requests after which the connection is presumed stale.
const STALE_AFTER: u32 = 3;
/// The least time between two replacements.
const REBUILD_EVERY: Duration = Duration::from_secs(10);

pub struct Supervised {
    cfg: RedisConfig,
    retries: u32,
    current: RwLock<ClusterConnection>,
    failures: AtomicU32,
    rebuilding: AtomicBool,
    last_rebuild: Mutex<Option<Instant>>,
}

impl Supervised {
    pub async fn connect(cfg: &RedisConfig, retries: u32) -> RedisResult<Arc<Supervised>> {
        let con = new_connection(cfg, retries).await?;
        Ok(Arc::new(Supervised {
            cfg: cfg.clone(),
            retries,
            current: RwLock::new(con),
            failures: AtomicU32::new(0),
            rebuilding: AtomicBool::new(false),
            last_rebuild: Mutex::new(None),
        }))
    }

    /// The connection to send the next request on (a cheap handle).
    pub fn current(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Watch one request: its outcome is recorded when it completes, and a request dropped
    /// before completing (an outer deadline passed) counts as a timeout.
    pub fn watch(self: &Arc<Self>) -> Watch {
        Watch {
            on: self.clone(),
            done: false,
        }
    }

    fn failed(self: &Arc<Self>) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < STALE_AFTER || self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let recent = self
            .last_rebuild
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < REBUILD_EVERY);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.rebuilding.store(false, Ordering::Release);
            return;
        };
        if recent {
            self.rebuilding.store(false, Ordering::Release);
            return;
        }
        let me = self.clone();
        runtime.spawn(async move {
            let limit = Duration::from_millis(me.cfg.connect_timeout_ms + me.cfg.timeout_ms);
            match tokio::time::timeout(limit, new_connection(&me.cfg, me.retries)).await {
                Ok(Ok(con)) => {
                    *me.current.write().unwrap_or_else(|e| e.into_inner()) = con;
                    me.failures.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        failures = n,
                        "replaced the Redis Cluster connection after consecutive failures"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reconnecting to the Redis Cluster failed")
                }
                Err(_) => tracing::warn!("reconnecting to the Redis Cluster timed out"),
            }
            *me.last_rebuild.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            me.rebuilding.store(false, Ordering::Release);
        });
    }
}

/// One request in flight (see [`Supervised::watch`]).
pub struct Watch {
    on: Arc<Supervised>,
    done: bool,
}

impl Watch {
    pub fn outcome<T>(mut self, r: &RedisResult<T>) {
        self.done = true;
        match r {
            Ok(_) => self.on.failures.store(0, Ordering::Relaxed),
            Err(e) if stale(e) => self.on.failed(),
            // The server answered (with an error): the connection works.
            Err(_) => self.on.failures.store(0, Ordering::Relaxed),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.on.failed();
        }
    }
}

fn stale(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

async fn new_connection(cfg: &RedisConfig, retries: u32) -> RedisResult<ClusterConnection> {
    let seeds: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
    ClusterClientBuilder::new(seeds)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .response_timeout(Duration::from_millis(cfg.timeout_ms))
        .retries(retries)
        .build()?
        .get_async_connection()
        .await
}
