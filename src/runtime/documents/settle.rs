//! Settle: what a batch's write outcome means for each view, until every view is durable or
//! refused for good.
//!
//! [`Settle`] is the pure state machine (one per batch): written views are durable, refused
//! ones are refused, conflicted ones are reloaded, folded again and written again — with a
//! short pause every [`CAS_ROUNDS`] rounds, and refused after [`CAS_LIMIT`]. The stage's
//! `settle_writes` drives it against the store.

use std::time::Duration;

use projectors::Projector;
use rustc_hash::FxHashSet as HashSet;

use super::{DocStage, Prepared};
use crate::runtime::retry::Retry;
use crate::runtime::stage::Mode;
use crate::runtime::stage::driver::Settled;
use crate::sinks::{DocStore, SinkError, WriteOutcome};

/// Rounds of reload-fold-write for contended views before the batch backs off a little.
pub const CAS_ROUNDS: usize = 10;

/// Rounds after which a view still contended is refused (its streams parked with the
/// reason): about 9 s of backing off, far past a rebalance overlap, so only a writer that
/// never stops (a second deployment writing the same version) gets there.
pub const CAS_LIMIT: usize = 300;

/// What one write round of a batch decided, by index into the batch's views.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Durable now.
    pub durable: Vec<usize>,
    /// Never storable as they are (dead letters, parks).
    pub refused: Vec<(usize, String)>,
    pub next: Next,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Done,
    /// Reload these views, fold them again and write them again, after `pause`.
    Again {
        views: Vec<usize>,
        pause: Option<Duration>,
    },
    /// Contended for too long: refuse these views with the reason.
    GiveUp {
        views: Vec<usize>,
        why: String,
    },
}

/// The compare-and-set rounds of one batch.
#[derive(Debug, Default)]
pub struct Settle {
    rounds: usize,
}

impl Settle {
    /// Judge one write round: `written[i]` is the view written as the round's write `i`.
    pub fn judge(&mut self, written: &[usize], outcome: &WriteOutcome) -> Verdict {
        let conflicted: Vec<usize> = outcome.conflicts.iter().map(|i| written[*i]).collect();
        let refused: Vec<(usize, String)> = outcome
            .refused
            .iter()
            .map(|(i, why)| (written[*i], why.clone()))
            .collect();
        let settled: HashSet<usize> = conflicted
            .iter()
            .copied()
            .chain(refused.iter().map(|r| r.0))
            .collect();
        let durable = written
            .iter()
            .copied()
            .filter(|v| !settled.contains(v))
            .collect();
        let next = if conflicted.is_empty() {
            Next::Done
        } else {
            self.rounds += 1;
            if self.rounds >= CAS_LIMIT {
                Next::GiveUp {
                    views: conflicted,
                    why: format!("still contended after {CAS_LIMIT} compare-and-set rounds"),
                }
            } else {
                // Contended by another worker (a rebalance overlap): let it finish first.
                let pause = self
                    .rounds
                    .is_multiple_of(CAS_ROUNDS)
                    .then(|| Duration::from_millis(20 * (self.rounds / CAS_ROUNDS) as u64));
                Next::Again {
                    views: conflicted,
                    pause,
                }
            }
        };
        Verdict {
            durable,
            refused,
            next,
        }
    }
}

/// The outcome of writing views one at a time, after the whole batch was refused: which of
/// them the store refuses (the permanent error was theirs), which conflicted. `Err` when one
/// failed transiently (the batch is retried; views that landed meanwhile then conflict with
/// themselves and fold to no change).
pub fn merge_single(
    results: Vec<Result<WriteOutcome, SinkError>>,
) -> Result<WriteOutcome, SinkError> {
    let mut merged = WriteOutcome::default();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(o) => {
                if !o.conflicts.is_empty() {
                    merged.conflicts.push(i);
                }
                if let Some((_, why)) = o.refused.into_iter().next() {
                    merged.refused.push((i, why));
                }
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => merged.refused.push((i, e.to_string())),
        }
    }
    Ok(merged)
}

