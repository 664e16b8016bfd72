//! The group's verdict from successive observations (pure: time comes in as an argument).
//!
//! - A partition is *stalled* when messages wait on it (lag > 0) and the group's committed
//!   offset has not moved for `stall`. Whoever owns it, or nobody.
//! - A partition is *unowned* when no member holds it in the coordinator's description.
//! - This member's assignment *mismatches* when, in a stable group, what it consumes differs
//!   from what the coordinator says it owns (a broker, assignor or client bug: partitions are
//!   then consumed twice or by nobody). Lasting `mismatch_grace`, longer than a rebalance
//!   takes, it asks to *heal*: re-create the consumer, which rejoins and gets a fresh
//!   assignment.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::assignment::TopicPartition;
use super::observe::Observation;

#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    pub stall: Duration,
    pub mismatch_grace: Duration,
}

/// What this member believes (none for an observer that is not a member, such as the read
/// service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Belief {
    pub client_id: String,
    /// The member id the coordinator gave it, once joined: names it in the description even
    /// if other members share its client id.
    pub member_id: Option<String>,
    pub assignment: BTreeSet<TopicPartition>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    pub lag: i64,
    /// Every partition of the subscribed topics has lag 0.
    pub caught_up: bool,
    pub unowned: Vec<TopicPartition>,
    /// Per partition: how long its commit has not moved while messages wait (zero when none
    /// wait).
    pub stall: Vec<(TopicPartition, Duration)>,
    /// Partitions stalled for at least `stall`.
    pub stalled: Vec<TopicPartition>,
    /// The longest stall among the partitions this member is responsible for: those it
    /// consumes and those the coordinator says it owns.
    pub my_longest_stall: Duration,
    pub mismatch: bool,
    /// Re-create the consumer now.
    pub heal: bool,
}

#[derive(Debug)]
pub struct Watch {
    cfg: WatchConfig,
    /// Per partition: the committed offset last seen and since when it has not moved.
    moved: HashMap<TopicPartition, (Option<i64>, Instant)>,
    mismatch_since: Option<Instant>,
}

impl Watch {
    pub fn new(cfg: WatchConfig) -> Watch {
        Watch {
            cfg,
            moved: HashMap::new(),
            mismatch_since: None,
        }
    }

