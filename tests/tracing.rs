//! Traces: a worker process given `PROJECTOR_TELEMETRY__OTLP_ENDPOINT` sends its spans over
//! OTLP/HTTP (protobuf) to a receiver run by the test; one without it exports nothing.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use common::faults::Worker;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A request's path and body.
type Post = (String, Vec<u8>);

/// The bodies POSTed to a tiny OTLP/HTTP receiver on 127.0.0.1 (any path is recorded).
struct Receiver {
    url: String,
    posts: Arc<Mutex<Vec<Post>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let p = posts.clone();
        let app =
            axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
                let p = p.clone();
                async move {
                    p.lock()
                        .unwrap()
                        .push((uri.path().to_owned(), body.to_vec()));
                    // An empty ExportTraceServiceResponse: everything accepted.
                    axum::http::StatusCode::OK
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, posts }
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }
}

/// An exported span: its name, ids and attributes (as text).
#[derive(Debug)]
struct Exported {
    name: String,
    id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, String>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// Every span of every request, with the `service.name` of its resource.
fn decode(posts: &[Post]) -> Vec<(String, Exported)> {
    let mut out = Vec::new();
    for (path, body) in posts {
        assert_eq!(path, "/v1/traces", "spans are POSTed to the traces path");
        let req = ExportTraceServiceRequest::decode(body.as_slice())
            .expect("an OTLP protobuf ExportTraceServiceRequest");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let Span {
                        name,
                        span_id,
                        parent_span_id,
                        attributes,
                        ..
                    } = s;
                    out.push((
                        service.clone(),
                        Exported {
                            name,
                            id: span_id,
                            parent: parent_span_id,
                            attrs: attrs(&attributes),
                        },
                    ));
                }
            }
        }
    }
    out
}

