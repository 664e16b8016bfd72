//! The replay reader against a real PostgreSQL with concurrent writers that commit out of
//! order and roll back: it never skips a committed event and never stalls on a gap.

mod common;

use std::collections::BTreeSet;

use projector::store::{EventStore, ReplayPosition};
use tokio_postgres::NoTls;

/// A raw connection, to hold transactions open at will.
async fn raw() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::config().postgres.url, NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn insert(tx: &tokio_postgres::Client, ns: &str, n: i64) -> i64 {
    let row = tx
        .query_one(
            "INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence_number, event_type, event_data, timestamp)
             VALUES (gen_random_uuid(), 'customer', $1, 0, 'customer.note_added', '{}', now()) RETURNING global_position",
            &[&format!("{ns}cus-{n}")],
        )
        .await
        .unwrap();
    row.get(0)
}

/// Read everything a replay can see now, from `from`, in pages of 2.
async fn drain(store: &EventStore, ns: &str, from: &mut ReplayPosition) -> Vec<i64> {
    let mut seen = Vec::new();
    loop {
        let page = store.read_committed_after(*from, 2).await.unwrap();
        if page.is_empty() {
            return seen;
        }
        for (pos, e) in page {
            assert!(pos > *from, "commit order only moves forward");
            *from = pos;
            if e.aggregate_id.starts_with(ns) {
                seen.push(e.global_position);
            }
        }
    }
}

#[tokio::test]
async fn out_of_order_commits_and_rollbacks_are_neither_skipped_nor_waited_on() {
    let store = common::store().await;
    let ns = common::unique_namespace("gap");
    let mut cursor = store.committed_head().await.unwrap();

    // Writer A takes the lowest position and stays open.
    let a = raw().await;
    a.batch_execute("BEGIN").await.unwrap();
    let pos_a = insert(&a, &ns, 1).await;
    // Writer B takes a higher position and commits first.
    let b = raw().await;
    b.batch_execute("BEGIN").await.unwrap();
    let pos_b = insert(&b, &ns, 2).await;
    b.batch_execute("COMMIT").await.unwrap();
    // Writer C takes a position and rolls back: a permanent gap.
    let c = raw().await;
    c.batch_execute("BEGIN").await.unwrap();
    let pos_c = insert(&c, &ns, 3).await;
    c.batch_execute("ROLLBACK").await.unwrap();
    assert!(pos_a < pos_b && pos_b < pos_c);

    // B is visible to a plain read, but a replay must not pass A's position yet: had it
    // checkpointed after B, A would be skipped for ever once it commits.
    let plain: Vec<i64> = store
        .read_prefix(&ns)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(plain, vec![pos_b]);
    let early = drain(&store, &ns, &mut cursor).await;
    assert!(
        early.is_empty(),
        "read {early:?} while an older writer was in flight"
    );

    a.batch_execute("COMMIT").await.unwrap();
    // Writer D after the gap: the reader gets past C's rolled-back position without waiting.
    let d = raw().await;
    let pos_d = insert(&d, &ns, 4).await;
    // Other tests' transactions may hold the horizon back a moment: poll, bounded.
    let mut later = Vec::new();
    for _ in 0..300 {
        later.extend(drain(&store, &ns, &mut cursor).await);
        if later.len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        later.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([pos_a, pos_b, pos_d])
    );
    assert_eq!(
        later,
        vec![pos_a, pos_b, pos_d],
        "commit order: A's transaction began writing first"
    );
    assert!(
        drain(&store, &ns, &mut cursor).await.is_empty(),
        "each event is read once"
    );
}

#[tokio::test]
async fn many_concurrent_writers_replay_completely() {
    let store = common::store().await;
    let ns = common::unique_namespace("cw");
    let mut cursor = store.committed_head().await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..6i64 {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let c = raw().await;
            let mut committed = Vec::new();
            for i in 0..20i64 {
                c.batch_execute("BEGIN").await.unwrap();
                let p = insert(&c, &ns, w * 100 + i).await;
                tokio::time::sleep(std::time::Duration::from_millis(
                    (i * 7 + w * 3) as u64 % 11,
                ))
                .await;
                if (i + w) % 5 == 0 {
                    c.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    c.batch_execute("COMMIT").await.unwrap();
                    committed.push(p);
                }
            }
            committed
        }));
    }
    // Replay while they write.
    let mut seen = Vec::new();
    let mut done = false;
    let mut expected = BTreeSet::new();
    while !done {
        seen.extend(drain(&store, &ns, &mut cursor).await);
        if tasks.iter().all(|t| t.is_finished()) {
            for t in tasks.drain(..) {
                expected.extend(t.await.unwrap());
            }
            for _ in 0..300 {
                seen.extend(drain(&store, &ns, &mut cursor).await);
                if seen.len() >= expected.len() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            done = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "nothing read twice");
    assert_eq!(
        unique, expected,
        "every committed event read, none of the rolled back"
    );
}

#[tokio::test]
async fn the_head_and_the_typed_reader_order_transactions_numerically() {
    // On a session of its own, a temporary `events` table shadows the real one, so the test
    // can give rows transaction ids whose text order differs from their numeric order
    // ("9" sorts after "13" as text). All are finished: below any snapshot's xmin, even on a
    // fresh cluster.
    let store = EventStore::connect(&common::config().postgres.url)
        .await
        .unwrap();
    store
        .client()
        .batch_execute(
            "CREATE TEMP TABLE events (LIKE public.events INCLUDING DEFAULTS);
             INSERT INTO events (global_position, event_id, aggregate_type, aggregate_id, sequence_number,
                                 event_type, event_data, timestamp, transaction_id)
             VALUES (7, gen_random_uuid(), 'customer', 'h-1', 0, 'customer.note_added', '{}', now(), '9'),
                    (5, gen_random_uuid(), 'customer', 'h-2', 0, 'customer.note_added', '{}', now(), '13'),
                    (6, gen_random_uuid(), 'customer', 'h-3', 0, 'customer.note_added', '{}', now(), '2');",
        )
        .await
        .unwrap();
    let head = store.committed_head().await.unwrap();
    assert_eq!(
        (head.transaction_id, head.global_position),
        (13, 5),
        "the head is the last transaction in numeric order"
    );
    let page = store
        .read_events_after(ReplayPosition::default(), None, 10)
        .await
        .unwrap();
    let order: Vec<i64> = page.iter().map(|(p, _)| p.global_position).collect();
    assert_eq!(order, [6, 7, 5], "commit order: transactions 2, 9, 13");
}
