//! `projector doctor` through the binary, against the real local servers: a healthy
//! deployment (its own topics, group, read models and a running worker) gets no fail row and
//! exits 0; the same deployment seen through a Redis that acknowledges before its fsync
//! (started here, `appendfsync everysec`) and a ClickHouse that is not there fails exactly
//! those rows and exits non-zero. Nothing of the shared servers' configuration is touched.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use projector::doctor::{Report, Verdict};

/// A child process killed (and reaped) when the test ends, also when it panics.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A redis-server of this test's own, on a free port, with its own directory.
struct OwnRedis {
    _child: Killed,
    dir: PathBuf,
    port: u16,
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now (what a stopped server looks like).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("its address").port()
}

/// Poll `ready` until it holds or `limit` passes (a condition, never a fixed sleep).
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !ready().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl OwnRedis {
    /// AOF on but fsynced once a second: Redis 7.0 (no WAITAOF) then acknowledges writes a
    /// crash can lose. On Redis 7.2+ the worker would wait on WAITAOF and this would be fine.
    async fn start_lossy() -> OwnRedis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "doctor-redis-{}",
            common::unique_namespace("r").trim_end_matches('-')
        ));
        std::fs::create_dir_all(&dir).expect("the test's Redis directory");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's, as scripts/services.sh installs it)");
        let own = OwnRedis {
            _child: Killed(child),
            dir,
            port,
        };
        let url = own.url();
        wait_until(
            "the test's Redis answers PING",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                async move {
                    let Ok(client) = redis::Client::open(url.as_str()) else {
                        return false;
                    };
                    match client.get_multiplexed_async_connection().await {
                        Ok(mut c) => redis::cmd("PING")
                            .query_async::<String>(&mut c)
                            .await
                            .is_ok(),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
        own
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// An isolated deployment as it looks once deployed: schema migrated, topics made, the read
/// models' stores created and a worker in the group.
struct Deployment {
    // Fields drop in this order: the worker stops before the topics go.
    _worker: Killed,
    cfg: common::Isolated,
}

impl Deployment {
    async fn start(tag: &str) -> Deployment {
        let (cfg, _ns) = common::isolated_config(tag);
        common::store().await;
        projector::kafka::ensure_topics(&cfg.kafka)
            .await
            .expect("Kafka up (scripts/services.sh up)");
        common::live_sinks(&cfg).await;
        let worker = Command::new(common::projector_bin())
            .arg("run")
            .envs(common::config_env(&cfg))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the worker");
        let worker = Killed(worker);
        // The group is healthy once the coordinator has given a member every partition.
        let (kafka, group) = (cfg.kafka.clone(), cfg.kafka.group_id.clone());
        let topics = projector::kafka::event_topics(&cfg.kafka);
        wait_until(
            "the worker owns every partition",
            Duration::from_secs(90),
            || {
                let (kafka, group, topics) = (kafka.clone(), group.clone(), topics.clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        let c: rdkafka::consumer::BaseConsumer =
                            projector::source::group::observer(
                                &kafka,
                                &group,
                                rdkafka::consumer::DefaultConsumerContext,
                            )
                            .ok()?;
                        projector::source::group::observe(
                            &c,
                            &group,
                            &topics,
                            Duration::from_secs(3),
                        )
                        .ok()
                    })
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|o| {
                        o.state == "Stable"
                            && !o.members.is_empty()
                            && !o.partitions.is_empty()
                            && o.unowned().is_empty()
                    })
                }
            },
        )
        .await;
        Deployment {
            cfg,
            _worker: worker,
        }
    }

    /// `projector doctor` with the deployment's settings and `extra` overrides.
    async fn doctor(&self, args: &[&str], extra: &[(&str, String)]) -> (bool, String) {
        let mut cmd = Command::new(common::projector_bin());
        cmd.arg("doctor")
            .args(args)
            .envs(common::config_env(&self.cfg))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            // The exit error's backtrace says nothing the rows do not.
            .env("RUST_BACKTRACE", "0");
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("the doctor runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "$ doctor {} ({:.1} s, {})\n{stdout}{}",
            args.join(" "),
            started.elapsed().as_secs_f64(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), stdout)
    }

    async fn report(&self, extra: &[(&str, String)]) -> (bool, Report) {
        self.report_with(&[], extra).await
    }

    async fn report_with(&self, args: &[&str], extra: &[(&str, String)]) -> (bool, Report) {
        let args: Vec<&str> = ["--json"].iter().chain(args).copied().collect();
        let (ok, stdout) = self.doctor(&args, extra).await;
        let report = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("doctor --json printed no report: {e}\n{stdout}"));
        (ok, report)
    }

    /// Every row of a healthy isolated deployment, with its verdict. All ok: the local
    /// servers run as the README promises (AOF fsynced always, a one-node replica set with
    /// --sync-on-commit, the facts table deduplicating), and the deployment is fresh (no
    /// parks, no rebuilt versions) with its worker caught up.
    fn healthy(&self) -> BTreeMap<String, Verdict> {
        [
            "kafka",
            "kafka topics",
            "kafka dead letters",
            &format!("group {}", self.cfg.kafka.group_id),
            "postgres",
            "postgres schema",
            "versions",
            "parked streams",
            "redis",
            "redis durability",
            "mongo",
            "mongo durability",
            "mongo transactions",
            "clickhouse",
            "clickhouse dedup",
            "clickhouse read-only",
        ]
        .into_iter()
        .map(|c| (c.to_owned(), Verdict::Ok))
        .collect()
    }
}

