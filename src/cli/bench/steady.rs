//! Steady state: publish → visible at a given rate, the latency curve and its budget.

use std::time::{Duration, Instant};

use contract::EventEnvelope;
use projector::config::Config;
use projector::generator::History;
use projector::kafka::{self, EventPublisher};
use projector::runtime::RunReport;

use super::SEED;
use super::worker::{CpuProbe, cpu_seconds, rss_line, spawn_worker_serving, wait_sampling_rss};

/// The latency budget of a run, step by step (see `projector::runtime::budget`).
pub(super) fn print_budget(steps: &[projector::runtime::budget::StepLatency]) {
    println!(
        "  {:<16} {:>6} {:>11} {:>11} {:>11}",
        "latency budget", "count", "p50 ms", "p99 ms", "max ms"
    );
    for s in steps {
        println!(
            "  {:<16} {:>6} {:>11.2} {:>11.2} {:>11.2}",
            s.step, s.count, s.p50_ms, s.p99_ms, s.max_ms
        );
    }
}

/// One steady-state run: publish → visible from the worker's own figures.
pub(super) struct Steady {
    pub rate: f64,
    pub sent: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// Peak RSS, MiB.
    pub rss: f64,
    /// Worker CPU seconds per wall second while the load was published.
    pub cpu_share: f64,
    /// Each server's and the worker's CPU while the load was published (what bounds a rate).
    pub servers: String,
    /// The worker's own report (latency budget, fetch sizes).
    pub report: RunReport,
}

impl Steady {
    pub(super) fn line(&self) -> String {
        format!(
            "steady state at {:.0} events/s ({} events): publish → visible p50 {} ms, p99 {} ms, max {} ms\n  CPU while publishing (share of one core): {}\n  {}",
            self.rate,
            self.sent,
            self.p50,
            self.p99,
            self.max,
            self.servers,
            rss_line(self.rss, None, &self.report, false)
        )
    }
}

/// A worker that has caught up receives a new history published at `target` events/s for
/// about 15 s.
pub(super) async fn at_rate(cfg: &Config, id: &str, target: f64) -> anyhow::Result<Steady> {
    let history: Vec<EventEnvelope> = History::new(SEED + 1, &format!("{id}s{target:.0}-"))
        .take((target * 15.0) as usize)
        .collect();
    publish_steadily(cfg, &format!("{id}-steady-{target:.0}"), &history, target).await
}

/// `cfg` on topics and a group of the phase's own (`label`), created. The local broker
/// rewrites a snapshot of everything it holds whenever any topic changes: a 200,000-event
/// backlog left on it took 58 % of a core from the broker at 5,000 events/s (15–33 % with
/// topics of the phase's own). Each phase after the drains runs on its own, deleted after.
pub(super) async fn on_own_topics(cfg: &Config, label: &str) -> anyhow::Result<Config> {
    let mut c = cfg.clone();
    c.kafka.topic_prefix = format!("{label}.");
    c.kafka.dlq_topic = format!("{label}.dlq");
    c.kafka.group_id = format!("{label}-group");
    kafka::ensure_topics(&c.kafka).await?;
    Ok(c)
}

/// A worker that has caught up receives `events` published at `rate` events/s, on topics of
/// its own; its figures.
pub(super) async fn publish_steadily(
    cfg: &Config,
    label: &str,
    events: &[EventEnvelope],
    rate: f64,
) -> anyhow::Result<Steady> {
    let cfg = &on_own_topics(cfg, label).await?;
    let steady = measure_steadily(cfg, label, events, rate).await;
    let _ = kafka::delete_topics(&cfg.kafka).await;
    steady
}

pub(super) async fn measure_steadily(
    cfg: &Config,
    label: &str,
    events: &[EventEnvelope],
    rate: f64,
) -> anyhow::Result<Steady> {
    let stats = std::env::temp_dir().join(format!("{label}-stats.json"));
    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = spawn_worker_serving(cfg, &stats, 8.0, None, Some(http))?;
    let pid = child.id();
    let waiting = tokio::spawn(wait_sampling_rss(child));
    // The load starts once the worker owns its partitions (ready; on topics of its own it is
    // then caught up) and the publisher knows the topics: steady state, not a start-up (the
    // worker exits 8 s after the last event).
    let publisher = EventPublisher::new(&cfg.kafka)?;
    let p = &publisher;
    tokio::task::block_in_place(|| p.warm_up(Duration::from_secs(10)))?;
    if !wait_ready(http, Duration::from_secs(60)).await {
        println!("  (the worker was not ready after 60 s; publishing anyway)");
    }
    let tick = Duration::from_millis(50);
    let per_tick = ((rate * tick.as_secs_f64()).ceil() as usize).max(1);
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let probe = CpuProbe::start();
    let started = Instant::now();
    for (i, chunk) in events.chunks(per_tick).enumerate() {
        let due = started + tick * i as u32;
        tokio::time::sleep_until(due.into()).await;
        publisher.publish(chunk).await?;
    }
    let cpu = cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
    let wall = started.elapsed().as_secs_f64();
    let servers = probe.report(Some(cpu));
    let (status, rss, _, _) = waiting.await??;
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let report: RunReport = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let _ = std::fs::remove_file(&stats);
    Ok(Steady {
        rate,
        sent: events.len() as u64,
        p50: report.latency_ms_p50,
        p99: report.latency_ms_p99,
        max: report.latency_ms_max,
        rss: rss as f64 / 1024.0,
        cpu_share: cpu / wall.max(1e-9),
        servers,
        report,
    })
}

/// Whether the worker serving at `addr` answers `/readyz` with 200 within `at_most`.
async fn wait_ready(addr: std::net::SocketAddr, at_most: Duration) -> bool {
    use http_body_util::Full;
    let deadline = Instant::now() + at_most;
    while Instant::now() < deadline {
        if let Ok(mut sender) = super::read::connect(addr).await {
            let req = hyper::Request::get("/readyz")
                .header("host", addr.to_string())
                .body(Full::new(bytes::Bytes::new()));
            if let Ok(req) = req
                && let Ok(resp) = sender.send_request(req).await
                && resp.status() == hyper::StatusCode::OK
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Publish → visible at each rate of the curve (and `extra`, 80 % of the drain rate): one
/// line per rate, the latency budget of each, and what the targets say.
pub(super) async fn curve(
    cfg: &Config,
    id: &str,
    extra: Option<f64>,
) -> anyhow::Result<Vec<Steady>> {
    let mut rates = CURVE.to_vec();
    rates.extend(extra);
    let mut out = Vec::new();
    for rate in rates {
        let s = at_rate(cfg, id, rate).await?;
        println!("{}", s.line());
        print_budget(&s.report.steps);
        out.push(s);
    }
    println!("  rate ev/s     p50 ms     p99 ms     max ms   worker %   RSS MiB");
    for s in &out {
        println!(
            "  {:>9.0} {:>10} {:>10} {:>10} {:>10.0} {:>9.0}",
            s.rate,
            s.p50,
            s.p99,
            s.max,
            s.cpu_share * 100.0,
            s.rss
        );
    }
    Ok(out)
}

/// The rates of the latency curve, events/s.
pub(super) const CURVE: [f64; 4] = [1_000.0, 2_000.0, 5_000.0, 10_000.0];
