//! The broker, the event topics, the dead-letter topic and the deployment's consumer groups,
//! as the broker sees them (the group watch's own `observe`, never a member's belief).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};

use super::{ProbeError, Row, timed, timed_blocking};
use crate::config::Config;
use crate::source::group::{Observation, observe, observer};

/// A group further behind than this is worth a look (ProjectorLagGrowing fires at 10,000).
const LAG_WARN: i64 = 10_000;

/// A topic as the broker's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicSeen {
    pub name: String,
    /// The partition ids with their leader broker (-1: none).
    pub partitions: Vec<(i32, i32)>,
    /// The broker's error for the topic (e.g. unknown topic).
    pub error: Option<String>,
}

struct Broker {
    brokers: Vec<(i32, String)>,
    topics: Vec<TopicSeen>,
}

pub(crate) async fn check(cfg: &Config, t: Duration) -> Vec<Row> {
    let groups = cfg.groups();
    let kcfg = cfg.kafka.clone();
    let first = groups.first().cloned().unwrap_or_default();
    let metadata = timed_blocking(t, move || -> Result<Broker, String> {
        let c: BaseConsumer =
            observer(&kcfg, &first, DefaultConsumerContext).map_err(|e| e.to_string())?;
        let md = c.fetch_metadata(None, t).map_err(|e| e.to_string())?;
        Ok(Broker {
            brokers: md
                .brokers()
                .iter()
                .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
                .collect(),
            topics: md
                .topics()
                .iter()
                .map(|tp| TopicSeen {
                    name: tp.name().to_owned(),
                    partitions: tp
                        .partitions()
                        .iter()
                        .map(|p| (p.id(), p.leader()))
                        .collect(),
                    error: tp
                        .error()
                        .map(|e| format!("{:?}", rdkafka::types::RDKafkaErrorCode::from(e))),
                })
                .collect(),
        })
    })
    .await;
    let md = match metadata {
        Ok(md) => md,
        Err(e) => {
            let seen = format!("no metadata from {}: {e}", cfg.kafka.brokers);
            let mut rows = vec![
                Row::fail("kafka", seen)
                    .action("check kafka.brokers and that the broker runs and is reachable"),
                Row::fail("kafka topics", "broker unreachable"),
                Row::fail("kafka dead letters", "broker unreachable"),
            ];
            rows.extend(
                groups
                    .iter()
                    .map(|g| Row::fail(format!("group {g}"), "broker unreachable")),
            );
            return rows;
        }
    };
    // Informational only: a broker that does not answer DescribeConfigs costs little.
    let version = broker_version(cfg, &md.brokers, t.min(Duration::from_secs(3))).await;
    let mut rows = vec![broker_row(&md.brokers, version.as_deref())];
    let expected: Vec<String> = crate::kafka::event_topics(&cfg.kafka);
    rows.push(topics_row(&expected, cfg.kafka.partitions, &md.topics));
    rows.push(dead_letter_row(cfg, &md.topics, t).await);
    for g in &groups {
        let (kcfg, group, topics) = (cfg.kafka.clone(), g.clone(), expected.clone());
        let obs = timed_blocking(t, move || {
            let c: BaseConsumer = observer(&kcfg, &group, DefaultConsumerContext)?;
            observe(&c, &group, &topics, t)
        })
        .await;
        rows.push(group_row(g, obs));
    }
    rows
}

/// The broker's version, if it names one among its settings (Apache Kafka 3.x does, as
/// `inter.broker.protocol.version`; the Kafka protocol has no version request).
async fn broker_version(cfg: &Config, brokers: &[(i32, String)], t: Duration) -> Option<String> {
    let id = brokers.first()?.0;
    let admin: AdminClient<DefaultClientContext> =
        crate::kafka::base_client_config(&cfg.kafka).create().ok()?;
    let opts = AdminOptions::new().request_timeout(Some(t));
    let spec = [ResourceSpecifier::Broker(id)];
    let answer = timed(t, admin.describe_configs(&spec, &opts)).await.ok()?;
    let resource = answer.into_iter().next()?.ok()?;
    let entries = resource.entry_map();
    ["inter.broker.protocol.version", "version"]
        .iter()
        .find_map(|k| entries.get(k).and_then(|e| e.value.clone()))
}

pub(crate) fn broker_row(brokers: &[(i32, String)], version: Option<&str>) -> Row {
    let list: Vec<String> = brokers
        .iter()
        .map(|(id, at)| format!("{id} at {at}"))
        .collect();
    let version = version.map_or("version not reported".to_owned(), |v| {
        format!("version {v}")
    });
    if brokers.is_empty() {
        return Row::fail("kafka", "metadata names no broker")
            .action("check the broker's advertised listeners");
    }
    Row::ok("kafka", format!("broker {} ({version})", list.join(", ")))
}

