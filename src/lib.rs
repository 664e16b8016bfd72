//! The projection engine: source → router → projectors → sinks, with checkpoints and
//! resilience beside them.
//!
//! - [`store`]: the PostgreSQL event store (source of truth, replay).
//! - [`kafka`]: topic admin and the publisher of the live feed.
//! - [`generator`]: a seeded, realistic event history for demos, tests and benchmarks.
//! - [`source`]: the Kafka consumer group and message decoding.
//! - [`router`]: each event to the projectors that handle its type.
//! - [`apply`]: projectors (pure, in `projectors/`) folded into documents, written by [`sinks`].
//! - [`resilience`]: backoff, circuit breaker, dead-letter topic.
//! - [`worker`]: the consumer-group loop tying them together.
//! - [`config`], [`telemetry`]: settings and logs.

pub mod apply;
pub mod config;
pub mod generator;
pub mod kafka;
pub mod observability;
pub mod queries;
pub mod rebuild;
pub mod resilience;
pub mod router;
pub mod sinks;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod versions;
pub mod worker;
