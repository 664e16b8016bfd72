//! The poison stage: messages nobody can read (bad bytes, bad JSON, a payload that breaks the
//! contract, missing or contradicting headers) go to the dead-letter topic with their reason,
//! and their stream is parked for every projector, before the window is acknowledged.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::Instrument;

use super::parking::{ANY, ParkRecord};
use super::stage::{Batch, StageCtx};
use crate::resilience::dead_letter::DeadLetter;

pub async fn run(ctx: StageCtx, mut rx: mpsc::Receiver<Arc<super::Window>>) {
    while let Some(batch) = ctx.recv(&mut rx).await {
        handle(&ctx, &batch).await;
        ctx.ack(&batch);
    }
}

async fn handle(ctx: &StageCtx, batch: &Batch) {
    let mut letters = Vec::new();
    let mut parks = Vec::new();
    for w in &batch.windows {
        for item in &w.items {
            let Err(p) = &item.decoded else { continue };
            letters.extend(DeadLetter::of(
                w,
                item,
                p.error.kind(),
                p.error.to_string(),
                None,
            ));
            let from = p.park_from(&item.origin);
            if let (Some(stream), Some(from)) = (&p.stream, from) {
                parks.push(ParkRecord {
                    projection: ANY.into(),
                    version: ANY.into(),
                    stream: stream.clone(),
                    from,
                    reason: p.error.to_string(),
                });
            }
        }
    }
    batch.span.record("letters", letters.len());
    ctx.send_letters(letters)
        .instrument(batch.span.clone())
        .await;
    ctx.save_parks(&parks).instrument(batch.span.clone()).await;
    if let Some(last) = batch.windows.last() {
        ctx.shared
            .poison_saved
            .fetch_max(last.id, std::sync::atomic::Ordering::Release);
    }
}
