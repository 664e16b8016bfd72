//! One schedule: a seeded log published with duplicates, one or two workers running the real
//! stages and commit tracker on a paused clock, and, at random instants, partitions moved
//! (with and without overlap), workers crashed and restarted under the same id, versions
//! switched and retired, and stores failing, hanging or losing replies. Then the properties.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contract::{Event, EventEnvelope};
use projector::config::Config;
use projector::runtime::Shared as Runtime;
use projector::runtime::commit::{Registration, Tp, Tracker, TrackerMsg};
use projector::runtime::pipeline::{StageEnv, spawn_stages_of};
use projector::runtime::stage::Mode;
use projector::source::decode::{RawItem, decode_all};
use projector::source::sequence::{MemoryEvents, Positions, Sequencing};
use projector::source::window::{Arena, Origin, RawRef, Window};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::models::{self, Model, comparable_whole};
use super::world::{
    Faults, Pointer, Shared, SimCommit, SimControl, SimPositions, SimSinks, World, lock, rate,
};

/// What a schedule found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub failures: Vec<String>,
    pub summary: String,
    /// The kinds of every dead letter sent.
    pub letter_kinds: Vec<String>,
}

/// The knobs of one schedule, all drawn from its seed.
#[derive(Debug, Clone)]
struct Plan {
    events: usize,
    partitions: i32,
    workers: usize,
    shards: usize,
    cache: usize,
    max_batch: usize,
    window: usize,
    dup: f64,
    /// Lost on the wire / swapped with the stream's next event, in any schedule (with crashes
    /// and moves too: a stream first seen after a restart or a reassignment starts from its
    /// durable position).
    loss: f64,
    swap: f64,
    action: f64,
    switches: usize,
    faults: Faults,
    /// Projectors panic on some events (see [`models::Panicky`]); drawn apart from the rest,
    /// so adding it kept every seed's schedule.
    panics: Option<u64>,
    /// Messages published unreadable (garbage bytes, headers intact), in schedules without
    /// losses, swaps or switches: a rebuild reads the stored event, which is readable, so
    /// with a switch live and rebuilt versions would rightly differ. Drawn apart too.
    poison: f64,
}

impl Plan {
    fn draw(rng: &mut ChaCha8Rng) -> Plan {
        let lossy = rng.random_bool(0.3);
        let mut plan = Plan {
            events: rng.random_range(8..48),
            partitions: rng.random_range(1..=3),
            workers: rng.random_range(1..=2),
            shards: rng.random_range(1..=2),
            cache: rng.random_range(1..=48),
            max_batch: rng.random_range(1..=24),
            window: rng.random_range(1..=8),
            dup: rate(rng, 0.15),
            loss: 0.0,
            swap: 0.0,
            action: rate(rng, 0.12),
            switches: rng.random_range(0..=2),
            faults: Faults::draw(rng),
            panics: None,
            poison: 0.0,
        };
        if lossy {
            plan.loss = rng.random_range(0.0..0.15);
            plan.swap = rng.random_range(0.0..0.15);
        }
        plan
    }
}

/// The wire: every partition's messages (indices into the log), revealed as published.
#[derive(Default)]
struct Wire {
    msgs: HashMap<Tp, Vec<usize>>,
    visible: HashMap<Tp, usize>,
}

type WireRef = Arc<std::sync::Mutex<Wire>>;

enum Cmd {
    Assign(Tp),
    Revoke(Tp, oneshot::Sender<()>),
}

struct Worker {
    member: u64,
    tasks: Vec<JoinHandle<()>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    owned: Vec<Tp>,
}

struct Ctx {
    world: Shared,
    store: Arc<MemoryEvents>,
    /// The group's durable stream positions (`None` with `SIM_NO_POSITIONS`: a stream first
    /// seen is taken as it comes, as before them).
    positions: Option<Arc<SimPositions>>,
    wire: WireRef,
    log: Arc<Vec<EventEnvelope>>,
    poisoned: Arc<std::collections::HashSet<usize>>,
    topics: Arc<Vec<String>>,
    cfg: Config,
    plan: Plan,
}

fn tp_of(e: &EventEnvelope, partitions: i32) -> Tp {
    let topic = contract::AggregateType::ALL
        .iter()
        .position(|a| *a == e.aggregate_type)
        .unwrap_or(0) as u16;
    let h = e
        .aggregate_id
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    (topic, (h % partitions as u32) as i32)
}

