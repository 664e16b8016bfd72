//! The PostgreSQL event store: schema migrations, appends with optimistic concurrency, reads.

mod append;
mod migrations;
mod pg;
mod read;
mod replay;
pub mod streams;

pub use append::AppendOutcome;
pub use migrations::MIGRATIONS;
pub use pg::Pg;
pub use read::{SELECT_EVENT, envelope_of, like_prefix};
pub use replay::{ReplayPosition, Replayed, Typed};

use thiserror::Error;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("event store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Not answering (down, restarting, hung): retry later.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    #[error(
        "concurrency conflict on {aggregate_type}/{aggregate_id}: next sequence is {expected}, got {got}"
    )]
    Conflict {
        aggregate_type: String,
        aggregate_id: String,
        expected: i64,
        got: i64,
    },
    #[error("concurrency conflict: another writer appended first ({0})")]
    ConcurrentAppend(String),
    #[error("event already in the store ({0})")]
    DuplicateEvent(String),
    #[error("stored event at position {position} breaks the contract: {source}")]
    Corrupt {
        position: i64,
        source: contract::ContractError,
    },
}

/// A connection to the event store.
pub struct EventStore {
    client: Client,
}

impl StoreError {
    /// Whether retrying later can succeed (the server was unreachable or went away), as
    /// opposed to a refusal (a conflict, a constraint, bad SQL).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.as_db_error().is_none_or(|db| {
                        // Shutdown, crash recovery, too many connections, serialization failures.
                        let c = db.code().code();
                        c.starts_with("57P")
                            || c.starts_with("08")
                            || c == "53300"
                            || c == "40001"
                            || c == "40P01"
                    })
            }
            _ => false,
        }
    }
}

/// Connect one client (the URL's password never appears in an error).
pub(crate) async fn connect_client(
    url: &str,
    connect_timeout: std::time::Duration,
) -> Result<Client, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Unavailable(crate::redact::error(&e, url)))?;
    config.connect_timeout(connect_timeout);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| StoreError::Unavailable(crate::redact::error(&e, url)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "event store connection closed");
        }
    });
    Ok(client)
}

impl EventStore {
    pub async fn connect(url: &str) -> Result<EventStore, StoreError> {
        let client = connect_client(url, std::time::Duration::from_secs(5)).await?;
        Ok(EventStore { client })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// How many events the store holds (a rebuild's progress total).
    pub async fn count_committed(&self) -> Result<i64, StoreError> {
        let row = self
            .client
            .query_one("SELECT count(*) FROM events", &[])
            .await?;
        Ok(row.get(0))
    }

    /// The highest position ever handed out (committed or not), 0 for an empty store.
    pub async fn head_position(&self) -> Result<i64, StoreError> {
        let row = self
            .client
            .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])
            .await?;
        Ok(row.get(0))
    }
}
