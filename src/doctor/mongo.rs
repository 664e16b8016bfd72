//! MongoDB: reachable, its version, whether its writes are as durable as the sink asks
//! (`mongo.write_concern`, always `j: true`; a replica set commits a command's replacements
//! in one transaction, a standalone server writes them one by one), and how long a killed
//! worker's open transaction can keep its documents locked.

use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};

use super::{ProbeError, Row, timed};
use crate::config::{Config, MongoWriteConcern};
use crate::sinks::mongo::TRANSACTION_LIFETIME_OK_SECS as LIFETIME_OK_SECS;

/// What `hello` says about the deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Topology {
    /// The replica set's name; `None`: a standalone server.
    pub set_name: Option<String>,
    /// Data-bearing members (`hosts`; arbiters and hidden members are not in it).
    pub members: usize,
}

pub(crate) async fn check(cfg: &Config, t: Duration, collection: &str) -> Vec<Row> {
    let at = crate::redact::url(&cfg.mongo.uri);
    let fail_both = |seen: String| {
        vec![
            Row::fail("mongo", seen)
                .action("check mongo.uri and that MongoDB runs and is reachable"),
            Row::fail("mongo durability", "MongoDB unreachable"),
            Row::fail(TRANSACTIONS, "MongoDB unreachable"),
        ]
    };
    let client = match timed(t, connect(cfg, t)).await {
        Ok(c) => c,
        Err(e) => return fail_both(format!("{at}: {e}")),
    };
    let db = client.database(&cfg.mongo.database);
    let hello = match timed(t, db.run_command(doc! {"hello": 1})).await {
        Ok(h) => h,
        Err(e) => return fail_both(format!("{at}: hello: {e}")),
    };
    let admin = client.database("admin");
    let version = timed(t, admin.run_command(doc! {"buildInfo": 1}))
        .await
        .ok()
        .and_then(|b| b.get_str("version").ok().map(str::to_owned));
    // Not every server answers it (it needs a privilege); then the write probe decides.
    let argv = timed(t, admin.run_command(doc! {"getCmdLineOpts": 1}))
        .await
        .ok()
        .and_then(|r| {
            r.get_array("argv").ok().map(|a| {
                a.iter()
                    .filter_map(Bson::as_str)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
        });
    let topology = Topology {
        set_name: hello.get_str("setName").ok().map(str::to_owned),
        members: hello.get_array("hosts").map_or(1, |h| h.len().max(1)),
    };
    let probe = timed(t, noop_write(&db, cfg, collection, t)).await;
    let lifetime = match topology.set_name {
        Some(_) => Some(
            timed(t, crate::sinks::mongo::transaction_lifetime_secs(&client))
                .await
                .map_err(|e| e.to_string()),
        ),
        None => None,
    };
    let shape = match &topology.set_name {
        Some(name) => format!("replica set {name} of {} member(s)", topology.members),
        None => "standalone".to_owned(),
    };
    vec![
        Row::ok(
            "mongo",
            format!(
                "MongoDB {} at {at}, {shape}",
                version.as_deref().unwrap_or("(version not reported)")
            ),
        ),
        durability_row(cfg.mongo.write_concern, &topology, argv.as_deref(), probe),
        transactions_row(lifetime),
    ]
}

const TRANSACTIONS: &str = "mongo transactions";

/// A worker killed between a transaction's update and its commit leaves its documents locked
/// to every other writer until the server aborts the transaction, after
/// `transactionLifetimeLimitSeconds` (MongoDB's default: 60). Until then the partitions it
/// owned, now another member's, retry WriteConflict with their circuit open. `lifetime`:
/// `None` on a standalone server (no transactions).
pub(crate) fn transactions_row(lifetime: Option<Result<i64, String>>) -> Row {
    let fix = format!(
        "db.adminCommand({{setParameter: 1, transactionLifetimeLimitSeconds: 5}}) on every \
         member (or mongod --setParameter transactionLifetimeLimitSeconds=5), at most \
         {LIFETIME_OK_SECS}"
    );
    match lifetime {
        None => Row::ok(
            TRANSACTIONS,
            "standalone: the sink uses no transactions, so a killed worker leaves no lock",
        ),
        Some(Ok(secs)) if secs <= LIFETIME_OK_SECS => Row::ok(
            TRANSACTIONS,
            format!(
                "transactionLifetimeLimitSeconds = {secs}: a worker killed mid-transaction \
                 blocks its documents for at most {secs} s"
            ),
        ),
        Some(Ok(secs)) => Row::warn(
            TRANSACTIONS,
            format!(
                "transactionLifetimeLimitSeconds = {secs}: a worker killed mid-transaction \
                 blocks the writes to its documents, and the lag of the partitions it owned, \
                 for up to {secs} s"
            ),
        )
        .action(fix),
        Some(Err(e)) => Row::warn(
            TRANSACTIONS,
            format!("transactionLifetimeLimitSeconds not readable: {e}"),
        )
        .action(format!("check it is at most {LIFETIME_OK_SECS} s: {fix}")),
    }
}

pub(crate) async fn connect(cfg: &Config, t: Duration) -> Result<mongodb::Client, String> {
    let options = crate::sinks::mongo::client_options(&cfg.mongo, "projector-doctor", t).await?;
    mongodb::Client::with_options(options).map_err(|e| e.to_string())
}

/// The write concern of every sink write, proven on an update that matches nothing (an `_id`
/// no document has, no upsert): the server checks `w` and `j` without changing a document.
async fn noop_write(
    db: &mongodb::Database,
    cfg: &Config,
    collection: &str,
    t: Duration,
) -> Result<(), String> {
    let w = match cfg.mongo.write_concern {
        MongoWriteConcern::Majority => Bson::String("majority".into()),
        MongoWriteConcern::Nodes(n) => Bson::Int32(n as i32),
    };
    let reply: Document = db
        .run_command(doc! {
            "update": collection,
            "updates": [{
                "q": {"_id": "projector-doctor: matches nothing"},
                "u": {"$set": {"_doctor": true}},
                "upsert": false,
            }],
            "ordered": true,
            "writeConcern": {"w": w, "j": true, "wtimeout": t.as_millis() as i64},
        })
        .await
        .map_err(|e| e.to_string())?;
    for field in ["writeConcernError", "writeErrors"] {
        if let Some(e) = reply.get(field) {
            return Err(format!("{field}: {e}"));
        }
    }
    Ok(())
}

/// Majority of `n` members.
fn majority(n: usize) -> usize {
    n / 2 + 1
}

pub(crate) fn durability_row(
    w: MongoWriteConcern,
    topology: &Topology,
    argv: Option<&[String]>,
    probe: Result<(), ProbeError>,
) -> Row {
    const CHECK: &str = "mongo durability";
    let w_text = match w {
        MongoWriteConcern::Majority => "majority".to_owned(),
        MongoWriteConcern::Nodes(n) => n.to_string(),
    };
    if let Err(e) = probe {
        return Row::fail(
            CHECK,
            format!("a write with w: {w_text}, j: true was refused: {e}"),
        )
        .action(
            "set mongo.write_concern to what the deployment can acknowledge, with journaling on",
        );
    }
    if let Some(argv) = argv {
        // The local MongoDB-protocol server acknowledges j: true before its log is on disk
        // unless told otherwise (README, Guarantees); an old mongod could turn the journal off.
        let local = argv.first().is_some_and(|a| a.contains("secantusd"));
        if local && !argv.iter().any(|a| a == "--sync-on-commit") {
            return Row::fail(
                CHECK,
                "secantusd-rs runs without --sync-on-commit: j: true is acknowledged before the log is on disk",
            )
            .action("restart it with --sync-on-commit");
        }
        if argv.iter().any(|a| a == "--nojournal") {
            return Row::fail(CHECK, "mongod runs with --nojournal")
                .action("run mongod with journaling");
        }
    }
    // Said when the server showed its command line (the local one's fsync switch).
    let synced = if argv.is_some_and(|a| a.iter().any(|x| x == "--sync-on-commit")) {
        "; the server runs with --sync-on-commit"
    } else {
        ""
    };
    match (&topology.set_name, w) {
        (None, MongoWriteConcern::Nodes(n)) if n > 1 => {
            Row::fail(CHECK, format!("standalone server, but w: {n}"))
                .action("set mongo.write_concern = \"majority\" (or 1)")
        }
        (None, _) => Row::ok(
            CHECK,
            format!(
                "w: {w_text}, j: true acknowledged; standalone: no failover, replacements \
                 one by one (no transactions){synced}"
            ),
        ),
        (Some(_), MongoWriteConcern::Nodes(n)) if n as usize > topology.members => Row::fail(
            CHECK,
            format!(
                "w: {n} but only {} data-bearing member(s)",
                topology.members
            ),
        )
        .action("set mongo.write_concern = \"majority\""),
        (Some(_), MongoWriteConcern::Nodes(n)) if (n as usize) < majority(topology.members) => {
            Row::warn(
                CHECK,
                format!(
                    "w: {n} of {} members: a failover can roll back acknowledged writes",
                    topology.members
                ),
            )
            .action("set mongo.write_concern = \"majority\" (the README's promise)")
        }
        (Some(name), _) => Row::ok(
            CHECK,
            format!(
                "w: {w_text}, j: true acknowledged; replica set {name}: replacements commit in \
                 transactions{synced}"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    fn rs(members: usize) -> Topology {
        Topology {
            set_name: Some("rs0".into()),
            members,
        }
    }

    #[test]
    fn the_write_concern_must_be_acknowledgeable_and_survive_a_failover() {
        use MongoWriteConcern::*;
        let v = |w, t: &Topology| durability_row(w, t, None, Ok(())).verdict;
        let standalone = Topology {
            set_name: None,
            members: 1,
        };
        assert_eq!(v(Majority, &rs(1)), Verdict::Ok);
        assert_eq!(v(Majority, &rs(3)), Verdict::Ok);
        assert_eq!(v(Majority, &standalone), Verdict::Ok);
        assert_eq!(v(Nodes(2), &rs(3)), Verdict::Ok);
        assert_eq!(
            v(Nodes(1), &rs(3)),
            Verdict::Warn,
            "w: 1 can be rolled back"
        );
        assert_eq!(v(Nodes(4), &rs(3)), Verdict::Fail, "never acknowledged");
        assert_eq!(v(Nodes(2), &standalone), Verdict::Fail);
        let refused = Err(ProbeError::Failed("UnsatisfiableWriteConcern".into()));
        assert_eq!(
            durability_row(Majority, &rs(1), None, refused).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn an_abandoned_transaction_must_not_hold_documents_for_long() {
        assert_eq!(transactions_row(None).verdict, Verdict::Ok);
        assert_eq!(transactions_row(Some(Ok(5))).verdict, Verdict::Ok);
        assert_eq!(transactions_row(Some(Ok(10))).verdict, Verdict::Ok);
        let default = transactions_row(Some(Ok(60)));
        assert_eq!(default.verdict, Verdict::Warn);
        assert!(default.seen.contains("60 s") && default.action.contains("setParameter"));
        assert_eq!(
            transactions_row(Some(Err("unauthorized".into()))).verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn the_local_server_must_sync_on_commit() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let v = |a: &[String]| {
            durability_row(MongoWriteConcern::Majority, &rs(1), Some(a), Ok(())).verdict
        };
        let bin = "/root/.cache/secantus/bin/secantusd-rs";
        assert_eq!(v(&argv(&[bin, "--sync-on-commit"])), Verdict::Ok);
        assert_eq!(v(&argv(&[bin, "--port", "1"])), Verdict::Fail);
        assert_eq!(v(&argv(&["mongod", "--nojournal"])), Verdict::Fail);
        assert_eq!(v(&argv(&["mongod", "--replSet", "rs0"])), Verdict::Ok);
    }
}
