//! Shared by the integration tests: settings for the real local services and unique names.
#![allow(dead_code)]

pub mod cleanup;
pub mod faults;
pub mod prometheus;
pub mod scenario;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use projector::config::Config;
use projector::store::EventStore;

pub fn config() -> Config {
    Config::load_for_tests().expect("config/local.toml must load")
}

/// A namespace no other test run uses, so tests can share the servers.
pub fn unique_namespace(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}{:x}{}{}-",
        nanos % 0xffff_ffff,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A migrated event store. Fails loudly when PostgreSQL is not up: run scripts/services.sh up.
pub async fn store() -> EventStore {
    let cfg = config();
    let mut store = EventStore::connect(&cfg.postgres.url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {} (run scripts/services.sh up): {e}",
                cfg.postgres.url
            )
        });
    store.migrate().await.expect("migrations");
    store
}

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use contract::Event;
use projector::generator::{self, GenerateOptions};
use projector::kafka::{self, EventPublisher};
use projector::runtime::{self, Shared};
use projector::sinks::Loaded;
use projector::sinks::clickhouse::FactRow;
use projector::versions::VersionSinks;
use projectors::analytics::AnalyticsProjector;
use projectors::customer360::{Customer360, Customer360Projector};
use projectors::memory::{MemoryFacts, MemoryViews};
use projectors::order_view::{OrderView, OrderViewProjector};
use projectors::{Doc, Guard};

/// Settings isolated to one test: own topics, group, dead-letter topic and read models.
pub fn isolated_config(tag: &str) -> (Isolated, String) {
    let ns = unique_namespace(tag);
    let id = ns.trim_end_matches('-').replace('-', "_");
    (Isolated::new(config().isolated(&id), &ns), ns)
}

/// One test's isolated settings, used as a `Config`. When the test ends without a panic, its
/// topics are deleted, and so is what it wrote into the stores ([`cleanup`]): the local broker
/// rewrites a snapshot of everything it holds whenever anything is produced, so every test's
/// leftover topics made every later produce of the run dearer, and leftover keys, collections,
/// tables and events grew the developer's servers with every run. A failed test keeps
/// everything, to be looked at.
pub struct Isolated {
    config: Config,
    /// The deployment's id as made, in every name it writes (a test may change the settings
    /// it uses; never what is deleted).
    id: String,
    /// The prefix of the test's aggregate ids in the event store.
    namespace: String,
    armed: bool,
}

impl Isolated {
    pub fn new(config: Config, namespace: &str) -> Isolated {
        Isolated {
            id: config.deployment.clone(),
            config,
            namespace: namespace.to_owned(),
            armed: true,
        }
    }

    /// The settings, for a caller that cleans up itself (the scenario does).
    pub fn keep(mut self) -> Config {
        self.armed = false;
        self.config.clone()
    }
}

impl std::ops::Deref for Isolated {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl std::ops::DerefMut for Isolated {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if !self.armed || std::thread::panicking() {
            return;
        }
        // Dropped inside the test's runtime, which cannot be blocked on: a runtime of its own
        // on a thread of its own.
        let (cfg, id, ns) = (self.config.clone(), self.id.clone(), self.namespace.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            // The timer is made inside the runtime (the arguments of block_on are not).
            let r = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    let _ = tokio::join!(
                        projector::kafka::delete_topics(&cfg.kafka),
                        cleanup::delete_deployment(&cfg, &id, &ns),
                    );
                })
                .await
            });
            r.ok()
        })
        .join();
    }
}

/// The same settings as environment variables, for a worker run as a child process.
pub fn config_env(cfg: &Config) -> Vec<(&'static str, String)> {
    cfg.child_env()
}

/// The binary under test; `PROJECTOR_BIN` names another build (a copy that a long repeated
/// run keeps using while the tree is rebuilt).
pub fn projector_bin() -> PathBuf {
    std::env::var_os("PROJECTOR_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_projector")),
        PathBuf::from,
    )
}

/// Append a seeded history to the store and publish it on the test's topics.
pub async fn generate(
    cfg: &Config,
    ns: &str,
    events: u64,
    seed: u64,
    duplicates: f64,
    redeliveries: f64,
) {
    let mut stores = vec![store().await];
    kafka::ensure_topics(&cfg.kafka)
        .await
        .expect("Kafka up (scripts/services.sh up)");
    let publisher = EventPublisher::new(&cfg.kafka).unwrap();
    let opts = GenerateOptions {
        seed,
        events,
        namespace: ns.to_owned(),
        batch_size: 1_000,
        duplicate_rate: duplicates,
        redelivery_rate: redeliveries,
    };
    generator::generate(&mut stores, Some(&publisher), &opts, |_| {})
        .await
        .unwrap();
}