impl<P: Projector, S: DocStore> DocStage<P, S> {
    /// Retry transient failures; isolate a permanent one to the views it belongs to; resolve
    /// conflicts (reload, fold again, write again) and refusals. Returns early, unsettled,
    /// when the pointers moved (the driver writes the batch where they point now).
    pub(super) async fn settle_writes(
        &mut self,
        prep: &mut Prepared,
        mut result: Result<WriteOutcome, SinkError>,
    ) -> Settled {
        let mut retry = Retry::new(&self.ctx.shared, self.ctx.store, "writing views");
        let mut settle = Settle::default();
        loop {
            let written: Vec<usize> = prep.pending();
            let outcome = match result {
                Ok(o) => o,
                Err(e) if !e.is_transient() && written.len() > 1 => {
                    // A permanent error for the batch: find whose it is, one view at a time.
                    tracing::warn!(projection = self.ctx.name, error = %e, views = written.len(),
                        "the store refused the batch: writing its views one at a time");
                    result = self.write_one_by_one(prep, &written).await;
                    continue;
                }
                Err(e) if !e.is_transient() => WriteOutcome {
                    conflicts: Vec::new(),
                    refused: vec![(0, e.to_string())],
                },
                Err(e) => {
                    retry.failed(&e).await;
                    if self.switched(prep).await {
                        // The replaced version (maybe retired) is not retried.
                        return Settled::Switched;
                    }
                    result = self.write_views(prep, &written).await;
                    continue;
                }
            };
            let verdict = settle.judge(&written, &outcome);
            self.durable(prep, &verdict.durable);
            for (v, why) in verdict.refused {
                self.refuse(prep, v, &why);
            }
            let views = match verdict.next {
                Next::Done => return Settled::Done,
                Next::GiveUp { views, why } => {
                    tracing::error!(projection = self.ctx.name, views = views.len(), %why,
                        "another writer never lets go of these views: their streams are parked");
                    for v in views {
                        self.refuse(prep, v, &why);
                    }
                    return Settled::Done;
                }
                Next::Again { views, pause } => {
                    self.ctx
                        .stats
                        .conflicts
                        .fetch_add(views.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                    views
                }
            };
            self.refold_from_store(prep, views).await;
            if self.switched(prep).await {
                return Settled::Switched;
            }
            let written = prep.pending();
            result = self.write_views(prep, &written).await;
        }
    }

    /// Live, whether the pointers (read fresh) name another version than the batch's.
    async fn switched(&self, prep: &Prepared) -> bool {
        self.ctx.mode == Mode::Live && self.ctx.target(true).await != prep.target
    }

    async fn write_one_by_one(
        &mut self,
        prep: &mut Prepared,
        views: &[usize],
    ) -> Result<WriteOutcome, SinkError> {
        let mut results = Vec::with_capacity(views.len());
        for v in views {
            results.push(self.write_views(prep, &[*v]).await);
        }
        merge_single(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(conflicts: &[usize], refused: &[usize]) -> WriteOutcome {
        WriteOutcome {
            conflicts: conflicts.to_vec(),
            refused: refused.iter().map(|i| (*i, "too big".to_owned())).collect(),
        }
    }

    #[test]
    fn a_clean_round_is_durable_and_done() {
        let v = Settle::default().judge(&[3, 5, 8], &outcome(&[], &[]));
        assert_eq!(v.durable, vec![3, 5, 8]);
        assert!(v.refused.is_empty());
        assert_eq!(v.next, Next::Done);
    }

    #[test]
    fn outcomes_index_the_round_not_the_batch() {
        let v = Settle::default().judge(&[3, 5, 8], &outcome(&[2], &[0]));
        assert_eq!(v.durable, vec![5]);
        assert_eq!(v.refused, vec![(3, "too big".to_owned())]);
        assert_eq!(
            v.next,
            Next::Again {
                views: vec![8],
                pause: None
            }
        );
    }

    #[test]
    fn conflicts_pause_every_few_rounds_then_give_up() {
        let mut s = Settle::default();
        let mut pauses = Vec::new();
        for round in 1..CAS_LIMIT {
            match s.judge(&[0], &outcome(&[0], &[])).next {
                Next::Again { pause, .. } => {
                    if let Some(p) = pause {
                        pauses.push((round, p));
                    }
                }
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(pauses[0], (CAS_ROUNDS, Duration::from_millis(20)));
        assert_eq!(pauses[1], (2 * CAS_ROUNDS, Duration::from_millis(40)));
        assert!(matches!(
            s.judge(&[0], &outcome(&[0], &[])).next,
            Next::GiveUp { ref views, .. } if views == &vec![0]
        ));
    }

    #[test]
    fn a_round_without_conflicts_does_not_count() {
        let mut s = Settle::default();
        for _ in 0..CAS_LIMIT * 2 {
            assert_eq!(s.judge(&[0, 1], &outcome(&[], &[1])).next, Next::Done);
        }
    }

    #[test]
    fn single_writes_tell_whose_the_permanent_error_is() {
        let merged = merge_single(vec![
            Ok(WriteOutcome::default()),
            Err(SinkError::permanent("redis", "value too large")),
            Ok(outcome(&[0], &[])),
        ])
        .expect("no transient failure");
        assert_eq!(merged.conflicts, vec![2]);
        assert_eq!(merged.refused.len(), 1);
        assert_eq!(merged.refused[0].0, 1);
        let again = merge_single(vec![
            Err(SinkError::permanent("redis", "x")),
            Err(SinkError::transient("redis", "reset")),
        ]);
        assert!(again.is_err_and(|e| e.is_transient()));
    }
}
