//! `projector doctor`: the configured deployment checked end to end, one row per check —
//! a verdict, what was seen and what to do.
//!
//! Each file asks one part of the deployment: `kafka.rs` the broker, the topics, the
//! dead-letter topic and the consumer groups (as the broker sees them); `redis.rs`,
//! `mongo.rs` and `clickhouse.rs` their store's reachability, version and the durability
//! the worker relies on; `deployment.rs` PostgreSQL, the read-model versions and the parked
//! streams. Nothing here changes data: the only writes sent are a MongoDB update that
//! matches nothing (to prove the write concern) and a ClickHouse write the read service's
//! session must refuse. The verdicts are pure functions of what was read, so they are
//! tested without servers.

mod clickhouse;
mod deployment;
mod kafka;
mod mongo;
mod redis;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// How a check came out. Ordered: the worst of a set is its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// As the README promises.
    Ok,
    /// Works, but not as promised, or needs an operator soon.
    Warn,
    /// Broken: the worker or the read service cannot keep its guarantees.
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        })
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// What was checked, e.g. `redis durability`; stable, so scripts can find a row.
    pub check: String,
    pub verdict: Verdict,
    /// What the server or the deployment said.
    pub seen: String,
    /// What to do about it (empty when nothing).
    pub action: String,
}

impl Row {
    pub fn new(check: impl Into<String>, verdict: Verdict, seen: impl Into<String>) -> Row {
        Row {
            check: check.into(),
            verdict,
            seen: seen.into(),
            action: String::new(),
        }
    }

    pub fn ok(check: impl Into<String>, seen: impl Into<String>) -> Row {
        Row::new(check, Verdict::Ok, seen)
    }

    pub fn warn(check: impl Into<String>, seen: impl Into<String>) -> Row {
        Row::new(check, Verdict::Warn, seen)
    }

    pub fn fail(check: impl Into<String>, seen: impl Into<String>) -> Row {
        Row::new(check, Verdict::Fail, seen)
    }

    pub fn action(mut self, action: impl Into<String>) -> Row {
        self.action = action.into();
        self
    }
}

/// Every row, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.rows.iter().filter(|r| r.verdict == verdict).count()
    }

    /// Whether any row failed (the command then exits non-zero).
    pub fn failed(&self) -> bool {
        self.count(Verdict::Fail) > 0
    }

    pub fn row(&self, check: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.check == check)
    }

    /// The table an operator reads: verdict, check, seen, action; then the counts.
    pub fn table(&self) -> String {
        const HEAD: [&str; 4] = ["VERDICT", "CHECK", "SEEN", "ACTION"];
        let cells: Vec<[String; 4]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.verdict.to_string(),
                    r.check.clone(),
                    r.seen.clone(),
                    if r.action.is_empty() {
                        "-".to_owned()
                    } else {
                        r.action.clone()
                    },
                ]
            })
            .collect();
        let mut width = HEAD.map(|h| h.chars().count());
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: [&str; 4]| {
            let mut s = String::new();
            for (i, c) in cols.iter().enumerate() {
                if i == 3 {
                    // The last column is not padded: no trailing blanks.
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(width[i] - c.chars().count() + 2));
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(HEAD);
        for row in &cells {
            out.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
        }
        out.push_str(&format!(
            "{} ok, {} warn, {} fail\n",
            self.count(Verdict::Ok),
            self.count(Verdict::Warn),
            self.count(Verdict::Fail)
        ));
        out
    }
}

/// How the checks run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The longest any one question to a server may take: a hung server is a fail row.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(10),
        }
    }
}

/// A question to a server that did not get its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Failed(String),
}

/// Ask under the deadline: a server that hangs is an error like any other.
pub(crate) async fn timed<T, E: fmt::Display>(
    limit: Duration,
    f: impl IntoFuture<Output = Result<T, E>>,
) -> Result<T, ProbeError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ProbeError::Failed(e.to_string())),
        Err(_) => Err(ProbeError::Timeout(limit.as_millis())),
    }
}

