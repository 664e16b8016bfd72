//! The engine alone: decode, route, fold and encode the history in memory, stores that keep
//! nothing.

use std::sync::Arc;
use std::time::Instant;

use contract::EventEnvelope;
use projector::config::Config;
use projector::kafka;
use projector::runtime::RunReport;
use projector::runtime::pipeline::{NullSinks, run_memory};
use projector::source::decode::RawItem;
use projector::source::kafka::RawWindow;
use projector::source::window::{Arena, Origin, RawRef};

use super::rate;

/// The history as raw windows of Kafka messages (value, key, headers), ready for decoding.
pub(super) fn raw_windows(
    cfg: &Config,
    history: &[EventEnvelope],
) -> (Vec<RawWindow>, Arc<Vec<String>>) {
    let topics = Arc::new(kafka::event_topics(&cfg.kafka));
    let size = cfg.worker.window_size.max(1);
    let mut out = Vec::new();
    for (i, chunk) in history.chunks(size).enumerate() {
        let mut arena = Arena::with_capacity(chunk.len() * 600);
        let mut items = Vec::with_capacity(chunk.len());
        for (j, e) in chunk.iter().enumerate() {
            let pairs = contract::RequiredHeaders::for_event(e).pairs();
            let topic = contract::AggregateType::ALL
                .iter()
                .position(|a| *a == e.aggregate_type)
                .unwrap_or(0) as u16;
            let raw = RawRef {
                key: Some(arena.push(e.aggregate_id.as_bytes())),
                payload: Some(arena.push(&e.to_json_bytes())),
                headers: Some(
                    arena.push_headers(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                ),
            };
            items.push(RawItem {
                origin: Origin::Kafka {
                    topic,
                    partition: 0,
                    offset: (i * size + j) as i64,
                    epoch: 0,
                    timestamp_ms: None,
                },
                raw,
            });
        }
        out.push(RawWindow {
            id: i as u64 + 1,
            generation: 0,
            items,
            arena,
            opened: Instant::now(),
        });
    }
    (out, topics)
}

pub(super) async fn engine_alone(
    cfg: &Config,
    history: &[EventEnvelope],
) -> anyhow::Result<(f64, RunReport)> {
    let (windows, topics) = raw_windows(cfg, history);
    let sinks = NullSinks::default();
    // The null stores give nothing back: a view evicted from the cache would be folded again
    // from nothing (and refused). The engine keeps every view, as it did before the cache had
    // a byte budget.
    let mut cfg = cfg.clone();
    cfg.worker.cache_bytes = 1 << 40;
    let (took, report) = run_memory(&cfg, windows, topics, &sinks).await?;
    anyhow::ensure!(
        report.messages == history.len() as u64,
        "the engine lost messages"
    );
    anyhow::ensure!(
        report.dead_letters == 0,
        "the engine refused {} events of a clean history",
        report.dead_letters
    );
    Ok((rate(history.len() as f64, took), report))
}
