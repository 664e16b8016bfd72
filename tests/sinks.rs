//! The document stores' batch writes against the real local servers: one verdict per
//! document, whatever else the batch holds.

mod common;

use projector::sinks::redis::{RedisSink, finished_key};
use projector::sinks::{DocStore, DocWrite, WriteOutcome};
use redis::AsyncCommands;

fn body(n: usize, rev: u64) -> Vec<u8> {
    format!(r#"{{"n":{n},"_guard":{{}},"_rev":{rev}}}"#).into_bytes()
}

fn write(key: &str, expected: Option<u64>, rev: u64, n: usize) -> DocWrite {
    DocWrite {
        key: key.to_owned(),
        expected,
        rev,
        body: body(n, rev).into(),
        finished: Vec::new(),
    }
}

/// A single server takes each chunk of a batch as one script (one log sync): every document
/// still gets its own verdict, in order, and one refused or conflicting document changes
/// nothing for the others.
#[tokio::test]
async fn redis_gives_each_document_of_a_batch_its_own_verdict() {
    let cfg = common::config();
    let prefix = common::unique_namespace("sinkw");
    let sink = RedisSink::connect(&cfg.redis, &prefix)
        .await
        .expect("redis is up (scripts/services.sh up)");
    let client = redis::Client::open(cfg.redis.url.as_str()).expect("url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection");

    // 600 new documents: more than one script's worth. The fifth finishes two streams.
    let mut first: Vec<DocWrite> = (0..600u64)
        .map(|i| write(&format!("d{i}"), None, 1_000 + i, i as usize))
        .collect();
    first[4].finished = vec!["order/o1".into(), "order/o2".into()];
    let out = sink.write(&first).await.expect("written");
    assert_eq!(out, WriteOutcome::default());
    for i in [0u64, 4, 255, 256, 599] {
        let got: Vec<u8> = con.get(sink.key(&format!("d{i}"))).await.expect("get");
        assert_eq!(got, body(i as usize, 1_000 + i), "d{i}");
    }
    let side = finished_key(&sink.key("d4")).expect("a plain key has a finished set");
    let mut members: Vec<String> = con.smembers(&side).await.expect("smembers");
    members.sort();
    assert_eq!(members, ["order/o1", "order/o2"]);

    // Another writer's key of the wrong kind where d2 should go; d1 is written with a token
    // that has moved on; d0, d3 and a new d600 are fine.
    let _: () = con.del(sink.key("d2")).await.expect("del");
    let _: () = con
        .hset(sink.key("d2"), "f", "v")
        .await
        .expect("a hash in the way");
    let second = vec![
        write("d0", Some(1_000), 2_000, 7),
        write("d1", Some(999), 2_001, 7),
        write("d2", None, 2_002, 7),
        write("d3", Some(1_003), 2_003, 7),
        write("d600", None, 2_600, 7),
    ];
    let out = sink.write(&second).await.expect("settled");
    assert_eq!(out.conflicts, vec![1], "{out:?}");
    assert_eq!(out.refused.len(), 1, "{out:?}");
    assert_eq!(out.refused[0].0, 2, "{out:?}");
    assert!(out.refused[0].1.contains("WRONGTYPE"), "{out:?}");
    for (key, want) in [
        ("d0", body(7, 2_000)),
        ("d1", body(1, 1_001)),
        ("d3", body(7, 2_003)),
        ("d600", body(7, 2_600)),
    ] {
        let got: Vec<u8> = con.get(sink.key(key)).await.expect("get");
        assert_eq!(got, want, "{key}");
    }

    // Large documents: a script holds at most 16 MiB of them, so Redis's query buffer limit
    // (1 GB) is never met by a chunk; 40 documents of 1 MiB go in several scripts.
    let pad = "x".repeat(1 << 20);
    let large: Vec<DocWrite> = (0..40u64)
        .map(|i| DocWrite {
            key: format!("big{i}"),
            expected: None,
            rev: 3_000 + i,
            body: format!(r#"{{"pad":"{pad}","_guard":{{}},"_rev":{}}}"#, 3_000 + i)
                .into_bytes()
                .into(),
            finished: Vec::new(),
        })
        .collect();
    let out = sink.write(&large).await.expect("written");
    assert_eq!(out, WriteOutcome::default());
    for i in [0u64, 15, 16, 39] {
        let got: Vec<u8> = con.get(sink.key(&format!("big{i}"))).await.expect("get");
        assert_eq!(got, large[i as usize].body, "big{i}");
    }

    let _ = sink.delete_all().await;
    let _: Result<(), _> = con.del(&side).await;
}

/// The live-version pointer: written by `announce`, removed by `forget_pointer` (the bench's
/// own deployment going away), and forgetting one that is not there is not an error.
#[tokio::test]
async fn redis_forgets_the_pointer_it_announced() {
    let cfg = common::config();
    let ns = common::unique_namespace("ptr");
    let key = format!("{ns}c360@current@{ns}");
    let sink = RedisSink::connect(&cfg.redis, &format!("{ns}c360:"))
        .await
        .expect("redis is up (scripts/services.sh up)")
        .with_pointer(key.clone());
    let client = redis::Client::open(cfg.redis.url.as_str()).expect("url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection");
    sink.announce("v1").await.unwrap();
    let pointer: Option<String> = con.get(&key).await.unwrap();
    assert!(pointer.is_some_and(|p| p.contains("\"v1\"")));
    sink.forget_pointer().await.unwrap();
    let pointer: Option<String> = con.get(&key).await.unwrap();
    assert_eq!(pointer, None);
    sink.forget_pointer().await.unwrap();
}
