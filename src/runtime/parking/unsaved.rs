//! Parks a stage knows of that the park table may not have yet.
//!
//! A stage parks a stream the moment it refuses an event (later events of the stream in the
//! same batch are held at once), but the table only has the park once the batch completes;
//! an unreadable message's park is recorded by the poison stage, in window order, on its own
//! schedule. A stage that reads the table in between (a rebalance, the periodic refresh)
//! must not lose those parks, or it would apply a held stream's later events out of order.
//! Keeping them forever is wrong too: an operator's unpark would not stick.
//!
//! So each one is kept exactly until the table has it — a stage's own until the stage has
//! recorded its window's parks ([`Unsaved::saved`]), an unreadable message's until the poison
//! stage has recorded its window (`poison_saved`) — and merged into every fresh read of the
//! table. The table must be read after `poison_saved` was: whatever the poison stage
//! recorded up to there is in it.

use projectors::Parked;
use projectors::parking::ParkFrom;

use super::ParkRecord;

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    window: u64,
    /// From an unreadable message (the poison stage records it, for every version).
    poison: bool,
    /// The version a stage's own park is for.
    version: String,
    stream: String,
    from: ParkFrom,
    reason: String,
}

#[derive(Debug, Default)]
pub struct Unsaved {
    entries: Vec<Entry>,
    /// The newest window whose parks this stage has recorded.
    saved_upto: u64,
}

impl Unsaved {
    /// A stage refused an event of window `window`: `r.stream` is held at once in `parked`;
    /// if that is a new mark, it is kept here until the table has it, and the record to save
    /// with the batch is returned.
    pub fn park(&mut self, parked: &mut Parked, window: u64, r: ParkRecord) -> Option<ParkRecord> {
        if !parked.park(&r.stream, r.from, &r.reason) {
            return None;
        }
        self.own(window, &r.version, &r.stream, r.from, &r.reason);
        Some(r)
    }

    /// This stage parked `stream` of `version` while handling window `window`.
    pub fn own(&mut self, window: u64, version: &str, stream: &str, from: ParkFrom, why: &str) {
        self.push(window, false, version, stream, from, why);
    }

    /// An unreadable message of window `window` parks `stream` (for every version).
    pub fn poison(&mut self, window: u64, stream: &str, from: ParkFrom, why: &str) {
        self.push(window, true, "", stream, from, why);
    }

    fn push(
        &mut self,
        window: u64,
        poison: bool,
        version: &str,
        stream: &str,
        from: ParkFrom,
        why: &str,
    ) {
        self.entries.push(Entry {
            window,
            poison,
            version: version.to_owned(),
            stream: stream.to_owned(),
            from,
            reason: why.to_owned(),
        });
    }

    /// This stage has recorded the parks of every window up to `window` (batches complete in
    /// window order).
    pub fn saved(&mut self, window: u64) {
        self.saved_upto = self.saved_upto.max(window);
        let upto = self.saved_upto;
        self.entries.retain(|e| e.poison || e.window > upto);
    }

    /// `parked`, just read from the table for `version` after `poison_saved` was read, plus
    /// what the table may not have yet; drops what it has.
    pub fn merge_into(&mut self, parked: &mut Parked, version: &str, poison_saved: u64) {
        let own_saved = self.saved_upto;
        self.entries
            .retain(|e| e.window > if e.poison { poison_saved } else { own_saved });
        for e in &self.entries {
            if e.poison || e.version == version {
                parked.park(&e.stream, e.from, &e.reason);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(u: &mut Unsaved, version: &str, poison_saved: u64) -> Vec<String> {
        let mut p = Parked::default();
        u.merge_into(&mut p, version, poison_saved);
        p.iter().map(|(s, _)| s.to_owned()).collect()
    }

    #[test]
    fn an_own_park_is_kept_until_its_window_is_saved() {
        let mut u = Unsaved::default();
        u.own(5, "v1", "order/o1", ParkFrom::Sequence(2), "refused");
        assert_eq!(
            merged(&mut u, "v1", 0),
            ["order/o1"],
            "not in the table yet"
        );
        u.saved(4);
        assert_eq!(
            merged(&mut u, "v1", 0),
            ["order/o1"],
            "an earlier window saved"
        );
        u.saved(5);
        assert!(
            merged(&mut u, "v1", 0).is_empty(),
            "the table has it: an unpark sticks"
        );
        assert!(u.is_empty());
    }

    #[test]
    fn a_poison_park_is_kept_until_the_poison_stage_recorded_its_window() {
        let mut u = Unsaved::default();
        u.poison(7, "customer/c1", ParkFrom::Sequence(0), "unreadable");
        u.saved(100);
        assert_eq!(
            merged(&mut u, "v1", 6),
            ["customer/c1"],
            "this stage saving is not enough"
        );
        assert_eq!(
            merged(&mut u, "v2", 6),
            ["customer/c1"],
            "for every version"
        );
        assert!(merged(&mut u, "v1", 7).is_empty());
    }

    #[test]
    fn a_park_is_recorded_once_and_held_at_once() {
        let mut u = Unsaved::default();
        let mut parked = Parked::default();
        let r = ParkRecord {
            projection: "order_view".into(),
            version: "v1".into(),
            stream: "order/o1".into(),
            from: ParkFrom::Sequence(4),
            reason: "refused".into(),
        };
        assert_eq!(u.park(&mut parked, 9, r.clone()), Some(r.clone()));
        assert!(
            parked.holding("order/o1", 5, None).is_some(),
            "held at once"
        );
        assert_eq!(
            u.park(&mut parked, 9, r),
            None,
            "the same mark again is not new"
        );
        assert_eq!(u.len(), 1);
    }

    #[test]
    fn own_parks_apply_to_their_version_only() {
        let mut u = Unsaved::default();
        u.own(3, "v1", "order/o1", ParkFrom::Sequence(1), "refused");
        assert!(merged(&mut u, "v2", 0).is_empty());
        assert_eq!(merged(&mut u, "v1", 0), ["order/o1"]);
        assert_eq!(u.len(), 1);
    }
}
