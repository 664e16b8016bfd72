//! Trace spans, per window and per store call, never per event (the hot path carries
//! ~20k events/s):
//!
//! ```text
//! window        one per window: decoded → durable in every stage (closes when the last stage
//!   │           drops it); partitions with first..last offsets, events, sampled event and
//!   │           correlation ids
//!   └─ stage    one per stage batch (coalesced windows: parent is the first, links to the
//!        │      rest); projection, store, shard, version, events handled, written, letters
//!        ├─ store.load   views a document stage reads first
//!        └─ store.write  store, version, location, documents or rows, outcome
//! ```
//!
//! Spans are for traces only (logs stay as they were): with no OTLP endpoint they are
//! disabled, and their fields are never computed. Every event's ids can be logged instead,
//! as `trace`-level events: `RUST_LOG=info,projector::runtime::spans=trace`.

use std::fmt::Write as _;
use std::sync::Arc;

use tracing::Span;
use tracing::field::Empty;

use crate::sinks::{SinkError, WriteOutcome};
use crate::source::window::{Origin, Window};

/// The target of every span made here.
pub const TARGET: &str = module_path!();

/// Ids kept per window span: a window holds thousands of events, and a span's attributes are
/// held in memory until it closes and then exported whole, so only a bounded sample fits.
const SAMPLE: usize = 5;
/// Events looked at for distinct correlation ids (each one's metadata is parsed).
const CORRELATION_SCAN: usize = 64;

/// The span of a window (fields recorded only when it is enabled).
pub fn window(w: &Window) -> Span {
    // A root: one trace per window.
    let span = tracing::info_span!(
        parent: None,
        "window",
        window = w.id,
        messages = w.items.len(),
        events = Empty,
        poison = Empty,
        partitions = Empty,
        event_ids = Empty,
        correlation_ids = Empty,
    );
    if tracing::enabled!(tracing::Level::TRACE) {
        for (i, e) in w.events() {
            let (partition, offset) = w.items[i].origin.position().unwrap_or((-1, -1));
            let meta = &e.header.metadata;
            tracing::trace!(
                parent: &span,
                window = w.id,
                event_id = %e.header.event_id,
                correlation_id = meta.get_str("correlation_id").as_deref(),
                causation_id = meta.get_str("causation_id").as_deref(),
                event_type = %e.header.event_type,
                partition,
                offset,
                "event"
            );
        }
    }
    if span.is_disabled() {
        return span;
    }
    let events = w.events().count();
    span.record("events", events);
    span.record("poison", w.items.len() - events);
    span.record("partitions", partitions(w).as_str());
    let ids: Vec<String> = w
        .events()
        .take(SAMPLE)
        .map(|(_, e)| e.header.event_id.to_string())
        .collect();
    span.record("event_ids", sample(&ids, events).as_str());
    let mut correlations: Vec<String> = Vec::new();
    for (_, e) in w.events().take(CORRELATION_SCAN) {
        if let Some(c) = e.header.metadata.get_str("correlation_id")
            && !correlations.contains(&c)
        {
            correlations.push(c);
            if correlations.len() == SAMPLE {
                break;
            }
        }
    }
    span.record("correlation_ids", correlations.join(" ").as_str());
    span
}

/// `ids` (the first of `total`), and how many more there are.
fn sample(ids: &[String], total: usize) -> String {
    let mut s = ids.join(" ");
    if total > ids.len() {
        let _ = write!(s, " (+{} more)", total - ids.len());
    }
    s
}

