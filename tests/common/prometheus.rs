//! A real Prometheus (Debian's), started by `scripts/services.sh up prometheus` in the fault
//! set's run root: the test writes its scrape targets (file_sd) and its rules (then reloads),
//! and reads alerts and query results from its HTTP API.

use std::path::PathBuf;

use serde_json::Value;

use super::faults::{PROMETHEUS_ADDR, repo, services_sh, services_sh_env};

pub struct Prometheus {
    pub addr: String,
    dir: PathBuf,
    /// Started by this test, with an empty TSDB (then stopped when it ends); one already
    /// running is used as it is and left running.
    pub started: bool,
}

/// One active alert: pending or firing (a resolved alert leaves `/api/v1/alerts`).
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    pub state: String,
    pub labels: serde_json::Map<String, Value>,
}

impl Alert {
    pub fn label(&self, k: &str) -> &str {
        self.labels.get(k).and_then(Value::as_str).unwrap_or("")
    }
}

impl Prometheus {
    pub fn up() -> Prometheus {
        let before = services_sh(true, &["pid", "prometheus"]);
        let running = String::from_utf8_lossy(&before.stdout)
            .split_whitespace()
            .nth(1)
            .is_some_and(|p| p != "-");
        // No series or alert state of an earlier run: they would answer for this one.
        let out = if running {
            services_sh(true, &["up", "prometheus"])
        } else {
            services_sh_env(true, &[("PROMETHEUS_FRESH", "1")], &["up", "prometheus"])
        };
        assert!(
            out.status.success(),
            "scripts/services.sh up prometheus:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Prometheus {
            addr: PROMETHEUS_ADDR.to_owned(),
            dir: repo().join(".services-faults/prometheus"),
            started: !running,
        }
    }

    /// Write a file whole (Prometheus may read it at any moment): a hidden temporary file
    /// its globs do not match, renamed over the target.
    fn write(&self, rel: &str, text: &str) {
        let path = self.dir.join(rel);
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        std::fs::write(&tmp, text).expect("write into the Prometheus run root");
        std::fs::rename(&tmp, &path).expect("rename into the Prometheus run root");
    }

    /// Scrape exactly these `host:port`s as `targets/<name>.json` (job `projector`).
    pub fn set_targets(&self, name: &str, targets: &[&str]) {
        let sd = serde_json::json!([{ "targets": targets, "labels": {} }]);
        self.write(&format!("targets/{name}.json"), &sd.to_string());
    }

    pub fn remove_targets(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("targets/{name}.json")));
    }

    /// Replace the rules (`rules/alerts.yml`) and reload; returns `/api/v1/rules`' groups.
    pub async fn load_rules(&self, text: &str) -> Vec<Value> {
        self.write("rules/alerts.yml", text);
        let (status, body) = super::http_post(&self.addr, "/-/reload", "text/plain", "")
            .await
            .expect("Prometheus answers /-/reload");
        assert_eq!(status, 200, "reload refused: {body}");
        self.api("/api/v1/rules")
            .await
            .expect("GET /api/v1/rules")
            .get("groups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// `data` of an API answer; `None` when Prometheus does not answer (or not with success).
    pub async fn api(&self, path: &str) -> Option<Value> {
        let (status, body) = super::http_get(&self.addr, path).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        if status != 200 || v["status"] != "success" {
            eprintln!("prometheus {path}: {status} {body}");
            return None;
        }
        v.get("data").cloned()
    }

    /// An instant query's result vector (empty when nothing matches or no answer).
    pub async fn query(&self, promql: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await
            .and_then(|d| d.get("result").and_then(Value::as_array).cloned())
            .unwrap_or_default()
    }

    /// The active (pending or firing) alerts.
    pub async fn alerts(&self) -> Vec<Alert> {
        let data = self.api("/api/v1/alerts").await.unwrap_or_default();
        data.get("alerts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| {
                let labels = a.get("labels")?.as_object()?.clone();
                Some(Alert {
                    name: labels.get("alertname")?.as_str()?.to_owned(),
                    state: a.get("state")?.as_str()?.to_owned(),
                    labels,
                })
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if self.started {
            let _ = services_sh(true, &["down", "prometheus"]);
        }
    }
}

/// Percent-encode a query-string value (everything but RFC 3986's unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
