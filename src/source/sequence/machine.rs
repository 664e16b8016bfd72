//! The pure state of the sequencer: per stream, the last sequence passed on, and what to do
//! with the next event of it. No I/O: [`super::Sequencing`] asks the stores.

use std::collections::HashMap;

/// What to do with one event of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The first of its stream seen in this assignment of its partition, with nothing known
    /// of where the stream stands (durable positions are off): taken as it comes.
    First,
    /// The sequence after the last one passed on (or after the stream's durable position).
    Next,
    /// Sequences `from..=to` never arrived: fill them in before this event.
    Gap { from: i64, to: i64 },
    /// At or below the last sequence passed on (or the durable position): a duplicate, or a
    /// foreign message.
    Late,
    /// Its stream is held (events are missing from the store): passed on, the parks hold it.
    Held,
}

/// Where a stream stands when it is seen for the first time (after a restart, a
/// reassignment of its partition, a new consumer, or once forgotten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Not known: the event is taken as it comes (durable positions are off).
    Unknown,
    /// Nothing of the stream was ever durable for this group: it starts at sequence 0.
    Fresh,
    /// Every sequence up to this one is durable for this group.
    At(i64),
}

impl Start {
    /// The last sequence known to be settled, if any (`Fresh`: -1, before the first).
    fn last(self) -> Option<i64> {
        match self {
            Start::Unknown => None,
            Start::Fresh => Some(-1),
            Start::At(l) => Some(l),
        }
    }
}

/// Per stream: the last sequence passed on, in which assignment of the partition, and whether
/// the stream is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    last: i64,
    epoch: u32,
    held: bool,
}

/// The pure state: the last sequence passed on per stream, for at most `capacity` streams.
///
/// Bounded as two generations: new and used streams go to the young map; when it holds half
/// the capacity, it becomes the old one and the previous old one is forgotten. A stream not
/// seen for that long is simply seen for the first time again (and starts from its durable
/// position, see [`Start`]).
#[derive(Debug)]
pub struct Sequencer {
    young: HashMap<Box<str>, Slot>,
    old: HashMap<Box<str>, Slot>,
    capacity: usize,
    /// The consumer incarnation of the windows seen (a new one forgets everything).
    generation: Option<u64>,
}

impl Sequencer {
    /// Remembers at most `capacity` streams; 0 remembers none (every event is a first sight,
    /// taken as it comes).
    pub fn new(capacity: usize) -> Sequencer {
        Sequencer {
            young: HashMap::new(),
            old: HashMap::new(),
            capacity,
            generation: None,
        }
    }

    /// Forget every stream when the windows come from another consumer incarnation (another
    /// member may have moved its streams on meanwhile). Returns whether it forgot anything.
    pub fn start_generation(&mut self, generation: u64) -> bool {
        if self.generation == Some(generation) {
            return false;
        }
        let had = !self.is_empty();
        self.young.clear();
        self.old.clear();
        self.generation = Some(generation);
        had
    }

    /// Whether an event of `stream` read in assignment `epoch` would be a first sight (the
    /// stream is not remembered, or was last seen under another epoch). Counts as no use.
    pub fn is_first_sight(&self, stream: &str, epoch: u32) -> bool {
        self.capacity > 0
            && self
                .young
                .get(stream)
                .or_else(|| self.old.get(stream))
                .is_none_or(|s| s.epoch != epoch)
    }

    /// Classify an event of `stream` with sequence `seq`, read in assignment `epoch` of its
    /// partition, and remember it: past a gap, the stream stands at `seq` (the caller fills or
    /// holds the gap). A stream last seen under another epoch is seen afresh: the partition
    /// was revoked meanwhile and its next owner may have moved the stream on. At a first
    /// sight the stream stands at `start` (its durable position): the event is then the next
    /// one, past a gap, or late, exactly as if the stream had been followed all along.
    pub fn observe(&mut self, stream: &str, seq: i64, epoch: u32, start: Start) -> Step {
        if self.capacity == 0 {
            return Step::First;
        }
        if let Some(slot) = self.slot(stream).filter(|s| s.epoch == epoch) {
            if seq <= slot.last {
                return Step::Late;
            }
            let before = slot.last;
            slot.last = seq;
            return gap_or_next(before, seq, slot.held);
        }
        let Some(last) = start.last() else {
            self.put(stream, seq, epoch);
            return Step::First;
        };
        self.put(stream, last.max(seq), epoch);
        if seq <= last {
            Step::Late
        } else {
            gap_or_next(last, seq, false)
        }
    }

    /// The stream's missing events are not in the store: pass its later events on without
    /// looking for gaps again (the parks hold them).
    pub fn hold(&mut self, stream: &str) {
        if let Some(slot) = self.slot(stream) {
            slot.held = true;
        }
    }

