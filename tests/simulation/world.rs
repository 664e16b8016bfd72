//! The simulated world the real stages run against: in-memory document and fact stores with
//! the sinks' compare-and-set, acknowledgement and failure semantics; version pointers,
//! retired versions, parks and dead letters as PostgreSQL and Kafka keep them; the group's
//! committed offsets. Every random choice comes from the schedule's seed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use contract::Event;
use futures::FutureExt;
use projector::resilience::dead_letter::DeadLetter;
use projector::runtime::commit::OffsetCommit;
use projector::runtime::control::Control;
use projector::runtime::documents::OpenStore;
use projector::runtime::facts::OpenFacts;
use projector::runtime::parking::{ANY, ParkRecord};
use projector::runtime::pipeline::SinkFactory;
use projector::runtime::targets::{Check, PointerError, Target};
use projector::sinks::{DocStore, DocWrite, FactStore, Loaded, SinkError, WriteOutcome};
use projector::source::sequence::{MemoryPositions, PositionStore};
use projector::store::streams::{StreamId, StreamSeq};
use projector::store::{StoreError, Typed};
use projector::versions::VersionError;
use projectors::analytics::Fact;
use projectors::{Doc, Parked};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How often things fail while faults are on (per call).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub store_fail: f64,
    pub reply_lost: f64,
    pub partial: f64,
    pub hang: f64,
    pub pg_fail: f64,
    pub max_latency_ms: u64,
}

/// A rate a schedule draws: none in 30 % of schedules, else up to `max`.
pub fn rate(rng: &mut ChaCha8Rng, max: f64) -> f64 {
    if rng.random_bool(0.3) {
        0.0
    } else {
        rng.random_range(0.0..max)
    }
}

impl Faults {
    /// A schedule's faults, drawn from its seed.
    pub fn draw(rng: &mut ChaCha8Rng) -> Faults {
        Faults {
            store_fail: rate(rng, 0.15),
            reply_lost: rate(rng, 0.15),
            partial: rate(rng, 0.08),
            hang: rate(rng, 0.01),
            pg_fail: rate(rng, 0.08),
            max_latency_ms: rng.random_range(1..40),
        }
    }

