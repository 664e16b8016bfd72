//! The worker processes the bench measures (spawned from this binary) and what it reads of
//! them and of the servers: peak and median RSS, CPU seconds, the RSS target.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use projector::config::Config;
use projector::runtime::RunReport;

/// The worker's memory target at any steady rate (issue 15); while draining a backlog it may
/// add the largest fetch response, which librdkafka holds whole until its last message is
/// read (the local broker ignores fetch limits: a backlog comes in one response).
pub(super) const RSS_TARGET_MIB: f64 = 150.0;

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The RSS line of a run: peak (and median), its target, and what the client's fetches held.
pub(super) fn rss_line(
    peak_mib: f64,
    median_mib: Option<f64>,
    report: &RunReport,
    draining: bool,
) -> String {
    let fetch = mib(report.fetch_response_bytes_max);
    let target = if draining {
        format!(
            "target ≤ {RSS_TARGET_MIB:.0} MiB + largest fetch = {:.0} MiB",
            RSS_TARGET_MIB + fetch
        )
    } else {
        format!("target ≤ {RSS_TARGET_MIB:.0} MiB")
    };
    let median = median_mib.map_or(String::new(), |m| format!(" (median {m:.0})"));
    format!(
        "peak RSS {peak_mib:.0} MiB{median}, {target}; largest fetch response ≤ {fetch:.1} MiB \
         (all its broker sent in one 5 s statistics interval), librdkafka's fetch queues held \
         ≤ {:.1} MiB (sampled every 5 s)",
        mib(report.fetch_queue_bytes_max)
    )
}

pub(super) struct Drain {
    pub(super) report: RunReport,
    pub(super) rss_mib: f64,
    /// Where the CPU went while it drained (share of one core per process).
    pub(super) cpu: String,
    /// Median of the RSS samples: the peak is set by the broker's fetch responses, which the
    /// local broker does not bound (see README).
    pub(super) rss_median_mib: f64,
}

/// A fresh group drains the backlog in a worker process (this binary); peak RSS sampled.
pub(super) async fn drain(cfg: &Config, label: &str, only: Option<&str>) -> anyhow::Result<Drain> {
    let stats = std::env::temp_dir().join(format!("{}-{label}-stats.json", cfg.kafka.group_id));
    let probe = CpuProbe::start();
    let child = spawn_worker(cfg, &stats, 3.0, only)?;
    let (status, rss, worker_cpu, median) = wait_sampling_rss(child).await?;
    let cpu = probe.report(worker_cpu);
    anyhow::ensure!(status.success(), "worker exited with {status}");
    let report: RunReport = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let _ = std::fs::remove_file(&stats);
    Ok(Drain {
        report,
        rss_mib: rss as f64 / 1024.0,
        cpu,
        rss_median_mib: median as f64 / 1024.0,
    })
}

/// Wait for a worker, sampling its peak RSS and median RSS (KiB) and its CPU seconds.
pub(super) async fn wait_sampling_rss(
    mut child: std::process::Child,
) -> anyhow::Result<(std::process::ExitStatus, u64, Option<f64>, u64)> {
    let pid = child.id();
    let mut peak = 0u64;
    let mut cpu = None;
    let mut samples = Vec::new();
    loop {
        if let Some(s) = child.try_wait()? {
            samples.sort_unstable();
            let median = samples.get(samples.len() / 2).copied().unwrap_or(0);
            return Ok((s, peak, cpu, median));
        }
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(kib) = vm_rss_kib(pid) {
            samples.push(kib);
        }
        if let Some(c) = cpu_seconds(pid) {
            cpu = Some(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU seconds (user + system) a process has used so far.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The servers' pids, from the pid files `scripts/services.sh` keeps (this machine's
/// servers only; none when they run elsewhere).
pub(super) fn server_pids() -> Vec<(&'static str, u32)> {
    let out = std::process::Command::new("bash")
        .args(["scripts/services.sh", "pid"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ["kafka", "postgres", "redis", "mongo", "clickhouse"]
        .into_iter()
        .filter_map(|svc| {
            let line = text.lines().find(|l| l.starts_with(svc))?;
            Some((svc, line.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect()
}

/// CPU used by each server (and PostgreSQL's backends, counted with it) between two reads.
pub(super) struct CpuProbe(Vec<(&'static str, u32, f64)>, Instant);

impl CpuProbe {
    pub(super) fn start() -> CpuProbe {
        let v = server_pids()
            .into_iter()
            .map(|(s, p)| (s, p, cpu_seconds(p).unwrap_or(0.0)))
            .collect();
        CpuProbe(v, Instant::now())
    }

    /// "mongo 93%, redis 20%, …" of one core, over the time since `start`.
    pub(super) fn report(&self, worker: Option<f64>) -> String {
        let secs = self.1.elapsed().as_secs_f64().max(1e-9);
        let mut parts: Vec<(String, f64)> = self
            .0
            .iter()
            .map(|(s, p, before)| {
                (
                    (*s).to_owned(),
                    (cpu_seconds(*p).unwrap_or(*before) - before) / secs,
                )
            })
            .collect();
        if let Some(w) = worker {
            parts.push(("worker".into(), w / secs));
        }
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        parts
            .iter()
            .map(|(s, c)| format!("{s} {:.0}%", c * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Resident set of a process now (VmRSS), in KiB.
pub(super) fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident set of a process (VmHWM), in KiB.
pub(super) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A worker process that exits when idle, writing its figures to `stats` (only the `only`
/// projector, if named).
pub(super) fn spawn_worker(
    cfg: &Config,
    stats: &Path,
    idle: f64,
    only: Option<&str>,
) -> anyhow::Result<std::process::Child> {
    spawn_worker_serving(cfg, stats, idle, only, None)
}

/// `spawn_worker`, its health endpoints served at `http` (an address) when given.
pub(super) fn spawn_worker_serving(
    cfg: &Config,
    stats: &Path,
    idle: f64,
    only: Option<&str>,
    http: Option<std::net::SocketAddr>,
) -> anyhow::Result<std::process::Child> {
    // BENCH_WORKER_WRAP runs the worker under another program, e.g. "heaptrack -o /tmp/w"
    // or "perf record -g -o /tmp/w.data" (profiling the process the figures come from).
    let wrap = std::env::var("BENCH_WORKER_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(std::env::current_exe()?);
            c
        }
        None => std::process::Command::new(std::env::current_exe()?),
    };
    cmd.args(["run", "--exit-when-idle", &idle.to_string(), "--stats-json"])
        .arg(PathBuf::from(stats));
    if let Some(p) = only {
        cmd.args(["--projectors", p]);
    }
    cmd.envs(cfg.child_env());
    if let Some(a) = http {
        cmd.env("PROJECTOR_WORKER__HTTP_ADDR", a.to_string());
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .stdout(Stdio::null())
    .spawn()
    .context("starting the worker")
}
