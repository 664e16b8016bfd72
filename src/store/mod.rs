//! The PostgreSQL event store: schema migrations, appends with optimistic concurrency, reads.

mod append;
mod migrations;
mod read;
mod replay;

pub use append::AppendOutcome;
pub use migrations::MIGRATIONS;
pub use replay::ReplayPosition;

use thiserror::Error;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("event store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
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

impl EventStore {
    pub async fn connect(url: &str) -> Result<EventStore, StoreError> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "event store connection closed");
            }
        });
        Ok(EventStore { client })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
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
