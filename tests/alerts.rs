//! The shipped alert rules, evaluated by a real Prometheus (Debian's, started through
//! `scripts/services.sh up prometheus`) scraping two real workers on the fault-test servers,
//! fire and resolve as the faults they name come and go:
//!
//! - a poison flood raises ProjectorDeadLettersRising;
//! - Redis hung (SIGSTOP) under load opens its circuit: ProjectorCircuitOpen fires, and
//!   resolves after SIGCONT;
//! - a member that stops (SIGSTOP; the coordinator still says it owns its partitions) leaves
//!   its partitions behind while messages arrive: ProjectorPartitionStalled fires, and resolves
//!   when it runs again.
//!
//! The rules are deploy/prometheus/alerts.yml with only their durations shortened: every
//! `for:` and the stall threshold (seconds without progress). Then every query of the Grafana
//! dashboard must return data from the same Prometheus.
//!
//! Runs in the `faults` test group, on the fault-test server set.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::faults::{FaultSet, Worker, load_while, progress, repo};
use common::prometheus::{Alert, Prometheus};

/// Every rule's `for:` in the test (shipped: 1 to 10 minutes). Longer than one evaluation, so
/// each alert still goes pending, then firing.
const FOR_SECS: u64 = 2;
/// ProjectorPartitionStalled's threshold in the test (shipped: 120 s without progress).
const STALL_SECS: u64 = 5;

