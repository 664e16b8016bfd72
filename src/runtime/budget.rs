//! The latency budget: where a message's time goes between publish and visible, step by
//! step, so a slow answer can be traced to the step that took it (issue "Fresh, lean and
//! flat"). Each step is exported as `projector_latency_seconds{step}` (a summary: its
//! quantiles) and kept in-process for the run report and the bench.
//!
//! - `broker`: create time → polled (waiting in the broker and in librdkafka's queues);
//! - `window`: a window opened → closed and handed to decode;
//! - `decode`: decoding one window (on the blocking pool);
//! - `queue`: a window handed to the stages → a stage starts folding it (backpressure);
//! - `load`: loading the views a batch lacks;
//! - `fold`: folding and encoding a batch (without its load);
//! - `write`: a batch's writes sent → durable (retries and conflicts included);
//! - `commit`: a window durable → its offsets committed.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Broker,
    Window,
    Decode,
    Queue,
    Load,
    Fold,
    Write,
    Commit,
}

pub const STEPS: [Step; 8] = [
    Step::Broker,
    Step::Window,
    Step::Decode,
    Step::Queue,
    Step::Load,
    Step::Fold,
    Step::Write,
    Step::Commit,
];

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Broker => "broker",
            Step::Window => "window",
            Step::Decode => "decode",
            Step::Queue => "queue",
            Step::Load => "load",
            Step::Fold => "fold",
            Step::Write => "write",
            Step::Commit => "commit",
        }
    }
}

/// One step's figures over the run, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLatency {
    pub step: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn histograms() -> &'static Mutex<Vec<Histogram<u64>>> {
    static H: OnceLock<Mutex<Vec<Histogram<u64>>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(STEPS.iter().map(|_| new_histogram()).collect()))
}

/// Record `d` spent in `step`.
pub fn record(step: Step, d: Duration) {
    metrics::histogram!("projector_latency_seconds", "step" => step.name()).record(d.as_secs_f64());
    let mut h = histograms().lock().unwrap_or_else(|e| e.into_inner());
    let i = STEPS.iter().position(|s| *s == step).unwrap_or(0);
    let _ = h[i].record(micros(d));
}

/// The `write` step of one store, kept beside the step: which store makes a slow write.
fn store_writes() -> &'static Mutex<BTreeMap<&'static str, Histogram<u64>>> {
    static H: OnceLock<Mutex<BTreeMap<&'static str, Histogram<u64>>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, up to an hour, 3 significant figures.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 3_600_000_000)
}

/// Record a batch's write to `store` (the `write` step, and that store's share of it).
pub fn record_write(store: &'static str, d: Duration) {
    record(Step::Write, d);
    let mut h = store_writes().lock().unwrap_or_else(|e| e.into_inner());
    let _ = h
        .entry(store)
        .or_insert_with(new_histogram)
        .record(micros(d));
}

fn latency(step: String, h: &Histogram<u64>) -> StepLatency {
    StepLatency {
        step,
        count: h.len(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// Every step recorded so far; after `write`, each store's writes (`write redis`, ...).
pub fn snapshot() -> Vec<StepLatency> {
    let h = histograms().lock().unwrap_or_else(|e| e.into_inner());
    let stores = store_writes().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    for (s, h) in STEPS.iter().zip(h.iter()) {
        if !h.is_empty() {
            out.push(latency(s.name().to_owned(), h));
        }
        if *s == Step::Write {
            out.extend(
                stores
                    .iter()
                    .map(|(store, h)| latency(format!("write {store}"), h)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_reports_its_quantiles_in_milliseconds() {
        for ms in 1..=100 {
            record(Step::Commit, Duration::from_millis(ms));
        }
        let s = snapshot();
        let c = s.iter().find(|s| s.step == "commit").expect("recorded");
        assert!(c.count >= 100);
        assert!((49.0..=51.0).contains(&c.p50_ms), "{c:?}");
        assert!(c.max_ms >= 100.0);
    }

    #[test]
    fn a_write_is_also_counted_for_its_store() {
        record_write("budget-test-store", Duration::from_millis(7));
        let s = snapshot();
        let w = s.iter().position(|s| s.step == "write").expect("the step");
        let st = s
            .iter()
            .position(|s| s.step == "write budget-test-store")
            .expect("the store's row");
        assert!(st > w, "the store's row follows the step: {s:?}");
        assert!((6.9..=7.1).contains(&s[st].p50_ms), "{s:?}");
    }
}
