//! A member's assignment as the group coordinator holds it: the bytes of Kafka's consumer
//! protocol `Assignment` (DescribeGroups answers them opaque), parsed into partitions.
//!
//! Layout (every version so far): version int16, then an array (int32 count) of
//! { topic: string (int16 length + UTF-8), partitions: array (int32 count) of int32 },
//! then user data (int32 length, -1 for null), which is ignored.

use std::collections::BTreeSet;

/// (topic, partition)
pub type TopicPartition = (String, i32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    #[error("assignment bytes end early at byte {0}")]
    Truncated(usize),
    #[error("assignment has a negative count or length at byte {0}")]
    Negative(usize),
    #[error("assignment topic name is not UTF-8")]
    Utf8,
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], AssignmentError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(AssignmentError::Truncated(self.at))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn i16(&mut self) -> Result<i16, AssignmentError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, AssignmentError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn count(&mut self) -> Result<usize, AssignmentError> {
        let at = self.at;
        usize::try_from(self.i32()?).map_err(|_| AssignmentError::Negative(at))
    }
}

/// The partitions an `Assignment` names. Empty bytes (a member not assigned yet) are none.
pub fn parse(bytes: &[u8]) -> Result<BTreeSet<TopicPartition>, AssignmentError> {
    let mut out = BTreeSet::new();
    if bytes.is_empty() {
        return Ok(out);
    }
    let mut r = Reader { buf: bytes, at: 0 };
    let _version = r.i16()?;
    let topics = r.count()?;
    for _ in 0..topics {
        let at = r.at;
        let len = usize::try_from(r.i16()?).map_err(|_| AssignmentError::Negative(at))?;
        let topic = std::str::from_utf8(r.take(len)?)
            .map_err(|_| AssignmentError::Utf8)?
            .to_owned();
        let n = r.count()?;
        for _ in 0..n {
            out.insert((topic.clone(), r.i32()?));
        }
    }
    Ok(out)
}

/// The bytes of an `Assignment` (version 1, no user data): the tests' side of `parse`.
pub fn encode(parts: &BTreeSet<TopicPartition>) -> Vec<u8> {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for (t, p) in parts {
        by_topic.entry(t).or_default().push(*p);
    }
    let mut b = Vec::new();
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(by_topic.len() as i32).to_be_bytes());
    for (t, ps) in by_topic {
        b.extend_from_slice(&(t.len() as i16).to_be_bytes());
        b.extend_from_slice(t.as_bytes());
        b.extend_from_slice(&(ps.len() as i32).to_be_bytes());
        for p in ps {
            b.extend_from_slice(&p.to_be_bytes());
        }
    }
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_bytes_are_no_partitions() {
        assert_eq!(parse(&[]).unwrap(), BTreeSet::new());
    }

    #[test]
    fn a_known_assignment() {
        // version 0, one topic "t" with partitions 0 and 2, user data of 2 bytes
        let bytes = [
            0, 0, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 9, 9,
        ];
        let got = parse(&bytes).unwrap();
        assert_eq!(
            got,
            [("t".into(), 0), ("t".into(), 2)].into_iter().collect()
        );
    }

    #[test]
    fn truncated_and_negative_are_errors() {
        let full = encode(&[("events.order".into(), 3)].into_iter().collect());
        for cut in 1..full.len() - 4 {
            assert!(parse(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut neg = full.clone();
        neg[2..6].copy_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(parse(&neg), Err(AssignmentError::Negative(2)));
    }

    proptest! {
        #[test]
        fn encode_then_parse(parts in proptest::collection::btree_set(("[a-z.]{1,12}", 0i32..64), 0..40)) {
            prop_assert_eq!(parse(&encode(&parts)).unwrap(), parts);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }
    }
}
