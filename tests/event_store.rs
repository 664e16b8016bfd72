//! The event store against a real PostgreSQL.

mod common;

use contract::EventEnvelope;
use projector::generator::History;
use projector::store::StoreError;

fn history(ns: &str, n: usize) -> Vec<EventEnvelope> {
    History::new(7, ns).take(n).collect()
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let mut store = common::store().await;
    assert_eq!(store.migrate().await.unwrap(), 0);
    let tables: Vec<String> = store
        .client()
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in [
        "events",
        "projection_checkpoints",
        "projection_versions",
        "schema_migrations",
    ] {
        assert!(
            tables.iter().any(|x| x == t),
            "missing table {t}: {tables:?}"
        );
    }
}

#[tokio::test]
async fn appended_events_read_back_identical_in_position_order() {
    let mut store = common::store().await;
    let ns = common::unique_namespace("st");
    let mut events = history(&ns, 500);
    let outcome = store.append(&mut events).await.unwrap();
    assert_eq!(outcome.appended, 500);
    assert!(
        events
            .windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
    assert_eq!(events[0].global_position, outcome.first_position);
    let back = store.read_prefix(&ns).await.unwrap();
    assert_eq!(back, events);
    // Every stored event still honours the contract.
    for e in back {
        e.into_event().unwrap();
    }
}

#[tokio::test]
async fn a_sequence_already_taken_is_a_conflict_and_writes_nothing() {
    let mut store = common::store().await;
    let ns = common::unique_namespace("oc");
    let mut events = history(&ns, 50);
    store.append(&mut events).await.unwrap();

    // Same stream, same sequence, new event id: a concurrent writer that lost.
    let mut stale = events[10].clone();
    stale.event_id = uuid::Uuid::new_v4();
    let ns2 = common::unique_namespace("oc2");
    let mut fresh = History::new(8, &ns2).take(5).collect::<Vec<_>>();
    fresh.push(stale);
    let err = store.append(&mut fresh).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected, got, .. } if got == events[10].sequence_number && expected > got),
        "{err:?}"
    );
    // The whole batch was refused, including the events of other streams.
    assert!(store.read_prefix(&ns2).await.unwrap().is_empty());
}

#[tokio::test]
async fn holes_in_a_stream_are_refused() {
    let mut store = common::store().await;
    let ns = common::unique_namespace("ho");
    let mut events = history(&ns, 3);
    let mut gap = vec![events[0].clone()];
    gap[0].sequence_number = 1; // a new stream must start at 0
    assert!(matches!(
        store.append(&mut gap).await,
        Err(StoreError::Conflict {
            expected: 0,
            got: 1,
            ..
        })
    ));
    store.append(&mut events).await.unwrap();
}

#[tokio::test]
async fn the_same_event_id_twice_is_refused() {
    let mut store = common::store().await;
    let ns = common::unique_namespace("de");
    let mut events = history(&ns, 3);
    store.append(&mut events).await.unwrap();
    let mut copy = vec![events[0].clone()];
    copy[0].aggregate_id = format!("{ns}other");
    copy[0].sequence_number = 0;
    let err = store.append(&mut copy).await.unwrap_err();
    assert!(matches!(err, StoreError::DuplicateEvent(_)), "{err:?}");
}

#[tokio::test]
async fn racing_writers_on_one_stream_have_exactly_one_winner() {
    let ns = common::unique_namespace("race");
    let base = history(&ns, 1);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut e = base.clone();
        e[0].event_id = uuid::Uuid::new_v4();
        tasks.push(tokio::spawn(async move {
            let mut store = common::store().await;
            store.append(&mut e).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::Conflict { .. } | StoreError::ConcurrentAppend(_)) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    let store = common::store().await;
    assert_eq!(store.read_prefix(&ns).await.unwrap().len(), 1);
}