fn start_worker(ctx: &Ctx, seed: u64) -> Worker {
    let member = {
        let mut w = lock(&ctx.world);
        w.members += 1;
        w.members
    };
    let shared = Arc::new(Runtime::default());
    let (tracker_tx, tracker_rx) = mpsc::unbounded_channel();
    let env = StageEnv {
        cfg: ctx.cfg.clone(),
        shared: shared.clone(),
        tracker: tracker_tx.clone(),
        control: Arc::new(SimControl(ctx.world.clone())),
        mode: Mode::Live,
        only: Vec::new(),
        shards: ctx.plan.shards,
        // About `plan.cache` small views per document stage (two projectors × shards).
        cache_bytes: ctx.plan.cache * 700 * 2 * ctx.plan.shards,
        max_batch: ctx.plan.max_batch,
    };
    let projectors = models::SimProjectors(ctx.plan.panics);
    let stages = match spawn_stages_of(&env, &SimSinks(ctx.world.clone()), &projectors) {
        Ok(s) => s,
        Err(e) => panic!("stages: {e}"),
    };
    let mut tracker = Tracker::new(
        stages.participants,
        shared.clone(),
        ctx.topics.clone(),
        None,
    )
    .commit_every(Duration::from_millis(seed % 300));
    let shared_for_source = shared.clone();
    let mut tasks = stages.handles;
    // The recorder of durable positions dies with the worker: what it had not written is lost.
    let mut sequencing = Sequencing::new(ctx.store.clone(), shared.clone(), &ctx.cfg.worker);
    if let Some(store) = &ctx.positions {
        // Written anywhere from at once to 2 s after durable (the default is 1 s).
        let every = Duration::from_millis(1 + seed % 2_000);
        let (p, recorder) = Positions::start(store.clone(), every);
        tasks.push(recorder);
        tracker = tracker.on_durable(p.on_durable());
        sequencing = sequencing.map(|s| s.with_positions(p));
    }
    tasks.push(tokio::spawn(async move {
        tracker.run(tracker_rx).await;
    }));
    let _ = tracker_tx.send(TrackerMsg::Consumer {
        generation: 1,
        consumer: Arc::new(SimCommit(ctx.world.clone(), member)),
    });
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let source = Source {
        rng: ChaCha8Rng::seed_from_u64(seed),
        shared: shared_for_source,
        tracker: tracker_tx,
        txs: stages.txs,
        cmds: cmd_rx,
        world: ctx.world.clone(),
        wire: ctx.wire.clone(),
        log: ctx.log.clone(),
        poisoned: ctx.poisoned.clone(),
        topics: ctx.topics.clone(),
        prefix: ctx.cfg.kafka.topic_prefix.clone(),
        window: ctx.plan.window,
        assigned: BTreeMap::new(),
        member,
        sequencing,
        epoch: 0,
        next_id: 0,
    };
    tasks.push(tokio::spawn(source.run()));
    Worker {
        member,
        tasks,
        cmd: cmd_tx,
        owned: Vec::new(),
    }
}

/// The source side of a worker, as `source::kafka` behaves: windows of consecutive messages
/// registered with the tracker before any stage sees them; assignments with epochs; a
/// revocation drains what was polled and commits it before letting the partition go.
struct Source {
    rng: ChaCha8Rng,
    shared: Arc<Runtime>,
    tracker: mpsc::UnboundedSender<TrackerMsg>,
    txs: Vec<mpsc::Sender<Arc<Window>>>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    world: Shared,
    wire: WireRef,
    log: Arc<Vec<EventEnvelope>>,
    /// Log indices published unreadable.
    poisoned: Arc<std::collections::HashSet<usize>>,
    topics: Arc<Vec<String>>,
    prefix: String,
    window: usize,
    /// Owned partitions: (epoch, next offset to read).
    assigned: BTreeMap<Tp, (u32, i64)>,
    member: u64,
    sequencing: Option<Sequencing>,
    epoch: u32,
    next_id: u64,
}

