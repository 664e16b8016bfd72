//! Event times in views, written fast: views are serialised once per write, and chrono's
//! serde goes through `fmt` for every timestamp (a profile of the engine put it at 6 % of all
//! CPU). RFC 3339 with `Z` and always six fraction digits (event times are microseconds), so
//! stored times sort as text (contract version 2); chrono writes anything unusual.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::Serializer;
use serde::ser::SerializeMap;

/// Buffer large enough for `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX: usize = 30;

fn two(buf: &mut [u8], at: usize, v: u32) {
    buf[at] = b'0' + (v / 10) as u8;
    buf[at + 1] = b'0' + (v % 10) as u8;
}

/// The text chrono's serde gives `t`, or `None` when chrono must write it (years outside
/// 0..=9999, leap seconds).
fn format(t: &DateTime<Utc>, buf: &mut [u8; MAX]) -> Option<usize> {
    let year = t.year();
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    let y = year as u32;
    two(buf, 0, y / 100);
    two(buf, 2, y % 100);
    buf[4] = b'-';
    two(buf, 5, t.month());
    buf[7] = b'-';
    two(buf, 8, t.day());
    buf[10] = b'T';
    two(buf, 11, t.hour());
    buf[13] = b':';
    two(buf, 14, t.minute());
    buf[16] = b':';
    two(buf, 17, t.second());
    let mut n = 19;
    let (digits, mut frac) = if nanos.is_multiple_of(1_000) {
        (6, nanos / 1_000)
    } else {
        (9, nanos)
    };
    if digits > 0 {
        buf[n] = b'.';
        for i in (0..digits).rev() {
            buf[n + 1 + i] = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        n += 1 + digits;
    }
    buf[n] = b'Z';
    Some(n + 1)
}

/// What chrono writes for the same format (the slow path, and the reference in tests).
fn slow(t: &DateTime<Utc>) -> String {
    let digits = if t.nanosecond().is_multiple_of(1_000) {
        SecondsFormat::Micros
    } else {
        SecondsFormat::Nanos
    };
    t.to_rfc3339_opts(digits, true)
}

/// The text a view stores for `t`.
pub fn text(t: &DateTime<Utc>) -> String {
    let mut buf = [0u8; MAX];
    match format(t, &mut buf) {
        Some(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        None => slow(t),
    }
}

pub fn ser<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX];
    match format(t, &mut buf) {
        // Only ASCII digits and separators were written.
        Some(n) => s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or_default()),
        None => s.serialize_str(&slow(t)),
    }
}

pub fn ser_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&Fast(t)),
        None => s.serialize_none(),
    }
}

pub fn ser_map<S: Serializer>(
    m: &BTreeMap<String, DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(k, &Fast(v))?;
    }
    map.end()
}

struct Fast<'a>(&'a DateTime<Utc>);

impl serde::Serialize for Fast<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser(self.0, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn writes_exactly_what_chrono_writes(
            secs in -2_208_988_800i64..253_402_300_799, // 1900 .. 9999
            nanos in prop_oneof![Just(0u32), (0u32..1000).prop_map(|m| m * 1_000_000),
                                 (0u32..1_000_000).prop_map(|u| u * 1000), 0u32..1_000_000_000],
        ) {
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            let ours = serde_json::to_string(&Fast(&t)).unwrap();
            prop_assert_eq!(ours, format!("\"{}\"", slow(&t)));
        }

        #[test]
        fn stored_times_sort_as_text_like_the_times(
            a in -2_208_988_800_000_000i64..253_402_300_799_000_000,
            b in -2_208_988_800_000_000i64..253_402_300_799_000_000,
        ) {
            let (ta, tb) = (DateTime::from_timestamp_micros(a).unwrap(), DateTime::from_timestamp_micros(b).unwrap());
            prop_assert_eq!(text(&ta).cmp(&text(&tb)), ta.cmp(&tb));
        }
    }
}
