//! Redis: reachable, its version, and whether an acknowledged Customer-360 write is on disk
//! (the sink's own probe: `appendonly`/`appendfsync`, and WAITAOF on Redis 7.2+).

use std::time::Duration;

use super::{Row, timed};
use crate::config::Config;
use crate::sinks::redis::{Durability, RedisCon, ServerDurability, probe_server};

pub(crate) async fn check(cfg: &Config, t: Duration) -> Vec<Row> {
    let mut rcfg = cfg.redis.clone();
    // Every question answers within the doctor's deadline, not the worker's.
    rcfg.timeout_ms = rcfg.timeout_ms.min(t.as_millis() as u64);
    rcfg.connect_timeout_ms = rcfg.connect_timeout_ms.min(t.as_millis() as u64);
    let at = crate::redact::url(&cfg.redis.url);
    let mut con = match timed(t, RedisCon::open(&rcfg, 0)).await {
        Ok(c) => c,
        Err(e) => {
            return vec![
                Row::fail("redis", format!("{at}: {e}"))
                    .action("check redis.url and that Redis runs and is reachable"),
                Row::fail("redis durability", "Redis unreachable"),
            ];
        }
    };
    let ping = timed(t, async {
        redis::cmd("PING").query_async::<String>(&mut con).await
    })
    .await;
    if let Err(e) = ping {
        return vec![
            Row::fail("redis", format!("{at}: PING: {e}"))
                .action("Redis accepts connections but does not answer: look at its load and logs"),
            Row::fail("redis durability", "Redis does not answer"),
        ];
    }
    let probe = match timed(t, async { Ok::<_, String>(probe_server(&mut con).await) }).await {
        Ok(p) => p,
        Err(e) => {
            return vec![
                Row::ok("redis", format!("{at} answers PING")),
                Row::fail("redis durability", format!("INFO/CONFIG: {e}")),
            ];
        }
    };
    let kind = if cfg.redis.cluster {
        "Redis Cluster"
    } else {
        "Redis"
    };
    vec![
        Row::ok(
            "redis",
            format!(
                "{kind} {} at {at}",
                probe.version.as_deref().unwrap_or("(version not reported)")
            ),
        ),
        durability_row(&probe),
    ]
}

/// The README's promise: an acknowledged write is on disk. The sink gets there either way:
/// WAITAOF after every pipeline (Redis 7.2+), or `appendfsync always` (fsync before each
/// reply) on an older server.
pub(crate) fn durability_row(p: &ServerDurability) -> Row {
    const CHECK: &str = "redis durability";
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
    let settings = format!(
        "appendonly {}, appendfsync {}",
        show(&p.appendonly),
        show(&p.appendfsync)
    );
    let version = p.version.as_deref().unwrap_or("?");
    match &p.durability {
        Durability::Lossy(why) => Row::fail(
            CHECK,
            format!("{settings}, Redis {version}: acknowledged writes can be lost ({why})"),
        )
        .action(
            "run Redis with appendonly yes and appendfsync always (or Redis 7.2+, whose WAITAOF \
             the worker then waits on)",
        ),
        // Redis 7.2+ whose settings could not be read: WAITAOF fails the batch (retried)
        // if the AOF is off, so nothing is lost, but nothing may be written either.
        Durability::WaitAof if p.appendonly.is_none() => Row::warn(
            CHECK,
            format!(
                "{settings}, Redis {version}: CONFIG GET refused; every write waits on WAITAOF 1 0"
            ),
        )
        .action("allow CONFIG GET to confirm appendonly yes (with the AOF off every write fails)"),
        Durability::WaitAof => Row::ok(
            CHECK,
            format!("{settings}, Redis {version}: every write pipeline waits on WAITAOF 1 0"),
        ),
        Durability::FsyncAlways => Row::ok(
            CHECK,
            format!(
                "{settings}: fsync before every reply (Redis {version} has no WAITAOF, which \
                 needs 7.2; not needed with always)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn probe(version: &str, ao: Option<&str>, af: Option<&str>, d: Durability) -> ServerDurability {
        ServerDurability {
            version: Some(version.into()),
            appendonly: ao.map(Into::into),
            appendfsync: af.map(Into::into),
            durability: d,
        }
    }

    #[test]
    fn only_writes_that_can_be_lost_fail() {
        let v = |p| durability_row(&p).verdict;
        let old_always = probe(
            "7.0.15",
            Some("yes"),
            Some("always"),
            Durability::FsyncAlways,
        );
        assert_eq!(v(old_always), Verdict::Ok);
        let new_everysec = probe("7.2.4", Some("yes"), Some("everysec"), Durability::WaitAof);
        assert_eq!(v(new_everysec), Verdict::Ok);
        let lossy =
            Durability::Lossy("appendfsync is \"everysec\" and Redis 7.0.15 has no WAITAOF".into());
        let old_everysec = probe("7.0.15", Some("yes"), Some("everysec"), lossy);
        let r = durability_row(&old_everysec);
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.seen.contains("appendfsync everysec"), "{}", r.seen);
        let unknown = probe("7.4.0", None, None, Durability::WaitAof);
        assert_eq!(v(unknown), Verdict::Warn);
    }
}
