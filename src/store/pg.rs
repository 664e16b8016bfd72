//! A PostgreSQL connection that survives the server: every call runs under a deadline, and a
//! connection that broke (restart, kill, network) is replaced by a new one on the next call.
//! The worker reads version pointers and records parked streams through it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{StoreError, connect_client};

pub struct Pg {
    url: String,
    timeout: Duration,
    connect_timeout: Duration,
    client: Mutex<Option<Arc<Client>>>,
}

impl Pg {
    /// No connection is made until the first call: a worker starts while PostgreSQL is down.
    pub fn new(url: &str, timeout: Duration, connect_timeout: Duration) -> Pg {
        Pg {
            url: url.to_owned(),
            timeout,
            connect_timeout,
            client: Mutex::new(None),
        }
    }

    pub fn from_config(cfg: &crate::config::PostgresConfig) -> Pg {
        Pg::new(
            &cfg.url,
            Duration::from_millis(cfg.timeout_ms),
            Duration::from_millis(cfg.connect_timeout_ms),
        )
    }

    /// The current connection, or a new one if there is none or it broke.
    pub async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let c = Arc::new(
            tokio::time::timeout(
                self.connect_timeout + Duration::from_millis(500),
                connect_client(&self.url, self.connect_timeout),
            )
            .await
            .map_err(|_| StoreError::Unavailable("connect timed out".into()))??,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Run `f` on the connection under the deadline. A timeout or a broken connection drops
    /// the connection, so the next call starts afresh.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, f(client.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_closed() || e.as_db_error().is_none() {
                    self.forget(&client).await;
                }
                Err(StoreError::Postgres(e))
            }
            Err(_) => {
                self.forget(&client).await;
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }

    async fn forget(&self, broken: &Arc<Client>) {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken)) {
            *slot = None;
        }
    }
}
