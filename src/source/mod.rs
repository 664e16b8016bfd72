//! The live source: a Kafka consumer group on the `events.*` topics, and the decoding of
//! each message into a validated event (or a poison record for the dead-letter topic).

mod consumer;
mod decode;

pub use consumer::{WorkerConsumer, create_consumer};
pub use decode::{Incoming, Origin, Poison, decode_message};
