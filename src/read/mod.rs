//! The read side for agents and services: typed answers from the live read models, each
//! with its freshness, over HTTP (`projector serve`) and as MCP tools.

pub mod http;
mod lag;
pub mod mcp;
pub mod openapi;
pub mod service;
pub mod types;

pub use service::{Consistency, Range, ReadError, ReadService};

use chrono::{DateTime, SecondsFormat, Utc};

/// An instant as every answer writes it.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The text a view stores for an instant (what Mongo filters compare against).
pub(crate) fn time_db(t: DateTime<Utc>) -> String {
    projectors::time::text(&t)
}

pub(crate) fn now() -> String {
    time(Utc::now())
}
