//! The hot-customer figure: one customer with a long history of finished orders receives a
//! steady rate of new orders for it alone; beside it, the same rate spread over many
//! customers. Per-event cost must not grow with a customer's history: the worker's CPU and
//! the publish → visible latency of the two runs are compared, and the hot customer's stored
//! document is measured.

use chrono::Utc;
use contract::catalogue::{OrderCompleted, OrderPlaced};
use contract::{Event, EventData, EventEnvelope};
use projector::config::Config;
use projector::generator::History;
use projector::kafka::EventPublisher;

use super::steady::{Steady, on_own_topics, publish_steadily};
use super::worker::{spawn_worker, wait_sampling_rss};

/// What the hot-customer run measured.
pub(super) struct Hot {
    pub history_orders: usize,
    pub rate: f64,
    pub hot: Steady,
    pub spread: Steady,
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

/// One customer with `history_orders` finished orders, then `rate` events/s of new orders
/// for it alone for `secs`; then the same rate over many customers.
pub(super) async fn run(
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
    {
        // On topics of its own (see `on_own_topics`), deleted once drained.
        let cfg = &on_own_topics(cfg, &format!("{id}-hothist")).await?;
        let publisher = EventPublisher::new(&cfg.kafka)?;
        for chunk in history.chunks(5_000) {
            publisher.publish(chunk).await?;
        }
        let stats = std::env::temp_dir().join(format!("{}-hot-history.json", cfg.kafka.group_id));
        let drained = wait_sampling_rss(spawn_worker(cfg, &stats, 3.0, None)?).await;
        let _ = std::fs::remove_file(&stats);
        let _ = projector::kafka::delete_topics(&cfg.kafka).await;
        let (status, _, _, _) = drained?;
        anyhow::ensure!(status.success(), "worker exited with {status}");
    }

    let n = ((rate * secs) as usize / 2).max(1);
    let load = orders(&ns, &customer, history_orders, n)?;
    let hot = publish_steadily(cfg, &format!("{id}-hot"), &load, rate).await?;
    let spread_events: Vec<EventEnvelope> = History::new(11, &format!("{id}m-"))
        .take(load.len())
        .collect();
    let spread = publish_steadily(cfg, &format!("{id}-spread"), &spread_events, rate).await?;

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
        let line = |label: &str, p: &Steady| {
            let r = &p.report;
            println!(
                "  {label:<44} p50 {:>5} ms  p99 {:>5} ms  worker {:>5.1} % of a core ({} events; \
                 the worker took {} messages in {} windows, {} loads, writes {:?}, {} consumer \
                 restarts)",
                p.p50,
                p.p99,
                p.cpu_share * 100.0,
                p.sent,
                r.messages,
                r.windows,
                r.loads,
                r.writes,
                r.consumer_restarts
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
            self.history_orders + self.hot.sent as usize / 2
        );
    }

    /// Worker CPU of the hot customer over the same rate spread (target ≤ 1.5).
    pub fn cpu_ratio(&self) -> f64 {
        self.hot.cpu_share / self.spread.cpu_share.max(1e-9)
    }

    /// p99 of the hot customer over the same rate spread (target ≤ 1.5).
    pub fn p99_ratio(&self) -> f64 {
        self.hot.p99 as f64 / (self.spread.p99 as f64).max(1.0)
    }
}