/// The shipped rules with their durations shortened, expressions otherwise unchanged: every
/// `for:` line, and the stall rule's threshold (a duration: seconds without progress). Fails
/// if the rules no longer have the shape this rewrite expects, rather than test other rules.
fn quick_rules(shipped: &str) -> (String, usize) {
    const STALL: &str = "(projector_group_stall_seconds) > ";
    let (mut fors, mut stalls) = (0, 0);
    let mut out = String::new();
    for line in shipped.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        if body.starts_with("for: ") {
            fors += 1;
            out.push_str(&format!("{indent}for: {FOR_SECS}s"));
        } else if let Some((head, limit)) = line.split_once(STALL) {
            assert!(
                limit.trim().parse::<f64>().is_ok(),
                "the stall rule's threshold is no longer a plain number: {line}"
            );
            stalls += 1;
            out.push_str(&format!("{head}{STALL}{STALL_SECS}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    assert_eq!(
        stalls, 1,
        "one ProjectorPartitionStalled threshold to shorten"
    );
    (out, fors)
}

/// Alert names in the rules text.
fn alert_names(rules: &str) -> Vec<String> {
    let mut names: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    names
}

/// What happened when, seconds from the start of the test.
struct Timeline {
    t0: Instant,
    events: Vec<(f64, String)>,
}

impl Timeline {
    fn note(&mut self, what: impl Into<String>) -> f64 {
        let t = self.t0.elapsed().as_secs_f64();
        let what = what.into();
        eprintln!("t={t:6.1}s  {what}");
        self.events.push((t, what));
        t
    }
}

/// Poll `/api/v1/alerts` until an alert named `name` whose labels `ours` accepts is firing
/// (`firing`), or until none is active any more, pending or firing (resolved); at most `limit`.
async fn wait_alert(
    prom: &Prometheus,
    name: &str,
    ours: impl Fn(&Alert) -> bool,
    firing: bool,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let alerts = prom.alerts().await;
        let mine: Vec<&Alert> = alerts
            .iter()
            .filter(|a| a.name == name && ours(a))
            .collect();
        let done = if firing {
            mine.iter().any(|a| a.state == "firing")
        } else {
            mine.is_empty()
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not {} within {limit:?}; active alerts: {alerts:#?}",
            if firing { "firing" } else { "resolved" }
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Poll a query until its result is not empty; at most `limit`.
async fn wait_query(prom: &Prometheus, promql: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while prom.query(promql).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no data for {promql} in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Publish a message no projector can read (not JSON) with an order's headers.
async fn poison(publisher: &projector::kafka::EventPublisher, topic: &str, key: &str) {
    publisher
        .publish_raw(
            topic,
            key,
            b"{not json",
            &[
                ("event_type", "order.placed"),
                ("aggregate_type", "order"),
                ("sequence", "0"),
            ],
        )
        .await
        .expect("publish a poison message");
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Resumes a hung server when dropped: a failing test leaves no store stopped behind.
struct Hung<'a>(&'a FaultSet, &'static str);

impl Drop for Hung<'_> {
    fn drop(&mut self) {
        self.0.resume(self.1);
    }
}

/// Resumes a stopped worker process when dropped.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

/// Every query of the Grafana dashboard (panels nested in rows too), with its panel title.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard query as Grafana would send it: its built-in interval variables and its
/// template variables (any value: `.*`) substituted.
fn substitute(expr: &str, variables: &[String]) -> String {
    let mut q = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "15s")
        .replace("${__interval}", "15s")
        .replace("$__range", "5m")
        .replace("${__range}", "5m");
    for v in variables {
        q = q
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("[[{v}]]"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    assert!(!q.contains('$'), "a variable left in the query: {q}");
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_alerts_fire_and_resolve_in_a_real_prometheus() {
    let mut tl = Timeline {
        t0: Instant::now(),
        events: Vec::new(),
    };
    let set = FaultSet::up();
    let prom = Prometheus::up();
    tl.note("fault set and Prometheus up");

    // The shipped rules, durations shortened, loaded by a reload.
    let shipped = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml"))
        .expect("deploy/prometheus/alerts.yml");
    let (rules, fors) = quick_rules(&shipped);
    let groups = prom.load_rules(&rules).await;
    let loaded: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let mut names: Vec<String> = loaded
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(
        names,
        alert_names(&shipped),
        "Prometheus evaluates every shipped rule"
    );
    let shortened = loaded
        .iter()
        .filter(|r| r["duration"].as_f64() == Some(FOR_SECS as f64))
        .count();
    assert_eq!(shortened, fors, "every `for:` shortened: {loaded:#?}");

    let (cfg, ns) = set.isolated("alerts");
    projector::kafka::ensure_topics(&cfg.kafka).await.unwrap();
    // A rebuild in progress (its checkpoint), so the dashboard's rebuild panel has series.
    let mut store = projector::store::EventStore::connect(&cfg.postgres.url)
        .await
        .expect("the fault set's PostgreSQL");
    store.migrate().await.expect("migrations");
    common::seed_at_head(&cfg, &store, "valerts").await;

    let extra = [
        ("PROJECTOR_WORKER__WINDOW_SIZE", "500".to_owned()),
        // A hung Redis fails a call within a second (10 s shipped), so its circuit opens
        // after three failures in a few seconds.
        ("PROJECTOR_REDIS__TIMEOUT_MS", "1000".to_owned()),
        ("PROJECTOR_REDIS__CONNECT_TIMEOUT_MS", "1000".to_owned()),
        // A stopped member keeps its place in the group (and its partitions) while stopped.
        ("PROJECTOR_KAFKA__SESSION_TIMEOUT_MS", "30000".to_owned()),
    ];
    let mut w0 = Worker::spawn(&cfg, "w0", "alerts", &extra);
    let mut w1 = Worker::spawn(&cfg, "w1", "alerts", &extra);
    prom.set_targets("alerts", &[&w0.http, &w1.http]);
    let group = cfg.kafka.group_id.clone();

    let loading = Arc::new(AtomicBool::new(true));
    let more = loading.clone();
    let load = tokio::spawn(load_while(cfg.clone(), ns.clone(), 200, move |_| {
        more.load(Ordering::Relaxed)
    }));
    // Our workers' series only (a Prometheus that was already running may hold others).
    let ours = format!(r#"job="projector",instance=~"{}|{}""#, w0.http, w1.http);
    let up = Duration::from_secs(60);
    wait_query(&prom, &format!("count(up{{{ours}}} == 1) == 2"), up).await;
    // Both members in the group, stable: the poison below stays with one member.
    wait_query(
        &prom,
        &format!(r#"max(projector_group_members{{group="{group}"}}) == 2"#),
        up,
    )
    .await;
    let c = cfg.clone();
    common::faults::wait_until(up, "the workers' first commits", || {
        progress(&c).is_some_and(|(done, _)| done > 0)
    })
    .await;
    tl.note("both workers scraped, in the group and committing");

    // Poison: one message first, so its counter's series exists before the flood (an
    // increase needs two samples), then 30 more on the same key (one partition, one member).
    let publisher = projector::kafka::EventPublisher::new(&cfg.kafka).unwrap();
    let topic = format!("{}order", cfg.kafka.topic_prefix);
    let key = format!("{ns}ord-poison");
    let rising = |a: &Alert| a.name == "ProjectorDeadLettersRising";
    assert!(
        !prom.alerts().await.iter().any(rising),
        "ProjectorDeadLettersRising is active before any dead letter of this test: a \
         Prometheus started elsewhere holds older series (stop it: scripts/services.sh down \
         prometheus, with the fault set's SERVICES_RUN_ROOT and PROMETHEUS_PORT)"
    );
    poison(&publisher, &topic, &key).await;
    wait_query(
        &prom,
        &format!("projector_dead_letters_total{{{ours}}}"),
        up,
    )
    .await;
    for _ in 0..30 {
        poison(&publisher, &topic, &key).await;
    }
    tl.note("poison flood published (31 undecodable messages)");
    wait_alert(
        &prom,
        "ProjectorDeadLettersRising",
        |_| true,
        true,
        Duration::from_secs(60),
    )
    .await;
    tl.note("ProjectorDeadLettersRising firing");

    // A store hang under load.
    let hung = Hung(&set, "redis");
    set.hang("redis");
    tl.note("Redis hung (SIGSTOP)");
    let workers = [w0.http.clone(), w1.http.clone()];
    let redis =
        |a: &Alert| a.label("store") == "redis" && workers.iter().any(|h| h == a.label("instance"));
    wait_alert(
        &prom,
        "ProjectorCircuitOpen",
        redis,
        true,
        Duration::from_secs(60),
    )
    .await;
    tl.note("ProjectorCircuitOpen{store=redis} firing");
    drop(hung);
    tl.note("Redis resumed (SIGCONT)");
    wait_alert(
        &prom,
        "ProjectorCircuitOpen",
        redis,
        false,
        Duration::from_secs(60),
    )
    .await;
    tl.note("ProjectorCircuitOpen resolved");

    // The hang stalled every partition too: caught up again before a member stalls alone.
    let in_group = |a: &Alert| a.label("group") == group;
    wait_alert(
        &prom,
        "ProjectorPartitionStalled",
        in_group,
        false,
        Duration::from_secs(90),
    )
    .await;
    tl.note("no partition stalled (the backlog of the hang is done)");

    // A stalled member: stopped, still the owner of its partitions as far as the
    // coordinator knows, while messages keep arriving on them.
    let stopped = Stopped(w0.child.id());
    signal(w0.child.id(), "-STOP");
    tl.note("worker w0 stopped (SIGSTOP)");
    wait_alert(
        &prom,
        "ProjectorPartitionStalled",
        in_group,
        true,
        Duration::from_secs(60),
    )
    .await;
    let stalled: Vec<String> = prom
        .alerts()
        .await
        .iter()
        .filter(|a| a.name == "ProjectorPartitionStalled" && a.state == "firing")
        .map(|a| format!("{}/{}", a.label("topic"), a.label("partition")))
        .collect();
    tl.note(format!("ProjectorPartitionStalled firing for {stalled:?}"));
    drop(stopped);
    tl.note("worker w0 resumed (SIGCONT)");
    wait_alert(
        &prom,
        "ProjectorPartitionStalled",
        in_group,
        false,
        Duration::from_secs(60),
    )
    .await;
    tl.note("ProjectorPartitionStalled resolved");

    // Every query of the dashboard returns data from this Prometheus, while the workers run.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/projector.json"))
            .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:#?}");
    // The rebuild rate and ETA need two of the workers' rebuild polls (10 s apart).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut empty: Vec<(String, String)>;
    loop {
        empty = Vec::new();
        let mut report = Vec::new();
        for (title, expr) in &queries {
            let q = substitute(expr, &variables);
            let result = prom.query(&q).await;
            let nan = result
                .iter()
                .filter(|s| s["value"][1].as_str() == Some("NaN"))
                .count();
            report.push(format!(
                "{:>3} series ({nan} NaN)  {q}   [{title}]",
                result.len()
            ));
            if result.is_empty() {
                empty.push((title.clone(), q));
            }
        }
        if empty.is_empty() || Instant::now() >= deadline {
            eprintln!("dashboard queries:\n  {}", report.join("\n  "));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tl.note(format!(
        "{} dashboard queries run, {} without data",
        queries.len(),
        empty.len()
    ));

    loading.store(false, Ordering::Relaxed);
    let published = load.await.unwrap();
    assert!(w0.running() && w1.running(), "nobody restarted a worker");
    w0.stop();
    w1.stop();
    prom.remove_targets("alerts");
    let _ = projector::kafka::delete_topics(&cfg.kafka).await;
    tl.note(format!("done ({published} messages published)"));
    eprintln!("timeline:");
    for (t, what) in &tl.events {
        eprintln!("  t={t:6.1}s  {what}");
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
}
