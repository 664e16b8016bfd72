//! The projection engine: source → decode → stages (projectors, typed) → store writers →
//! commit tracker, with resilience, rebuild and the read side beside them.
//!
//! - [`store`]: the PostgreSQL event store (source of truth, replay).
//! - [`kafka`]: topic admin and the publisher of the live feed.
//! - [`generator`]: a seeded, realistic event history for demos, tests and benchmarks.
//! - [`source`]: the Kafka consumer group, windows, and message decoding.
//! - [`runtime`]: the pipelined stages (projectors from `projectors/` folded into typed views),
//!   the commit tracker, parking and the version pointers.
//! - [`sinks`]: one module per store: write shape, timeouts, error classification.
//! - [`resilience`]: backoff and the dead-letter topic.
//! - [`rebuild`]: replay of the event store into a new version, checkpoints, handover.
//! - [`versions`], [`config`], [`observability`], [`telemetry`], [`redact`].
//! - [`doctor`]: `projector doctor`, the deployment checked end to end.

pub mod config;
pub mod doctor;
pub mod generator;
pub mod kafka;
pub mod observability;
pub mod read;
pub mod rebuild;
pub mod redact;
pub mod resilience;
pub mod runtime;
pub mod sinks;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod versions;