/// Every event topic exists, each partition led, with `kafka.partitions` partitions.
pub(crate) fn topics_row(expected: &[String], partitions: i32, seen: &[TopicSeen]) -> Row {
    let mut missing = Vec::new();
    let mut leaderless = Vec::new();
    let mut other_count = Vec::new();
    for name in expected {
        match seen.iter().find(|t| &t.name == name) {
            Some(t) if t.error.is_none() && !t.partitions.is_empty() => {
                if t.partitions.iter().any(|(_, leader)| *leader < 0) {
                    leaderless.push(name.clone());
                }
                if t.partitions.len() as i32 != partitions {
                    other_count.push(format!("{name} has {}", t.partitions.len()));
                }
            }
            _ => missing.push(name.clone()),
        }
    }
    if !missing.is_empty() {
        return Row::fail("kafka topics", format!("missing: {}", missing.join(", "))).action(
            "create them with kafka.partitions partitions (`projector generate` creates the \
             topics it publishes to); check kafka.topic_prefix",
        );
    }
    if !leaderless.is_empty() {
        return Row::fail(
            "kafka topics",
            format!("partitions without a leader: {}", leaderless.join(", ")),
        )
        .action("a broker is down: nothing can be read from or written to those partitions");
    }
    if !other_count.is_empty() {
        return Row::warn(
            "kafka topics",
            format!(
                "{} (kafka.partitions is {partitions})",
                other_count.join(", ")
            ),
        )
        .action("set kafka.partitions to the topics' count; more partitions than members idle");
    }
    Row::ok(
        "kafka topics",
        format!(
            "{} topics, {partitions} partitions each, all led",
            expected.len()
        ),
    )
}

/// The dead-letter topic exists and the dead-letter producer (the worker's own settings:
/// idempotent, acks=all) finds a leader for every partition. No letter is sent to prove it:
/// every letter is read by `dlq list`, counted by the dead-letter alert and possibly
/// replayed, and Kafka has no way to take one back — a test letter would be a false alarm.
async fn dead_letter_row(cfg: &Config, topics: &[TopicSeen], t: Duration) -> Row {
    let name = cfg.kafka.dlq_topic.clone();
    let seen = topics.iter().find(|tp| tp.name == name);
    // Only about a topic that exists: a producer's metadata request for a missing topic
    // makes a broker with auto-creation on create it, and the doctor writes nothing.
    if seen.is_none_or(|t| t.error.is_some()) {
        return dead_letter_verdict(&name, seen, Ok(Vec::new()));
    }
    let kcfg = cfg.kafka.clone();
    let leaders = timed_blocking(t, move || {
        crate::resilience::dead_letter::DeadLetterQueue::new(&kcfg)?.leaders(t)
    })
    .await;
    dead_letter_verdict(&name, seen, leaders)
}

pub(crate) fn dead_letter_verdict(
    name: &str,
    seen: Option<&TopicSeen>,
    leaders: Result<Vec<(i32, i32)>, ProbeError>,
) -> Row {
    const CHECK: &str = "kafka dead letters";
    if seen.is_none_or(|t| t.error.is_some() || t.partitions.is_empty()) {
        return Row::fail(CHECK, format!("topic {name} missing"))
            .action("create it (kafka.dlq_topic); poison would otherwise stop its partition");
    }
    match leaders {
        Err(e) => Row::fail(
            CHECK,
            format!("the dead-letter producer got no metadata: {e}"),
        )
        .action("check the broker and its ACLs for kafka.dlq_topic"),
        Ok(l) if l.is_empty() => Row::fail(
            CHECK,
            format!("the dead-letter producer does not see {name}"),
        )
        .action("check the topic's ACLs (describe, write) for this client"),
        Ok(l) if l.iter().any(|(_, leader)| *leader < 0) => {
            Row::fail(CHECK, format!("{name}: partitions without a leader"))
                .action("a broker is down: dead letters cannot be written")
        }
        Ok(l) => Row::ok(
            CHECK,
            format!(
                "{name}: {} partitions, each led (seen by the dead-letter producer)",
                l.len()
            ),
        ),
    }
}

