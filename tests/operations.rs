//! The operations files name only what a running worker exports: every `projector_*` metric
//! in the alert rules and in the Grafana dashboard is on a live worker's `/metrics` (the
//! rules' and the dashboard's syntax is checked by scripts/ops-check.sh).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::faults::Worker;

/// Every `projector_*` name in a file (summary and histogram suffixes stripped).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("projector_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        if before_ok {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

/// Read the worker's `/metrics` every 500 ms, for up to 30 s, until `done` holds for what
/// `read` makes of it; returns the last reading either way.
async fn watch<T>(
    worker: &Worker,
    mut read: impl FnMut(&str) -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let mut last = None;
    for _ in 0..60 {
        let (_, body) = common::http_get(&worker.http, "/metrics").await.unwrap();
        let v = read(&body);
        if done(&v) {
            return v;
        }
        last = Some(v);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last.expect("60 readings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported_by_a_running_worker() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/dashboards/projector.json")).unwrap();
    let named: BTreeSet<String> = metric_names(&rules)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(named.len() >= 15, "{named:?}");

    let (cfg, ns) = common::isolated_config("ops");
    let store = common::store().await;
    // A rebuild in progress (its checkpoint), so its progress series exist.
    common::seed_at_head(&cfg, &store, "vops").await;
    common::generate(&cfg, &ns, 500, 4, 0.05, 0.05).await;
    projector::kafka::EventPublisher::new(&cfg.kafka)
        .unwrap()
        .publish_raw(
            &format!("{}order", cfg.kafka.topic_prefix),
            &format!("{ns}ord-poison"),
            b"{not json",
            &[
                ("event_type", "order.placed"),
                ("aggregate_type", "order"),
                ("sequence", "0"),
            ],
        )
        .await
        .unwrap();
    let worker = Worker::spawn(&cfg, "ops-0", "operations", &[]);
    let sinks = common::live_sinks(&cfg).await;
    let want = common::event_log_at(&cfg, &ns).await.len();
    assert_eq!(common::wait_for_facts(&sinks, &ns, want).await, want);

    let mut missing = named.clone();
    let missing = watch(
        &worker,
        |body| {
            missing.retain(|m| {
                !body
                    .lines()
                    .any(|l| !l.starts_with('#') && l.starts_with(m.as_str()))
            });
            missing.clone()
        },
        |m| m.is_empty(),
    )
    .await;
    assert!(
        missing.is_empty(),
        "named by the dashboard or the alerts, not exported: {missing:?}"
    );

    // Caught up: every partition's lag in seconds reads 0 once the commit is in the client's
    // statistics (every 5 s).
    let caught_up = |v: &Vec<f64>| !v.is_empty() && v.iter().all(|s| *s == 0.0);
    let last = watch(
        &worker,
        |body| -> Vec<f64> {
            body.lines()
                .filter(|l| l.starts_with("projector_consumer_lag_seconds{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect()
        },
        caught_up,
    )
    .await;
    assert!(
        caught_up(&last),
        "lag in seconds after catching up: {last:?}"
    );
    // The garbled message parked its stream for every projector: one parked now.
    let parked = watch(
        &worker,
        |body| -> Vec<String> {
            body.lines()
                .filter(|l| l.starts_with("projector_parked_streams{"))
                .map(str::to_owned)
                .collect()
        },
        |p| p.iter().any(|l| l.ends_with(" 1")),
    )
    .await;
    assert!(
        parked
            .iter()
            .any(|l| l.contains("projector=\"*\"") && l.ends_with(" 1")),
        "{parked:?}"
    );
    // The seeded rebuild's checkpoint does not move: 0 events/s and no time estimate (both
    // known from the second look at the checkpoints, 10 s apart).
    let series = |body: &str, name: &str| -> Vec<String> {
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains("version=\"vops\""))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
            .collect()
    };
    let (rate, eta) = watch(
        &worker,
        |body| {
            (
                series(body, "projector_rebuild_events_per_second{"),
                series(body, "projector_rebuild_eta_seconds{"),
            )
        },
        |(rate, eta)| !rate.is_empty() && !eta.is_empty(),
    )
    .await;
    assert!(
        !rate.is_empty() && rate.iter().all(|v| v == "0"),
        "{rate:?}"
    );
    assert!(!eta.is_empty() && eta.iter().all(|v| v == "NaN"), "{eta:?}");
    worker.stop();
    for p in projectors::names() {
        projector::rebuild::retire(&cfg, &store, p, "vops")
            .await
            .ok();
    }
}
