//! Fault injection against real servers: a second set of the five servers (own ports and
//! data, started by `scripts/services.sh` with `SERVICES_RUN_ROOT`), which the fault tests
//! hang (SIGSTOP/SIGCONT), kill -9 and restart by the pids the script recorded — without
//! disturbing the tests that share the default set.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use projector::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

pub const SERVICES: [&str; 5] = ["kafka", "postgres", "redis", "mongo", "clickhouse"];

const PORTS: [(&str, &str); 7] = [
    ("KAFKA_PORT", "29092"),
    ("POSTGRES_PORT", "25432"),
    ("REDIS_PORT", "26379"),
    ("MONGO_PORT", "27217"),
    ("CLICKHOUSE_HTTP_PORT", "28123"),
    ("CLICKHOUSE_TCP_PORT", "29001"),
    // Not started by `FaultSet::up`: `scripts/services.sh up prometheus` (tests/alerts.rs).
    ("PROMETHEUS_PORT", "29090"),
];

/// The fault set's Prometheus, when one is started.
pub const PROMETHEUS_ADDR: &str = "127.0.0.1:29090";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/services.sh ARGS`, on the fault-test set (its own ports and data) or, with
/// `fault_set` false, on the default one.
pub fn services_sh(fault_set: bool, args: &[&str]) -> std::process::Output {
    services_sh_env(fault_set, &[], args)
}

/// `services_sh` with more variables in its environment.
pub fn services_sh_env(
    fault_set: bool,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/services.sh"))
        .args(args)
        .stdin(Stdio::null());
    if fault_set {
        cmd.env("SERVICES_RUN_ROOT", repo().join(".services-faults"))
            .envs(PORTS);
    }
    cmd.envs(env.iter().copied())
        .output()
        .expect("scripts/services.sh runs")
}

fn services(args: &[&str]) -> std::process::Output {
    services_sh(true, args)
}

/// The fault-test servers, started if they are not running.
pub struct FaultSet;

impl FaultSet {
    pub fn up() -> FaultSet {
        let out = services(&["up"]);
        assert!(
            out.status.success(),
            "fault-test servers did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        FaultSet
    }

    /// Settings pointing at the fault-test servers.
    pub fn config(&self) -> Config {
        let mut c = super::config();
        c.kafka.brokers = "127.0.0.1:29092".into();
        c.postgres.url = "postgres://projector@127.0.0.1:25432/projector".into();
        c.redis.url = "redis://127.0.0.1:26379/".into();
        c.mongo.uri = "mongodb://127.0.0.1:27217/?directConnection=true".into();
        c.clickhouse.url = "http://127.0.0.1:28123".into();
        c
    }

    /// Isolated names on the fault-test servers.
    pub fn isolated(&self, tag: &str) -> (super::Isolated, String) {
        let ns = super::unique_namespace(tag);
        let id = ns.trim_end_matches('-').replace('-', "_");
        (super::Isolated::new(self.config().isolated(&id), &ns), ns)
    }

    pub fn pid(&self, svc: &str) -> u32 {
        let out = services(&["pid", svc]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{svc} has no pid: {text}"))
    }

    /// The server's process and, for PostgreSQL, its backends (stopping only the postmaster
    /// would leave open connections served).
    fn pids(&self, svc: &str) -> Vec<String> {
        let pid = self.pid(svc);
        let mut all = vec![pid.to_string()];
        if svc == "postgres" {
            let out = Command::new("pgrep")
                .args(["-P", &pid.to_string()])
                .output()
                .unwrap();
            all.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned),
            );
        }
        all
    }

    fn signal(&self, svc: &str, sig: &str) {
        for p in self.pids(svc) {
            let _ = Command::new("kill").args([sig, &p]).status();
        }
    }

    pub fn hang(&self, svc: &str) {
        self.signal(svc, "-STOP");
    }

    pub fn resume(&self, svc: &str) {
        self.signal(svc, "-CONT");
    }

    pub fn kill9(&self, svc: &str) {
        let pid = self.pid(svc);
        self.signal(svc, "-KILL");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&self, svc: &str) {
        let out = services(&["up", svc]);
        assert!(
            out.status.success(),
            "{svc} did not come back:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A worker process (a pod with a stable identity), killed if the test ends early.
pub struct Worker {
    pub child: Child,
    pub http: String,
    pub name: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Worker {
    pub fn spawn(cfg: &Config, name: &str, log_tag: &str, extra: &[(&str, String)]) -> Worker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let http = format!("127.0.0.1:{port}");
        let dir = repo().join("target/fault-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join(format!("{log_tag}-{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(super::projector_bin())
            .arg("run")
            .envs(super::config_env(cfg))
            .env("PROJECTOR_KAFKA__BROKERS", &cfg.kafka.brokers)
            .env("PROJECTOR_POSTGRES__URL", &cfg.postgres.url)
            .env("PROJECTOR_REDIS__URL", &cfg.redis.url)
            .env("PROJECTOR_MONGO__URI", &cfg.mongo.uri)
            .env("PROJECTOR_CLICKHOUSE__URL", &cfg.clickhouse.url)
            .env("PROJECTOR_KAFKA__INSTANCE_ID", name)
            .env("PROJECTOR_WORKER__HTTP_ADDR", &http)
            .env("RUST_LOG", "info")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn worker");
        Worker {
            child,
            http,
            name: name.to_owned(),
            log: log_path,
        }
    }

    /// Its view for a failure message: the metrics that say what it owns and does, and the
    /// last warnings and errors of its log.
    pub async fn report(&self) -> String {
        const METRICS: [&str; 11] = [
            "projector_consumer_restarts_total",
            "projector_fetch_pauses_total",
            "projector_fetch_silent_resumes_total",
            "projector_log_rewinds_total",
            "projector_in_flight_messages",
            "projector_paused",
            "projector_group_unowned_partitions",
            "projector_group_stalled_partitions",
            "projector_assignment_mismatch",
            "projector_assignment_heals_total",
            "projector_consumer_lag_messages",
        ];
        let mut out = format!("{} ({}):\n", self.name, self.log.display());
        for m in METRICS {
            out.push_str(&format!("  {m} {}\n", self.metric(m).await));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("\"level\":\"INFO\"") || l.contains("partitions"))
            .collect();
        for l in &notable[notable.len().saturating_sub(40)..] {
            out.push_str("  | ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A metric's value summed over its series (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let Some((_, body)) = super::http_get(&self.http, "/metrics").await else {
            return f64::NAN;
        };
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{} exits 0 on SIGTERM: {status:?}",
            self.name
        );
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Committed offsets and high watermarks of the group, summed over the event topics.
/// `None` while the broker does not answer.
pub fn progress(cfg: &Config) -> Option<(i64, i64)> {
    partitions(cfg).map(|ps| totals(&ps))
}

fn totals(parts: &[PartitionProgress]) -> (i64, i64) {
    parts
        .iter()
        .fold((0, 0), |(d, h), p| (d + p.committed, h + p.high))
}

/// One partition of the group, as the broker sees it.
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// Committed offset (0 when nothing is committed).
    pub committed: i64,
    pub high: i64,
}

/// Each event partition's committed offset and high watermark; `None` while the broker does
/// not answer.
pub fn partitions(cfg: &Config) -> Option<Vec<PartitionProgress>> {
    let consumer: BaseConsumer = projector::kafka::base_client_config(&cfg.kafka)
        .set("group.id", &cfg.kafka.group_id)
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    for t in projector::kafka::event_topics(&cfg.kafka) {
        for p in 0..cfg.kafka.partitions {
            tpl.add_partition(&t, p);
        }
    }
    let committed = consumer
        .committed_offsets(tpl.clone(), Duration::from_secs(3))
        .ok()?;
    let mut out = Vec::new();
    for e in tpl.elements() {
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(3))
            .ok()?;
        let committed = match committed
            .find_partition(e.topic(), e.partition())
            .map(|c| c.offset())
        {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        out.push(PartitionProgress {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            committed,
            high,
        });
    }
    Some(out)
}

/// Wait until every partition of the group is caught up and the (committed, high) totals
/// satisfy `done`; past `limit`, fail with what a stuck run needs to say (a CI log is all
/// there is): the partitions behind, and each worker's assignment, pacing and last warnings.
pub async fn wait_for_group<F: FnMut(i64, i64) -> bool>(
    cfg: &Config,
    workers: &[&Worker],
    limit: Duration,
    what: &str,
    mut done: F,
) {
    let deadline = Instant::now() + limit;
    // Totals can match while one partition is behind and another ahead (a broker that lost
    // messages leaves commits past its high watermark): every partition must be caught up.
    let caught_up = |parts: &[PartitionProgress]| parts.iter().all(|p| p.committed == p.high);
    while !partitions(cfg).is_some_and(|ps| {
        let (d, h) = totals(&ps);
        done(d, h) && caught_up(&ps)
    }) {
        if Instant::now() >= deadline {
            let mut report = format!("timed out waiting for {what}\npartitions behind:\n");
            match partitions(cfg) {
                None => report.push_str("  (the broker does not answer)\n"),
                Some(ps) => {
                    for p in ps.iter().filter(|p| p.committed < p.high) {
                        report.push_str(&format!(
                            "  {}/{}: committed {} of {}\n",
                            p.topic, p.partition, p.committed, p.high
                        ));
                    }
                }
            }
            for w in workers {
                report.push_str(&w.report().await);
            }
            panic!("{report}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A load generator that survives the servers it writes to: `rounds` batches of a seeded
/// history (3 % duplicates, 5 % redeliveries on the wire), each appended — retried until it
/// is known to be in the store — then published, retried until the broker has it. Returns
/// the messages published.
pub async fn load(cfg: projector::config::Config, ns: String, rounds: usize, per: usize) -> i64 {
    load_while(cfg, ns, per, |i| i < rounds).await
}

/// [`load`] for as long as it takes: rounds go on until `stop` is set, then `after` more.
pub async fn load_until(
    cfg: projector::config::Config,
    ns: String,
    per: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    after: usize,
) -> i64 {
    let mut left = after;
    load_while(cfg, ns, per, move |_| {
        if !stop.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        if left == 0 {
            return false;
        }
        left -= 1;
        true
    })
    .await
}

/// `load`, for as long as `more(rounds done)` says.
pub async fn load_while(
    cfg: projector::config::Config,
    ns: String,
    per: usize,
    mut more: impl FnMut(usize) -> bool,
) -> i64 {
    use projector::generator::{GenerateOptions, History, Injector};
    let mut history = History::new(7, &ns);
    let mut injector = Injector::new(&GenerateOptions {
        seed: 7,
        duplicate_rate: 0.03,
        redelivery_rate: 0.05,
        ..Default::default()
    });
    let mut published = 0i64;
    let mut round = 0;
    while more(round) {
        round += 1;
        let mut batch: Vec<contract::EventEnvelope> = history.by_ref().take(per).collect();
        let first = batch[0].event_id;
        loop {
            let attempt = async {
                let mut store = projector::store::EventStore::connect(&cfg.postgres.url).await?;
                store.migrate().await?;
                // A commit whose answer was lost: the batch is in already.
                let there = store
                    .client()
                    .query_opt("SELECT 1 FROM events WHERE event_id = $1", &[&first])
                    .await?
                    .is_some();
                if !there {
                    store.append(&mut batch).await?;
                }
                Ok::<_, anyhow::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => eprintln!("load: append: {e}; retrying"),
                Err(_) => eprintln!("load: append timed out; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let wire = injector.wire_order(&batch);
        loop {
            let attempt = async {
                let p = projector::kafka::EventPublisher::new(&cfg.kafka)?;
                p.publish(&wire).await?;
                Ok::<_, anyhow::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(40), attempt).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => eprintln!("load: publish: {e}; retrying"),
                Err(_) => eprintln!("load: publish timed out; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        published += wire.len() as i64;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    published
}

/// Poll `f` every 50 ms until it holds; fail the test after `limit`.
pub async fn wait_until<F: FnMut() -> bool>(limit: Duration, what: &str, mut f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
