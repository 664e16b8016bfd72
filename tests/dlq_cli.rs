//! `projector dlq` as an operator uses it, through the binary: a message garbled in transit
//! is dead-lettered and parks its stream, the stream's next event waits as `parked`; the
//! operator lists and reads the letters, unparks the stream (replayed from the event store,
//! which has it intact), replays a letter through the guarded path, and the read models equal
//! the fold of the event log.

mod common;

use std::process::Command;
use std::time::Duration;

use projector::config::Config;

fn dlq(cfg: &Config, args: &[&str]) -> String {
    let out = Command::new(common::projector_bin())
        .arg("dlq")
        .args(args)
        .envs(common::config_env(cfg))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ dlq {}\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dlq {args:?} failed");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reads_replays_and_unparks_dead_letters() {
    let (cfg, ns) = common::isolated_config("dlq");
    common::generate(&cfg, &ns, 300, 3, 0.0, 0.0).await;
    let id = format!("{ns}cus-garbled");
    common::stream_garbled_in_transit(&cfg, &id).await;
    common::run_worker_until_idle(&cfg, Duration::from_secs(3)).await;

    // The letters, with reasons and origins.
    let stream = format!("customer/{id}");
    let list = dlq(&cfg, &["list"]);
    let lines: Vec<&str> = list.lines().filter(|l| l.contains(&stream)).collect();
    let poison = lines
        .iter()
        .find(|l| l.contains(&format!("{stream} #0")))
        .unwrap_or_else(|| panic!("the garbled message is listed: {list}"));
    let parked = lines
        .iter()
        .find(|l| l.contains(&format!("{stream} #1")) && l.contains("parked"))
        .unwrap_or_else(|| panic!("the held event is listed as parked: {list}"));
    let poison_id = poison.split_whitespace().next().unwrap().to_owned();
    let parked_id = parked.split_whitespace().next().unwrap().to_owned();
    let show = dlq(&cfg, &["show", &poison_id]);
    assert!(show.contains("garbled in transit"), "{show}");
    assert!(
        show.contains(&format!("source     {}customer", cfg.kafka.topic_prefix)),
        "{show}"
    );
    let only_parked = dlq(&cfg, &["list", "--kind", "parked"]);
    assert!(
        only_parked.lines().skip(2).all(|l| l.contains(" parked ")),
        "{only_parked}"
    );

    // Nothing of the stream is in the Customer-360 yet.
    let sinks = common::live_sinks(&cfg).await;
    let docs = common::decoded(
        sinks
            .redis
            .scan_all::<projectors::customer360::Customer360>()
            .await
            .unwrap(),
    );
    assert!(
        !docs.iter().any(|(k, _)| *k == id),
        "held back while parked"
    );

    // Unpark: the stream is replayed from the event store (which has it intact).
    let out = dlq(&cfg, &["unpark", &stream]);
    assert!(out.contains("events replayed"), "{out}");
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    // Replaying a letter goes through the guarded path: applied already, so nothing changes.
    let out = dlq(&cfg, &["replay", &parked_id]);
    assert!(out.contains("sent again"), "{out}");
    common::run_worker_until_idle(&cfg, Duration::from_secs(3)).await;
    common::assert_read_models_equal_fold(&cfg, &ns).await;

    // Unknown letters are refused with a clear message.
    let out = Command::new(common::projector_bin())
        .args(["dlq", "show", "99:99999"])
        .envs(common::config_env(&cfg))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no letter 99:99999"));
}