/// The event log of a namespace, in commit order.
pub async fn event_log(ns: &str) -> Vec<Event> {
    event_log_at(&config(), ns).await
}

/// The event log of a namespace in the event store `cfg` names.
pub async fn event_log_at(cfg: &Config, ns: &str) -> Vec<Event> {
    EventStore::connect(&cfg.postgres.url)
        .await
        .unwrap()
        .read_prefix(ns)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.into_event().unwrap())
        .collect()
}

/// View and guard only: the write token changes with every write.
pub fn comparable<V>(
    docs: impl IntoIterator<Item = (String, Doc<V>)>,
    ns: &str,
) -> BTreeMap<String, (V, Guard)> {
    docs.into_iter()
        .filter(|(k, _)| k.starts_with(ns))
        .map(|(k, d)| (k, (d.view, d.guard)))
        .collect()
}

/// Stored documents, every one of which must decode.
pub fn decoded<V>(docs: Vec<(String, Loaded<V>)>) -> Vec<(String, Doc<V>)> {
    docs.into_iter()
        .map(|(k, d)| {
            let d = d.unwrap_or_else(|e| panic!("stored document {k} does not decode: {e}"));
            (k, d)
        })
        .collect()
}

/// What a set of read models holds for one namespace.
pub struct Snapshot {
    pub customers: BTreeMap<String, (Customer360, Guard)>,
    pub orders: BTreeMap<String, (OrderView, Guard)>,
    pub facts: BTreeMap<String, FactRow>,
}

pub async fn snapshot(sinks: &VersionSinks, ns: &str) -> Snapshot {
    Snapshot {
        customers: comparable(
            decoded(sinks.redis.scan_all::<Customer360>().await.unwrap()),
            ns,
        ),
        orders: comparable(
            decoded(sinks.mongo.scan_all::<OrderView>().await.unwrap()),
            ns,
        ),
        facts: facts_of(sinks, ns).await,
    }
}

/// The pure fold of a log, as the read models should hold it.
pub fn fold(log: &[Event], ns: &str) -> Snapshot {
    let facts = MemoryFacts::fold(&AnalyticsProjector, log);
    Snapshot {
        customers: comparable(MemoryViews::fold(&Customer360Projector, log).docs, ns),
        orders: comparable(MemoryViews::fold(&OrderViewProjector, log).docs, ns),
        facts: facts
            .facts
            .values()
            .filter(|f| f.aggregate_id.starts_with(ns))
            .map(|f| (f.event_id.clone(), FactRow::from(f)))
            .collect(),
    }
}

/// `got` equals `want`, with a precise message for the first difference.
pub fn assert_same(want: &Snapshot, got: &Snapshot, what: &str) {
    assert_eq!(
        want.customers.len(),
        got.customers.len(),
        "{what}: Customer-360 document count"
    );
    for (k, w) in &want.customers {
        assert_eq!(
            Some(w),
            got.customers.get(k),
            "{what}: Customer-360 {k} differs"
        );
    }
    assert_eq!(
        want.orders.len(),
        got.orders.len(),
        "{what}: order view count"
    );
    for (k, w) in &want.orders {
        assert_eq!(Some(w), got.orders.get(k), "{what}: order view {k} differs");
    }
    assert_eq!(
        want.facts.len(),
        got.facts.len(),
        "{what}: fact count (each event once)"
    );
    assert!(want.facts == got.facts, "{what}: analytics facts differ");
}

/// Every read model equals the pure fold of the event log, exactly.
pub async fn assert_read_models_equal_fold(cfg: &Config, ns: &str) {
    let log = event_log_at(cfg, ns).await;
    assert!(!log.is_empty());
    let sinks = VersionSinks::connect_views(cfg, &cfg.views).await.unwrap();
    assert_same(
        &fold(&log, ns),
        &snapshot(&sinks, ns).await,
        "live read models vs the fold",
    );
}

/// Run the worker in this process until no event arrived for `idle`.
pub async fn run_worker_until_idle(cfg: &Config, idle: Duration) -> runtime::RunReport {
    let opts = runtime::RunOptions {
        stop_when_idle: Some(idle),
    };
    runtime::run(cfg, opts, Arc::new(Shared::default()))
        .await
        .expect("worker")
}

/// The live read models of a test's settings.
pub async fn live_sinks(cfg: &Config) -> VersionSinks {
    VersionSinks::connect_views(cfg, &cfg.views).await.unwrap()
}

/// The facts of one namespace, by event id (a rebuilt version's table also holds other
/// tests' events replayed beside ours).
pub async fn facts_of(sinks: &VersionSinks, ns: &str) -> BTreeMap<String, FactRow> {
    sinks
        .clickhouse
        .all_facts()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.aggregate_id.starts_with(ns))
        .map(|r| (r.event_id.clone(), r))
        .collect()
}