/// Not a terminal: JSON lines as before traces existed, without span context (spans go to
/// traces only). A panic's message, were a dependency to panic while the process winds
/// down, is not a log line.
fn assert_json_logs(log: &str) {
    let json: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(json.len() >= 3, "{log}");
    for v in &json {
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{v}"
        );
        assert!(v.get("span").is_none() && v.get("spans").is_none(), "{v}");
    }
    assert!(
        !log.lines()
            .any(|l| l.contains(" INFO ") || l.contains(" WARN ")),
        "no human-readable log lines: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_windows_and_store_writes_reach_an_otlp_endpoint() {
    let receiver = Receiver::start().await;
    let (cfg, ns) = common::isolated_config("trace");
    // A backlog before the worker starts, then more while it runs: several windows.
    common::generate(&cfg, &ns, 300, 21, 0.0, 0.0).await;
    let worker = Worker::spawn(
        &cfg,
        "trace-0",
        "tracing",
        &[("PROJECTOR_TELEMETRY__OTLP_ENDPOINT", receiver.url.clone())],
    );
    let sinks = common::live_sinks(&cfg).await;
    let first = common::event_log_at(&cfg, &ns).await.len();
    assert_eq!(common::wait_for_facts(&sinks, &ns, first).await, first);
    common::generate(&cfg, &format!("{ns}b-"), 200, 22, 0.0, 0.0).await;
    let log = common::event_log_at(&cfg, &ns).await;
    assert_eq!(
        common::wait_for_facts(&sinks, &ns, log.len()).await,
        log.len()
    );
    // SIGTERM: drain, commit, flush the buffered spans, exit 0.
    let worker_log = {
        let path = worker.log.clone();
        worker.stop();
        std::fs::read_to_string(path).unwrap_or_default()
    };
    assert!(
        worker_log.contains("exporting traces over OTLP/HTTP"),
        "{worker_log}"
    );
    assert_json_logs(&worker_log);

    let spans = decode(&receiver.posts());
    assert!(
        !spans.is_empty(),
        "no span arrived; worker log:\n{worker_log}"
    );
    assert!(
        spans.iter().all(|(service, _)| service == "projector"),
        "service.name is projector"
    );
    let named = |n: &'static str| spans.iter().map(|(_, s)| s).filter(move |s| s.name == n);
    let by_id: HashMap<&[u8], &Exported> =
        spans.iter().map(|(_, s)| (s.id.as_slice(), s)).collect();

    // Windows: this test's partitions and offsets, every event once, sampled ids.
    let windows: Vec<&Exported> = named("window").collect();
    assert!(windows.len() >= 2, "{} windows", windows.len());
    for w in &windows {
        assert!(w.parent.is_empty(), "a window span is a root");
        let partitions = &w.attrs["partitions"];
        assert!(
            partitions.starts_with(&cfg.kafka.topic_prefix) && partitions.contains(".."),
            "partitions with first..last offsets: {partitions}"
        );
    }
    let events: usize = windows
        .iter()
        .map(|w| w.attrs["events"].parse::<usize>().unwrap())
        .sum();
    assert_eq!(events, log.len(), "every window's span was exported");
    let event_ids: BTreeSet<String> = log.iter().map(|e| e.header.event_id.to_string()).collect();
    let correlations: BTreeSet<String> = log
        .iter()
        .filter_map(|e| e.header.metadata.get_str("correlation_id"))
        .collect();
    assert!(!correlations.is_empty());
    for w in &windows {
        let ids = &w.attrs["event_ids"];
        let sampled: Vec<&str> = ids.split_whitespace().filter(|t| t.len() == 36).collect();
        assert!(
            !sampled.is_empty() && sampled.iter().all(|id| event_ids.contains(*id)),
            "sampled event ids are the generated events': {ids}"
        );
    }
    let with_correlation = windows.iter().any(|w| {
        w.attrs["correlation_ids"]
            .split_whitespace()
            .any(|c| correlations.contains(c))
    });
    assert!(
        with_correlation,
        "a window span carries the correlation ids of its events"
    );
    // The raw bytes hold them too (protobuf strings are plain UTF-8).
    let raw: Vec<u8> = receiver.posts().into_iter().flat_map(|(_, b)| b).collect();
    assert!(
        correlations
            .iter()
            .any(|c| raw.windows(c.len()).any(|w| w == c.as_bytes()))
    );

    // Stages under windows, store writes under stages: one of each store, written.
    let stages: Vec<&Exported> = named("stage").collect();
    for p in projectors::names() {
        assert!(
            stages.iter().any(|s| s.attrs["projection"] == p),
            "a stage span of {p}"
        );
    }
    for s in &stages {
        let parent = by_id.get(s.parent.as_slice()).map(|p| p.name.as_str());
        assert_eq!(parent, Some("window"), "a stage's parent is its window");
    }
    let writes: Vec<&Exported> = named("store.write").collect();
    for store in ["redis", "mongo", "clickhouse"] {
        let ok: Vec<&&Exported> = writes
            .iter()
            .filter(|w| w.attrs["store"] == store && w.attrs["outcome"] == "ok")
            .collect();
        assert!(!ok.is_empty(), "a successful write span of {store}");
        for w in &ok {
            let parent = by_id.get(w.parent.as_slice()).expect("a write's parent");
            assert_eq!(parent.name, "stage");
            assert_eq!(parent.attrs["store"], store);
            assert_eq!(w.attrs["version"], "live");
            let size = w.attrs.get("documents").or(w.attrs.get("rows"));
            assert!(size.is_some_and(|n| n.parse::<usize>().is_ok()), "{w:?}");
        }
    }
    let locations: BTreeSet<&str> = writes
        .iter()
        .map(|w| w.attrs["location"].as_str())
        .collect();
    for want in [
        cfg.views.redis_prefix.as_str(),
        cfg.views.mongo_collection.as_str(),
        cfg.views.clickhouse_table.as_str(),
    ] {
        assert!(locations.contains(want), "{want} in {locations:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_exporter_is_installed() {
    let receiver = Receiver::start().await;
    let (cfg, ns) = common::isolated_config("notrace");
    common::generate(&cfg, &ns, 200, 22, 0.0, 0.0).await;
    let want = common::event_log_at(&cfg, &ns).await.len();
    // The SDK's own variables name the receiver: an exporter, had one been installed, would
    // have sent there.
    let worker = Worker::spawn(
        &cfg,
        "notrace-0",
        "tracing",
        &[
            ("PROJECTOR_TELEMETRY__OTLP_ENDPOINT", String::new()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.clone()),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("{}/v1/traces", receiver.url),
            ),
        ],
    );
    let sinks = common::live_sinks(&cfg).await;
    assert_eq!(common::wait_for_facts(&sinks, &ns, want).await, want);
    let path = worker.log.clone();
    worker.stop();
    let worker_log = std::fs::read_to_string(path).unwrap();
    assert!(receiver.posts().is_empty(), "nothing was exported");
    assert!(!worker_log.contains("exporting traces"), "{worker_log}");
    assert_json_logs(&worker_log);
}