impl Source {
    async fn run(mut self) {
        loop {
            while let Ok(c) = self.cmds.try_recv() {
                match c {
                    Cmd::Assign(tp) => self.assign(tp),
                    Cmd::Revoke(tp, done) => {
                        self.revoke(tp).await;
                        let _ = done.send(());
                    }
                }
            }
            if self.shared.waiting.load(Ordering::Relaxed) > 0 && self.rng.random_bool(0.8) {
                // Paused while a stage waits for a store.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let Some(mut w) = self.poll() else {
                tokio::time::sleep(Duration::from_millis(25)).await;
                continue;
            };
            if let Some(s) = self.sequencing.as_mut() {
                s.apply(&mut w).await;
            }
            let w = Arc::new(w);
            for tx in &self.txs {
                if tx.send(w.clone()).await.is_err() {
                    return;
                }
            }
            let pause = self.rng.random_range(0..8);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    fn assign(&mut self, tp: Tp) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "[{:?}] member {} assigned {tp:?}",
                tokio::time::Instant::now(),
                self.member
            );
        }
        self.epoch += 1;
        let topic = self.topics[tp.0 as usize].clone();
        let from = lock(&self.world)
            .committed
            .get(&(topic, tp.1))
            .copied()
            .unwrap_or(0);
        self.assigned.insert(tp, (self.epoch, from));
        let _ = self
            .tracker
            .send(TrackerMsg::Assigned(vec![(tp, self.epoch)]));
        self.shared.assignment_gen.fetch_add(1, Ordering::Relaxed);
    }

    async fn revoke(&mut self, tp: Tp) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "[{:?}] member {} revoking {tp:?}",
                tokio::time::Instant::now(),
                self.member
            );
        }
        if self.assigned.remove(&tp).is_none() {
            return;
        }
        let (reply, answer) = std::sync::mpsc::channel();
        let _ = self.tracker.send(TrackerMsg::Drain {
            upto: self.next_id,
            partitions: vec![tp],
            deadline: std::time::Instant::now() + Duration::from_secs(3600),
            reply,
        });
        // As the real source: wait a bounded time, commit what is durable, let go.
        for _ in 0..300 {
            match answer.try_recv() {
                Ok(offsets) => {
                    let mut w = lock(&self.world);
                    for (tp, next) in offsets {
                        let topic = &self.topics[tp.0 as usize];
                        w.commit_as(self.member, topic, tp.1, next);
                    }
                    break;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(_) => break,
            }
        }
        let _ = self.tracker.send(TrackerMsg::Revoked(vec![tp]));
        self.shared.assignment_gen.fetch_add(1, Ordering::Relaxed);
    }

    /// The next window: up to `window` messages from the owned partitions.
    fn poll(&mut self) -> Option<Window> {
        let want = self.rng.random_range(1..=self.window);
        let parts: Vec<Tp> = self.assigned.keys().copied().collect();
        if parts.is_empty() {
            return None;
        }
        let start = self.rng.random_range(0..parts.len());
        let mut picked: Vec<(Tp, u32, i64, usize)> = Vec::new();
        {
            let wire = self.wire.lock().unwrap_or_else(|e| e.into_inner());
            for k in 0..parts.len() {
                let tp = parts[(start + k) % parts.len()];
                let Some((epoch, pos)) = self.assigned.get_mut(&tp) else {
                    continue;
                };
                let visible = wire.visible.get(&tp).copied().unwrap_or(0) as i64;
                let msgs = &wire.msgs[&tp];
                while *pos < visible && picked.len() < want {
                    picked.push((tp, *epoch, *pos, msgs[*pos as usize]));
                    *pos += 1;
                }
            }
        }
        if picked.is_empty() {
            return None;
        }
        self.next_id += 1;
        let mut arena = Arena::with_capacity(picked.len() * 600);
        let mut raw = Vec::with_capacity(picked.len());
        let mut offsets: BTreeMap<(Tp, u32), i64> = BTreeMap::new();
        for (tp, epoch, offset, i) in &picked {
            let e = &self.log[*i];
            let pairs = contract::RequiredHeaders::for_event(e).pairs();
            raw.push(RawItem {
                origin: Origin::Kafka {
                    topic: tp.0,
                    partition: tp.1,
                    offset: *offset,
                    epoch: *epoch,
                    timestamp_ms: None,
                },
                raw: RawRef {
                    key: Some(arena.push(e.aggregate_id.as_bytes())),
                    payload: Some(if self.poisoned.contains(i) {
                        arena.push(b"{\"event_id\": garbage")
                    } else {
                        arena.push(&e.to_json_bytes())
                    }),
                    headers: Some(
                        arena.push_headers(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes())))),
                    ),
                },
            });
            let o = offsets.entry((*tp, *epoch)).or_insert(*offset);
            *o = (*o).max(*offset);
        }
        self.shared
            .in_flight
            .fetch_add(picked.len(), Ordering::Relaxed);
        let _ = self.tracker.send(TrackerMsg::Register(Registration {
            id: self.next_id,
            generation: 1,
            offsets: offsets.into_iter().map(|((tp, e), o)| (tp, e, o)).collect(),
            newest: Vec::new(),
            messages: picked.len(),
            bytes: 0,
            timestamps: Vec::new(),
        }));
        if std::env::var_os("SIM_TRACE").is_some() {
            let what: Vec<String> = picked
                .iter()
                .map(|(tp, _, o, i)| {
                    let e = &self.log[*i];
                    format!("{tp:?}@{o} {}#{}", e.aggregate_id, e.sequence_number)
                })
                .collect();
            eprintln!(
                "[{:?}] member {} window {} {what:?}",
                tokio::time::Instant::now(),
                self.member,
                self.next_id
            );
        }
        let items = decode_all(raw, &arena, &self.topics, &self.prefix);
        Some(Window {
            id: self.next_id,
            generation: 1,
            items,
            arena,
            topics: self.topics.clone(),
            opened: std::time::Instant::now(),
            span: tracing::Span::none(),
        })
    }
}

/// Run schedule `seed` to quiescence and check the properties.
pub fn run_seed(seed: u64) -> Outcome {
    trace_if_asked();
    simulate(seed, Mode_::Drawn)
}

/// `SIM_TRACE`: the runtime's debug logs on stderr.
pub(super) fn trace_if_asked() {
    if std::env::var_os("SIM_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("projector=debug"))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Schedule `seed` with no faults and one worker, where another writer always wins the
/// first customer's Customer-360 view: the stage must give that view up (its streams parked
/// with the reason) and everything else must still equal the fold.
pub fn run_hostile(seed: u64) -> Outcome {
    simulate(seed, Mode_::Hostile)
}

/// Schedule `seed` with no faults and one worker, where the stores refuse for good (a
/// permanent error for the whole call) any write of the first customer's Customer-360 view
/// and any insert of that customer's first fact: the stages must find whose the error is,
/// dead-letter and park just that, and store everything else.
pub fn run_refusing(seed: u64) -> Outcome {
    simulate(seed, Mode_::Refusing)
}

/// Schedule `seed` with projectors that panic on about one event in 17.
pub fn run_panicky(seed: u64) -> Outcome {
    simulate(seed, Mode_::Panicky)
}

/// Schedule `seed` with unreadable messages on a clean wire, so operators unpark streams
/// while the rest flows (see [`super::unpark`]).
pub fn run_unparking(seed: u64) -> Outcome {
    simulate(seed, Mode_::Unparking)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode_ {
    Drawn,
    Hostile,
    Refusing,
    Panicky,
    Unparking,
}

/// One schedule on a paused clock of its own, with this thread's jitter seeded.
fn simulate(seed: u64, mode: Mode_) -> Outcome {
    on_a_paused_clock(seed, schedule(seed, mode))
}

/// Run `run` on a paused clock of its own, with this thread's jitter seeded by `seed`.
pub(super) fn on_a_paused_clock(
    seed: u64,
    run: impl std::future::Future<Output = Outcome>,
) -> Outcome {
    quiet_injected_panics();
    projector::resilience::backoff::seed_jitter(Some(seed));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let out = rt.block_on(run);
    // Tasks still running (stages of crashed workers, write tasks) go with the runtime.
    rt.shutdown_background();
    out
}

/// Panics the simulation injects are expected: not printed (every other one is).
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m == models::INJECTED);
            if !injected {
                default(info);
            }
        }));
    });
}

