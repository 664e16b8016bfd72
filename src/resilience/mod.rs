//! What keeps the worker going when parts fail: retries with backoff and jitter, a circuit
//! breaker per batch loop, and the dead-letter topic for events that can never be applied.

pub mod backoff;
pub mod dead_letter;
pub mod dlq_tools;
