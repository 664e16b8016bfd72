//! The Kafka headers of DESIGN §1 and their check against the body.

use crate::{AggregateType, ContractError, EventEnvelope, EventHeader};

/// What the headers describe: implemented by both event shapes.
pub trait HeaderFields {
    fn event_type(&self) -> &str;
    fn aggregate_type(&self) -> AggregateType;
    fn sequence(&self) -> i64;
}

impl HeaderFields for EventEnvelope {
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn aggregate_type(&self) -> AggregateType {
        self.aggregate_type
    }
    fn sequence(&self) -> i64 {
        self.sequence_number
    }
}

impl HeaderFields for EventHeader {
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn aggregate_type(&self) -> AggregateType {
        self.aggregate_type
    }
    fn sequence(&self) -> i64 {
        self.sequence_number
    }
}

pub const HEADER_EVENT_TYPE: &str = "event_type";
pub const HEADER_AGGREGATE_TYPE: &str = "aggregate_type";
pub const HEADER_SEQUENCE: &str = "sequence";

/// The headers every event message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredHeaders {
    pub event_type: String,
    pub aggregate_type: AggregateType,
    pub sequence: i64,
}

impl RequiredHeaders {
    /// The headers to publish with an event.
    pub fn for_event(env: &impl HeaderFields) -> RequiredHeaders {
        RequiredHeaders {
            event_type: env.event_type().to_owned(),
            aggregate_type: env.aggregate_type(),
            sequence: env.sequence(),
        }
    }

    /// `(name, value)` pairs, ready for a producer.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_EVENT_TYPE, self.event_type.clone()),
            (
                HEADER_AGGREGATE_TYPE,
                self.aggregate_type.as_str().to_owned(),
            ),
            (HEADER_SEQUENCE, self.sequence.to_string()),
        ]
    }

    /// Read the required headers from `(name, value)` pairs; a value of `None` is a null header.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<RequiredHeaders, ContractError> {
        let (mut event_type, mut aggregate_type, mut sequence) = (None, None, None);
        for (name, value) in pairs {
            let slot = match name {
                HEADER_EVENT_TYPE => &mut event_type,
                HEADER_AGGREGATE_TYPE => &mut aggregate_type,
                HEADER_SEQUENCE => &mut sequence,
                _ => continue,
            };
            *slot = value;
        }
        let text = |header: &'static str, v: Option<&'a [u8]>| -> Result<&'a str, ContractError> {
            let bytes = v.ok_or(ContractError::MissingHeader(header))?;
            std::str::from_utf8(bytes).map_err(|_| ContractError::InvalidHeader {
                header,
                reason: "not valid UTF-8".into(),
            })
        };
        let event_type = text(HEADER_EVENT_TYPE, event_type)?.to_owned();
        let aggregate_type = text(HEADER_AGGREGATE_TYPE, aggregate_type)?
            .parse()
            .map_err(|e: ContractError| ContractError::InvalidHeader {
                header: HEADER_AGGREGATE_TYPE,
                reason: e.to_string(),
            })?;
        let seq_text = text(HEADER_SEQUENCE, sequence)?;
        let sequence = seq_text
            .parse::<i64>()
            .map_err(|_| ContractError::InvalidHeader {
                header: HEADER_SEQUENCE,
                reason: format!("{seq_text:?} is not an integer"),
            })?;
        Ok(RequiredHeaders {
            event_type,
            aggregate_type,
            sequence,
        })
    }

    /// The headers must say what the body says; a disagreement means a broken producer.
    pub fn check_against(&self, env: &impl HeaderFields) -> Result<(), ContractError> {
        let mismatch = |header, h: String, b: String| ContractError::HeaderMismatch {
            header,
            header_value: h,
            body_value: b,
        };
        if self.event_type != env.event_type() {
            return Err(mismatch(
                HEADER_EVENT_TYPE,
                self.event_type.clone(),
                env.event_type().to_owned(),
            ));
        }
        if self.aggregate_type != env.aggregate_type() {
            return Err(mismatch(
                HEADER_AGGREGATE_TYPE,
                self.aggregate_type.to_string(),
                env.aggregate_type().to_string(),
            ));
        }
        if self.sequence != env.sequence() {
            return Err(mismatch(
                HEADER_SEQUENCE,
                self.sequence.to_string(),
                env.sequence().to_string(),
            ));
        }
        Ok(())
    }
}