    /// The same latencies, nothing failing.
    pub fn none(self) -> Faults {
        Faults {
            store_fail: 0.0,
            reply_lost: 0.0,
            partial: 0.0,
            hang: 0.0,
            pg_fail: 0.0,
            ..self
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pointer {
    pub version: String,
    pub epoch: i64,
    pub switching: bool,
}

/// Stored documents: key → (encoded document, write token).
pub type Docs = BTreeMap<String, (Vec<u8>, u64)>;

/// Finished streams kept beside documents (like Redis's sets): key → streams.
pub type Finished = BTreeMap<String, std::collections::BTreeSet<String>>;

/// Called at each commit of (topic, partition, next offset): why it is premature, if it is.
pub type CommitCheck = Box<dyn FnMut(&World, &str, i32, i64) -> Option<String> + Send>;

pub struct World {
    pub rng: ChaCha8Rng,
    pub faults: Faults,
    pub faults_on: bool,
    /// (store, version) → documents.
    pub docs: HashMap<(String, String), Docs>,
    /// (store, version) → finished streams beside its documents (written with them).
    pub finished: HashMap<(String, String), Finished>,
    /// version → facts by event id.
    pub facts: HashMap<String, BTreeMap<String, Fact>>,
    pub pointers: HashMap<String, Pointer>,
    pub retired: HashSet<(String, String)>,
    /// (store, version) deleted after retirement (past the fence): nothing may land there.
    pub deleted: HashSet<(String, String)>,
    /// (projection, version) → parked streams; ("*", "*") for every projector.
    pub parks: HashMap<(String, String), Parked>,
    /// Streams unparked, with the mark of their release (PostgreSQL `released_streams`).
    pub released: Vec<(String, i64)>,
    /// The event store: every event of the log (an outbox stores before it publishes).
    pub stored: Vec<Event>,
    pub letters: Vec<(String, String)>,
    /// (topic, partition) → next offset to read.
    pub committed: HashMap<(String, i32), i64>,
    /// (topic, partition) → the member that owns it now: the broker refuses commits from
    /// any other (a fenced generation).
    pub owner: HashMap<(String, i32), u64>,
    /// Member ids handed out so far.
    pub members: u64,
    /// Which projection writes each store.
    pub projection_of: HashMap<&'static str, &'static str>,
    pub violations: Vec<String>,
    /// (store, key) that another writer always wins: every compare-and-set on it conflicts.
    pub hostile: HashSet<(String, String)>,
    /// (store, key or event id) the store refuses for good, failing the whole call that
    /// carries it (as a server refuses a request over its limits).
    pub refusing: HashSet<(String, String)>,
    /// Checks every commit against what the stores hold (see `run`).
    pub commit_check: Option<CommitCheck>,
    /// Checks every durable stream position written against what the stores hold.
    pub position_check: Option<PositionCheck>,
}

pub type Shared = Arc<Mutex<World>>;

pub fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one store call does.
enum Fault {
    None,
    Before,
    Partial,
    After,
    Hang(Duration),
}

impl World {
    pub fn new(seed: u64, faults: Faults) -> World {
        World {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5151_7e57),
            faults,
            faults_on: true,
            docs: HashMap::new(),
            finished: HashMap::new(),
            facts: HashMap::new(),
            pointers: HashMap::new(),
            retired: HashSet::new(),
            deleted: HashSet::new(),
            parks: HashMap::new(),
            released: Vec::new(),
            stored: Vec::new(),
            letters: Vec::new(),
            committed: HashMap::new(),
            owner: HashMap::new(),
            members: 0,
            projection_of: HashMap::new(),
            violations: Vec::new(),
            hostile: HashSet::new(),
            refusing: HashSet::new(),
            commit_check: None,
            position_check: None,
        }
    }

    fn roll(&mut self, p: f64) -> bool {
        self.faults_on && p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    fn latency(&mut self) -> Duration {
        let max = self.faults.max_latency_ms.max(1);
        Duration::from_millis(self.rng.random_range(0..max))
    }

    fn plan(&mut self) -> (Duration, Fault) {
        let d = self.latency();
        let f = self.faults;
        let fault = if self.roll(f.hang) {
            Fault::Hang(Duration::from_millis(self.rng.random_range(1_000..20_000)))
        } else if self.roll(f.store_fail) {
            Fault::Before
        } else if self.roll(f.partial) {
            Fault::Partial
        } else if self.roll(f.reply_lost) {
            Fault::After
        } else {
            Fault::None
        };
        (d, fault)
    }

    fn is_deleted(&self, store: &str, version: &str) -> bool {
        self.deleted
            .contains(&(store.to_owned(), version.to_owned()))
    }

    pub fn pointer(&self, projection: &str) -> Pointer {
        self.pointers.get(projection).cloned().unwrap_or(Pointer {
            version: "live".into(),
            epoch: 0,
            switching: false,
        })
    }
}

fn transient(store: &'static str, why: &str) -> SinkError {
    SinkError::transient(store, why)
}

/// Runs `plan`'s latency and failure before a store call; `Err` when the call fails first.
async fn before_call(world: &Shared, store: &'static str) -> Result<bool, SinkError> {
    let (delay, fault) = lock(world).plan();
    tokio::time::sleep(delay).await;
    match fault {
        Fault::None => Ok(false),
        Fault::Before => Err(transient(store, "refused the connection")),
        Fault::Hang(d) => {
            tokio::time::sleep(d).await;
            Err(transient(store, "no answer (hung)"))
        }
        Fault::Partial => Ok(true),
        Fault::After => Ok(true),
    }
}

/// A document store in memory: one per (store, version).
#[derive(Clone)]
pub struct MemDocs {
    pub world: Shared,
    pub store: &'static str,
    pub version: String,
}

impl DocStore for MemDocs {
    fn name(&self) -> &'static str {
        self.store
    }

    fn max_doc_bytes(&self) -> usize {
        1 << 20
    }

    fn encode<V: Serialize>(&self, doc: &Doc<V>) -> Result<Vec<u8>, String> {
        serde_json::to_vec(doc).map_err(|e| e.to_string())
    }

    /// Like Redis: finished streams beside the documents.
    fn finished_apart(&self, _key: &str) -> bool {
        self.store == "redis"
    }

    async fn finished(
        &self,
        asks: Vec<(String, Vec<String>)>,
    ) -> Result<Vec<(String, Vec<String>)>, SinkError> {
        before_call(&self.world, self.store).await?;
        let w = lock(&self.world);
        let sets = w
            .finished
            .get(&(self.store.to_owned(), self.version.clone()));
        Ok(asks
            .into_iter()
            .map(|(k, streams)| {
                let set = sets.and_then(|f| f.get(&k));
                let found = streams
                    .into_iter()
                    .filter(|s| set.is_some_and(|set| set.contains(s)))
                    .collect();
                (k, found)
            })
            .collect())
    }

    async fn load<V: DeserializeOwned + Send + 'static>(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Loaded<V>)>, SinkError> {
        before_call(&self.world, self.store).await?;
        let w = lock(&self.world);
        let docs = w.docs.get(&(self.store.to_owned(), self.version.clone()));
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "[{:?}] load {} {} {keys:?}",
                tokio::time::Instant::now(),
                self.store,
                self.version
            );
        }
        Ok(keys
            .into_iter()
            .filter_map(|k| {
                let (body, _) = docs?.get(&k)?;
                let d = serde_json::from_slice::<Doc<V>>(body).map_err(|e| e.to_string());
                Some((k, d))
            })
            .collect())
    }

    async fn write(&self, writes: &[DocWrite]) -> Result<WriteOutcome, SinkError> {
        // A fault after the call began: some (partial) or all (reply lost) writes land, and
        // the caller hears a failure.
        let faulty = before_call(&self.world, self.store).await?;
        let mut w = lock(&self.world);
        if w.is_deleted(self.store, &self.version) {
            let v = format!(
                "a write to retired (deleted) version {} of {}",
                self.version, self.store
            );
            w.violations.push(v);
        }
        if writes.iter().any(|dw| {
            w.refusing
                .contains(&(self.store.to_owned(), dw.key.clone()))
        }) {
            return Err(SinkError::permanent(
                self.store,
                "a value over the server's limit",
            ));
        }
        let land = if faulty {
            w.rng.random_range(0..=writes.len())
        } else {
            writes.len()
        };
        let hostile: Vec<bool> = writes
            .iter()
            .map(|dw| w.hostile.contains(&(self.store.to_owned(), dw.key.clone())))
            .collect();
        let at = (self.store.to_owned(), self.version.clone());
        let mut finished = w.finished.remove(&at).unwrap_or_default();
        let docs = w.docs.entry(at.clone()).or_default();
        let mut out = WriteOutcome::default();
        if std::env::var_os("SIM_TRACE").is_some() {
            for dw in writes {
                let g = serde_json::from_slice::<serde_json::Value>(&dw.body)
                    .ok()
                    .and_then(|v| v.get("_guard").cloned());
                eprintln!(
                    "[{:?}] write {} {} {} expected={:?} rev={} guard={g:?} land={land}/{}",
                    tokio::time::Instant::now(),
                    self.store,
                    self.version,
                    dw.key,
                    dw.expected,
                    dw.rev,
                    writes.len()
                );
            }
        }
        for (i, dw) in writes.iter().enumerate().take(land) {
            let held = docs.get(&dw.key).map(|(_, rev)| *rev);
            if hostile[i] {
                out.conflicts.push(i);
            } else if held == dw.expected {
                docs.insert(dw.key.clone(), (dw.body.to_vec(), dw.rev));
                // In the same atomic step, like the script.
                if !dw.finished.is_empty() {
                    finished
                        .entry(dw.key.clone())
                        .or_default()
                        .extend(dw.finished.iter().cloned());
                }
            } else {
                out.conflicts.push(i);
            }
        }
        w.finished.insert(at, finished);
        if faulty {
            return Err(transient(self.store, "connection reset after the request"));
        }
        Ok(out)
    }
}

