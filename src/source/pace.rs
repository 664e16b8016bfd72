//! Fetch pacing for a caught-up member (pure; the poll loop drives it).
//!
//! librdkafka sends the next fetch as soon as the last one returns and leaves it to the
//! broker to hold an empty fetch (`fetch.wait.max.ms`). A broker that answers at once (the
//! local one does) gets thousands of empty fetches a second from an idle member, and both
//! processes spend most of a core on them. So once every owned partition has reported its
//! end (librdkafka's partition EOF: a fetch response found nothing past what was consumed)
//! and nothing came after, the member pauses its partitions for `kafka.idle_pause_ms`, then
//! resumes them.
//!
//! Why no partition can starve: a pause drops any fetch response in flight, but the next
//! pause needs an EOF of every partition *after* the resume. librdkafka resets a partition's
//! EOF mark when it is resumed (a new fetch version) and emits EOF only from a response of
//! the current version, queued after that response's messages. So each pause follows a
//! complete, delivered response of every partition, and a message the last pause dropped is
//! fetched again, and consumed, before the next one. (librdkafka applies a resume off the
//! broker thread, which may sleep up to a second first: the poll loop wakes it with a
//! request until a fetch answers.) With Apache Kafka the broker holds empty fetches itself,
//! so `idle_pause_ms` is 0 unless configured.
//!
//! A resume can be lost: librdkafka numbers each pause, resume and fetch start with a
//! version taken before the operation is queued, and drops one that arrives after a higher
//! version (`rd_kafka_toppar_op_serve`: "outdated"). A resume racing the fetch start of a
//! rebalance can so leave its partition paused for good, with nothing reported. Hence the
//! check: a partition that has said nothing (no message, no end) for [`SILENCE`] since it
//! was resumed or assigned is resumed again (resuming an unpaused partition is a no-op).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::runtime::commit::Tp;

/// How long a resumed or assigned partition may say nothing before it is resumed again: a
/// broker that answers fetches at once (the only kind pacing is for) answers within
/// milliseconds.
pub const SILENCE: Duration = Duration::from_millis(250);

/// Which owned partitions reported their end since they were last resumed, and which said
/// anything at all.
#[derive(Debug, Default)]
pub struct Pacer {
    parts: HashMap<Tp, Part>,
}

#[derive(Debug, Clone, Copy)]
struct Part {
    at_end: bool,
    /// Since when it has said nothing (it was resumed or assigned then); `None` once it did.
    silent_since: Option<Instant>,
}

impl Pacer {
    pub fn assigned(&mut self, tp: Tp, now: Instant) {
        self.parts.insert(
            tp,
            Part {
                at_end: false,
                silent_since: Some(now),
            },
        );
    }

    pub fn revoked(&mut self, tp: Tp) {
        self.parts.remove(&tp);
    }

    /// A message of `tp` was consumed: whatever end it reported is behind it.
    pub fn message(&mut self, tp: Tp) {
        if let Some(p) = self.parts.get_mut(&tp) {
            p.at_end = false;
            p.silent_since = None;
        }
    }

    /// `tp` reported its end (a partition EOF).
    pub fn end(&mut self, tp: Tp) {
        if let Some(p) = self.parts.get_mut(&tp) {
            p.at_end = true;
            p.silent_since = None;
        }
    }

    /// Every owned partition is at its end: pause now (and forget the ends, which the next
    /// resume makes stale).
    pub fn pause_now(&mut self) -> bool {
        let all = !self.parts.is_empty() && self.parts.values().all(|p| p.at_end);
        if all {
            self.parts.values_mut().for_each(|p| p.at_end = false);
        }
        all
    }

    /// The partitions were resumed at `now`: each must say something again.
    pub fn resumed(&mut self, now: Instant) {
        self.parts
            .values_mut()
            .for_each(|p| p.silent_since = Some(now));
    }

    /// Partitions silent for [`SILENCE`] since their resume or assignment, to resume again
    /// (each one's clock starts over).
    pub fn silent(&mut self, now: Instant) -> Vec<Tp> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.parts {
            if let Some(since) = p.silent_since
                && now.duration_since(since) >= SILENCE
            {
                p.silent_since = Some(now);
                out.push(*tp);
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_needs_every_owned_partition_at_its_end_since_the_last_pause() {
        let mut p = Pacer::default();
        assert!(!p.pause_now(), "nothing owned: nothing to pace");
        let (a, b) = ((0u16, 0), (0u16, 1));
        let now = Instant::now();
        p.assigned(a, now);
        p.assigned(b, now);
        p.end(a);
        assert!(!p.pause_now(), "b has not reported its end");
        p.end(b);
        p.message(a);
        assert!(!p.pause_now(), "a message came after a's end");
        p.end(a);
        assert!(p.pause_now());
        // After the pause (and its resume) both must report their end again.
        assert!(!p.pause_now());
        p.end(a);
        assert!(!p.pause_now());
        p.end(b);
        assert!(p.pause_now());
    }

    #[test]
    fn partitions_follow_the_assignment() {
        let mut p = Pacer::default();
        let (a, b) = ((0u16, 0), (1u16, 0));
        let now = Instant::now();
        p.assigned(a, now);
        p.end(a);
        // An end or a message of a partition not owned changes nothing.
        p.end(b);
        assert!(p.pause_now());
        p.assigned(b, now);
        p.end(a);
        assert!(!p.pause_now(), "b was assigned since and has not reported");
        p.revoked(b);
        assert!(p.pause_now());
        // Assigned again: its end must be reported again.
        p.assigned(a, now);
        assert!(!p.pause_now());
    }

    #[test]
    fn a_partition_silent_since_its_resume_is_resumed_again_until_it_speaks() {
        let mut p = Pacer::default();
        let (a, b, c) = ((0u16, 0), (0u16, 1), (0u16, 2));
        let t0 = Instant::now();
        p.assigned(a, t0);
        p.assigned(b, t0);
        p.end(a);
        p.message(b);
        assert!(p.silent(t0 + SILENCE).is_empty(), "both spoke");
        p.resumed(t0 + SILENCE);
        let t1 = t0 + SILENCE;
        p.end(a);
        assert!(
            p.silent(t1 + SILENCE / 2).is_empty(),
            "not silent long enough"
        );
        assert_eq!(
            p.silent(t1 + SILENCE),
            vec![b],
            "b said nothing since its resume"
        );
        assert!(
            p.silent(t1 + SILENCE + SILENCE / 2).is_empty(),
            "its clock started over"
        );
        assert_eq!(p.silent(t1 + SILENCE * 2), vec![b], "and again");
        p.end(b);
        assert!(p.silent(t1 + SILENCE * 10).is_empty());
        // A partition assigned and never heard from is silent too; a revoked one is not.
        p.assigned(c, t1);
        assert_eq!(p.silent(t1 + SILENCE * 10), vec![c]);
        p.revoked(c);
        assert!(p.silent(t1 + SILENCE * 20).is_empty());
    }
}
