//! `rebuild-projection` as an operator runs it, through the binary: build beside the live
//! version without switching, see the orphaned versions in `status`, switch one later (the
//! replaced version retires), refuse to drop what readers use, drop what they do not.

mod common;

use std::process::{Command, Output};

use projector::config::Config;
use projector::versions::{VersionSinks, live_versions};

fn cli(cfg: &Config, args: &[&str]) -> Output {
    let out = Command::new(common::projector_bin())
        .arg("rebuild-projection")
        .args(args)
        .envs(common::config_env(cfg))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    eprintln!(
        "$ rebuild-projection {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(cfg: &Config, args: &[&str]) -> String {
    let out = cli(cfg, args);
    assert!(out.status.success(), "rebuild-projection {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn statuses(
    cfg: &Config,
    store: &projector::store::EventStore,
    version: &str,
) -> Vec<String> {
    let mut s: Vec<String> = projector::rebuild::versions_in_scope(cfg, store)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.version == version)
        .map(|c| format!("{} {}", c.projection, c.status))
        .collect();
    s.sort();
    s
}

async fn va_keys(cfg: &Config) -> projector::sinks::redis::RedisCon {
    projector::sinks::redis::RedisSink::connect(&cfg.redis, "x")
        .await
        .unwrap()
        .connection()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_builds_switches_and_drops_versions_from_the_command_line() {
    let (cfg, ns) = common::isolated_config("rbcli");
    let store = common::store().await;
    // Both versions start at today's head: they replay this test's history only.
    common::seed_at_head(&cfg, &store, "va").await;
    common::seed_at_head(&cfg, &store, "vb").await;
    common::generate(&cfg, &ns, 1_500, 11, 0.0, 0.0).await;

    let out = ok(&cfg, &["--all", "--version", "va", "--no-switch"]);
    assert!(out.contains("--no-switch"), "{out}");
    ok(&cfg, &["--all", "--version", "vb", "--no-switch"]);
    let status = ok(&cfg, &["status"]);
    for p in projectors::names() {
        assert!(
            status.contains(&format!("{p}: readers on version live")),
            "{status}"
        );
        assert!(status.contains(&format!("{p} va (caught_up)")), "{status}");
        assert!(status.contains(&format!("{p} vb (caught_up)")), "{status}");
    }
    assert!(status.contains("orphaned versions"), "{status}");

    // Switch to va later: readers move, the replaced version (live) is retired.
    ok(&cfg, &["switch", "va", "--grace-seconds", "0"]);
    let live = live_versions(&store, &cfg).await.unwrap();
    for p in projectors::names() {
        assert_eq!(live.of(p), "va", "{p} readers moved");
    }
    assert!(live.switching.is_empty());
    // Agents that read Redis directly find the live version under the pointer key.
    let pointer: Option<String> = redis::cmd("GET")
        .arg(cfg.redis_pointer_key())
        .query_async(&mut va_keys(&cfg).await)
        .await
        .unwrap();
    let pointer: serde_json::Value =
        serde_json::from_str(&pointer.expect("pointer key set")).unwrap();
    assert_eq!(pointer["version"], "va");
    assert_eq!(pointer["prefix"], cfg.versioned_views("va").redis_prefix);
    assert_eq!(
        statuses(&cfg, &store, "live").await,
        [
            "analytics retired",
            "customer360 retired",
            "order_view retired"
        ]
    );
    let va = VersionSinks::connect(&cfg, "va").await.unwrap();
    let log = common::event_log_at(&cfg, &ns).await;
    common::assert_same(
        &common::fold(&log, &ns),
        &common::snapshot(&va, &ns).await,
        "the switched-to version",
    );

    // A version readers use cannot be dropped; switching twice is refused too.
    let refused = cli(&cfg, &["drop", "va"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("switch to another version"),
        "the refusal says why"
    );
    assert!(!cli(&cfg, &["switch", "va"]).status.success());
    assert!(!cli(&cfg, &["drop", "nosuch"]).status.success());

    // The unused one is dropped: its stores are gone, nothing orphaned remains.
    let vb_views = cfg.versioned_views("vb");
    let vb_keys = projector::sinks::redis::RedisSink::connect(&cfg.redis, &vb_views.redis_prefix)
        .await
        .unwrap();
    let stored = |keys: Vec<(
        String,
        projector::sinks::Loaded<projectors::customer360::Customer360>,
    )>| { keys.iter().filter(|(k, _)| k.starts_with(&ns)).count() };
    assert!(stored(vb_keys.scan_all().await.unwrap()) > 0);
    ok(&cfg, &["drop", "vb"]);
    assert_eq!(
        statuses(&cfg, &store, "vb").await,
        [
            "analytics retired",
            "customer360 retired",
            "order_view retired"
        ]
    );
    assert_eq!(
        stored(vb_keys.scan_all().await.unwrap()),
        0,
        "Redis documents deleted"
    );
    let collections = va.mongo.collection().namespace();
    let names = va
        .mongo
        .collection()
        .client()
        .database(&collections.db)
        .list_collection_names()
        .await
        .unwrap();
    let left = va
        .mongo
        .collection()
        .client()
        .database(&collections.db)
        .collection::<mongodb::bson::Document>(&vb_views.mongo_collection)
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    assert!(
        !names.contains(&vb_views.mongo_collection),
        "MongoDB collection dropped ({left} documents left)"
    );
    let exists: u8 = va
        .clickhouse
        .client()
        .query(&format!("EXISTS TABLE {}", vb_views.clickhouse_table))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(exists, 0, "ClickHouse table dropped");
    let status = ok(&cfg, &["status"]);
    assert!(!status.contains("orphaned"), "{status}");
    for p in projectors::names() {
        projector::rebuild::retire(&cfg, &store, p, "va").await.ok();
    }
}