/// Poll (up to 120 s) until the namespace has `want` facts; returns how many it has.
pub async fn wait_for_facts(sinks: &VersionSinks, ns: &str, want: usize) -> usize {
    wait_for_facts_within(sinks, ns, want, Duration::from_secs(120)).await
}

/// Poll (every 500 ms, up to `at_most`) until the namespace has `want` facts; returns how
/// many it has.
pub async fn wait_for_facts_within(
    sinks: &VersionSinks,
    ns: &str,
    want: usize,
    at_most: Duration,
) -> usize {
    let mut have = 0;
    for _ in 0..at_most.as_millis().div_ceil(500) {
        have = facts_of(sinks, ns).await.len();
        if have >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    have
}

/// Append and publish events the projectors refuse though they honour the contract: an
/// order that completes without ever being placed (then ships), and a customer updated
/// before being created (then created). Returns how many events were appended.
pub async fn append_refused(cfg: &Config, ns: &str) -> usize {
    use contract::EventData;
    use contract::catalogue::*;
    let t = chrono::Utc::now();
    let ghost = format!("{ns}ord-ghost");
    let early = format!("{ns}cus-early");
    let customer = format!("{ns}cus-ghost");
    let twice = format!("{ns}ord-twice");
    let placed = |seq| {
        Event::new(
            uuid::Uuid::new_v4(),
            &twice,
            seq,
            EventData::OrderPlaced(OrderPlaced {
                order_id: twice.clone(),
                customer_id: early.clone(),
                items: vec![],
                shipping_address: Default::default(),
                total_amount: 12.5,
                currency: None,
            }),
            Default::default(),
            t,
        )
    };
    let events = vec![
        Event::new(
            uuid::Uuid::new_v4(),
            &ghost,
            0,
            EventData::OrderCompleted(OrderCompleted {
                order_id: ghost.clone(),
                customer_id: customer.clone(),
            }),
            Default::default(),
            t,
        ),
        Event::new(
            uuid::Uuid::new_v4(),
            &ghost,
            1,
            EventData::OrderShipped(OrderShipped {
                order_id: ghost.clone(),
                customer_id: customer.clone(),
                carrier: "UPS".into(),
                tracking_number: "1Z".into(),
            }),
            Default::default(),
            t,
        ),
        Event::new(
            uuid::Uuid::new_v4(),
            &early,
            0,
            EventData::CustomerUpdated(CustomerUpdated {
                customer_id: early.clone(),
                changes: serde_json::Map::from_iter([("name".into(), serde_json::json!("B"))]),
                previous_values: Default::default(),
            }),
            Default::default(),
            t,
        ),
        Event::new(
            uuid::Uuid::new_v4(),
            &early,
            1,
            EventData::CustomerCreated(CustomerCreated {
                customer_id: early.clone(),
                name: "A".into(),
                email: "a@x".into(),
                phone: None,
                address: None,
            }),
            Default::default(),
            t,
        ),
    ];
    // ord-twice: placed, validated, placed again (the order view refuses it; Customer-360
    // and analytics take it), then shipped (held by the order view only).
    let mut events = events;
    events.push(placed(0));
    events.push(Event::new(
        uuid::Uuid::new_v4(),
        &twice,
        1,
        EventData::OrderValidated(OrderValidated {
            order_id: twice.clone(),
            customer_id: early.clone(),
            validation_details: Default::default(),
        }),
        Default::default(),
        t,
    ));
    events.push(placed(2));
    events.push(Event::new(
        uuid::Uuid::new_v4(),
        &twice,
        3,
        EventData::OrderShipped(OrderShipped {
            order_id: twice.clone(),
            customer_id: early.clone(),
            carrier: "DHL".into(),
            tracking_number: "9".into(),
        }),
        Default::default(),
        t,
    ));
    append_and_publish(cfg, events.into_iter().map(|e| e.unwrap()).collect()).await
}

/// A customer stream whose first event was garbled in transit: `customer.created` is intact
/// in the event store, its Kafka copy is not JSON (poison: the stream parks), and the
/// stream's next event (an interaction, sequence 1) is appended and published after it.
pub async fn stream_garbled_in_transit(cfg: &Config, id: &str) {
    use contract::EventData;
    use contract::catalogue::{CustomerCreated, InteractionRecorded};
    let event = |seq: i64, data: EventData| {
        Event::new(
            uuid::Uuid::new_v4(),
            id,
            seq,
            data,
            Default::default(),
            chrono::Utc::now(),
        )
        .unwrap()
    };
    let created = event(
        0,
        EventData::CustomerCreated(CustomerCreated {
            customer_id: id.to_owned(),
            name: "G".into(),
            email: "g@x".into(),
            phone: None,
            address: None,
        }),
    );
    append(cfg, &[created]).await;
    EventPublisher::new(&cfg.kafka)
        .unwrap()
        .publish_raw(
            &format!("{}customer", cfg.kafka.topic_prefix),
            id,
            b"\x00\x01 garbled in transit",
            &[
                ("event_type", "customer.created"),
                ("aggregate_type", "customer"),
                ("sequence", "0"),
            ],
        )
        .await
        .unwrap();
    let later = event(
        1,
        EventData::InteractionRecorded(InteractionRecorded {
            customer_id: id.to_owned(),
            agent_id: "a".into(),
            interaction_id: "i".into(),
            interaction_type: "chat".into(),
            channel: None,
            sentiment_score: Some(0.9),
        }),
    );
    append_and_publish(cfg, vec![later]).await;
}

/// Append events to the event store only (never published); returns them as stored, with
/// their global positions.
pub async fn append(cfg: &Config, events: &[Event]) -> Vec<contract::EventEnvelope> {
    let mut envs: Vec<contract::EventEnvelope> = events.iter().map(|e| e.to_envelope()).collect();
    EventStore::connect(&cfg.postgres.url)
        .await
        .unwrap()
        .append(&mut envs)
        .await
        .unwrap();
    envs
}

/// Append events to the event store and publish them; returns how many.
pub async fn append_and_publish(cfg: &Config, events: Vec<Event>) -> usize {
    let envs = append(cfg, &events).await;
    kafka::ensure_topics(&cfg.kafka).await.unwrap();
    EventPublisher::new(&cfg.kafka)
        .unwrap()
        .publish(&envs)
        .await
        .unwrap();
    envs.len()
}

/// GET a path over plain HTTP/1.0: (status, body).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, path, &[]).await
}