/// Each partition of the window with its first and last offset, in order of appearance:
/// `events.order/3:120..245 events.customer/0:77..80` (a replay: `event-store:<positions>`).
fn partitions(w: &Window) -> String {
    let mut ranges: Vec<((u16, i32), i64, i64)> = Vec::new();
    let mut replay: Option<(i64, i64)> = None;
    let mut filled = 0usize;
    for it in &w.items {
        match it.origin {
            Origin::Kafka {
                topic,
                partition,
                offset,
                ..
            } => match ranges.iter_mut().find(|r| r.0 == (topic, partition)) {
                Some(r) => {
                    r.1 = r.1.min(offset);
                    r.2 = r.2.max(offset);
                }
                None => ranges.push(((topic, partition), offset, offset)),
            },
            Origin::Replay { position } => {
                let p = position.global_position;
                replay = Some(replay.map_or((p, p), |(a, b)| (a.min(p), b.max(p))));
            }
            Origin::Gap { .. } => filled += 1,
        }
    }
    let mut s = String::new();
    for ((topic, partition), first, last) in ranges {
        let name = w.topics.get(topic as usize).map_or("?", String::as_str);
        let _ = write!(s, "{}{name}/{partition}:{first}..{last}", sep(&s));
    }
    if let Some((first, last)) = replay {
        let _ = write!(s, "{}event-store:{first}..{last}", sep(&s));
    }
    if filled > 0 {
        let _ = write!(s, "{}gaps-filled:{filled}", sep(&s));
    }
    s
}

fn sep(s: &str) -> &'static str {
    if s.is_empty() { "" } else { " " }
}

/// The span of a stage's batch: a child of its first window, linked to the others.
pub fn stage(projection: &'static str, store: &'static str, windows: &[Arc<Window>]) -> Span {
    let Some(first) = windows.first() else {
        return Span::none();
    };
    let span = tracing::info_span!(
        parent: &first.span,
        "stage",
        projection,
        store,
        window = first.id,
        windows = windows.len(),
        shard = Empty,
        version = Empty,
        events = Empty,
        written = Empty,
        letters = Empty,
    );
    if !span.is_disabled() {
        for w in &windows[1..] {
            span.follows_from(&w.span);
        }
    }
    span
}

/// A write of `documents` views into a document store.
pub fn doc_write(
    parent: &Span,
    store: &'static str,
    version: &str,
    location: &str,
    documents: usize,
) -> Span {
    tracing::info_span!(
        parent: parent,
        "store.write",
        store,
        version,
        location,
        documents,
        outcome = Empty,
        conflicts = Empty,
        refused = Empty,
        error = Empty,
        otel.status_code = Empty,
    )
}

/// What a document write did.
pub fn doc_written(span: &Span, r: &Result<WriteOutcome, SinkError>) {
    match r {
        Ok(o) => {
            let outcome = match (o.conflicts.is_empty(), o.refused.is_empty()) {
                (true, true) => "ok",
                (false, _) => "conflicts",
                (true, false) => "refused",
            };
            span.record("outcome", outcome);
            span.record("conflicts", o.conflicts.len());
            span.record("refused", o.refused.len());
        }
        Err(e) => failed(span, e),
    }
}

/// An insert of `rows` fact rows.
pub fn fact_write(
    parent: &Span,
    store: &'static str,
    version: &str,
    location: &str,
    rows: usize,
) -> Span {
    tracing::info_span!(
        parent: parent,
        "store.write",
        store,
        version,
        location,
        rows,
        outcome = Empty,
        error = Empty,
        otel.status_code = Empty,
    )
}

/// A read of `documents` views a document stage needs before folding.
pub fn doc_load(
    parent: &Span,
    store: &'static str,
    version: &str,
    location: &str,
    documents: usize,
) -> Span {
    tracing::info_span!(
        parent: parent,
        "store.load",
        store,
        version,
        location,
        documents,
        outcome = Empty,
        error = Empty,
        otel.status_code = Empty,
    )
}

/// What a load or a fact insert did (a document write says more: [`doc_written`]).
pub fn finished<T>(span: &Span, r: &Result<T, SinkError>) {
    match r {
        Ok(_) => {
            span.record("outcome", "ok");
        }
        Err(e) => failed(span, e),
    }
}

fn failed(span: &Span, e: &SinkError) {
    let outcome = if e.is_transient() {
        "transient error"
    } else {
        "permanent error"
    };
    span.record("outcome", outcome);
    span.record("error", tracing::field::display(e));
    span.record("otel.status_code", "ERROR");
}
