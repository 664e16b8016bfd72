//! The hot-customer figure: one customer with a long history of finished orders receives a
//! steady rate of new orders for it alone; beside it, the same rate spread over many
//! customers. Per-event cost must not grow with a customer's history: the worker's CPU and
//! the publish → visible latency of the two runs are compared, and the hot customer's stored
//! document is measured.

use std::time::{Duration, Instant};

use chrono::Utc;
use contract::catalogue::{OrderCompleted, OrderPlaced};
use contract::{Event, EventData, EventEnvelope};
use projector::config::Config;
use projector::generator::History;
use projector::kafka::EventPublisher;
use projector::runtime::RunReport;

use super::bench::{cpu_seconds, spawn_worker, wait_sampling_rss};

/// One load run: publish → visible and the worker's CPU while the load lasted.
pub struct Phase {
    pub p50_ms: u64,
    pub p99_ms: u64,
    /// Worker CPU seconds per wall second while the load was published.
    pub cpu_share: f64,
    pub events: usize,
}

/// What the hot-customer run measured.
pub struct Hot {
    pub history_orders: usize,
    pub rate: f64,
    pub hot: Phase,
    pub spread: Phase,
    /// The hot customer's stored Customer-360 document, in bytes, after the run.
    pub document_bytes: usize,
}

/// `n` orders of `customer` (placed, then completed), the first numbered `first`.
fn orders(ns: &str, customer: &str, first: usize, n: usize) -> anyhow::Result<Vec<EventEnvelope>> {
    let mut out = Vec::with_capacity(2 * n);
    let now = Utc::now();
    for i in first..first + n {
        let id = format!("{ns}ord-{i}");
        let placed = EventData::OrderPlaced(OrderPlaced {
            order_id: id.clone(),
            customer_id: customer.to_owned(),
            items: vec![],
            shipping_address: Default::default(),
            total_amount: 12.5,
            currency: None,
        });
        let done = EventData::OrderCompleted(OrderCompleted {
            order_id: id.clone(),
            customer_id: customer.to_owned(),
        });
        for (seq, data) in [placed, done].into_iter().enumerate() {
            let e = Event::new(
                uuid::Uuid::new_v4(),
                &id,
                seq as i64,
                data,
                Default::default(),
                now,
            )?;
            out.push(e.to_envelope());
        }
    }
    Ok(out)
}

/// Publish `events` at `rate` per second to a caught-up worker; its figures.
async fn phase(
    cfg: &Config,
    label: &str,
    events: &[EventEnvelope],
    rate: f64,
) -> anyhow::Result<Phase> {
    let stats = std::env::temp_dir().join(format!("{}-{label}-stats.json", cfg.kafka.group_id));
    let child = spawn_worker(cfg, &stats, 6.0, None)?;
    let pid = child.id();
    let waiting = tokio::spawn(wait_sampling_rss(child));
    // Joined and caught up before the load starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let publisher = EventPublisher::new(&cfg.kafka)?;
    let tick = Duration::from_millis(50);
    let per_tick = ((rate * tick.as_secs_f64()).ceil() as usize).max(1);
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let started = Instant::now();
    for (i, chunk) in events.chunks(per_tick).enumerate() {
        tokio::time::sleep_until((started + tick * i as u32).into()).await;
        publisher.publish(chunk).await?;
    }
    // The last events become visible within a second or so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
    let wall = started.elapsed().as_secs_f64();
    let (status, _, _, _) = waiting.await??;
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let report: RunReport = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let _ = std::fs::remove_file(&stats);
    Ok(Phase {
        p50_ms: report.latency_ms_p50,
        p99_ms: report.latency_ms_p99,
        cpu_share: cpu / wall.max(1e-9),
        events: events.len(),
    })
}

/// One customer with `history_orders` finished orders, then `rate` events/s of new orders
/// for it alone for `secs`; then the same rate over many customers.
pub async fn run(
    cfg: &Config,
    id: &str,
    history_orders: usize,
    rate: f64,
    secs: f64,
) -> anyhow::Result<Hot> {
    let ns = format!("{id}h-");
    let customer = format!("{ns}cus-hot");
    // The history, drained before anything is measured.
    let history = orders(&ns, &customer, 0, history_orders)?;
    let publisher = EventPublisher::new(&cfg.kafka)?;
    for chunk in history.chunks(5_000) {
        publisher.publish(chunk).await?;
    }
    let stats = std::env::temp_dir().join(format!("{}-hot-history.json", cfg.kafka.group_id));
    let (status, _, _, _) = wait_sampling_rss(spawn_worker(cfg, &stats, 3.0, None)?).await?;
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let _ = std::fs::remove_file(&stats);

    let n = ((rate * secs) as usize / 2).max(1);
    let load = orders(&ns, &customer, history_orders, n)?;
    let hot = phase(cfg, "hot", &load, rate).await?;
    let spread_events: Vec<EventEnvelope> = History::new(11, &format!("{id}m-"))
        .take(load.len())
        .collect();
    let spread = phase(cfg, "spread", &spread_events, rate).await?;

    let sinks = projector::versions::VersionSinks::connect_views(cfg, &cfg.views).await?;
    let mut con = sinks.redis.connection();
    let document_bytes: usize = redis::cmd("STRLEN")
        .arg(sinks.redis.key(&customer))
        .query_async(&mut con)
        .await?;
    Ok(Hot {
        history_orders,
        rate,
        hot,
        spread,
        document_bytes,
    })
}

impl Hot {
    pub fn print(&self) {
        let line = |label: &str, p: &Phase| {
            println!(
                "  {label:<44} p50 {:>5} ms  p99 {:>5} ms  worker {:>5.1} % of a core ({} events)",
                p.p50_ms,
                p.p99_ms,
                p.cpu_share * 100.0,
                p.events
            );
        };
        println!(
            "hot customer: {} finished orders, then {:.0} events/s of new orders",
            self.history_orders, self.rate
        );
        line("one customer", &self.hot);
        line("many customers, same rate", &self.spread);
        println!(
            "  its Customer-360 document: {} bytes after {} orders",
            self.document_bytes,
            self.history_orders + self.hot.events / 2
        );
    }

    /// Worker CPU of the hot customer over the same rate spread (target ≤ 1.5).
    pub fn cpu_ratio(&self) -> f64 {
        self.hot.cpu_share / self.spread.cpu_share.max(1e-9)
    }

    /// p99 of the hot customer over the same rate spread (target ≤ 1.5).
    pub fn p99_ratio(&self) -> f64 {
        self.hot.p99_ms as f64 / (self.spread.p99_ms as f64).max(1.0)
    }
}