    pub fn update(&mut self, obs: &Observation, me: Option<&Belief>) -> Verdict {
        let now = obs.at;
        let mut v = Verdict {
            lag: obs.lag(),
            caught_up: obs.partitions.values().all(|p| p.lag() == 0),
            unowned: obs.unowned().into_iter().cloned().collect(),
            ..Verdict::default()
        };
        let described = me.and_then(|b| obs.member(b.member_id.as_deref(), &b.client_id));
        let owned_by_coordinator: BTreeSet<TopicPartition> =
            described.map(|m| m.partitions.clone()).unwrap_or_default();
        self.moved.retain(|tp, _| obs.partitions.contains_key(tp));
        for (tp, p) in &obs.partitions {
            let slot = self.moved.entry(tp.clone()).or_insert((p.committed, now));
            // Moving, or nothing waits: the clock starts again.
            if slot.0 != p.committed || p.lag() == 0 {
                *slot = (p.committed, now);
            }
            let stalled_for = now.saturating_duration_since(slot.1);
            v.stall.push((tp.clone(), stalled_for));
            if stalled_for >= self.cfg.stall {
                v.stalled.push(tp.clone());
            }
            let mine =
                me.is_some_and(|b| b.assignment.contains(tp)) || owned_by_coordinator.contains(tp);
            if mine {
                v.my_longest_stall = v.my_longest_stall.max(stalled_for);
            }
        }
        if let Some(b) = me {
            // Only a stable group's description is an assignment; during a rebalance members
            // and coordinator legitimately disagree.
            // A member a stable group does not list is not in it, whatever it believes.
            v.mismatch = obs.state == "Stable"
                && (described.is_none() || b.assignment != owned_by_coordinator);
            if v.mismatch {
                let since = *self.mismatch_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.cfg.mismatch_grace {
                    v.heal = true;
                    // The next heal waits a whole grace again (the rejoin takes a while).
                    self.mismatch_since = None;
                }
            } else if obs.state == "Stable" {
                self.mismatch_since = None;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::super::observe::{MemberView, PartitionView};
    use super::*;
    use std::collections::BTreeMap;

    fn tp(p: i32) -> TopicPartition {
        ("events.order".into(), p)
    }

    fn set(ps: &[i32]) -> BTreeSet<TopicPartition> {
        ps.iter().map(|p| tp(*p)).collect()
    }

    fn cfg() -> WatchConfig {
        WatchConfig {
            stall: Duration::from_secs(10),
            mismatch_grace: Duration::from_secs(20),
        }
    }

    /// Partitions 0..4 with (high, committed); members (client id, partitions).
    fn obs(
        at: Instant,
        state: &str,
        parts: &[(i64, Option<i64>)],
        members: &[(&str, &[i32])],
    ) -> Observation {
        let partitions: BTreeMap<_, _> = parts
            .iter()
            .enumerate()
            .map(|(i, (high, committed))| {
                (
                    tp(i as i32),
                    PartitionView {
                        low: 0,
                        high: *high,
                        committed: *committed,
                        owner: None,
                    },
                )
            })
            .collect();
        let members = members
            .iter()
            .map(|(c, ps)| MemberView {
                member_id: format!("m-{c}"),
                client_id: (*c).into(),
                host: "127.0.0.1".into(),
                partitions: set(ps),
            })
            .collect();
        Observation::new("g", state, members, partitions, at)
    }

    fn me(c: &str, ps: &[i32]) -> Belief {
        Belief {
            client_id: c.into(),
            member_id: None,
            assignment: set(ps),
        }
    }

    #[test]
    fn lag_and_caught_up() {
        let t = Instant::now();
        let o = obs(t, "Stable", &[(10, Some(10)), (5, None)], &[("a", &[0, 1])]);
        let v = Watch::new(cfg()).update(&o, None);
        assert_eq!(v.lag, 5);
        assert!(!v.caught_up);
        let o = obs(t, "Stable", &[(10, Some(10)), (0, None)], &[("a", &[0, 1])]);
        assert!(Watch::new(cfg()).update(&o, None).caught_up);
    }

    #[test]
    fn unowned_partitions_come_from_the_coordinator() {
        let o = obs(
            Instant::now(),
            "Stable",
            &[(1, Some(0)), (1, Some(0)), (1, Some(0))],
            &[("a", &[0]), ("b", &[2])],
        );
        assert_eq!(Watch::new(cfg()).update(&o, None).unowned, vec![tp(1)]);
    }

    #[test]
    fn a_partition_stalls_when_its_commit_does_not_move_while_messages_wait() {
        let t = Instant::now();
        let mut w = Watch::new(cfg());
        let parts = [(100, Some(40)), (100, Some(100))];
        let v = w.update(&obs(t, "Stable", &parts, &[("a", &[0, 1])]), None);
        assert!(v.stalled.is_empty());
        let v = w.update(
            &obs(
                t + Duration::from_secs(11),
                "Stable",
                &parts,
                &[("a", &[0, 1])],
            ),
            None,
        );
        assert_eq!(v.stalled, vec![tp(0)], "caught-up partition 1 never stalls");
        // It moves: the clock starts again.
        let moved = [(100, Some(41)), (100, Some(100))];
        let v = w.update(
            &obs(
                t + Duration::from_secs(12),
                "Stable",
                &moved,
                &[("a", &[0, 1])],
            ),
            None,
        );
        assert!(v.stalled.is_empty());
        // Caught up while not moving: not a stall either.
        let done = [(41, Some(41)), (100, Some(100))];
        let v = w.update(
            &obs(
                t + Duration::from_secs(40),
                "Stable",
                &done,
                &[("a", &[0, 1])],
            ),
            None,
        );
        assert!(v.stalled.is_empty() && v.caught_up);
    }

    #[test]
    fn my_longest_stall_counts_what_i_consume_and_what_the_coordinator_gives_me() {
        let t = Instant::now();
        let mut w = Watch::new(cfg());
        let parts = [(9, Some(1)), (9, Some(1)), (9, Some(1))];
        let members: &[(&str, &[i32])] = &[("a", &[0]), ("b", &[1, 2])];
        w.update(&obs(t, "Stable", &parts, members), Some(&me("a", &[1])));
        let later = obs(t + Duration::from_secs(30), "Stable", &parts, members);
        let v = Watch::update(&mut w, &later, Some(&me("a", &[1])));
        assert_eq!(v.my_longest_stall, Duration::from_secs(30));
        // A member responsible for nothing stalled is not stalled itself.
        let mut w = Watch::new(cfg());
        let parts = [(9, Some(9)), (9, Some(1))];
        let members: &[(&str, &[i32])] = &[("a", &[0]), ("b", &[1])];
        w.update(&obs(t, "Stable", &parts, members), Some(&me("a", &[0])));
        let v = w.update(
            &obs(t + Duration::from_secs(30), "Stable", &parts, members),
            Some(&me("a", &[0])),
        );
        assert_eq!(v.my_longest_stall, Duration::ZERO);
        assert_eq!(v.stalled, vec![tp(1)]);
    }

    #[test]
    fn a_lasting_mismatch_heals_once_per_grace() {
        let t = Instant::now();
        let mut w = Watch::new(cfg());
        let parts = [(9, Some(1)), (9, Some(1))];
        // The broker's bug: "a" was handed b's partition; the description says 0.
        let members: &[(&str, &[i32])] = &[("a", &[0]), ("b", &[1])];
        let wrong = me("a", &[1]);
        let at = |s: u64| obs(t + Duration::from_secs(s), "Stable", &parts, members);
        let v = w.update(&at(0), Some(&wrong));
        assert!(v.mismatch && !v.heal);
        assert!(!w.update(&at(19), Some(&wrong)).heal);
        assert!(w.update(&at(20), Some(&wrong)).heal);
        // Not again before another whole grace.
        assert!(!w.update(&at(21), Some(&wrong)).heal);
        assert!(!w.update(&at(40), Some(&wrong)).heal);
        assert!(w.update(&at(41), Some(&wrong)).heal);
    }

    #[test]
    fn agreement_or_a_rebalance_never_heals() {
        let t = Instant::now();
        let mut w = Watch::new(cfg());
        let parts = [(9, Some(1)), (9, Some(1))];
        let members: &[(&str, &[i32])] = &[("a", &[0]), ("b", &[1])];
        for s in 0..60 {
            let o = obs(t + Duration::from_secs(s), "Stable", &parts, members);
            let v = w.update(&o, Some(&me("a", &[0])));
            assert!(!v.mismatch && !v.heal);
        }
        let mut w = Watch::new(cfg());
        for s in 0..60 {
            let o = obs(
                t + Duration::from_secs(s),
                "PreparingRebalance",
                &parts,
                members,
            );
            let v = w.update(&o, Some(&me("a", &[1])));
            assert!(!v.mismatch && !v.heal);
        }
    }

    #[test]
    fn the_member_id_names_a_member_among_others_with_its_client_id() {
        let t = Instant::now();
        let parts = [(9, Some(1)), (9, Some(1))];
        // Both members use librdkafka's default client id.
        let members: &[(&str, &[i32])] = &[("rdkafka", &[0]), ("rdkafka", &[1])];
        let o = obs(t, "Stable", &parts, members);
        let second = Belief {
            client_id: "rdkafka".into(),
            member_id: Some("m-rdkafka-1".into()),
            assignment: set(&[1]),
        };
        let mut o2 = o.clone();
        o2.members[1].member_id = "m-rdkafka-1".into();
        assert!(!Watch::new(cfg()).update(&o2, Some(&second)).mismatch);
        let wrong = Belief {
            assignment: set(&[0]),
            ..second
        };
        assert!(Watch::new(cfg()).update(&o2, Some(&wrong)).mismatch);
    }

    #[test]
    fn a_member_the_stable_group_does_not_know_mismatches() {
        let t = Instant::now();
        let mut w = Watch::new(cfg());
        let parts = [(9, Some(1))];
        let members: &[(&str, &[i32])] = &[("b", &[0])];
        let v = w.update(&obs(t, "Stable", &parts, members), Some(&me("a", &[0])));
        assert!(v.mismatch);
        // …even one that believes it owns nothing (it is not in the group at all).
        let v = w.update(
            &obs(t + Duration::from_secs(25), "Stable", &parts, members),
            Some(&me("a", &[])),
        );
        assert!(v.heal);
    }
}