    /// The last sequence passed on for `stream`, if remembered (does not count as a use).
    pub fn last(&self, stream: &str) -> Option<i64> {
        self.young
            .get(stream)
            .or_else(|| self.old.get(stream))
            .map(|s| s.last)
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remember `stream` at `last` under `epoch`, not held (a use: made young).
    fn put(&mut self, stream: &str, last: i64, epoch: u32) {
        let fresh = Slot {
            last,
            epoch,
            held: false,
        };
        match self.slot(stream) {
            Some(s) => *s = fresh,
            None => self.insert(stream.into(), fresh),
        }
    }

    /// The slot of `stream`, made young again if it was old.
    fn slot(&mut self, stream: &str) -> Option<&mut Slot> {
        if !self.young.contains_key(stream) {
            let (k, v) = self.old.remove_entry(stream)?;
            self.insert(k, v);
        }
        self.young.get_mut(stream)
    }

    fn insert(&mut self, stream: Box<str>, slot: Slot) {
        if self.young.len() >= (self.capacity / 2).max(1) {
            let young = std::mem::take(&mut self.young);
            // With room for one stream only, there is no old generation.
            self.old = if self.capacity >= 2 {
                young
            } else {
                HashMap::new()
            };
        }
        self.young.insert(stream, slot);
    }
}

/// The step for `seq` after `last` (`seq > last`).
fn gap_or_next(last: i64, seq: i64, held: bool) -> Step {
    if held {
        Step::Held
    } else if seq == last + 1 {
        Step::Next
    } else {
        Step::Gap {
            from: last + 1,
            to: seq - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "customer/cus-1";
    const U: Start = Start::Unknown;

    #[test]
    fn first_sight_then_next_sequences_pass() {
        let mut s = Sequencer::new(10);
        assert_eq!(s.observe(S, 4, 1, U), Step::First, "whatever it starts at");
        assert_eq!(s.observe(S, 5, 1, U), Step::Next);
        assert_eq!(s.observe(S, 6, 1, U), Step::Next);
        assert_eq!(s.last(S), Some(6));
        assert_eq!(s.observe("order/o-1", 0, 1, U), Step::First);
    }

    #[test]
    fn a_jump_is_a_gap_and_the_stream_moves_past_it() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1, U);
        assert_eq!(s.observe(S, 3, 1, U), Step::Gap { from: 1, to: 2 });
        assert_eq!(s.last(S), Some(3));
        assert_eq!(s.observe(S, 4, 1, U), Step::Next);
    }

    #[test]
    fn at_or_below_the_last_is_late_and_moves_nothing() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1, U);
        s.observe(S, 1, 1, U);
        assert_eq!(s.observe(S, 1, 1, U), Step::Late, "a repeat");
        assert_eq!(s.observe(S, 0, 1, U), Step::Late, "older");
        assert_eq!(s.last(S), Some(1));
        assert_eq!(s.observe(S, 2, 1, U), Step::Next);
    }

    #[test]
    fn a_swapped_pair_is_a_gap_then_a_late_message() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1, U);
        assert_eq!(s.observe(S, 2, 1, U), Step::Gap { from: 1, to: 1 });
        assert_eq!(s.observe(S, 1, 1, U), Step::Late);
        assert_eq!(s.observe(S, 3, 1, U), Step::Next);
    }

    #[test]
    fn a_held_stream_passes_later_events_without_looking_for_gaps() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1, U);
        assert_eq!(s.observe(S, 5, 1, U), Step::Gap { from: 1, to: 4 });
        s.hold(S);
        assert_eq!(s.observe(S, 6, 1, U), Step::Held);
        assert_eq!(s.observe(S, 9, 1, U), Step::Held, "no second wait");
        assert_eq!(s.observe(S, 2, 1, U), Step::Late, "still checked when late");
    }

    #[test]
    fn another_assignment_of_the_partition_starts_the_stream_afresh() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1, U);
        s.observe(S, 1, 1, U);
        assert!(!s.is_first_sight(S, 1));
        assert!(s.is_first_sight(S, 2));
        // Revoked and assigned again: its next owner may have moved it on meanwhile.
        assert_eq!(s.observe(S, 7, 2, U), Step::First);
        assert_eq!(s.observe(S, 8, 2, U), Step::Next);
        assert_eq!(s.observe(S, 3, 2, U), Step::Late);
    }

    #[test]
    fn a_new_consumer_generation_forgets_every_stream() {
        let mut s = Sequencer::new(10);
        assert!(!s.start_generation(1), "nothing to forget yet");
        s.observe(S, 0, 1, U);
        assert!(!s.start_generation(1), "same generation");
        assert_eq!(s.last(S), Some(0));
        assert!(s.start_generation(2));
        assert!(s.is_empty());
        assert!(s.is_first_sight(S, 1));
        assert_eq!(s.observe(S, 5, 1, U), Step::First);
    }

    #[test]
    fn the_least_recently_seen_streams_are_forgotten_beyond_the_capacity() {
        let mut s = Sequencer::new(4);
        for i in 0..4 {
            s.observe(&format!("order/o-{i}"), 0, 1, U);
        }
        assert_eq!(s.len(), 4);
        // o-0 is used again, so it is kept; o-4 and o-5 push the others out.
        assert_eq!(s.observe("order/o-0", 1, 1, U), Step::Next);
        s.observe("order/o-4", 0, 1, U);
        s.observe("order/o-5", 0, 1, U);
        assert!(s.len() <= 4, "bounded: {}", s.len());
        assert_eq!(s.last("order/o-0"), Some(1));
        assert_eq!(s.last("order/o-1"), None, "forgotten");
        assert!(s.is_first_sight("order/o-1", 1));
        assert_eq!(s.observe("order/o-1", 3, 1, U), Step::First);
        for i in 0..1_000 {
            s.observe(&format!("order/x-{i}"), 0, 1, U);
            assert!(s.len() <= 4);
        }
        let mut one = Sequencer::new(1);
        one.observe("a/1", 0, 1, U);
        one.observe("a/2", 0, 1, U);
        assert_eq!(one.len(), 1);
        assert_eq!(one.observe("a/2", 1, 1, U), Step::Next);
    }

    #[test]
    fn capacity_zero_checks_nothing() {
        let mut s = Sequencer::new(0);
        assert_eq!(s.observe(S, 0, 1, U), Step::First);
        assert_eq!(s.observe(S, 9, 1, Start::At(2)), Step::First);
        assert!(s.is_empty());
        assert!(!s.is_first_sight(S, 1), "nothing to look up");
    }

    #[test]
    fn a_first_sight_starts_from_the_durable_position() {
        // The next one after the durable position passes as the next.
        let mut s = Sequencer::new(10);
        assert_eq!(s.observe(S, 5, 1, Start::At(4)), Step::Next);
        assert_eq!(s.observe(S, 6, 1, Start::At(0)), Step::Next, "known now");
        // Lost right at the restart: the gap from the durable position is filled.
        let mut s = Sequencer::new(10);
        assert_eq!(
            s.observe(S, 7, 1, Start::At(4)),
            Step::Gap { from: 5, to: 6 }
        );
        assert_eq!(s.last(S), Some(7));
        assert_eq!(s.observe(S, 8, 1, U), Step::Next);
        // Redelivered at or below it: late (checked against the store), and the stream stands
        // at the durable position, so the one after it is the next.
        let mut s = Sequencer::new(10);
        assert_eq!(s.observe(S, 3, 1, Start::At(4)), Step::Late);
        assert_eq!(s.last(S), Some(4));
        assert_eq!(s.observe(S, 4, 1, U), Step::Late);
        assert_eq!(s.observe(S, 5, 1, U), Step::Next);
        // A swap across the restart: 6 before 5.
        let mut s = Sequencer::new(10);
        assert_eq!(
            s.observe(S, 6, 1, Start::At(4)),
            Step::Gap { from: 5, to: 5 }
        );
        assert_eq!(s.observe(S, 5, 1, U), Step::Late);
    }

    #[test]
    fn a_stream_never_durable_starts_at_zero() {
        let mut s = Sequencer::new(10);
        assert_eq!(s.observe(S, 0, 1, Start::Fresh), Step::Next);
        let mut s = Sequencer::new(10);
        assert_eq!(
            s.observe(S, 3, 1, Start::Fresh),
            Step::Gap { from: 0, to: 2 },
            "nothing of it was ever durable: everything before it is filled"
        );
    }

    #[test]
    fn the_start_counts_only_at_a_first_sight() {
        let mut s = Sequencer::new(10);
        s.observe(S, 0, 1, Start::Fresh);
        s.observe(S, 1, 1, Start::Fresh);
        // Known in this epoch: the durable position (older, lagging) changes nothing.
        assert_eq!(s.observe(S, 2, 1, Start::At(0)), Step::Next);
        assert_eq!(s.observe(S, 2, 1, Start::At(9)), Step::Late);
        // Another epoch: the stream is seen afresh from its durable position.
        assert_eq!(
            s.observe(S, 9, 2, Start::At(6)),
            Step::Gap { from: 7, to: 8 }
        );
        // A held stream stays held while known.
        s.hold(S);
        assert_eq!(s.observe(S, 11, 2, Start::At(0)), Step::Held);
    }
}
