//! Waiting out a failing store: exponential backoff with jitter, a circuit breaker per store,
//! and the "waiting" mark that makes the source pause its partitions at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::{Shared, WaitGuard};
use crate::resilience::backoff::Backoff;

/// Failures in a row after which a store's circuit opens (readiness goes false, the
/// metric says so); it closes at the first success.
pub const BREAKER_THRESHOLD: u32 = 3;

fn circuits() -> &'static Mutex<HashMap<&'static str, usize>> {
    static C: OnceLock<Mutex<HashMap<&'static str, usize>>> = OnceLock::new();
    C.get_or_init(Default::default)
}

fn circuit(shared: &Shared, store: &'static str, open: bool) {
    let mut c = circuits().lock().unwrap_or_else(|e| e.into_inner());
    let n = c.entry(store).or_default();
    if open {
        *n += 1;
        shared
            .open_circuits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    } else {
        *n = n.saturating_sub(1);
        shared
            .open_circuits
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    metrics::gauge!("projector_circuit_open", "store" => store).set(if *n > 0 { 1.0 } else { 0.0 });
}

/// One retry loop's state. Dropping it (after success) clears its marks.
pub struct Retry {
    shared: Arc<Shared>,
    store: &'static str,
    what: &'static str,
    backoff: Backoff,
    failures: u32,
    open: bool,
    _waiting: Option<WaitGuard>,
}

impl Retry {
    pub fn new(shared: &Arc<Shared>, store: &'static str, what: &'static str) -> Retry {
        Retry {
            shared: shared.clone(),
            store,
            what,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            failures: 0,
            open: false,
            _waiting: None,
        }
    }

    /// Record a failure and sleep out the backoff.
    pub async fn failed(&mut self, error: &(dyn std::fmt::Display + Sync)) {
        self.failures += 1;
        if self._waiting.is_none() {
            self._waiting = Some(self.shared.waiting());
        }
        metrics::counter!("projector_store_errors_total", "store" => self.store).increment(1);
        if self.failures >= BREAKER_THRESHOLD && !self.open {
            self.open = true;
            circuit(&self.shared, self.store, true);
            tracing::error!(store = self.store, what = self.what, %error, failures = self.failures,
                "circuit open: partitions paused, retrying with backoff");
        } else {
            tracing::warn!(store = self.store, what = self.what, %error, attempt = self.failures,
                "store call failed; retrying");
        }
        tokio::time::sleep(self.backoff.next_delay()).await;
    }

    /// Call `f` until it succeeds, sleeping out each failure as [`Retry::failed`] does.
    pub async fn until_ok<T, E, Fut>(mut self, mut f: impl FnMut() -> Fut) -> T
    where
        E: std::fmt::Display + Sync,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) => self.failed(&e).await,
            }
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

impl Drop for Retry {
    fn drop(&mut self) {
        if self.open {
            circuit(&self.shared, self.store, false);
            tracing::info!(
                store = self.store,
                what = self.what,
                "store answers again: circuit closed"
            );
        }
    }
}
