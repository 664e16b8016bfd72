//! A rebuild through the real replay ([`projector::rebuild::replay_pages`]): the stored log
//! paged into the stages in replay mode, their cache too small for what they wrote (views
//! evicted and read back, a fresh replay's set of written keys given up), stored rows that
//! break the contract, projectors that panic, store and PostgreSQL faults, and crashes: an
//! attempt stopped at a drawn instant (its stages and tracker with it) and resumed from a
//! durable position it reported, as `rebuild` resumes from its checkpoint (the first one
//! saved before anything is written). The version built must equal the pure fold of the log.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use contract::{ContractError, Event, EventEnvelope};
use projector::config::Config;
use projector::rebuild::{Page, replay_pages};
use projector::runtime::commit::TrackerMsg;
use projector::runtime::pipeline::StageEnv;
use projector::runtime::stage::Mode;
use projector::store::ReplayPosition;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use super::models::{self, SimProjectors};
use super::run::{Exempt, Outcome, check, on_a_paused_clock, trace_if_asked};
use super::world::{Faults, Pointer, Shared, SimControl, SimSinks, World, lock};

/// The version the rebuild writes.
const VERSION: &str = "r1";

/// One rebuild schedule on a paused clock of its own.
pub fn run_replay(seed: u64) -> Outcome {
    trace_if_asked();
    on_a_paused_clock(seed, schedule(seed))
}

/// The knobs of one rebuild, all drawn from its seed.
#[derive(Debug)]
struct Plan {
    events: usize,
    /// Events per window (the checkpoint interval) and per page read.
    window: usize,
    page: usize,
    shards: usize,
    /// Bytes of views cached, all document stages together.
    cache: usize,
    crashes: usize,
    corrupt: f64,
    panics: Option<u64>,
    faults: Faults,
}

impl Plan {
    fn draw(rng: &mut ChaCha8Rng) -> Plan {
        Plan {
            events: rng.random_range(8..160),
            window: rng.random_range(1..=40),
            page: rng.random_range(1..=50),
            shards: rng.random_range(1..=2),
            // From nothing (every view read back, the written keys given up at once) to
            // about 40 small views.
            cache: rng.random_range(0..=40) * 700,
            crashes: rng.random_range(0..=3),
            corrupt: if rng.random_bool(0.25) {
                rng.random_range(0.0..0.1)
            } else {
                0.0
            },
            panics: rng.random_bool(0.2).then(|| rng.random()),
            faults: Faults::draw(rng),
        }
    }
}

/// The event at `i` stored at position `i + 1` (one transaction each).
fn position(i: usize) -> ReplayPosition {
    ReplayPosition {
        transaction_id: i as u64 + 1,
        global_position: i as i64 + 1,
    }
}

/// The stored rows after the `start` first, as the event store pages them.
fn pages(events: &[Event], corrupt: &HashSet<usize>, start: usize, page: usize) -> Vec<Page> {
    let rows: Page = events
        .iter()
        .enumerate()
        .skip(start)
        .map(|(i, e)| {
            let row = if corrupt.contains(&i) {
                Err((
                    projectors::document::stream_key(e),
                    e.header.sequence_number,
                    ContractError::InvalidJson {
                        reason: "sim: a stored row that breaks the contract".into(),
                    },
                ))
            } else {
                Ok(e.clone())
            };
            (position(i), row)
        })
        .collect();
    let mut out = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        out.push(rows.by_ref().take(page.max(1)).collect());
    }
    out
}

/// The stages' environment of a replay into the simulated world (its tracker's receiver
/// beside it): this rebuild's, and an unpark's ([`super::unpark`]).
pub fn replay_env(
    cfg: &Config,
    world: &Shared,
    mode: Mode,
    shards: usize,
    cache_bytes: usize,
    max_batch: usize,
) -> (StageEnv, mpsc::UnboundedReceiver<TrackerMsg>) {
    let (tracker_tx, tracker_rx) = mpsc::unbounded_channel();
    let env = StageEnv {
        cfg: cfg.clone(),
        shared: Default::default(),
        tracker: tracker_tx,
        control: Arc::new(SimControl(world.clone())),
        mode,
        only: Vec::new(),
        shards,
        cache_bytes,
        max_batch,
    };
    (env, tracker_rx)
}

