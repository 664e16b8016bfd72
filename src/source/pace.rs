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

use std::collections::HashMap;

use crate::runtime::commit::Tp;

/// Which owned partitions reported their end since they were last resumed.
#[derive(Debug, Default)]
pub struct Pacer {
    at_end: HashMap<Tp, bool>,
}

impl Pacer {
    pub fn assigned(&mut self, tp: Tp) {
        self.at_end.insert(tp, false);
    }

    pub fn revoked(&mut self, tp: Tp) {
        self.at_end.remove(&tp);
    }

    /// A message of `tp` was consumed: whatever end it reported is behind it.
    pub fn message(&mut self, tp: Tp) {
        if let Some(e) = self.at_end.get_mut(&tp) {
            *e = false;
        }
    }

    /// `tp` reported its end (a partition EOF).
    pub fn end(&mut self, tp: Tp) {
        if let Some(e) = self.at_end.get_mut(&tp) {
            *e = true;
        }
    }

    /// Every owned partition is at its end: pause now (and forget the ends, which the next
    /// resume makes stale).
    pub fn pause_now(&mut self) -> bool {
        let all = !self.at_end.is_empty() && self.at_end.values().all(|e| *e);
        if all {
            self.at_end.values_mut().for_each(|e| *e = false);
        }
        all
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
        p.assigned(a);
        p.assigned(b);
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
        p.assigned(a);
        p.end(a);
        // An end or a message of a partition not owned changes nothing.
        p.end(b);
        assert!(p.pause_now());
        p.assigned(b);
        p.end(a);
        assert!(!p.pause_now(), "b was assigned since and has not reported");
        p.revoked(b);
        assert!(p.pause_now());
        // Assigned again: its end must be reported again.
        p.assigned(a);
        assert!(!p.pause_now());
    }
}