/// A blocking call (librdkafka's) on a thread of its own, under the deadline too.
pub(crate) async fn timed_blocking<T: Send + 'static, E: fmt::Display + Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ProbeError> {
    match timed(limit, tokio::task::spawn_blocking(f)).await? {
        Ok(v) => Ok(v),
        Err(e) => Err(ProbeError::Failed(e.to_string())),
    }
}

type Group<'a> = Pin<Box<dyn Future<Output = Vec<Row>> + Send + 'a>>;

/// Run every check (the groups side by side) and gather the rows in a fixed order.
pub async fn run(cfg: &Config, opts: Options) -> Report {
    let t = opts.timeout;
    // The stores readers and workers use now (a rebuild may have switched them); the
    // configured names when the pointers cannot be read (the postgres rows say why).
    let live = deployment::live(cfg, t).await.unwrap_or_default();
    let views = crate::versions::reader_views(cfg, &live);
    let groups: Vec<(&str, Group<'_>)> = vec![
        ("kafka", Box::pin(kafka::check(cfg, t))),
        ("postgres", Box::pin(deployment::check(cfg, t))),
        ("redis", Box::pin(redis::check(cfg, t))),
        (
            "mongo",
            Box::pin(mongo::check(cfg, t, &views.mongo_collection)),
        ),
        (
            "clickhouse",
            Box::pin(clickhouse::check(cfg, t, &views.clickhouse_table)),
        ),
    ];
    // Every step inside a group has its own deadline; this one only catches a group that
    // strings too many slow steps together, so the doctor itself never hangs.
    let backstop = t * 4 + Duration::from_secs(1);
    let rows = futures::future::join_all(groups.into_iter().map(|(name, g)| async move {
        match tokio::time::timeout(backstop, g).await {
            Ok(rows) => rows,
            Err(_) => vec![
                Row::fail(
                    name,
                    format!("checks unfinished after {} s", backstop.as_secs()),
                )
                .action("the server answers too slowly: look at its load and logs"),
            ],
        }
    }))
    .await;
    Report {
        rows: rows.into_iter().flatten().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            rows: vec![
                Row::ok("kafka", "broker 1 at 127.0.0.1:19092"),
                Row::warn("group projector", "no member").action("start the workers"),
                Row::fail("redis durability", "appendfsync everysec"),
            ],
        }
    }

    #[test]
    fn the_table_aligns_columns_and_counts_verdicts() {
        let table = report().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert_eq!(
            lines[0],
            "VERDICT  CHECK             SEEN                         ACTION"
        );
        assert_eq!(
            lines[1],
            "ok       kafka             broker 1 at 127.0.0.1:19092  -"
        );
        assert_eq!(
            lines[2],
            "warn     group projector   no member                    start the workers"
        );
        assert!(lines[3].starts_with("fail     redis durability  appendfsync everysec "));
        assert_eq!(lines[4], "1 ok, 1 warn, 1 fail");
        assert!(table.lines().all(|l| !l.ends_with(' ')), "{table:?}");
    }

    #[test]
    fn any_fail_fails_the_report() {
        let mut r = report();
        assert!(r.failed());
        r.rows.pop();
        assert!(!r.failed(), "a warning alone does not fail");
        assert_eq!(r.row("kafka").map(|r| r.verdict), Some(Verdict::Ok));
    }

    #[test]
    fn verdicts_order_from_ok_to_fail_and_read_back_from_json() {
        assert!(Verdict::Ok < Verdict::Warn && Verdict::Warn < Verdict::Fail);
        let json = serde_json::to_string(&report()).unwrap_or_default();
        assert!(json.contains(r#""verdict":"warn""#), "{json}");
        let back: Report = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, report());
    }

    #[tokio::test]
    async fn a_hung_call_is_a_timeout_not_a_hang() {
        let hung = std::future::pending::<Result<(), String>>();
        let r = timed(Duration::from_millis(20), hung).await;
        assert_eq!(r, Err(ProbeError::Timeout(20)));
        let refused = async { Err::<(), _>("connection refused") };
        assert_eq!(
            timed(Duration::from_secs(1), refused).await,
            Err(ProbeError::Failed("connection refused".into()))
        );
    }
}