async fn schedule(seed: u64) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5245_504c_4159);
    let plan = Plan::draw(&mut rng);
    let events: Vec<Event> = projector::generator::history::History::new(seed, "p")
        .take(plan.events)
        .filter_map(|e: EventEnvelope| e.into_event().ok())
        .collect();
    let corrupt: HashSet<usize> = (0..events.len())
        .filter(|_| rng.random_bool(plan.corrupt))
        .collect();
    // A row that breaks the contract parks its stream from there, for every projector.
    let mut pre = projectors::Parked::default();
    for (i, e) in events.iter().enumerate() {
        if corrupt.contains(&i) {
            let from = projectors::parking::ParkFrom::Sequence(e.header.sequence_number);
            pre.park(&projectors::document::stream_key(e), from, "corrupt");
        }
    }
    static CFG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    let cfg = CFG
        .get_or_init(|| Config::load_for_tests().unwrap_or_else(|e| panic!("config: {e}")))
        .clone();
    let models = models::models(plan.panics);
    let world = Arc::new(Mutex::new(World::new(seed, plan.faults)));
    for m in &models {
        lock(&world).projection_of.insert(m.store, m.name);
    }
    let mut out = Outcome::default();
    // The checkpoint: events before it are durable in every projection.
    let mut checkpoint: Option<usize> = None;
    let mut attempts = Vec::new();
    for attempt in 0..=plan.crashes {
        let fresh = checkpoint.is_none();
        // `rebuild` saves a new version's first checkpoint before it writes anything.
        let start = *checkpoint.get_or_insert(0);
        let (page_tx, page_rx) = mpsc::channel(2);
        let feed = pages(&events, &corrupt, start, plan.page);
        let feeder = tokio::spawn(async move {
            for p in feed {
                if page_tx.send(p).await.is_err() {
                    break;
                }
            }
        });
        let (env, tracker_rx) = replay_env(
            &cfg,
            &world,
            Mode::Replay {
                version: VERSION.into(),
                fresh,
            },
            plan.shards,
            plan.cache,
            plan.window,
        );
        let reported: Arc<Mutex<Vec<usize>>> = Arc::default();
        let r = reported.clone();
        let mut durable = move |p: ReplayPosition, _: u64| {
            r.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(p.global_position as usize);
        };
        let before = start.checked_sub(1).map(position).unwrap_or_default();
        let (sinks, projectors) = (SimSinks(world.clone()), SimProjectors(plan.panics));
        let run = replay_pages(
            env,
            tracker_rx,
            &sinks,
            &projectors,
            before,
            page_rx,
            &mut durable,
        );
        let last = attempt == plan.crashes;
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "[{:?}] attempt {attempt}: fresh {fresh}, from event {start}",
                tokio::time::Instant::now()
            );
        }
        let limit = if last {
            Duration::from_secs(3_600)
        } else {
            Duration::from_millis(rng.random_range(0..2_000))
        };
        let outcome = tokio::time::timeout(limit, run).await;
        feeder.abort();
        let reported = reported.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (last, outcome) {
            (true, Ok(Ok((_, n)))) if n as usize + start != events.len() => out.failures.push(
                format!("the replay read {n} events after {start}, not the rest"),
            ),
            (true, Ok(Err(e))) => out.failures.push(format!("the replay failed: {e}")),
            (true, Err(_)) => out.failures.push("the replay stalled for an hour".into()),
            _ => {}
        }
        if last {
            // Finished: the durable positions end at the last event.
            if !events.is_empty() && start < events.len() && reported.last() != Some(&events.len())
            {
                out.failures.push(format!(
                    "the replay finished, durable only up to {:?} of {}",
                    reported.last(),
                    events.len()
                ));
            }
        } else if !reported.is_empty() {
            // The checkpoint saved: the newest durable position or, saved less often, an
            // earlier one of this attempt.
            let i = if rng.random_bool(0.7) {
                reported.len() - 1
            } else {
                rng.random_range(0..reported.len())
            };
            checkpoint = Some(reported[i]);
        }
        attempts.push(format!(
            "{}{start}{}",
            if fresh { "fresh from " } else { "from " },
            if last { "" } else { " (crashed)" }
        ));
    }
    {
        // Readers switched to the version built.
        let mut w = lock(&world);
        for m in &models {
            w.pointers.insert(
                m.name.to_owned(),
                Pointer {
                    version: VERSION.into(),
                    epoch: 1,
                    switching: false,
                },
            );
        }
    }
    let none = Exempt {
        view: None,
        fact_stream: None,
    };
    check(&world, &events, &models, &none, &pre, &mut out);
    out.summary = format!(
        "{plan:?}; {} corrupt rows; attempts: {}",
        corrupt.len(),
        attempts.join(", ")
    );
    out
}
