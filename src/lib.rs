//! The projection engine: source → router → projectors → sinks, with checkpoints and
//! resilience beside them.
//!
//! - [`store`]: the PostgreSQL event store (source of truth, replay).
//! - [`kafka`]: topic admin and the publisher of the live feed.
//! - [`generator`]: a seeded, realistic event history for demos, tests and benchmarks.
//! - [`config`], [`telemetry`]: settings and logs.

pub mod config;
pub mod generator;
pub mod kafka;
pub mod store;
pub mod telemetry;