async fn schedule(seed: u64, mode: Mode_) -> Outcome {
    let refusing = mode == Mode_::Refusing;
    // Both give one customer's view up: the same quiet, single-worker schedule.
    let hostile = mode == Mode_::Hostile || refusing;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut plan = Plan::draw(&mut rng);
    plan.panics = {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5041_4e49_4353);
        let p = r.random_bool(0.2) || mode == Mode_::Panicky;
        (p && !hostile).then(|| r.random())
    };
    let mut poison_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x504f_4953_4f4e);
    if mode == Mode_::Unparking {
        (plan.loss, plan.swap, plan.switches) = (0.0, 0.0, 0);
        // Long enough for a stream to go on after its unpark.
        plan.events = poison_rng.random_range(40..160);
    }
    let clean_wire = plan.loss == 0.0 && plan.swap == 0.0 && plan.switches == 0;
    if clean_wire && !hostile && poison_rng.random_bool(0.25) {
        plan.poison = poison_rng.random_range(0.0..0.12);
    }
    if mode == Mode_::Unparking {
        plan.poison = poison_rng.random_range(0.04..0.12);
    }
    // Triage knobs for a failing seed: the same schedule without faults or without actions.
    if std::env::var_os("SIM_NO_FAULTS").is_some() {
        plan.faults = plan.faults.none();
    }
    if std::env::var_os("SIM_NO_ACTIONS").is_some() || hostile {
        plan.action = 0.0;
    }
    if hostile {
        plan.workers = 1;
        (plan.dup, plan.loss, plan.swap) = (0.0, 0.0, 0.0);
        plan.faults = plan.faults.none();
    }
    let log: Vec<EventEnvelope> = projector::generator::history::History::new(seed, "s")
        .take(plan.events)
        .collect();
    let events: Vec<Event> = log
        .iter()
        .filter_map(|e| e.clone().into_event().ok())
        .collect();
    static CFG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    let cfg = CFG
        .get_or_init(|| Config::load_for_tests().unwrap_or_else(|e| panic!("config: {e}")))
        .clone();
    let topics = Arc::new(projector::kafka::event_topics(&cfg.kafka));
    let models = models::models(plan.panics);
    // Unreadable on the wire: their streams are parked from them for every projector (the
    // fold starts with those parks).
    let poisoned: Arc<std::collections::HashSet<usize>> = Arc::new(
        (0..log.len())
            .filter(|_| poison_rng.random_bool(plan.poison))
            .collect(),
    );
    let mut pre = projectors::Parked::default();
    for (i, e) in events.iter().enumerate() {
        if poisoned.contains(&i) {
            let from = projectors::parking::ParkFrom::Sequence(e.header.sequence_number);
            pre.park(&projectors::document::stream_key(e), from, "unreadable");
        }
    }
    let world = Arc::new(std::sync::Mutex::new(World::new(seed, plan.faults)));
    let contended = hostile
        .then(|| {
            events
                .iter()
                .find_map(|e| e.data.customer_id().map(str::to_owned))
        })
        .flatten();
    {
        let mut w = lock(&world);
        for m in &models {
            w.projection_of.insert(m.store, m.name);
        }
        if let Some(k) = &contended {
            if refusing {
                w.refusing.insert(("redis".into(), k.clone()));
            } else {
                w.hostile.insert(("redis".into(), k.clone()));
            }
        }
    }
    // Refusing: that customer's first fact is refused too; its stream is exempt from the
    // facts' comparison (its later rows in the same insert may be stored).
    let refused_stream = contended.as_ref().filter(|_| refusing).and_then(|k| {
        let e = events
            .iter()
            .find(|e| e.data.customer_id() == Some(k.as_str()))?;
        let id = e.header.event_id.to_string();
        lock(&world).refusing.insert(("clickhouse".into(), id));
        Some(projectors::document::stream_key(e))
    });
    // The wire: the log in order, some messages published twice later.
    let mut publications: Vec<(Tp, usize)> = Vec::new();
    let mut wire = Wire::default();
    // Later events of each stream: a lost or swapped event always has one (a relay that
    // loses a stream's last event loses it until the next one shows the gap).
    let mut later = vec![false; log.len()];
    let mut seen_streams = std::collections::HashSet::new();
    for (i, e) in log.iter().enumerate().rev() {
        later[i] = !seen_streams.insert((e.aggregate_type, e.aggregate_id.clone()));
    }
    let mut held: HashMap<String, usize> = HashMap::new();
    for (i, e) in log.iter().enumerate() {
        let tp = tp_of(e, plan.partitions);
        let stream = format!("{}/{}", e.aggregate_type.as_str(), e.aggregate_id);
        // A stream's first event too (a stream first seen past 0 starts at 0), in lossy
        // schedules only: the others draw exactly what they drew before positions.
        let eligible = later[i] && (e.sequence_number > 0 || plan.loss > 0.0 || plan.swap > 0.0);
        if eligible && !held.contains_key(&stream) && rng.random_bool(plan.loss) {
            continue;
        }
        if eligible && !held.contains_key(&stream) && rng.random_bool(plan.swap) {
            held.insert(stream, i);
            continue;
        }
        publications.push((tp, i));
        if let Some(h) = held.remove(&stream) {
            publications.push((tp, h));
        }
        if i > 0 && rng.random_bool(plan.dup) {
            let j = rng.random_range(0..i);
            publications.push((tp_of(&log[j], plan.partitions), j));
        }
    }
    for (tp, i) in &publications {
        wire.msgs.entry(*tp).or_default().push(*i);
        if std::env::var_os("SIM_TRACE").is_some() {
            let e = &log[*i];
            eprintln!(
                "publish {tp:?} #{} {} {}/{} #{}",
                wire.msgs[tp].len() - 1,
                e.event_type,
                e.aggregate_type.as_str(),
                e.aggregate_id,
                e.sequence_number
            );
        }
    }
    for t in 0..topics.len() as u16 {
        for p in 0..plan.partitions {
            wire.msgs.entry((t, p)).or_default();
        }
    }
    let all_tps: Vec<Tp> = {
        let mut v: Vec<Tp> = wire.msgs.keys().copied().collect();
        v.sort();
        v
    };
    let ends: HashMap<Tp, i64> = wire
        .msgs
        .iter()
        .map(|(tp, m)| (*tp, m.len() as i64))
        .collect();
    let wire = Arc::new(std::sync::Mutex::new(wire));
    let settled = Settled::new(
        &events,
        plan.panics,
        &pre,
        contended.clone(),
        refused_stream.clone(),
    );
    lock(&world).stored = events.clone();
    install_commit_check(&world, &wire, &events, &topics, settled.clone());
    install_position_check(&world, &events, settled);
    let ctx = Ctx {
        world: world.clone(),
        store: Arc::new(MemoryEvents::new(events.clone())),
        positions: std::env::var_os("SIM_NO_POSITIONS")
            .is_none()
            .then(|| Arc::new(SimPositions::new(world.clone(), seed))),
        wire: wire.clone(),
        log: Arc::new(log.clone()),
        poisoned: poisoned.clone(),
        topics: topics.clone(),
        cfg,
        plan: plan.clone(),
    };
    let mut workers: Vec<Option<Worker>> = Vec::new();
    for _ in 0..plan.workers {
        workers.push(Some(start_worker(&ctx, rng.random())));
    }
    for (k, tp) in all_tps.iter().enumerate() {
        let w = k % plan.workers;
        if let Some(wk) = workers[w].as_mut() {
            give(&world, &topics, wk, *tp, true);
        }
    }
    let mut actions: Vec<String> = Vec::new();
    // Unparks, in schedules with unreadable messages: drawn apart, so the other schedules
    // are what they were.
    let mut unpark_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x554e_5041_524b);
    let mut unparks: Vec<JoinHandle<()>> = Vec::new();
    let mut unparked: Vec<String> = Vec::new();
    let shared_events = Arc::new(events.clone());
    let mut switches = 0;
    let mut next_version = 1;
    let mut published = 0;
    while published < publications.len() {
        let n = rng.random_range(1..=4).min(publications.len() - published);
        {
            let mut w = wire.lock().unwrap_or_else(|e| e.into_inner());
            for (tp, _) in &publications[published..published + n] {
                *w.visible.entry(*tp).or_default() += 1;
            }
        }
        published += n;
        if rng.random_bool(plan.action) {
            match rng.random_range(0..10) {
                0..=3 if plan.workers > 1 => {
                    let overlap = rng.random_bool(0.3);
                    let (from, to) = if rng.random_bool(0.5) { (0, 1) } else { (1, 0) };
                    if workers[from].is_some() && workers[to].is_some() {
                        let owned = workers[from].as_ref().map_or(0, |w| w.owned.len());
                        if owned > 0 {
                            let k = rng.random_range(0..owned);
                            let tp = workers[from].as_mut().map(|w| w.owned.remove(k));
                            if let Some(tp) = tp {
                                actions.push(format!("move {tp:?} {from}->{to} overlap={overlap}"));
                                move_partition(
                                    &world,
                                    &topics,
                                    &mut workers,
                                    from,
                                    to,
                                    tp,
                                    overlap,
                                )
                                .await;
                            }
                        }
                    }
                }
                0..=6 => {
                    let k = rng.random_range(0..workers.len());
                    if let Some(w) = workers[k].take() {
                        actions.push(format!("crash worker {k}"));
                        if std::env::var_os("SIM_TRACE").is_some() {
                            eprintln!("[{:?}] crash", tokio::time::Instant::now());
                        }
                        for t in &w.tasks {
                            t.abort();
                        }
                        let down = rng.random_range(0..3_000);
                        tokio::time::sleep(Duration::from_millis(down)).await;
                        let mut fresh = start_worker(&ctx, rng.random());
                        for tp in &w.owned {
                            give(&world, &topics, &mut fresh, *tp, false);
                        }
                        fresh.owned = w.owned;
                        workers[k] = Some(fresh);
                    }
                }
                _ if switches < plan.switches => {
                    switches += 1;
                    let m = &models[rng.random_range(0..models.len())];
                    let version = format!("v{next_version}");
                    next_version += 1;
                    actions.push(format!("switch {} to {version}", m.name));
                    let catch_up = rng.random_range(0..400);
                    let fence = rng.random_range(0..1500);
                    switch(
                        &world,
                        &wire,
                        &publications,
                        &events,
                        m,
                        &version,
                        catch_up,
                        fence,
                    )
                    .await;
                }
                _ => {}
            }
        }
        let unpark_odds = if mode == Mode_::Unparking { 1.0 } else { 0.3 };
        if plan.poison > 0.0 && unparks.len() < 3 && unpark_rng.random_bool(unpark_odds) {
            let msgs = wire.lock().unwrap_or_else(|e| e.into_inner()).msgs.clone();
            let stream_of = |i: usize| {
                let e = &log[i];
                format!("{}/{}", e.aggregate_type.as_str(), e.aggregate_id)
            };
            if let Some(stream) = super::unpark::unparkable(
                &world, &msgs, &topics, &poisoned, stream_of, &pre, &unparked,
            ) {
                actions.push(format!("unpark {stream}"));
                unparked.push(stream.clone());
                unparks.push(tokio::spawn(super::unpark::unpark(
                    world.clone(),
                    ctx.cfg.clone(),
                    shared_events.clone(),
                    stream,
                    plan.panics,
                    unparks.len() as i64 + 1,
                )));
                // Long enough for the stages' parks to grow stale: the next events find the
                // park gone while the unpark's second replay is still to come.
                let stale = projector::runtime::documents::PARKS_REFRESH;
                tokio::time::sleep(
                    stale - Duration::from_millis(unpark_rng.random_range(0..2_000)),
                )
                .await;
            }
        }
        let pause = rng.random_range(0..30);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for u in unparks {
        let _ = u.await;
    }
    lock(&world).faults_on = false;
    // Quiescence: every partition committed to its end.
    let mut settled = false;
    for _ in 0..12_000 {
        let done = {
            let w = lock(&world);
            all_tps.iter().all(|tp| {
                let end = ends[tp];
                end == 0 || w.committed.get(&(topics[tp.0 as usize].clone(), tp.1)) == Some(&end)
            })
        };
        if done {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = Outcome::default();
    if !settled {
        let w = lock(&world);
        let lag: Vec<String> = all_tps
            .iter()
            .filter_map(|tp| {
                let c = w
                    .committed
                    .get(&(topics[tp.0 as usize].clone(), tp.1))
                    .copied()
                    .unwrap_or(0);
                (c != ends[tp]).then(|| format!("{tp:?} committed {c} of {}", ends[tp]))
            })
            .collect();
        out.failures
            .push(format!("no quiescence in 10 virtual minutes: {lag:?}"));
    }
    let exempt = Exempt {
        view: contended.as_deref(),
        fact_stream: refused_stream.as_deref(),
    };
    // An unparked stream is held nowhere: the fold takes all of it.
    let mut expected = pre.clone();
    for s in &unparked {
        expected.unpark(s);
    }
    check(&world, &events, &models, &exempt, &expected, &mut out);
    let letters: Vec<String> = lock(&world)
        .letters
        .iter()
        .take(5)
        .map(|(k, r)| format!("{k}: {r}"))
        .collect();
    out.summary = format!("{plan:?} actions={actions:?} letters={letters:?}");
    out.letter_kinds = lock(&world)
        .letters
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    out
}

/// The broker hands `tp` to `w`: from now on only `w` may commit it.
fn give(world: &Shared, topics: &[String], w: &mut Worker, tp: Tp, record: bool) {
    lock(world)
        .owner
        .insert((topics[tp.0 as usize].clone(), tp.1), w.member);
    let _ = w.cmd.send(Cmd::Assign(tp));
    if record {
        w.owned.push(tp);
    }
}

/// A partition moves from one worker to another, the old owner letting go first (or, with
/// `overlap`, while the new one already reads it: both write its views for a while).
async fn move_partition(
    world: &Shared,
    topics: &[String],
    workers: &mut [Option<Worker>],
    from: usize,
    to: usize,
    tp: Tp,
    overlap: bool,
) {
    let (done_tx, done_rx) = oneshot::channel();
    if let Some(w) = workers[from].as_ref() {
        let _ = w.cmd.send(Cmd::Revoke(tp, done_tx));
    }
    if !overlap {
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
    }
    if let Some(w) = workers[to].as_mut() {
        give(world, topics, w, tp, true);
    }
}

/// A rebuild of `m` into `version` and the handover: the flag raised (stages hold), the
/// catch-up (the fold of everything appended so far), the pointer moved to a new epoch, and
/// after a fence the old version retired and deleted.
#[allow(clippy::too_many_arguments)]
async fn switch(
    world: &Shared,
    wire: &WireRef,
    publications: &[(Tp, usize)],
    events: &[Event],
    m: &Model,
    version: &str,
    catch_up_ms: u64,
    fence_ms: u64,
) {
    let old = {
        let mut w = lock(world);
        let p = w.pointer(m.name);
        w.pointers.insert(
            m.name.to_owned(),
            Pointer {
                switching: true,
                ..p.clone()
            },
        );
        p
    };
    tokio::time::sleep(Duration::from_millis(catch_up_ms)).await;
    // An outbox appends before it publishes: every event up to the newest published one is
    // in the event store (lost on the wire or not), and the final catch-up folds all of it.
    let appended = {
        let w = wire.lock().unwrap_or_else(|e| e.into_inner());
        let shown: usize = w.visible.values().sum();
        publications[..shown.min(publications.len())]
            .iter()
            .map(|(_, i)| i + 1)
            .max()
            .unwrap_or(0)
    };
    // No poison in schedules with switches (see `Plan::poison`).
    let folded = (m.fold)(&events[..appended], &projectors::Parked::default());
    {
        let mut w = lock(world);
        if m.store == "clickhouse" {
            w.facts.insert(version.to_owned(), folded.facts);
        } else {
            let docs = folded
                .docs
                .into_iter()
                .map(|(k, (body, _))| (k, (body, 0)))
                .collect::<BTreeMap<_, _>>();
            // The rebuild wrote them with tokens of its own.
            let mut docs = docs;
            for (i, (_, (body, rev))) in docs.iter_mut().enumerate() {
                *rev = 1_000_000 + i as u64;
                let mut v: serde_json::Value =
                    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.insert("_rev".into(), (*rev).into());
                }
                *body = serde_json::to_vec(&v).unwrap_or_default();
            }
            w.docs
                .insert((m.store.to_owned(), version.to_owned()), docs);
        }
        w.parks
            .insert((m.name.to_owned(), version.to_owned()), folded.parked);
        w.pointers.insert(
            m.name.to_owned(),
            Pointer {
                version: version.to_owned(),
                epoch: old.epoch + 1,
                switching: false,
            },
        );
        w.retired.insert((m.name.to_owned(), old.version.clone()));
    }
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!(
            "[{:?}] switched {} {} -> {version}, {} retired",
            tokio::time::Instant::now(),
            m.name,
            old.version,
            old.version
        );
    }
    tokio::time::sleep(Duration::from_millis(fence_ms.max(1000))).await;
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!(
            "[{:?}] deleted {} {}",
            tokio::time::Instant::now(),
            m.store,
            old.version
        );
    }
    let mut w = lock(world);
    w.deleted.insert((m.store.to_owned(), old.version.clone()));
    if m.store == "clickhouse" {
        w.facts.remove(&old.version);
    } else {
        w.docs.remove(&(m.store.to_owned(), old.version.clone()));
        w.finished
            .remove(&(m.store.to_owned(), old.version.clone()));
    }
}

