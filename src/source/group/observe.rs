//! One look at a consumer group from the broker's side: every partition of the subscribed
//! topics with its watermarks and the group's committed offset, and every member with the
//! partitions the coordinator says it owns. Nothing here trusts what a member believes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::assignment::{self, TopicPartition};

/// A partition as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub low: i64,
    pub high: i64,
    /// The group's committed offset (the next message to read); `None`: none yet.
    pub committed: Option<i64>,
    /// The client id of the member the coordinator assigned it to.
    pub owner: Option<String>,
}

impl PartitionView {
    /// Messages published and not yet committed by the group.
    pub fn lag(&self) -> i64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0)
    }
}

/// A member of the group, as the coordinator describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    pub partitions: BTreeSet<TopicPartition>,
}

#[derive(Debug, Clone)]
pub struct Observation {
    pub group: String,
    /// The coordinator's group state (Stable, PreparingRebalance, CompletingRebalance, Empty,
    /// Dead), or "" when the broker did not describe it.
    pub state: String,
    pub members: Vec<MemberView>,
    pub partitions: BTreeMap<TopicPartition, PartitionView>,
    pub at: Instant,
}

impl Observation {
    /// Build from its parts, filling each partition's owner from the members.
    pub fn new(
        group: &str,
        state: &str,
        members: Vec<MemberView>,
        mut partitions: BTreeMap<TopicPartition, PartitionView>,
        at: Instant,
    ) -> Observation {
        for m in &members {
            for tp in &m.partitions {
                if let Some(p) = partitions.get_mut(tp) {
                    p.owner = Some(m.client_id.clone());
                }
            }
        }
        Observation {
            group: group.to_owned(),
            state: state.to_owned(),
            members,
            partitions,
            at,
        }
    }

    pub fn lag(&self) -> i64 {
        self.partitions.values().map(PartitionView::lag).sum()
    }

    /// Partitions no member owns, as the coordinator says.
    pub fn unowned(&self) -> Vec<&TopicPartition> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.owner.is_none())
            .map(|(tp, _)| tp)
            .collect()
    }

    /// A member by its member id when known, else by its client id.
    pub fn member(&self, member_id: Option<&str>, client_id: &str) -> Option<&MemberView> {
        match member_id {
            Some(id) => self.members.iter().find(|m| m.member_id == id),
            None => self.members.iter().find(|m| m.client_id == client_id),
        }
    }
}

/// A client that reads the group's offsets and description without joining it (it never
/// subscribes, so it moves no partition).
pub fn observer<C: ConsumerContext>(
    cfg: &crate::config::KafkaConfig,
    group: &str,
    ctx: C,
) -> Result<BaseConsumer<C>, KafkaError> {
    crate::kafka::base_client_config(cfg)
        .set("client.id", "projector-group-watch")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create_with_context(ctx)
}

/// Ask the broker: metadata of `topics`, watermarks, the group's committed offsets and its
/// description. Fails as a whole if any answer is missing (a partial view could hide a
/// partition).
pub fn observe<C: ClientContext + ConsumerContext>(
    c: &BaseConsumer<C>,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<Observation, KafkaError> {
    let metadata = c.fetch_metadata(None, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        if topics.iter().any(|n| n == t.name()) {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = c.committed_offsets(tpl, timeout)?;
    let mut partitions = BTreeMap::new();
    for e in committed.elements() {
        let (low, high) = c.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let committed = match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        };
        partitions.insert(
            (e.topic().to_owned(), e.partition()),
            PartitionView {
                low,
                high,
                committed,
                owner: None,
            },
        );
    }
    let (state, members) = describe(c, group, timeout)?;
    Ok(Observation::new(
        group,
        &state,
        members,
        partitions,
        Instant::now(),
    ))
}

/// The group's state and members (DescribeGroups). A member whose assignment cannot be
/// parsed counts as owning nothing, and says so in the log.
fn describe<C: ClientContext + ConsumerContext>(
    c: &BaseConsumer<C>,
    group: &str,
    timeout: Duration,
) -> Result<(String, Vec<MemberView>), KafkaError> {
    let list = c.fetch_group_list(Some(group), timeout)?;
    let Some(g) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok((String::new(), Vec::new()));
    };
    let members = g
        .members()
        .iter()
        .map(|m| {
            let partitions = match assignment::parse(m.assignment().unwrap_or_default()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(member = m.id(), error = %e, "unreadable member assignment");
                    BTreeSet::new()
                }
            };
            MemberView {
                member_id: m.id().to_owned(),
                client_id: m.client_id().to_owned(),
                host: m.client_host().to_owned(),
                partitions,
            }
        })
        .collect();
    Ok((g.state().to_owned(), members))
}
