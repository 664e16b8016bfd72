//! Parked streams of one projector: after an event of a stream is refused (or cannot even be
//! read), that stream's later events are held back, so a stream is never applied out of
//! order. The rule is a pure function of the log, so the live worker, a rebuild and the
//! reference fold all park the same streams at the same sequences.

use std::collections::HashMap;

/// Where a stream's held events begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkFrom {
    /// This sequence and every later one (an event refused by the projector).
    Sequence(i64),
    /// Every message of the stream after this Kafka offset (a message so broken that even
    /// its sequence is unknown). Only the live feed has offsets; a replay ignores it.
    Offset { partition: i32, offset: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkMark {
    pub from: ParkFrom,
    pub reason: String,
}

impl ParkMark {
    /// Whether this mark holds an event of sequence `seq`, read at `position` (partition,
    /// offset) when it came from Kafka.
    pub fn holds(&self, seq: i64, position: Option<(i32, i64)>) -> bool {
        match self.from {
            ParkFrom::Sequence(from) => seq >= from,
            ParkFrom::Offset { partition, offset } => match position {
                Some((p, o)) => p != partition || o > offset,
                None => false,
            },
        }
    }
}

/// The parked streams of one projector (and read-model version).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parked {
    marks: HashMap<String, ParkMark>,
}

impl Parked {
    pub fn get(&self, stream: &str) -> Option<&ParkMark> {
        self.marks.get(stream)
    }

    /// The mark holding this event, if any.
    pub fn holding(
        &self,
        stream: &str,
        seq: i64,
        position: Option<(i32, i64)>,
    ) -> Option<&ParkMark> {
        self.marks.get(stream).filter(|m| m.holds(seq, position))
    }

    /// Park `stream` from `from`. A stream already parked keeps its first mark (the earliest
    /// refusal); returns whether anything changed.
    pub fn park(&mut self, stream: &str, from: ParkFrom, reason: &str) -> bool {
        match self.marks.get_mut(stream) {
            Some(existing) => {
                // An earlier sequence wins: a redelivered older refusal moves the mark back.
                if let (ParkFrom::Sequence(new), ParkFrom::Sequence(old)) = (from, existing.from)
                    && new < old
                {
                    existing.from = from;
                    existing.reason = reason.to_owned();
                    return true;
                }
                false
            }
            None => {
                self.marks.insert(
                    stream.to_owned(),
                    ParkMark {
                        from,
                        reason: reason.to_owned(),
                    },
                );
                true
            }
        }
    }

    pub fn unpark(&mut self, stream: &str) -> bool {
        self.marks.remove(stream).is_some()
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &ParkMark)> {
        self.marks.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_mark_holds_that_sequence_and_later_ones() {
        let mut p = Parked::default();
        assert!(p.park("order/o1", ParkFrom::Sequence(3), "bad"));
        assert!(p.holding("order/o1", 2, None).is_none());
        assert!(p.holding("order/o1", 3, None).is_some());
        assert!(p.holding("order/o1", 9, Some((0, 1))).is_some());
        assert!(p.holding("order/o2", 9, None).is_none());
        // A later refusal of a parked stream changes nothing; an earlier one moves the mark.
        assert!(!p.park("order/o1", ParkFrom::Sequence(5), "later"));
        assert!(p.park("order/o1", ParkFrom::Sequence(1), "earlier"));
        assert!(p.holding("order/o1", 1, None).is_some());
    }

    #[test]
    fn an_offset_mark_holds_later_messages_only_and_never_a_replay() {
        let mut p = Parked::default();
        p.park(
            "order/o1",
            ParkFrom::Offset {
                partition: 2,
                offset: 10,
            },
            "unreadable",
        );
        assert!(p.holding("order/o1", 0, Some((2, 10))).is_none());
        assert!(p.holding("order/o1", 0, Some((2, 11))).is_some());
        assert!(p.holding("order/o1", 7, None).is_none());
    }
}