/// At every commit: each message below the committed offset is durable in every store.
fn install_commit_check(
    world: &Shared,
    wire: &WireRef,
    events: &[Event],
    topics: &Arc<Vec<String>>,
    settled: Settled,
) {
    let wire = wire.clone();
    let topics = topics.clone();
    let events: Vec<Event> = events.to_vec();
    let mut verified: HashMap<(String, i32), i64> = HashMap::new();
    lock(world).commit_check = Some(Box::new(move |w: &World, topic, partition, next| {
        let t = topics.iter().position(|x| x == topic)? as u16;
        let msgs = {
            let wire = wire.lock().unwrap_or_else(|e| e.into_inner());
            wire.msgs.get(&(t, partition)).cloned().unwrap_or_default()
        };
        let from = verified
            .get(&(topic.to_owned(), partition))
            .copied()
            .unwrap_or(0);
        for off in from..next.min(msgs.len() as i64) {
            let e = events.get(msgs[off as usize])?;
            if let Some(name) = settled.not_durable(w, e) {
                return Some(format!(
                    "committed {topic}/{partition} up to {next}, but offset {off} ({} #{} of {}/{}) is not durable in {name}",
                    e.header.event_type,
                    e.header.sequence_number,
                    e.header.aggregate_type,
                    e.header.aggregate_id
                ));
            }
        }
        verified.insert((topic.to_owned(), partition), next);
        None
    }));
}