/// A fact store in memory, deduplicated by event id.
#[derive(Clone)]
pub struct MemFacts {
    pub world: Shared,
    pub version: String,
}

impl FactStore for MemFacts {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    async fn insert(&self, facts: &[Fact]) -> Result<(), SinkError> {
        let faulty = before_call(&self.world, "clickhouse").await?;
        let mut w = lock(&self.world);
        if w.is_deleted("clickhouse", &self.version) {
            let v = format!("an insert into retired version {}", self.version);
            w.violations.push(v);
        }
        if facts.iter().any(|f| {
            w.refusing
                .contains(&("clickhouse".to_owned(), f.event_id.clone()))
        }) {
            return Err(SinkError::permanent("clickhouse", "a row it cannot parse"));
        }
        let land = if faulty {
            w.rng.random_range(0..=facts.len())
        } else {
            facts.len()
        };
        if std::env::var_os("SIM_TRACE").is_some() {
            let ids: Vec<&str> = facts.iter().map(|f| &f.event_id[..8]).collect();
            eprintln!(
                "[{:?}] insert {} {ids:?} faulty={faulty}",
                tokio::time::Instant::now(),
                self.version
            );
        }
        let rows = w.facts.entry(self.version.clone()).or_default();
        for f in facts.iter().take(land) {
            rows.entry(f.event_id.clone()).or_insert_with(|| f.clone());
        }
        if faulty {
            return Err(transient("clickhouse", "connection reset after the insert"));
        }
        Ok(())
    }
}

