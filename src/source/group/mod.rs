//! The consumer group watched as a whole (DESIGN §3.9): lag, ownership and progress of every
//! partition of the subscribed topics, from the broker's committed offsets and the
//! coordinator's description, never from what one member believes.
//!
//! `assignment` parses what the coordinator says a member owns, `observe` asks the broker,
//! `watch` turns successive observations into a verdict (stalled, unowned, mismatched), and
//! `spawn` runs it beside a worker: metrics, the liveness input, `--exit-when-idle`'s "caught
//! up", and healing a member whose assignment disagrees with the coordinator's.

pub mod assignment;
pub mod observe;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use observe::{Observation, observe, observer};
pub use watch::{Belief, Verdict, Watch, WatchConfig};

use crate::config::Config;
use crate::runtime::Shared;

const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Watch the worker's group on a thread of its own until shutdown.
pub fn spawn(
    cfg: &Config,
    shared: Arc<Shared>,
    topics: Vec<String>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("group-watch".into())
        .spawn(move || run(&cfg, &shared, &topics))
}

fn run(cfg: &Config, shared: &Shared, topics: &[String]) {
    let group = cfg.kafka.group_id.clone();
    let every = Duration::from_millis(cfg.worker.group_watch_ms.max(100));
    let mut watch = Watch::new(WatchConfig {
        stall: Duration::from_secs(cfg.worker.partition_stall_secs),
        mismatch_grace: Duration::from_secs(cfg.worker.assignment_mismatch_secs),
    });
    let mut exported = Exported::default();
    // Every series the alerts name exists from the start.
    metrics::counter!("projector_assignment_heals_total", "group" => group.clone()).increment(0);
    metrics::gauge!("projector_assignment_mismatch", "group" => group.clone()).set(0.0);
    let mut client = None;
    let mut failures = 0u32;
    while !shared.shutdown.load(Ordering::Relaxed) {
        if client.is_none() {
            client = observer(
                &cfg.kafka,
                &group,
                rdkafka::consumer::DefaultConsumerContext,
            )
            .map_err(|e| tracing::warn!(error = %e, "group watch: no client"))
            .ok();
        }
        if let Some(c) = &client {
            match observe(c, &group, topics, ASK_TIMEOUT) {
                Ok(obs) => {
                    failures = 0;
                    let me = shared.belief();
                    let v = watch.update(&obs, me.as_ref());
                    exported.export(&obs, &v);
                    shared.note_group(&v);
                    if v.heal {
                        let theirs = me
                            .as_ref()
                            .and_then(|b| obs.member(b.member_id.as_deref(), &b.client_id))
                            .map(|m| m.partitions.len());
                        tracing::warn!(
                            group,
                            consumed = me.as_ref().map_or(0, |b| b.assignment.len()),
                            coordinator_says = ?theirs,
                            "this member's assignment has disagreed with the coordinator's \
                             for {} s: re-creating the consumer",
                            cfg.worker.assignment_mismatch_secs
                        );
                        metrics::counter!("projector_assignment_heals_total", "group" => group.clone())
                            .increment(1);
                        shared.recreate.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    failures += 1;
                    // Unknown is not caught up: `--exit-when-idle` waits for an answer.
                    shared.group_caught_up.store(false, Ordering::Relaxed);
                    if failures == 3 {
                        tracing::warn!(group, error = %e, "group watch: the broker does not answer");
                    }
                    // A client that keeps failing is replaced (its connections may be stale).
                    if failures.is_multiple_of(10) {
                        client = None;
                    }
                }
            }
        }
        sleep_unless_shutdown(shared, every);
    }
}

fn sleep_unless_shutdown(shared: &Shared, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !shared.shutdown.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The series this member exports, so a partition that disappears leaves no stale one.
#[derive(Default)]
struct Exported {
    partitions: Vec<(String, i32)>,
}

impl Exported {
    fn export(&mut self, obs: &Observation, v: &Verdict) {
        let g = obs.group.clone();
        let now: Vec<(String, i32)> = obs.partitions.keys().cloned().collect();
        for (t, p) in self.partitions.iter().filter(|tp| !now.contains(tp)) {
            let labels = [
                ("group", g.clone()),
                ("topic", t.clone()),
                ("partition", p.to_string()),
            ];
            metrics::gauge!("projector_group_lag_messages", &labels).set(f64::NAN);
            metrics::gauge!("projector_group_stall_seconds", &labels).set(f64::NAN);
        }
        for ((t, p), view) in &obs.partitions {
            let labels = [
                ("group", g.clone()),
                ("topic", t.clone()),
                ("partition", p.to_string()),
            ];
            metrics::gauge!("projector_group_lag_messages", &labels).set(view.lag() as f64);
        }
        for ((t, p), d) in &v.stall {
            let labels = [
                ("group", g.clone()),
                ("topic", t.clone()),
                ("partition", p.to_string()),
            ];
            metrics::gauge!("projector_group_stall_seconds", &labels).set(d.as_secs_f64());
        }
        metrics::gauge!("projector_group_unowned_partitions", "group" => g.clone())
            .set(v.unowned.len() as f64);
        metrics::gauge!("projector_group_stalled_partitions", "group" => g.clone())
            .set(v.stalled.len() as f64);
        metrics::gauge!("projector_group_members", "group" => g.clone())
            .set(obs.members.len() as f64);
        metrics::gauge!("projector_assignment_mismatch", "group" => g.clone()).set(if v.mismatch {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("projector_group_observed_timestamp_seconds", "group" => g)
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        self.partitions = now;
    }
}
