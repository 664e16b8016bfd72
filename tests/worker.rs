//! The live worker against the real broker and stores: read models equal the pure fold of
//! the event log whatever the duplicates, redeliveries, crashes and rebalances.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;

/// A worker process with a stable identity (static group membership, like a StatefulSet
/// pod): a restarted pod takes its partitions back without waiting for its old session.
fn spawn_worker(cfg: &projector::config::Config, pod: &str, idle_exit: Option<f64>) -> Pod {
    let mut cmd = Command::new(common::projector_bin());
    cmd.arg("run")
        .envs(common::config_env(cfg))
        .env("PROJECTOR_KAFKA__INSTANCE_ID", pod)
        .env("RUST_LOG", "warn");
    if let Some(s) = idle_exit {
        cmd.arg("--exit-when-idle").arg(s.to_string());
    }
    Pod(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker"))
}

/// A worker process that is killed if the test ends early (a failed assertion).
struct Pod(Child);

impl Drop for Pod {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Pod {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Pod {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

fn kill9(child: &mut Pod) {
    // Child::kill sends SIGKILL: no drain, no commit, no goodbye to the group.
    child.kill().expect("kill -9");
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_redeliveries_give_read_models_equal_to_the_fold() {
    let (cfg, ns) = common::isolated_config("dup");
    common::generate(&cfg, &ns, 4_000, 11, 0.05, 0.5).await;
    let report = common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    assert!(
        report.duplicates > 0,
        "injected copies reached the projectors and were skipped"
    );
    assert_eq!(report.dead_letters, 0);
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    // A full replay of the topics by a new group changes nothing.
    let mut replay = cfg.clone();
    replay.kafka.group_id = format!("{}-replay", cfg.kafka.group_id);
    let again = common::run_worker_until_idle(&replay, Duration::from_secs(4)).await;
    assert!(again.messages >= 4_000);
    assert_eq!(
        again.writes.get("customer360").copied().unwrap_or(0),
        0,
        "no Customer-360 rewritten"
    );
    assert_eq!(
        again.writes.get("order_view").copied().unwrap_or(0),
        0,
        "no order view rewritten"
    );
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    let (cfg, ns) = common::isolated_config("kill");
    let mut rng = rand::rng();
    // Events keep arriving while the worker is killed and restarted, five times.
    for round in 0..5u64 {
        let mut worker = spawn_worker(&cfg, "pod-0", None);
        common::generate(&cfg, &ns_round(&ns, round), 1_500, 100 + round, 0.02, 0.2).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_500))).await;
        kill9(&mut worker);
    }
    // A last worker finishes the backlog.
    let mut last = spawn_worker(&cfg, "pod-0", Some(5.0));
    let status = tokio::task::spawn_blocking(move || last.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

/// Each round writes its own streams (a new seed would otherwise rewrite the same ids).
fn ns_round(ns: &str, round: u64) -> String {
    format!("{ns}r{round}-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_one_killed_a_third_joining_still_equal() {
    let (cfg, ns) = common::isolated_config("grp");
    let mut a = spawn_worker(&cfg, "pod-0", None);
    let mut b = spawn_worker(&cfg, "pod-1", None);
    common::generate(&cfg, &ns_round(&ns, 0), 3_000, 21, 0.02, 0.2).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    kill9(&mut a);
    common::generate(&cfg, &ns_round(&ns, 1), 3_000, 22, 0.02, 0.2).await;
    // The killed pod's replacement, and a new pod scaling the group out, join mid-run.
    let mut a2 = spawn_worker(&cfg, "pod-0", None);
    let mut c = spawn_worker(&cfg, "pod-2", None);
    common::generate(&cfg, &ns_round(&ns, 2), 3_000, 23, 0.02, 0.2).await;
    wait_until_caught_up(&cfg, &ns).await;
    let mut workers = [&mut a2, &mut b, &mut c];
    for w in workers.iter_mut() {
        let pid = w.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }
    for w in workers.iter_mut() {
        let status = w.wait().unwrap();
        assert!(
            status.success(),
            "SIGTERM drains, commits and exits 0: {status:?}"
        );
    }
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

/// Poll until the facts table holds every event of the namespace (or 120 s).
async fn wait_until_caught_up(cfg: &projector::config::Config, ns: &str) {
    let want = common::event_log(ns).await.len();
    let sinks = common::live_sinks(cfg).await;
    let have = common::wait_for_facts(&sinks, ns, want).await;
    assert!(have >= want, "workers did not catch up: {have} of {want}");
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// librdkafka can drop a resume as outdated (it raced a rebalance's fetch start), leaving a
/// partition paused for good with nothing reported (`source::pace`). The failpoint loses
/// one partition's resume after the first idle pause; events then arrive on every
/// partition, and the worker must still take them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_librdkafka_drops_is_made_again() {
    use common::faults::Worker;
    let (cfg, ns) = common::isolated_config("lres");
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    assert!(cfg.kafka.idle_pause_ms > 0, "the test config paces fetches");
    let extra = [("PROJECTOR_FAILPOINT", "lose_a_resume".to_owned())];
    let w = Worker::spawn(&cfg, "lres-0", "lres", &extra);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // NaN, which is not ≥ 1, until the worker serves its metrics.
        if w.metric("projector_fetch_pauses_total").await >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle worker never paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::generate(&cfg, &ns, 2_000, 61, 0.0, 0.0).await;
    wait_until_caught_up(&cfg, &ns).await;
    let again = w.metric("projector_fetch_silent_resumes_total").await;
    assert!(again >= 1.0, "the lost resume was made again");
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    // Idle and paced now: every partition answers each resume, none is resumed again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pauses = w.metric("projector_fetch_pauses_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "silent resumes: {again} while catching up, {} after; pauses in 2 s idle: {}",
        w.metric("projector_fetch_silent_resumes_total").await,
        w.metric("projector_fetch_pauses_total").await - pauses
    );
    w.stop();
}

/// librdkafka can hang a consumer's close for good (issue 4041). The failpoint hangs it: the
/// worker still exits 0 on SIGTERM, after everything is written and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_hangs_does_not_keep_the_worker_from_exiting() {
    use common::faults::Worker;
    let (cfg, ns) = common::isolated_config("hclose");
    common::generate(&cfg, &ns, 300, 71, 0.0, 0.0).await;
    let extra = [
        ("PROJECTOR_FAILPOINT", "hang_close".to_owned()),
        ("PROJECTOR_WORKER__DRAIN_TIMEOUT_MS", "1000".to_owned()),
    ];
    let w = Worker::spawn(&cfg, "hclose-0", "hclose", &extra);
    wait_until_caught_up(&cfg, &ns).await;
    let log = w.log.clone();
    w.stop(); // asserts exit 0
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("closing the consumer hangs"),
        "the close hung and was left behind"
    );
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

/// While nothing else is in flight a window closes `window_idle_ms` after its first message:
/// with `window_ms` at two minutes, events still become visible within seconds. (That a busy
/// pipeline waits out `window_ms` is `source::window`'s unit test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pipeline_does_not_wait_out_the_window() {
    use common::faults::Worker;
    let (cfg, ns) = common::isolated_config("idlew");
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    let extra = [
        ("PROJECTOR_WORKER__WINDOW_MS", "120000".to_owned()),
        ("PROJECTOR_WORKER__WINDOW_IDLE_MS", "5".to_owned()),
    ];
    let w = Worker::spawn(&cfg, "idlew-0", "idlew", &extra);
    common::generate(&cfg, &ns, 500, 83, 0.0, 0.0).await;
    let want = common::event_log(&ns).await.len();
    let sinks = common::live_sinks(&cfg).await;
    let started = std::time::Instant::now();
    let have = common::wait_for_facts_within(&sinks, &ns, want, Duration::from_secs(40)).await;
    assert!(
        have >= want,
        "{have} of {want} events visible after 40 s: windows waited for window_ms"
    );
    eprintln!(
        "all {want} visible {:?} after publishing",
        started.elapsed()
    );
    common::assert_read_models_equal_fold(&cfg, &ns).await;
    w.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_aggregate_are_applied_in_sequence() {
    let (cfg, ns) = common::isolated_config("ord");
    common::generate(&cfg, &ns, 3_000, 31, 0.1, 1.0).await;
    common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    let log = common::event_log(&ns).await;
    let mut streams: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in log
        .iter()
        .filter(|e| e.header.aggregate_type == contract::AggregateType::Order)
    {
        streams
            .entry(e.header.aggregate_id.clone())
            .or_default()
            .push(e.header.event_type.clone());
    }
    let sinks = common::live_sinks(&cfg).await;
    let views: BTreeMap<String, projectors::Doc<projectors::order_view::OrderView>> =
        common::decoded(sinks.mongo.scan_all().await.unwrap())
            .into_iter()
            .collect();
    assert_eq!(views.len(), streams.len());
    for (id, types) in &streams {
        let doc = &views[id];
        // The timeline records the order events were applied in.
        let applied: Vec<String> = doc
            .view
            .timeline
            .iter()
            .map(|t| t.event_type.clone())
            .collect();
        assert_eq!(&applied, types, "order {id} applied out of sequence");
        assert_eq!(doc.view.version, types.len() as i64 - 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dead_letter_topic_with_its_reason_and_never_stops_the_worker() {
    use projector::kafka::{self, EventPublisher};
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use serde_json::json;

    let (cfg, ns) = common::isolated_config("dlq");
    kafka::ensure_topics(&cfg.kafka).await.unwrap();
    let publisher = EventPublisher::new(&cfg.kafka).unwrap();
    let order_topic = format!("{}order", cfg.kafka.topic_prefix);
    let bad_stream = format!("{ns}ord-poison");
    let envelope = |seq: i64, data: serde_json::Value| {
        json!({"event_id": uuid::Uuid::new_v4().to_string(), "aggregate_type": "order",
               "aggregate_id": bad_stream, "sequence_number": seq, "global_position": 1,
               "event_type": "order.shipped", "event_data": data,
               "timestamp": "2026-11-22T10:00:00Z"})
        .to_string()
    };
    fn headers(seq: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("event_type", "order.shipped"),
            ("aggregate_type", "order"),
            ("sequence", seq),
        ]
    }
    // 1. not JSON; 2. a known type whose payload does not parse; 3. a later, valid event of
    // that stream (parked so it is never applied out of order); 4. no headers at all.
    publisher
        .publish_raw(
            &order_topic,
            &format!("{ns}ord-junk"),
            b"{not json",
            &headers("0"),
        )
        .await
        .unwrap();
    let shipped_without_carrier = envelope(0, json!({"order_id": bad_stream, "customer_id": "c"}));
    publisher
        .publish_raw(
            &order_topic,
            &bad_stream,
            shipped_without_carrier.as_bytes(),
            &headers("0"),
        )
        .await
        .unwrap();
    let valid_later = envelope(
        1,
        json!({"order_id": bad_stream, "customer_id": "c", "carrier": "UPS", "tracking_number": "1Z"}),
    );
    publisher
        .publish_raw(
            &order_topic,
            &bad_stream,
            valid_later.as_bytes(),
            &headers("1"),
        )
        .await
        .unwrap();
    publisher
        .publish_raw(
            &order_topic,
            &format!("{ns}ord-nohdr"),
            valid_later.as_bytes(),
            &[],
        )
        .await
        .unwrap();
    // And a normal history around them.
    common::generate(&cfg, &ns, 2_000, 41, 0.0, 0.0).await;

    let report = common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    // Three unreadable messages, and the later event of the poisoned stream, held by each of
    // the three projectors that handle its type (parking is per projector).
    assert_eq!(report.dead_letters, 6);
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    let consumer: StreamConsumer = kafka::base_client_config(&cfg.kafka)
        .set("group.id", format!("{ns}dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[cfg.kafka.dlq_topic.as_str()]).unwrap();
    let mut kinds = BTreeMap::new();
    while kinds.len() < 6 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("dead letters arrive")
            .unwrap();
        let h = msg.headers().unwrap();
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let key = String::from_utf8_lossy(msg.key().unwrap()).into_owned();
        let reason = get("dlq_reason").unwrap();
        assert!(!reason.is_empty());
        assert_eq!(
            get("dlq_source_topic").as_deref(),
            Some(order_topic.as_str())
        );
        kinds.insert(
            (
                key,
                get("dlq_source_offset").unwrap(),
                get("dlq_projector").unwrap_or_default(),
            ),
            (get("dlq_kind").unwrap(), reason),
        );
    }
    let parked_by: Vec<&str> = kinds
        .iter()
        .filter(|(_, (k, _))| k == "parked")
        .map(|((_, _, p), _)| p.as_str())
        .collect();
    assert_eq!(
        parked_by,
        ["analytics", "customer360", "order_view"],
        "{kinds:?}"
    );
    let kinds: Vec<(String, String)> = kinds.into_values().collect();
    let has = |kind: &str, text: &str| kinds.iter().any(|(k, r)| k == kind && r.contains(text));
    assert!(has("invalid_json", "not valid JSON"), "{kinds:?}");
    assert!(has("invalid_event_data", "carrier"), "{kinds:?}");
    assert!(has("parked", "parked"), "{kinds:?}");
    assert!(has("missing_header", "event_type"), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_exposes_health_readiness_and_metrics() {
    let (cfg, ns) = common::isolated_config("obs");
    common::generate(&cfg, &ns, 500, 51, 0.0, 0.0).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(common::projector_bin());
    cmd.arg("run")
        .envs(common::config_env(&cfg))
        .env("PROJECTOR_WORKER__HTTP_ADDR", &addr);
    let mut pod = Pod(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let mut ready = false;
    for _ in 0..100 {
        if let Some((code, _)) = common::http_get(&addr, "/readyz").await {
            if code == 200 {
                ready = true;
                break;
            }
            assert_eq!(code, 503, "not ready yet is a 503");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "ready once partitions are assigned");
    assert_eq!(
        common::http_get(&addr, "/healthz").await.map(|r| r.0),
        Some(200)
    );
    let names = [
        "projector_events_total",
        "projector_writes_total",
        "projector_window_messages",
        "projector_lag_seconds",
        "projector_in_flight_messages",
        // From the client's statistics, every 5 s.
        "projector_consumer_lag_messages",
    ];
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = common::http_get(&addr, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        if names.iter().all(|n| metrics.contains(n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in names {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    let pid = pod.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(pod.wait().unwrap().success());
}

/// One customer's order stream: placed, then completed or cancelled.
fn order_events(ns: &str, n: usize) -> Vec<contract::Event> {
    use contract::EventData;
    use contract::catalogue::{OrderCancelled, OrderCompleted, OrderPlaced};
    let customer = format!("{ns}cus-hot");
    let t0 = chrono::Utc::now();
    let mut events = Vec::new();
    for i in 0..n {
        let id = format!("{ns}ord-{i}");
        let at = t0 + chrono::Duration::milliseconds(i as i64);
        let placed = EventData::OrderPlaced(OrderPlaced {
            order_id: id.clone(),
            customer_id: customer.clone(),
            items: vec![],
            shipping_address: Default::default(),
            total_amount: 2.5,
            currency: None,
        });
        let outcome = if i % 4 == 0 {
            EventData::OrderCancelled(OrderCancelled {
                order_id: id.clone(),
                customer_id: customer.clone(),
                reason: "r".into(),
                cancelled_by: "customer".into(),
                previous_status: "created".into(),
            })
        } else {
            EventData::OrderCompleted(OrderCompleted {
                order_id: id.clone(),
                customer_id: customer.clone(),
            })
        };
        for (seq, data) in [placed, outcome].into_iter().enumerate() {
            let e = contract::Event::new(
                uuid::Uuid::new_v4(),
                &id,
                seq as i64,
                data,
                Default::default(),
                at,
            );
            events.push(e.unwrap());
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_document_stays_small_however_many_orders_it_has_finished() {
    let (cfg, ns) = common::isolated_config("hot");
    let orders = 1_500;
    common::append_and_publish(&cfg, order_events(&ns, orders)).await;
    common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    // The stored document holds no order: each finished stream is kept beside it, in a set
    // written by the same script.
    let sinks = common::live_sinks(&cfg).await;
    let key = sinks.redis.key(&format!("{ns}cus-hot"));
    let side = projector::sinks::redis::finished_key(&key).unwrap();
    let mut con = sinks.redis.connection();
    let body: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    let finished: usize = redis::cmd("SCARD")
        .arg(&side)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(finished, orders);
    assert!(body.len() < 2_000, "the document is {} bytes", body.len());
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["orders"]["total"], orders);
    assert_eq!(doc["orders"]["cancelled"], orders / 4);
    assert_eq!(doc["_guard"].as_object().map(|g| g.len()), Some(0));

    // Every event again (a new group replays the topics): all duplicates, nothing rewritten.
    let mut replay = cfg.clone();
    replay.kafka.group_id = format!("{}-replay", cfg.kafka.group_id);
    let again = common::run_worker_until_idle(&replay, Duration::from_secs(4)).await;
    assert!(again.messages >= 2 * orders as u64);
    assert_eq!(again.writes.get("customer360").copied().unwrap_or(0), 0);
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    // Retiring the version deletes the sets with the documents.
    sinks.redis.delete_all().await.unwrap();
    let left: usize = redis::cmd("EXISTS")
        .arg(&side)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(left, 0);
}