fn verdicts(r: &Report) -> BTreeMap<String, Verdict> {
    r.rows
        .iter()
        .map(|r| (r.check.clone(), r.verdict))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_deployment_passes_every_check() {
    let d = Deployment::start("doc").await;
    let (ok, report) = d.report(&[]).await;
    assert_eq!(verdicts(&report), d.healthy(), "{report:#?}");
    assert!(ok, "exit 0 without a fail row");
    let group = report
        .row(&format!("group {}", d.cfg.kafka.group_id))
        .expect("the group's row");
    assert!(group.seen.contains("1 member(s)"), "{}", group.seen);

    // The table an operator reads: a header, a row per check, the counts.
    let (ok, table) = d.doctor(&[], &[]).await;
    assert!(ok);
    assert!(table.starts_with("VERDICT"), "{table}");
    for check in d.healthy().keys() {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("ok ") && l.contains(check.as_str())),
            "{check} in {table}"
        );
    }
    assert!(table.ends_with(&format!("{} ok, 0 warn, 0 fail\n", d.healthy().len())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_redis_and_a_stopped_clickhouse_fail_their_rows_only() {
    let d = Deployment::start("docbad").await;
    let redis = OwnRedis::start_lossy().await;
    let stopped_clickhouse = format!("http://127.0.0.1:{}", free_port());
    let (ok, report) = d
        .report(&[
            ("PROJECTOR_REDIS__URL", redis.url()),
            ("PROJECTOR_CLICKHOUSE__URL", stopped_clickhouse),
        ])
        .await;
    let mut want = d.healthy();
    for failed in [
        "redis durability",
        "clickhouse",
        "clickhouse dedup",
        "clickhouse read-only",
    ] {
        want.insert(failed.to_owned(), Verdict::Fail);
    }
    assert_eq!(verdicts(&report), want, "{report:#?}");
    assert!(!ok, "a fail row exits non-zero");
    let durability = report.row("redis durability").expect("the Redis row");
    assert!(
        durability.seen.contains("appendfsync everysec") && !durability.action.is_empty(),
        "{durability:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_a_fail_row_not_a_hung_doctor() {
    let d = Deployment::start("dochung").await;
    // Accepts connections (the kernel completes them) and never answers: a hung server.
    let hung = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = hung.local_addr().expect("its address").port();
    let started = Instant::now();
    let (ok, report) = d
        .report_with(
            &["--timeout-secs", "2"],
            &[
                ("PROJECTOR_REDIS__URL", format!("redis://127.0.0.1:{port}/")),
                (
                    "PROJECTOR_MONGO__URI",
                    format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
                ),
                (
                    "PROJECTOR_CLICKHOUSE__URL",
                    format!("http://127.0.0.1:{port}"),
                ),
            ],
        )
        .await;
    // Each group asks its server a few times at most, each under the deadline.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(!ok);
    for check in ["redis", "mongo", "clickhouse"] {
        let row = report.row(check).expect("the store's row");
        assert_eq!(row.verdict, Verdict::Fail, "{row:?}");
    }
    assert_eq!(report.row("postgres").map(|r| r.verdict), Some(Verdict::Ok));
    drop(hung);
}
