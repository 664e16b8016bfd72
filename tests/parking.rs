//! Refused and unreadable events against the real servers: parks are per projector, shared
//! by every worker (a worker that takes partitions over holds what another one parked),
//! recorded before the offsets move (a crash right after recording them changes nothing),
//! and an operator can unpark a stream and replay it from the event store. Inputs that the
//! earlier engine retried forever become dead letters while the rest flows.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use contract::EventData;
use contract::catalogue::*;
use projector::config::Config;
use projector::runtime::parking::ParkStore;
use projector::store::Pg;

/// A worker process, killed when dropped (a failing test leaks no worker). Its log is kept
/// under `target/fault-logs` and printed when the test fails.
struct Worker {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Worker {
    /// The last lines of its log, for a failure message.
    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("{}:\n{}", self.log.display(), lines[from..].join("\n"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        }
    }
}

impl std::ops::Deref for Worker {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

/// A worker process: dynamic membership unless `pod` is given.
fn worker(cfg: &Config, pod: Option<&str>, idle: Option<f64>, env: &[(&str, &str)]) -> Worker {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fault-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("parking-{}-{n}.log", cfg.deployment));
    let mut cmd = Command::new(common::projector_bin());
    cmd.arg("run").envs(common::config_env(cfg)).env(
        "RUST_LOG",
        std::env::var("TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
    );
    if let Some(p) = pod {
        cmd.env("PROJECTOR_KAFKA__INSTANCE_ID", p);
    }
    if let Some(s) = idle {
        cmd.arg("--exit-when-idle").arg(s.to_string());
    }
    let child = cmd
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Worker { child, log }
}

/// Stop a worker as Kubernetes does and wait for it, a bounded time: a shutdown that hangs
/// fails the test with the worker's log instead of stalling it until the runner's timeout.
fn sigterm(w: &mut Worker) -> std::process::ExitStatus {
    let pid = w.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = w.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not exit within 90 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn parks(cfg: &Config) -> Vec<(String, String, String, String)> {
    ParkStore::new(
        std::sync::Arc::new(Pg::from_config(&cfg.postgres)),
        &cfg.deployment,
    )
    .list()
    .await
    .unwrap()
}

fn completed(ns: &str, seq: i64) -> contract::Event {
    let id = format!("{ns}ord-twice");
    contract::Event::new(
        uuid::Uuid::new_v4(),
        &id,
        seq,
        EventData::OrderCompleted(OrderCompleted {
            order_id: id.clone(),
            customer_id: format!("{ns}cus-early"),
        }),
        Default::default(),
        chrono::Utc::now(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parks_are_per_projector_and_survive_a_rebalance() {
    let (cfg, ns) = common::isolated_config("pr");
    within(
        "generate",
        120,
        common::generate(&cfg, &ns, 1_000, 3, 0.0, 0.0),
    )
    .await;
    within("append refused", 60, common::append_refused(&cfg, &ns)).await;
    // a alone parks; then b joins, and a leaves: b owns every partition, ord-twice's too.
    let mut a = worker(&cfg, None, None, &[]);
    let want = common::event_log(&ns).await.len();
    let sinks = common::live_sinks(&cfg).await;
    let have = within(
        "a takes all",
        150,
        common::wait_for_facts(&sinks, &ns, want),
    )
    .await;
    assert_eq!(have, want);
    let mut b = worker(&cfg, None, None, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = within("read parks", 30, parks(&cfg)).await;
    let twice = format!("order/{ns}ord-twice");
    assert!(
        p.iter()
            .any(|(proj, _, s, _)| proj == "order_view" && *s == twice),
        "the order view parked ord-twice: {p:?}"
    );
    assert!(
        !p.iter()
            .any(|(proj, _, s, _)| proj != "order_view" && *s == twice),
        "only the order view refused it: {p:?}"
    );
    // a leaves; b takes its partitions over and must hold what a parked.
    assert!(sigterm(&mut a).success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    within(
        "publish",
        60,
        common::append_and_publish(&cfg, vec![completed(&ns, 4)]),
    )
    .await;
    let have = within(
        "b takes over",
        150,
        common::wait_for_facts(&sinks, &ns, want + 1),
    )
    .await;
    assert_eq!(have, want + 1, "analytics took the new event");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sigterm(&mut b).success());
    // The fold parks the same way: the order view holds seq 3 and 4, Customer-360 applies them.
    within(
        "fold",
        120,
        common::assert_read_models_equal_fold(&cfg, &ns),
    )
    .await;
    let view: Vec<_> = common::decoded(
        within(
            "scan",
            60,
            sinks.mongo.scan_all::<projectors::order_view::OrderView>(),
        )
        .await
        .unwrap(),
    )
    .into_iter()
    .filter(|(k, _)| k.ends_with("ord-twice"))
    .collect();
    assert_eq!(
        view[0].1.view.status, "payment_pending",
        "stopped before the refused event"
    );
}

/// `step` within `secs`, or fail naming it (the workers' logs follow, from their drops): a
/// hang anywhere fails the test with what it was doing instead of reaching the runner's
/// timeout mute.
async fn within<T>(step: &str, secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{step}: not done within {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_recording_parks_and_committing_changes_nothing() {
    let (cfg, ns) = common::isolated_config("pc");
    common::generate(&cfg, &ns, 800, 4, 0.0, 0.0).await;
    common::append_refused(&cfg, &ns).await;
    // The first worker dies the moment its parks are recorded, before any commit covers them.
    let mut crashing = worker(
        &cfg,
        Some("pod-0"),
        None,
        &[("PROJECTOR_FAILPOINT", "after_parks_saved")],
    );
    let status = tokio::task::spawn_blocking(move || crashing.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success(), "the failpoint killed it: {status:?}");
    assert!(
        !parks(&cfg).await.is_empty(),
        "parks were recorded before the crash"
    );
    // Its replacement redelivers the uncommitted events: the ones before the refusal apply,
    // the refused one and those after it are held, exactly as the fold says.
    let mut next = worker(&cfg, Some("pod-0"), Some(4.0), &[]);
    assert!(
        tokio::task::spawn_blocking(move || next.wait().unwrap())
            .await
            .unwrap()
            .success()
    );
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    let p = parks(&cfg).await;
    let twice = format!("order/{ns}ord-twice");
    let mark = p
        .iter()
        .find(|(proj, _, s, _)| proj == "order_view" && *s == twice)
        .unwrap();
    assert!(mark.3.contains("already placed"), "{mark:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparked_stream_is_replayed_from_the_event_store() {
    let (cfg, ns) = common::isolated_config("up");
    common::generate(&cfg, &ns, 500, 5, 0.0, 0.0).await;
    // A stream whose first event was corrupted in transit: the event store has it intact.
    let id = format!("{ns}cus-transit");
    common::stream_garbled_in_transit(&cfg, &id).await;
    let mut w = worker(&cfg, Some("pod-0"), None, &[]);
    let stream = format!("customer/{id}");
    let sinks = common::live_sinks(&cfg).await;
    let want = common::event_log(&ns).await.len() - 2;
    assert_eq!(common::wait_for_facts(&sinks, &ns, want).await, want);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        parks(&cfg).await.iter().any(|(_, _, s, _)| *s == stream),
        "parked by the garbled message"
    );
    // The operator fixes nothing here (the store was right all along): unpark and replay,
    // while the worker runs.
    let all: Vec<String> = projectors::names()
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    projector::rebuild::unpark_and_replay(&cfg, &all, &stream)
        .await
        .unwrap();
    assert!(!parks(&cfg).await.iter().any(|(_, _, s, _)| *s == stream));
    // What arrives after the unpark flows at once: no stage keeps a copy of the park of its
    // own once the table has it (it used to for 60 s, holding this event for good).
    let next = contract::Event::new(
        uuid::Uuid::new_v4(),
        &id,
        2,
        EventData::InteractionRecorded(InteractionRecorded {
            customer_id: id.clone(),
            agent_id: "a".into(),
            interaction_id: "i2".into(),
            interaction_type: "chat".into(),
            channel: None,
            sentiment_score: Some(0.5),
        }),
        Default::default(),
        chrono::Utc::now(),
    )
    .unwrap();
    common::append_and_publish(&cfg, vec![next]).await;
    assert_eq!(
        common::wait_for_facts(&sinks, &ns, want + 3).await,
        want + 3
    );
    assert!(sigterm(&mut w).success());
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

/// An interaction of the garbled stream (`common::stream_garbled_in_transit`) at `seq`.
fn interaction(id: &str, seq: i64) -> contract::Event {
    contract::Event::new(
        uuid::Uuid::new_v4(),
        id,
        seq,
        EventData::InteractionRecorded(InteractionRecorded {
            customer_id: id.to_owned(),
            agent_id: "a".into(),
            interaction_id: format!("i{seq}"),
            interaction_type: "chat".into(),
            channel: None,
            sentiment_score: Some(seq as f64 / 10.0),
        }),
        Default::default(),
        chrono::Utc::now(),
    )
    .unwrap()
}

/// An unpark while the stream goes on receiving events. A worker reads the parks again only
/// every `PARKS_REFRESH`: until then it holds what arrives, after the first replay read the
/// store. An event it takes once it has read them again must not bury one it held (the
/// guard would then take the held one for a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpark_while_the_stream_flows_loses_no_held_event() {
    unpark_while_the_stream_flows("uf", false).await;
}

/// The same, with the worker killed right after it held an event and started again under
/// its own id: the new process knows of the release from PostgreSQL, not from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_after_holding_an_unparked_streams_event_loses_it_neither() {
    unpark_while_the_stream_flows("ur", true).await;
}

async fn unpark_while_the_stream_flows(tag: &str, restart: bool) {
    use projector::runtime::documents::PARKS_REFRESH;
    let (cfg, ns) = common::isolated_config(tag);
    common::generate(&cfg, &ns, 100, 6, 0.0, 0.0).await;
    let id = format!("{ns}cus-transit");
    common::stream_garbled_in_transit(&cfg, &id).await;
    let mut w = worker(&cfg, Some("pod-0"), None, &[]);
    let stream = format!("customer/{id}");
    let sinks = common::live_sinks(&cfg).await;
    let mut want = common::event_log(&ns).await.len() - 2;
    assert_eq!(common::wait_for_facts(&sinks, &ns, want).await, want);
    for _ in 0..40 {
        if parks(&cfg).await.iter().any(|(_, _, s, _)| *s == stream) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(parks(&cfg).await.iter().any(|(_, _, s, _)| *s == stream));
    // Its parks grown stale, an event of the stream makes the worker read them again (the
    // park still there, so it is held): the next reading is PARKS_REFRESH away.
    tokio::time::sleep(PARKS_REFRESH).await;
    common::append_and_publish(&cfg, vec![interaction(&id, 2)]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all: Vec<String> = projectors::names()
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let started = tokio::time::Instant::now();
    let unpark = {
        let (cfg, stream) = ((*cfg).clone(), stream.clone());
        tokio::spawn(
            async move { projector::rebuild::unpark_and_replay(&cfg, &all, &stream).await },
        )
    };
    // Held: the worker has not read the parks since the unpark.
    tokio::time::sleep(Duration::from_secs(1)).await;
    common::append_and_publish(&cfg, vec![interaction(&id, 3)]).await;
    if restart {
        // Held and committed (commits every 500 ms), then the process is gone.
        tokio::time::sleep(Duration::from_secs(2)).await;
        w.kill().unwrap();
        w.wait().unwrap();
        w = worker(&cfg, Some("pod-0"), None, &[]);
    }
    // Taken: the worker reads the parks again (gone), before the second replay.
    tokio::time::sleep_until(started + PARKS_REFRESH).await;
    common::append_and_publish(&cfg, vec![interaction(&id, 4)]).await;
    unpark.await.unwrap().unwrap();
    want += 5;
    assert_eq!(common::wait_for_facts(&sinks, &ns, want).await, want);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sigterm(&mut w).success());
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_that_used_to_wedge_the_worker_become_dead_letters_or_just_work() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (cfg, ns) = common::isolated_config("pe");
    let t0 = chrono::DateTime::parse_from_rfc3339("2010-01-15T00:00:00Z")
        .unwrap()
        .to_utc();
    // An id ending like the old revision keys, and 150 months of events in one window.
    let mut events = Vec::new();
    for (i, id) in [format!("{ns}cus-7"), format!("{ns}cus-7:rev")]
        .iter()
        .enumerate()
    {
        events.push(
            contract::Event::new(
                uuid::Uuid::new_v4(),
                id,
                0,
                EventData::CustomerCreated(CustomerCreated {
                    customer_id: id.clone(),
                    name: format!("n{i}"),
                    email: "e".into(),
                    phone: None,
                    address: None,
                }),
                Default::default(),
                t0,
            )
            .unwrap(),
        );
    }
    for m in 0..150i64 {
        let id = format!("{ns}cus-m{m}");
        events.push(
            contract::Event::new(
                uuid::Uuid::new_v4(),
                &id,
                0,
                EventData::CustomerCreated(CustomerCreated {
                    customer_id: id.clone(),
                    name: "m".into(),
                    email: "e".into(),
                    phone: None,
                    address: None,
                }),
                Default::default(),
                t0 + chrono::Duration::days(31 * m),
            )
            .unwrap(),
        );
    }
    common::append_and_publish(&cfg, events).await;
    // Kafka only (the contract keeps them out of the event store): an integer no store can
    // hold, and a message bigger than the dead-letter producer takes.
    let producer: FutureProducer = projector::kafka::base_client_config(&cfg.kafka)
        .create()
        .unwrap();
    let order = format!("{ns}ord-big");
    let huge_int = format!(
        r#"{{"event_id":"{}","aggregate_type":"order","aggregate_id":"{order}","sequence_number":0,"global_position":1,
        "event_type":"order.placed","event_data":{{"order_id":"{order}","customer_id":"c","items":[],
        "shipping_address":{{"zip":18446744073709551615}},"total_amount":1.0}},"timestamp":"2026-11-22T10:00:00Z"}}"#,
        uuid::Uuid::new_v4()
    );
    // Under the contract's 1 MB (so it is read, and refused as not JSON), but with the
    // dead-letter headers over what the producer and broker take: it keeps its head only.
    let oversized = vec![b'x'; 990_000];
    let headers = projector::kafka::headers([
        ("event_type", "order.placed"),
        ("aggregate_type", "order"),
        ("sequence", "0"),
    ]);
    for payload in [huge_int.as_bytes(), oversized.as_slice()] {
        let topic = format!("{}order", cfg.kafka.topic_prefix);
        let r = FutureRecord::to(&topic)
            .key(order.as_str())
            .payload(payload)
            .headers(headers.clone());
        projector::kafka::send(&producer, r).await.unwrap();
    }
    let report = common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    assert_eq!(report.dead_letters, 2, "{report:?}");
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    let sinks = common::live_sinks(&cfg).await;
    let facts = common::facts_of(&sinks, &ns).await;
    assert_eq!(facts.len(), 152, "every month's facts inserted");
    // The big one kept the head of its payload, and says how big it was.
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let dlq: StreamConsumer = projector::kafka::base_client_config(&cfg.kafka)
        .set("group.id", format!("{ns}dlq"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    dlq.subscribe(&[cfg.kafka.dlq_topic.as_str()]).unwrap();
    let mut truncated = None;
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(30), dlq.recv())
            .await
            .unwrap()
            .unwrap();
        let h = m.headers().unwrap();
        if let Some(v) = h
            .iter()
            .find(|x| x.key == "dlq_truncated_from_bytes")
            .and_then(|x| x.value)
        {
            truncated = Some((
                String::from_utf8_lossy(v).into_owned(),
                m.payload().map_or(0, <[u8]>::len),
            ));
        }
    }
    let (from, len) = truncated.expect("the oversized letter is marked truncated");
    assert_eq!(from, "990000");
    assert!(len < cfg.kafka.dlq_max_bytes, "{len}");
}

/// PostgreSQL keeps parks by the same rule as every stage in memory (`Parked::park`): an
/// earlier sequence moves a sequence mark back; a mark after an unreadable message's offset
/// is never replaced by a sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_park_table_follows_the_in_memory_rule() {
    use projector::runtime::parking::ParkRecord;
    use projectors::Parked;
    use projectors::parking::ParkFrom;

    let (cfg, ns) = common::isolated_config("parkrule");
    let store = ParkStore::new(
        std::sync::Arc::new(Pg::from_config(&cfg.postgres)),
        &cfg.deployment,
    );
    let _ = ns;
    common::store().await;
    let record = |stream: &str, from: ParkFrom| ParkRecord {
        projection: "order_view".into(),
        version: "live".into(),
        stream: stream.into(),
        from,
        reason: format!("{from:?}"),
    };
    let offset = ParkFrom::Offset {
        partition: 1,
        offset: 7,
    };
    let steps = [
        record("order/a", ParkFrom::Sequence(5)),
        record("order/a", ParkFrom::Sequence(9)),
        record("order/a", ParkFrom::Sequence(3)),
        record("order/b", offset),
        record("order/b", ParkFrom::Sequence(1)),
    ];
    let mut memory = Parked::default();
    for r in &steps {
        memory.park(&r.stream, r.from, &r.reason);
        store.save(std::slice::from_ref(r)).await.unwrap();
    }
    let table = store.load("order_view", "live").await.unwrap();
    assert_eq!(table, memory);
    assert_eq!(
        table.get("order/a").map(|m| m.from),
        Some(ParkFrom::Sequence(3))
    );
    assert_eq!(table.get("order/b").map(|m| m.from), Some(offset));
}
