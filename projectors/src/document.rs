//! The stored document around a view: the view itself plus the idempotence guard (the last
//! sequence applied from each source stream) and a revision for compare-and-set writes.
//! Guard and view are one value, so a store writes them in one atomic operation.

use std::collections::BTreeMap;

use contract::Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Projector, Rejection, ViewError};

/// Last applied `sequence_number` per source stream (`aggregate_type/aggregate_id`).
pub type Guard = BTreeMap<String, i64>;

/// The key of an event's source stream in a [`Guard`].
pub fn stream_key(event: &Event) -> String {
    format!(
        "{}/{}",
        event.envelope.aggregate_type, event.envelope.aggregate_id
    )
}

/// A view as stored: `{...view fields, "_guard": {...}, "_rev": n}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    #[serde(flatten)]
    pub view: serde_json::Map<String, Value>,
    #[serde(rename = "_guard", default)]
    pub guard: Guard,
    /// Bumped on every write; the store's compare-and-set checks it.
    #[serde(rename = "_rev", default)]
    pub rev: i64,
}

/// The result of folding one key's events.
#[derive(Debug)]
pub struct FoldOutcome {
    /// The new document, `None` when no event changed it (all duplicates or rejected).
    pub document: Option<Document>,
    /// Indexes (into the folded slice) of the events skipped as already applied.
    pub duplicates: Vec<usize>,
    /// Events the projector refused, with why.
    pub rejected: Vec<(usize, Rejection)>,
}

pub(crate) fn fold<P: Projector>(
    p: &P,
    current: Option<Document>,
    events: &[&Event],
) -> Result<FoldOutcome, ViewError> {
    let (mut view, mut guard, rev) = match current {
        None => (P::View::default(), Guard::new(), 0),
        Some(doc) => {
            let view = serde_json::from_value(Value::Object(doc.view)).map_err(|e| ViewError {
                projector: p.name(),
                reason: e.to_string(),
            })?;
            (view, doc.guard, doc.rev)
        }
    };
    let mut out = FoldOutcome {
        document: None,
        duplicates: Vec::new(),
        rejected: Vec::new(),
    };
    let mut changed = false;
    for (i, e) in events.iter().enumerate() {
        let stream = stream_key(e);
        let seq = e.envelope.sequence_number;
        if guard.get(&stream).is_some_and(|last| seq <= *last) {
            out.duplicates.push(i);
            continue;
        }
        match p.apply(&mut view, e) {
            Ok(()) => {
                guard.insert(stream, seq);
                changed = true;
            }
            Err(reason) => out.rejected.push((
                i,
                Rejection {
                    projector: p.name(),
                    event_type: e.envelope.event_type.clone(),
                    stream,
                    sequence: seq,
                    reason,
                },
            )),
        }
    }
    if changed {
        let Value::Object(view) = serde_json::to_value(&view).map_err(|e| ViewError {
            projector: p.name(),
            reason: e.to_string(),
        })?
        else {
            return Err(ViewError {
                projector: p.name(),
                reason: "a view must serialise to a JSON object".into(),
            });
        };
        out.document = Some(Document {
            view,
            guard,
            rev: rev + 1,
        });
    }
    Ok(out)
}
