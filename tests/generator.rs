//! The history generator: deterministic, realistic, and published as committed.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use contract::{Event, EventEnvelope, EventType, RequiredHeaders};
use projector::generator::{self, GenerateOptions, History, Injector};
use projector::kafka::{self, EventPublisher};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;

#[test]
fn the_same_seed_gives_the_same_history() {
    let a: Vec<EventEnvelope> = History::new(42, "").take(5_000).collect();
    let b: Vec<EventEnvelope> = History::new(42, "").take(5_000).collect();
    assert_eq!(a, b);
    let c: Vec<EventEnvelope> = History::new(43, "").take(5_000).collect();
    assert_ne!(a, c);
}

#[test]
fn a_history_is_realistic_and_valid() {
    let events: Vec<EventEnvelope> = History::new(1, "ns-").take(20_000).collect();
    let mut next_seq: HashMap<(String, String), i64> = HashMap::new();
    let mut types = HashSet::new();
    let mut ids = HashSet::new();
    for e in &events {
        assert!(ids.insert(e.event_id), "event ids are unique");
        assert!(e.aggregate_id.starts_with("ns-"));
        let key = (e.aggregate_type.to_string(), e.aggregate_id.clone());
        let expected = next_seq.entry(key).or_insert(0);
        assert_eq!(e.sequence_number, *expected, "streams have no holes");
        *expected += 1;
        let typed = e
            .clone()
            .into_event()
            .expect("generated events honour the contract");
        types.insert(typed.event_type().unwrap());
    }
    // Every event type of the catalogue occurs, lifecycles included.
    for t in EventType::ALL {
        assert!(types.contains(&t), "{t} never generated");
    }
    assert!(
        events.windows(2).all(|w| w[0].timestamp < w[1].timestamp),
        "time moves on"
    );
}

#[test]
fn injected_copies_only_repeat_events_already_sent() {
    let batch: Vec<EventEnvelope> = History::new(5, "").take(2_000).collect();
    let opts = GenerateOptions {
        duplicate_rate: 0.1,
        redelivery_rate: 1.0,
        ..Default::default()
    };
    let wire = Injector::new(&opts).wire_order(&batch);
    assert!(
        wire.len() > batch.len() + 100,
        "copies were injected: {}",
        wire.len()
    );
    let mut firsts = Vec::new();
    let mut seen = HashSet::new();
    for e in &wire {
        if seen.insert(e.event_id) {
            firsts.push(e.event_id);
        }
    }
    // The first delivery of each event keeps the store's order.
    assert_eq!(firsts, batch.iter().map(|e| e.event_id).collect::<Vec<_>>());
    let none = Injector::new(&GenerateOptions::default()).wire_order(&batch);
    assert_eq!(none, batch);
}

#[tokio::test]
async fn generate_appends_then_publishes_every_committed_event_with_headers() {
    let (cfg, ns) = common::isolated_config("gen");
    let mut stores = vec![common::store().await, common::store().await];
    kafka::ensure_topics(&cfg.kafka)
        .await
        .expect("Kafka up (scripts/services.sh up)");
    let publisher = EventPublisher::new(&cfg.kafka).unwrap();
    let opts = GenerateOptions {
        seed: 9,
        events: 1_200,
        namespace: ns.clone(),
        batch_size: 500,
        duplicate_rate: 0.05,
        ..Default::default()
    };
    let report = generator::generate(&mut stores, Some(&publisher), &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(report.appended, 1_200);
    assert_eq!(report.published, 1_200 + report.injected_duplicates);
    assert!(report.injected_duplicates > 0);

    let stored = stores[0].read_prefix(&ns).await.unwrap();
    let expected: Vec<EventEnvelope> = History::new(9, &ns).take(1_200).collect();
    assert_eq!(stored.len(), expected.len());
    // Parallel writers interleave streams, so compare by id; each stream stays in sequence.
    let by_id: HashMap<_, _> = stored
        .iter()
        .map(|s| {
            (
                s.event_id,
                EventEnvelope {
                    global_position: 1,
                    ..s.clone()
                },
            )
        })
        .collect();
    for e in &expected {
        assert_eq!(
            by_id.get(&e.event_id),
            Some(e),
            "the store holds the seeded history"
        );
    }
    let mut last: HashMap<&str, (i64, i64)> = HashMap::new();
    for s in &stored {
        if let Some((seq, pos)) =
            last.insert(&s.aggregate_id, (s.sequence_number, s.global_position))
        {
            assert!(
                seq < s.sequence_number && pos < s.global_position,
                "stream {} out of order",
                s.aggregate_id
            );
        }
    }

    // Read the topics back: every event arrives, with matching headers and its store position.
    let consumer: StreamConsumer = kafka::base_client_config(&cfg.kafka)
        .set("group.id", format!("{ns}reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topics = kafka::event_topics(&cfg.kafka);
    consumer
        .subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let by_id: HashMap<_, _> = stored
        .iter()
        .map(|e| (e.event_id, e.global_position))
        .collect();
    let mut received = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while received.len() < stored.len() {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("only {} of {} events arrived", received.len(), stored.len())
            })
            .unwrap();
        let Some(payload) = msg.payload() else {
            continue;
        };
        let Ok(event) = Event::decode(payload) else {
            continue;
        };
        if !event.header.aggregate_id.starts_with(&ns) {
            continue;
        }
        assert_eq!(msg.key(), Some(event.header.aggregate_id.as_bytes()));
        let headers = msg.headers().expect("headers");
        let pairs = headers.iter().map(|h| (h.key, h.value));
        RequiredHeaders::from_pairs(pairs)
            .unwrap()
            .check_against(&event.header)
            .unwrap();
        assert_eq!(
            by_id.get(&event.header.event_id),
            Some(&event.header.global_position)
        );
        *received.entry(event.header.event_id).or_insert(0u32) += 1;
    }
    assert_eq!(received.len(), stored.len());
}
