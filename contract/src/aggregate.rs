use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ContractError;

/// The aggregate types of the event store; each has its own Kafka topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateType {
    Customer,
    Order,
    SupportTicket,
}

impl AggregateType {
    pub const ALL: [AggregateType; 3] = [Self::Customer, Self::Order, Self::SupportTicket];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Order => "order",
            Self::SupportTicket => "support_ticket",
        }
    }

    /// The Kafka topic of this aggregate type, e.g. `events.order`.
    pub fn topic(self, prefix: &str) -> String {
        format!("{prefix}{}", self.as_str())
    }
}

impl fmt::Display for AggregateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AggregateType {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Self::Customer),
            "order" => Ok(Self::Order),
            "support_ticket" => Ok(Self::SupportTicket),
            other => Err(ContractError::UnknownAggregateType(other.to_owned())),
        }
    }
}
