//! The one loop every pipelined stage runs (documents and facts): fold batch N+1 while batch
//! N is written, settle N, then write N+1.
//!
//! The loop owns the ordering rules, so each stage only says how to fold, write and settle:
//! - a batch that touches what the batch in flight writes waits for that write to settle
//!   before it is folded (a view is only ever folded onto its settled state);
//! - a batch folded for one version and written after the pointers moved is folded again for
//!   the version they name now (checked after the batch in flight settles, and again just
//!   before the write, because folding may have waited);
//! - after its writes settle, a live batch reads fresh pointers: if the read model was
//!   switched under it, it is folded and written again there before it completes.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Batch, Mode, StageCtx};
use crate::runtime::Window;
use crate::runtime::targets::Target;

/// How a batch's writes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Durable (or refused for good, with its dead letters and parks decided).
    Done,
    /// The pointers moved while the writes were retried: write the batch where they point.
    Switched,
}

/// A stage the driver can run.
pub trait Pipelined: Send {
    /// A batch routed (which events are this stage's), before it is folded.
    type Routed: Send;
    /// A batch folded for one version: the writes to make and what to do once durable.
    type Prepared: Send;
    /// What a write task hands back (the writes, and how they went).
    type Written: Send + 'static;

    fn ctx(&self) -> &StageCtx;

    /// Pure: which events of `batch` are this stage's.
    fn route(&self, batch: Batch) -> Self::Routed;

    /// Whether `routed` touches something `inflight` writes (it must wait for it to settle).
    fn overlaps(&self, _routed: &Self::Routed, _inflight: &Self::Prepared) -> bool {
        false
    }

    /// Fold a routed batch for the version the pointers name.
    fn prepare(&mut self, routed: Self::Routed) -> impl Future<Output = Self::Prepared> + Send;

    /// The version `prepared` was folded for.
    fn target_of(prepared: &Self::Prepared) -> &Target;

    /// The version this stage writes now (`None` before the first batch).
    fn current(&self) -> Option<&Target>;

    /// Back to the routed batch, to fold it again (for another version).
    fn unfold(prepared: Self::Prepared) -> Self::Routed;

    /// Start the batch's writes in a task.
    fn start(&mut self, prepared: &mut Self::Prepared) -> JoinHandle<Self::Written>;

    /// Write the batch now (after a switch), in this task.
    fn write(
        &mut self,
        prepared: &mut Self::Prepared,
    ) -> impl Future<Output = Self::Written> + Send;

    /// A write task that died: a transient failure of all its writes.
    fn died(&self, prepared: &Self::Prepared, e: tokio::task::JoinError) -> Self::Written;

    /// Retry failures, resolve conflicts and refusals, until durable or switched.
    fn settle(
        &mut self,
        prepared: &mut Self::Prepared,
        written: Self::Written,
    ) -> impl Future<Output = Settled> + Send;

    /// Durable: send the batch's dead letters, record its parks, acknowledge it.
    fn complete(&mut self, prepared: Self::Prepared) -> impl Future<Output = ()> + Send;
}

struct InFlight<S: Pipelined> {
    prepared: S::Prepared,
    task: JoinHandle<S::Written>,
}

/// Run `stage` until its input closes; every batch taken is written and acknowledged. When
/// nothing new arrives, the batch in flight is finished (acknowledged) at once.
pub async fn run<S: Pipelined>(mut stage: S, mut rx: mpsc::Receiver<Arc<Window>>) {
    let mut inflight: Option<InFlight<S>> = None;
    loop {
        let first = match inflight.as_mut() {
            None => rx.recv().await,
            Some(f) => tokio::select! {
                // In a fixed order, so a seeded simulation replays exactly.
                biased;
                w = rx.recv() => w,
                r = &mut f.task => {
                    if let Some(f) = inflight.take() {
                        finish(&mut stage, f.prepared, r).await;
                    }
                    continue;
                }
            },
        };
        let Some(first) = first else { break };
        let routed = stage.route(stage.ctx().coalesce(first, &mut rx));
        if let Some(f) = inflight.take_if(|f| stage.overlaps(&routed, &f.prepared)) {
            let r = f.task.await;
            finish(&mut stage, f.prepared, r).await;
        }
        let mut next = stage.prepare(routed).await;
        if let Some(f) = inflight.take() {
            let r = f.task.await;
            finish(&mut stage, f.prepared, r).await;
            if Some(S::target_of(&next)) != stage.current() {
                // The batch in flight moved to another version: fold this one there too.
                next = stage.prepare(S::unfold(next)).await;
            }
        }
        // Folding may have waited (a slow load, the batch in flight settling): the version
        // it was folded for may have been switched and retired meanwhile.
        while stage.ctx().mode == Mode::Live
            && stage.ctx().target(false).await != *S::target_of(&next)
        {
            next = stage.prepare(S::unfold(next)).await;
        }
        let task = stage.start(&mut next);
        inflight = Some(InFlight {
            prepared: next,
            task,
        });
    }
    if let Some(f) = inflight.take() {
        let r = f.task.await;
        finish(&mut stage, f.prepared, r).await;
    }
}

/// Settle a batch's writes; live, check the pointers after them (writing the batch again
/// where they point if it was switched under it); then complete it.
async fn finish<S: Pipelined>(
    stage: &mut S,
    mut prepared: S::Prepared,
    joined: Result<S::Written, tokio::task::JoinError>,
) {
    let mut written = match joined {
        Ok(w) => w,
        Err(e) => stage.died(&prepared, e),
    };
    loop {
        let settled = stage.settle(&mut prepared, written).await;
        if let Mode::Replay { .. } = stage.ctx().mode {
            break;
        }
        // Fresh pointers, read after the writes: hold during a handover.
        let t = stage.ctx().target(true).await;
        if settled == Settled::Done && t == *S::target_of(&prepared) {
            break;
        }
        tracing::info!(projection = stage.ctx().name, from = %S::target_of(&prepared).version,
            to = %t.version, "the read model was switched under a batch: writing it to the new version");
        prepared = stage.prepare(S::unfold(prepared)).await;
        written = stage.write(&mut prepared).await;
    }
    stage.complete(prepared).await;
}
