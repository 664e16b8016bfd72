//! An operator's unpark in the middle of a live schedule, as `projector dlq unpark` does it
//! ([`projector::rebuild::unpark_and_replay`]): the park forgotten and the release noted in
//! one step, the stream replayed from the event store into the live version through the real
//! replay, and again once every worker has read the parks afresh, while the workers go on.
//! A worker's parks stay stale for up to `PARKS_REFRESH`, so it holds what arrives of the
//! stream meanwhile; whatever it takes afterwards must not bury what it held.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use contract::Event;
use projector::config::Config;
use projector::rebuild::{Page, replay_pages};
use projector::runtime::commit::Tp;
use projector::runtime::documents::PARKS_REFRESH;
use projector::runtime::stage::Mode;
use projector::store::ReplayPosition;
use tokio::sync::mpsc;

use super::models::SimProjectors;
use super::world::{Shared, SimSinks, lock};

/// A stream parked by unreadable messages that can be unparked now: every copy of its
/// unreadable messages on the wire is committed past, so none is delivered again to park it
/// anew (the fold then holds nothing of it). `msgs`: each partition's messages (log indexes).
pub fn unparkable(
    world: &Shared,
    msgs: &HashMap<Tp, Vec<usize>>,
    topics: &[String],
    poisoned: &std::collections::HashSet<usize>,
    stream_of: impl Fn(usize) -> String,
    parked: &projectors::Parked,
    done: &[String],
) -> Option<String> {
    let w = lock(world);
    let mut candidates: Vec<(String, bool)> = Vec::new();
    for (tp, list) in msgs {
        let committed = w
            .committed
            .get(&(topics[tp.0 as usize].clone(), tp.1))
            .copied()
            .unwrap_or(0);
        for (offset, i) in list.iter().enumerate() {
            if !poisoned.contains(i) {
                continue;
            }
            let stream = stream_of(*i);
            let past = (offset as i64) < committed;
            match candidates.iter_mut().find(|(s, _)| *s == stream) {
                Some(c) => c.1 &= past,
                None => candidates.push((stream, past)),
            }
        }
    }
    candidates.sort();
    candidates
        .into_iter()
        .find(|(s, past)| *past && parked.get(s).is_some() && !done.contains(s))
        .map(|(s, _)| s)
}

/// Unpark `stream` for every projector and replay it twice, as the operator's command does.
pub async fn unpark(
    world: Shared,
    cfg: Config,
    events: Arc<Vec<Event>>,
    stream: String,
    panics: Option<u64>,
    mark: i64,
) {
    {
        let mut w = lock(&world);
        for p in w.parks.values_mut() {
            p.unpark(&stream);
        }
        w.released.push((stream.clone(), mark));
    }
    replay(&world, &cfg, &events, &stream, panics).await;
    tokio::time::sleep(PARKS_REFRESH + Duration::from_secs(2)).await;
    replay(&world, &cfg, &events, &stream, panics).await;
}

/// The stream's stored events into the live version, through the real replay (tried again
/// until it succeeds: the stores may be failing).
async fn replay(world: &Shared, cfg: &Config, events: &[Event], stream: &str, panics: Option<u64>) {
    let page: Page = events
        .iter()
        .enumerate()
        .filter(|(_, e)| projectors::document::stream_key(e) == stream)
        .map(|(i, e)| {
            let at = ReplayPosition {
                transaction_id: i as u64 + 1,
                global_position: i as i64 + 1,
            };
            (at, Ok(e.clone()))
        })
        .collect();
    // In schedules with unreadable messages nothing switches: every projection is live in
    // one version.
    let version = lock(world).pointer("customer360").version;
    for _ in 0..100 {
        let (page_tx, page_rx) = mpsc::channel(1);
        let _ = page_tx.send(page.clone()).await;
        drop(page_tx);
        let mode = Mode::Replay {
            version: version.clone(),
            fresh: false,
        };
        let (env, tracker_rx) = super::replay::replay_env(cfg, world, mode, 1, 1 << 20, 16);
        let (sinks, projectors) = (SimSinks(world.clone()), SimProjectors(panics));
        let mut durable = |_: ReplayPosition, _: u64| {};
        let run = replay_pages(
            env,
            tracker_rx,
            &sinks,
            &projectors,
            ReplayPosition::default(),
            page_rx,
            &mut durable,
        );
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(600), run).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