pub struct SimSinks(pub Shared);

fn opened(world: &Shared, store: &'static str, version: &str) -> Result<(), SinkError> {
    let mut w = lock(world);
    if w.is_deleted(store, version) {
        let v = format!("{store} opened for retired (deleted) version {version}");
        w.violations.push(v);
    }
    let p = w.faults.store_fail;
    if w.roll(p) {
        return Err(transient(store, "refused the connection"));
    }
    Ok(())
}

impl SinkFactory for SimSinks {
    type Redis = MemDocs;
    type Mongo = MemDocs;
    type Facts = MemFacts;

    fn redis(&self) -> OpenStore<MemDocs> {
        let world = self.0.clone();
        Arc::new(move |version: String| {
            let world = world.clone();
            async move {
                opened(&world, "redis", &version)?;
                Ok(MemDocs {
                    world,
                    store: "redis",
                    version,
                })
            }
            .boxed()
        })
    }

    fn mongo(&self) -> OpenStore<MemDocs> {
        let world = self.0.clone();
        Arc::new(move |version: String| {
            let world = world.clone();
            async move {
                opened(&world, "mongo", &version)?;
                Ok(MemDocs {
                    world,
                    store: "mongo",
                    version,
                })
            }
            .boxed()
        })
    }

    fn facts(&self) -> OpenFacts<MemFacts> {
        let world = self.0.clone();
        Arc::new(move |version: String| {
            let world = world.clone();
            async move {
                opened(&world, "clickhouse", &version)?;
                Ok(MemFacts { world, version })
            }
            .boxed()
        })
    }
}

/// Pointers, retired versions, parks and dead letters, as PostgreSQL and Kafka keep them.
pub struct SimControl(pub Shared);

