//! The live source: a Kafka consumer group on the `events.*` topics, cut into windows, and
//! the decoding of each message into a validated event (or a poison record).

mod consumer;
pub mod decode;
pub mod group;
pub mod kafka;
mod pace;
pub mod sequence;
pub mod window;

pub use consumer::{
    SourceConsumer, SourceContext, commit_answered, create_consumer, is_fatal, member_id,
    unique_client_id,
};