/// Whether an event is settled in every store: durable, or settled without a write (the
/// fold parks it — a panic, poison, or held after one — or the schedule gave its view or
/// its fact stream up on purpose).
#[derive(Clone)]
struct Settled(Arc<SettledInner>);

struct SettledInner {
    models: Vec<(
        &'static str,
        &'static str,
        models::DurableFn,
        projectors::Parked,
    )>,
    contended: Option<String>,
    refused_stream: Option<String>,
}

impl Settled {
    fn new(
        events: &[Event],
        panics: Option<u64>,
        pre: &projectors::Parked,
        contended: Option<String>,
        refused_stream: Option<String>,
    ) -> Settled {
        let models = models::models(panics)
            .into_iter()
            .map(|m| {
                let parked = (m.fold)(events, pre).parked;
                (m.name, m.store, m.durable, parked)
            })
            .collect();
        Settled(Arc::new(SettledInner {
            models,
            contended,
            refused_stream,
        }))
    }

    /// The first model `e` is not durable in, if any.
    fn not_durable(&self, w: &World, e: &Event) -> Option<&'static str> {
        let s = &self.0;
        let stream = projectors::document::stream_key(e);
        for (name, store, d, parked) in &s.models {
            if parked
                .holding(&stream, e.header.sequence_number, None)
                .is_some()
            {
                continue;
            }
            if *store == "redis"
                && s.contended.is_some()
                && e.data.customer_id() == s.contended.as_deref()
            {
                continue;
            }
            if *store == "clickhouse" && s.refused_stream.as_deref() == Some(stream.as_str()) {
                continue;
            }
            if !d(w, e) {
                return Some(name);
            }
        }
        None
    }
}