/// A group's members, state and lag as the coordinator and the committed offsets say.
pub(crate) fn group_row(group: &str, obs: Result<Observation, ProbeError>) -> Row {
    let check = format!("group {group}");
    let obs = match obs {
        Ok(o) => o,
        Err(e) => {
            return Row::fail(check, format!("not observed: {e}"))
                .action("check the broker and the group's ACLs (describe)");
        }
    };
    let lag = obs.lag();
    let behind = obs.partitions.values().filter(|p| p.lag() > 0).count();
    let unowned = obs.unowned().len();
    let mut clients: Vec<&str> = obs.members.iter().map(|m| m.client_id.as_str()).collect();
    clients.sort();
    let state = if obs.state.is_empty() {
        "unknown"
    } else {
        obs.state.as_str()
    };
    let lag_text = format!(
        "lag {lag} messages ({behind} of {} partitions behind)",
        obs.partitions.len()
    );
    if obs.members.is_empty() {
        return Row::warn(check, format!("{state}, no member; {lag_text}"))
            .action("no worker consumes for this group: start the workers (`projector run`)");
    }
    let seen = format!(
        "{state}, {} member(s) ({}); {lag_text}, {unowned} unowned",
        obs.members.len(),
        clients.join(", ")
    );
    if unowned > 0 && obs.state == "Stable" {
        return Row::warn(check, seen).action(
            "partitions no member owns: members re-create their consumer after \
             worker.assignment_mismatch_secs; if it persists restart the workers",
        );
    }
    if obs.state != "Stable" {
        return Row::warn(check, seen).action("rebalancing: look again in a few seconds");
    }
    if lag > LAG_WARN {
        return Row::warn(check, seen)
            .action("far behind: add workers (up to one per partition) or find the slow store");
    }
    Row::ok(check, seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;
    use crate::source::group::observe::{MemberView, PartitionView};
    use std::collections::{BTreeMap, BTreeSet};

    fn topic(name: &str, leaders: &[i32]) -> TopicSeen {
        TopicSeen {
            name: name.into(),
            partitions: leaders
                .iter()
                .enumerate()
                .map(|(i, l)| (i as i32, *l))
                .collect(),
            error: None,
        }
    }

    #[test]
    fn topics_missing_leaderless_or_resized() {
        let want = vec!["e.a".to_owned(), "e.b".to_owned()];
        let ok = [topic("e.a", &[1, 1]), topic("e.b", &[1, 1])];
        assert_eq!(topics_row(&want, 2, &ok).verdict, Verdict::Ok);
        let r = topics_row(&want, 2, &ok[..1]);
        assert_eq!(
            (r.verdict, r.seen.as_str()),
            (Verdict::Fail, "missing: e.b")
        );
        let gone = [topic("e.a", &[1, 1]), topic("e.b", &[1, -1])];
        assert_eq!(topics_row(&want, 2, &gone).verdict, Verdict::Fail);
        let r = topics_row(&want, 3, &ok);
        assert_eq!(r.verdict, Verdict::Warn, "{r:?}");
        let mut unknown = topic("e.b", &[]);
        unknown.error = Some("UnknownTopicOrPartition".into());
        assert_eq!(
            topics_row(&want, 2, &[ok[0].clone(), unknown]).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn dead_letters_need_the_topic_and_a_leader_per_partition() {
        let t = topic("d", &[1, 1]);
        let v = |seen, leaders| dead_letter_verdict("d", seen, leaders).verdict;
        assert_eq!(v(Some(&t), Ok(vec![(0, 1), (1, 1)])), Verdict::Ok);
        assert_eq!(v(None, Ok(vec![(0, 1)])), Verdict::Fail);
        assert_eq!(v(Some(&t), Ok(vec![(0, 1), (1, -1)])), Verdict::Fail);
        assert_eq!(v(Some(&t), Ok(vec![])), Verdict::Fail);
        assert_eq!(v(Some(&t), Err(ProbeError::Timeout(5))), Verdict::Fail);
    }

    fn obs(state: &str, members: usize, owned: usize, lag: i64) -> Observation {
        let mut partitions = BTreeMap::new();
        for p in 0..4 {
            partitions.insert(
                ("e.a".to_owned(), p),
                PartitionView {
                    low: 0,
                    high: 100 + if p == 0 { lag } else { 0 },
                    committed: Some(100),
                    owner: None,
                },
            );
        }
        let members = (0..members)
            .map(|m| MemberView {
                member_id: format!("m{m}"),
                client_id: format!("c{m}"),
                host: "h".into(),
                partitions: if m == 0 {
                    (0..owned as i32).map(|p| ("e.a".to_owned(), p)).collect()
                } else {
                    BTreeSet::new()
                },
            })
            .collect();
        Observation::new("g", state, members, partitions, std::time::Instant::now())
    }

    #[test]
    fn a_group_is_ok_when_stable_owned_and_near_the_head() {
        let v = |o| group_row("g", Ok(o)).verdict;
        assert_eq!(v(obs("Stable", 2, 4, 5)), Verdict::Ok);
        assert_eq!(v(obs("Empty", 0, 0, 0)), Verdict::Warn, "nobody consumes");
        assert_eq!(
            v(obs("Stable", 1, 3, 0)),
            Verdict::Warn,
            "a partition unowned"
        );
        assert_eq!(v(obs("PreparingRebalance", 1, 4, 0)), Verdict::Warn);
        assert_eq!(v(obs("Stable", 1, 4, LAG_WARN + 1)), Verdict::Warn);
        let r = group_row("g", Err(ProbeError::Failed("refused".into())));
        assert_eq!((r.verdict, r.check.as_str()), (Verdict::Fail, "group g"));
        let r = group_row("g", Ok(obs("Stable", 2, 4, 5)));
        assert!(
            r.seen.contains("2 member(s) (c0, c1); lag 5 messages"),
            "{}",
            r.seen
        );
    }
}