impl SimControl {
    async fn pg(&self) -> Result<(), StoreError> {
        let (delay, fail) = {
            let mut w = lock(&self.0);
            let d = w.latency() / 4;
            let f = w.faults.pg_fail;
            (d, w.roll(f))
        };
        tokio::time::sleep(delay).await;
        if fail {
            return Err(StoreError::Unavailable(
                "simulated PostgreSQL failure".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Control for SimControl {
    async fn check(&self, projection: &str, _fresh: bool) -> Result<Check, PointerError> {
        self.pg().await?;
        let w = lock(&self.0);
        let p = w.pointer(projection);
        if p.switching {
            return Ok(Check::Hold);
        }
        if w.retired
            .contains(&(projection.to_owned(), p.version.clone()))
        {
            return Err(VersionError::Retired {
                projection: projection.to_owned(),
                version: p.version,
            }
            .into());
        }
        Ok(Check::Write(Target {
            version: p.version,
            epoch: p.epoch,
        }))
    }

    async fn admit(&self, projection: &str, version: &str) -> Result<(), PointerError> {
        self.pg().await?;
        let w = lock(&self.0);
        if w.retired
            .contains(&(projection.to_owned(), version.to_owned()))
        {
            return Err(VersionError::Retired {
                projection: projection.to_owned(),
                version: version.to_owned(),
            }
            .into());
        }
        Ok(())
    }

    async fn load_parks(&self, projection: &str, version: &str) -> Result<Parked, StoreError> {
        self.pg().await?;
        let w = lock(&self.0);
        let mut out = Parked::default();
        for key in [
            (projection.to_owned(), version.to_owned()),
            (ANY.to_owned(), ANY.to_owned()),
        ] {
            if let Some(p) = w.parks.get(&key) {
                for (stream, mark) in p.iter() {
                    out.park(stream, mark.from, &mark.reason);
                }
            }
        }
        Ok(out)
    }

    async fn save_parks(&self, records: &[ParkRecord]) -> Result<(), StoreError> {
        self.pg().await?;
        let mut w = lock(&self.0);
        for r in records {
            w.parks
                .entry((r.projection.clone(), r.version.clone()))
                .or_default()
                .park(&r.stream, r.from, &r.reason);
        }
        Ok(())
    }

    async fn send_letters(&self, letters: &[DeadLetter]) -> Result<(), SinkError> {
        let faulty = before_call(&self.0, "dead-letter topic").await?;
        if faulty {
            return Err(transient("dead-letter topic", "no acknowledgement"));
        }
        let mut w = lock(&self.0);
        for l in letters {
            w.letters.push((l.kind.clone(), l.reason.clone()));
        }
        Ok(())
    }

    async fn released(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.pg().await?;
        Ok(lock(&self.0).released.clone())
    }

    async fn history(&self, stream: &str, before: i64) -> Result<Vec<Typed>, StoreError> {
        self.pg().await?;
        let w = lock(&self.0);
        let mut out: Vec<&Event> = w
            .stored
            .iter()
            .filter(|e| {
                e.header.sequence_number < before && projectors::document::stream_key(e) == stream
            })
            .collect();
        out.sort_by_key(|e| e.header.sequence_number);
        out.dedup_by_key(|e| e.header.sequence_number);
        Ok(out.into_iter().map(|e| Ok(e.clone())).collect())
    }
}

/// The group's committed offsets, as the broker keeps them: (world, member id).
pub struct SimCommit(pub Shared, pub u64);

impl World {
    /// Commit as `member`: refused (fenced) for a partition another member owns now.
    pub fn commit_as(&mut self, member: u64, topic: &str, partition: i32, next: i64) -> bool {
        let key = (topic.to_owned(), partition);
        if self.owner.get(&key) != Some(&member) {
            return false;
        }
        if let Some(mut check) = self.commit_check.take() {
            if let Some(v) = check(self, topic, partition, next) {
                self.violations.push(v);
            }
            self.commit_check = Some(check);
        }
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!(
                "[{:?}] commit {topic}/{partition} {next} by {member}",
                tokio::time::Instant::now()
            );
        }
        self.committed.insert(key, next);
        true
    }
}

impl OffsetCommit for SimCommit {
    fn commit_offsets(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String> {
        let mut w = lock(&self.0);
        for (topic, partition, next) in offsets {
            if !w.commit_as(self.1, topic, *partition, *next) {
                return Err(format!("{topic}/{partition}: fenced (not the owner)"));
            }
        }
        Ok(())
    }
}

/// Called at each write of durable stream positions, per position: why it leads what is
/// durable, if it does.
pub type PositionCheck = Box<dyn FnMut(&World, &StreamSeq) -> Option<String> + Send>;

/// The group's durable stream positions, as PostgreSQL keeps them: shared by every worker, and
/// a crash loses only what a worker's recorder had not written yet. While faults are on, a call
/// fails as PostgreSQL does, drawn from a random stream of its own (the seed's other faults
/// stay as they were). Every write is checked: a position must never lead what is durable.
pub struct SimPositions {
    pub world: Shared,
    pub rows: MemoryPositions,
    rng: Mutex<ChaCha8Rng>,
}

impl SimPositions {
    pub fn new(world: Shared, seed: u64) -> SimPositions {
        SimPositions {
            world,
            rows: MemoryPositions::default(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x9051_7105)),
        }
    }

    async fn pg(&self) -> Result<(), StoreError> {
        let (on, p, max) = {
            let w = lock(&self.world);
            (
                w.faults_on,
                w.faults.pg_fail,
                w.faults.max_latency_ms.max(1),
            )
        };
        let (delay, fail) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            let d = Duration::from_millis(rng.random_range(0..max) / 4);
            (d, on && p > 0.0 && rng.random_bool(p.min(1.0)))
        };
        tokio::time::sleep(delay).await;
        if fail {
            return Err(StoreError::Unavailable(
                "simulated PostgreSQL failure".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl PositionStore for SimPositions {
    async fn read(&self, streams: &[StreamId]) -> Result<Vec<(StreamId, i64)>, StoreError> {
        self.pg().await?;
        self.rows.read(streams).await
    }

    async fn record(&self, positions: &[StreamSeq]) -> Result<(), StoreError> {
        self.pg().await?;
        {
            let mut w = lock(&self.world);
            if let Some(mut check) = w.position_check.take() {
                for p in positions {
                    if let Some(v) = check(&w, p) {
                        w.violations.push(v);
                    }
                }
                w.position_check = Some(check);
            }
        }
        self.rows.record(positions).await
    }
}