/// At every write of a durable stream position `L`: every event `0..=L` of the stream is
/// durable in every store (a position may lag what is durable, never lead it).
fn install_position_check(world: &Shared, events: &[Event], settled: Settled) {
    let events: Vec<Event> = events.to_vec();
    lock(world).position_check = Some(Box::new(move |w: &World, p| {
        for e in &events {
            let h = &e.header;
            if h.aggregate_type != p.aggregate_type
                || h.aggregate_id != p.aggregate_id
                || h.sequence_number > p.sequence
            {
                continue;
            }
            if let Some(name) = settled.not_durable(w, e) {
                return Some(format!(
                    "recorded position {} of {}/{}, but #{} ({}) is not durable in {name}",
                    p.sequence, h.aggregate_type, h.aggregate_id, h.sequence_number, h.event_type
                ));
            }
        }
        None
    }));
}

/// The read models of the versions the pointers name equal the fold of the whole log; no
/// stream is parked where the fold does not park it; nothing landed in a deleted version.
/// What a schedule gave up on purpose (a view contended or refused forever, a stream whose
/// row the store refused): exempt from the comparison, and its parks expected.
pub(super) struct Exempt<'a> {
    pub view: Option<&'a str>,
    pub fact_stream: Option<&'a str>,
}

pub(super) fn check(
    world: &Shared,
    events: &[Event],
    models: &[Model],
    exempt: &Exempt,
    pre: &projectors::Parked,
    out: &mut Outcome,
) {
    let contended = exempt.view;
    let stream_of: HashMap<String, String> = events
        .iter()
        .map(|e| {
            let id = e.header.event_id.to_string();
            (id, projectors::document::stream_key(e))
        })
        .collect();
    let exempt_row = |id: &String| {
        exempt.fact_stream.is_some() && stream_of.get(id).map(String::as_str) == exempt.fact_stream
    };
    let w = lock(world);
    out.failures.extend(w.violations.iter().cloned());
    for m in models {
        let mut want = (m.fold)(events, pre);
        let version = w.pointer(m.name).version;
        if m.store == "clickhouse" {
            let empty = BTreeMap::new();
            let mut got = w.facts.get(&version).unwrap_or(&empty).clone();
            got.retain(|id, _| !exempt_row(id));
            want.facts.retain(|id, _| !exempt_row(id));
            if got != want.facts {
                let missing = want.facts.keys().filter(|k| !got.contains_key(*k)).count();
                let extra = got.keys().filter(|k| !want.facts.contains_key(*k)).count();
                out.failures.push(format!(
                    "{} ({version}): {} rows, the fold has {} ({missing} missing, {extra} extra)",
                    m.name,
                    got.len(),
                    want.facts.len()
                ));
            }
        } else {
            let empty = BTreeMap::new();
            let got = w
                .docs
                .get(&(m.store.to_owned(), version.clone()))
                .unwrap_or(&empty);
            let beside = w.finished.get(&(m.store.to_owned(), version.clone()));
            let mut diffs = Vec::new();
            for (k, (_, c)) in &want.docs {
                if m.store == "redis" && Some(k.as_str()) == contended {
                    continue;
                }
                let whole = |body: &[u8]| comparable_whole(body, beside.and_then(|f| f.get(k)));
                match got.get(k) {
                    None => diffs.push(format!("{k} missing")),
                    Some((body, _)) if whole(body) != *c => {
                        diffs.push(format!("{k} differs: got {} want {c}", whole(body)))
                    }
                    _ => {}
                }
            }
            for k in got.keys() {
                if !want.docs.contains_key(k) {
                    diffs.push(format!("{k} not in the fold"));
                }
            }
            if !diffs.is_empty() {
                diffs.truncate(3);
                out.failures
                    .push(format!("{} ({version}): {}", m.name, diffs.join("; ")));
            }
        }
        if let Some(parked) = w.parks.get(&(m.name.to_owned(), version.clone())) {
            for (stream, mark) in parked.iter() {
                let given_up = ["compare-and-set rounds", "refused view", "refused the row"];
                if contended.is_some() && given_up.iter().any(|r| mark.reason.contains(r)) {
                    continue;
                }
                if want.parked.get(stream).map(|x| x.from) != Some(mark.from) {
                    out.failures.push(format!(
                        "{} parked {stream} from {:?} ({}); the fold does not",
                        m.name, mark.from, mark.reason
                    ));
                }
            }
        }
    }
}
