use thiserror::Error;

/// Why an event does not honour the contract. Each variant is one class of bad input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContractError {
    #[error("event is {size} bytes, over the {max}-byte limit")]
    Oversized { size: usize, max: usize },
    #[error("event is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("event is not valid JSON: {reason}")]
    InvalidJson { reason: String },
    #[error("event must be a JSON object, got {found}")]
    NotAnObject { found: &'static str },
    #[error("missing field `{field}`")]
    MissingField { field: &'static str },
    #[error("field `{field}` must be {expected}, got {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field `{field}` is not a valid UUID: {value:?}")]
    InvalidUuid { field: &'static str, value: String },
    #[error("field `{field}` is not an RFC 3339 timestamp: {value:?}")]
    InvalidTimestamp { field: &'static str, value: String },
    #[error("field `{field}` is invalid: {reason}")]
    InvalidValue { field: &'static str, reason: String },
    #[error("unknown aggregate type {0:?} (expected customer, order or support_ticket)")]
    UnknownAggregateType(String),
    #[error("event type {event_type} belongs to aggregate {expected}, not {found}")]
    AggregateMismatch {
        event_type: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("event_data of {event_type} does not parse: {reason}")]
    InvalidEventData { event_type: String, reason: String },
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    #[error("header `{header}` is not valid: {reason}")]
    InvalidHeader {
        header: &'static str,
        reason: String,
    },
    #[error("header `{header}` says {header_value:?} but the body says {body_value:?}")]
    HeaderMismatch {
        header: &'static str,
        header_value: String,
        body_value: String,
    },
    /// The decoder itself failed (a bug, not the message's fault, but the message still
    /// cannot be read): it is dead-lettered and its stream parked like any unreadable one,
    /// so it is never dropped and its offset never committed unaccounted for.
    #[error("the decoder panicked on this message: {reason}")]
    DecoderPanic { reason: String },
    /// Earlier events of the stream never arrived on the wire and the event store does not
    /// hold them either: the stream is held from `from` until they exist (unpark, replay).
    #[error("sequences {from}..{to} of stream {stream} are missing from the event store")]
    SequenceGap { stream: String, from: i64, to: i64 },
    /// As [`ContractError::SequenceGap`], but the event store refused to be read (not a
    /// passing outage, which is retried): the stream is held the same way.
    #[error(
        "sequences {from}..{to} of stream {stream} could not be read from the event store: {reason}"
    )]
    SequenceUnreadable {
        stream: String,
        from: i64,
        to: i64,
        reason: String,
    },
    /// A message arrived behind its stream with an event id the event store does not hold at
    /// that sequence: a foreign message, dead-lettered alone (the stream itself is intact).
    #[error("event {event_id} arrived as sequence {sequence} of stream {stream}, but {verdict}")]
    SequenceConflict {
        stream: String,
        sequence: i64,
        event_id: String,
        verdict: String,
    },
}

impl ContractError {
    /// A short stable label for metrics and dead-letter records.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::InvalidJson { .. } => "invalid_json",
            Self::NotAnObject { .. } => "not_an_object",
            Self::MissingField { .. } => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::InvalidUuid { .. } => "invalid_uuid",
            Self::InvalidTimestamp { .. } => "invalid_timestamp",
            Self::InvalidValue { .. } => "invalid_value",
            Self::UnknownAggregateType(_) => "unknown_aggregate_type",
            Self::AggregateMismatch { .. } => "aggregate_mismatch",
            Self::InvalidEventData { .. } => "invalid_event_data",
            Self::MissingHeader(_) => "missing_header",
            Self::InvalidHeader { .. } => "invalid_header",
            Self::HeaderMismatch { .. } => "header_mismatch",
            Self::DecoderPanic { .. } => "decoder_panic",
            Self::SequenceGap { .. } => "sequence_gap",
            Self::SequenceUnreadable { .. } => "sequence_unreadable",
            Self::SequenceConflict { .. } => "sequence_conflict",
        }
    }
}

/// The JSON type name of a value, for error messages.
pub(crate) fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