/// GET a path with extra headers over plain HTTP/1.0: (status, body).
pub async fn http_request(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    exchange(
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: x\r\n"),
        headers,
        "",
    )
    .await
}

/// POST a JSON body over plain HTTP/1.0: (status, body).
pub async fn http_post_json(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Option<(u16, String)> {
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n",
        body.len()
    );
    exchange(addr, head, headers, &body).await
}

/// POST a body of any type over plain HTTP/1.0: (status, body).
pub async fn http_post(
    addr: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Option<(u16, String)> {
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    exchange(addr, head, &[], body).await
}

/// Send a request (its first lines, more headers, a body) and read the whole answer.
async fn exchange(
    addr: &str,
    mut req: String,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    ))
}

/// `projector serve` as a child process on an ephemeral port, with one bearer token.
pub struct ReadServer {
    child: std::process::Child,
    pub addr: String,
    pub token: String,
}

impl ReadServer {
    pub fn spawn(cfg: &Config, extra: &[(&str, String)]) -> ReadServer {
        use std::io::BufRead;
        let token = format!("tok-{}", unique_namespace("t").trim_end_matches('-'));
        let mut child = std::process::Command::new(projector_bin())
            .args(["serve", "--addr", "127.0.0.1:0"])
            .envs(config_env(cfg))
            .env("PROJECTOR_READ__TOKENS", &token)
            .env("RUST_LOG", "warn")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| panic!("serve did not start: {line:?}"))
            .to_owned();
        ReadServer { child, addr, token }
    }

    /// GET with the token: (status, JSON body).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {}", self.token);
        let (status, body) = http_request(&self.addr, path, &[("Authorization", &auth)])
            .await
            .unwrap_or_else(|| panic!("no answer to {path}"));
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: {status} {body:?} is not JSON: {e}"));
        (status, json)
    }
}

impl Drop for ReadServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `version`'s rebuild at the current head, so the test replays only recent events
/// (the event store is shared with every other test).
pub async fn seed_at_head(
    cfg: &Config,
    store: &EventStore,
    version: &str,
) -> projector::rebuild::Checkpoint {
    let head = store.committed_head().await.unwrap();
    let mut seeded = None;
    for p in projectors::names() {
        let c = projector::rebuild::Checkpoint {
            projection: projector::versions::scope_key(cfg, p),
            version: version.to_owned(),
            position: head,
            events_applied: 0,
            status: "building".into(),
        };
        projector::rebuild::save_checkpoint(store, &c)
            .await
            .unwrap();
        seeded = Some(c);
    }
    seeded.unwrap()
}

/// A guard as the read API shows it: the streams still open for the document.
pub fn open_streams(guard: &Guard) -> Guard {
    guard
        .iter()
        .filter(|(_, seq)| **seq != projectors::document::FINISHED)
        .map(|(s, seq)| (s.clone(), *seq))
        .collect()
}
