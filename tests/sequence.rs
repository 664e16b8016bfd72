//! Messages lost, reordered, repeated or foreign on the wire change no read model. A lossy
//! outbox relay republishes a history from the event store, dropping events that have a later
//! one in their stream and swapping pairs of a stream's consecutive events (as measured: 103
//! lost and 59 swapped in 20,000), with a few duplicates and one message that claims another
//! event's place. One worker drains it: the read models equal the fold of the event store,
//! the gaps were filled from it, and the foreign message is a dead letter. A gap the event
//! store cannot fill holds its stream instead. And a worker killed and restarted between runs
//! of a relay that loses or swaps each stream's first event after the restart starts every
//! stream from its durable position: those gaps are filled too.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use contract::catalogue::{CustomerCreated, InteractionRecorded};
use contract::{Event, EventData, EventEnvelope};
use metrics_exporter_prometheus::PrometheusHandle;
use projector::config::Config;
use projector::generator::{self, GenerateOptions};
use projector::kafka::{self, EventPublisher};
use projector::resilience::dlq_tools::{Letter, read_letters};
use projector::runtime::parking::ParkStore;
use projector::store::Pg;
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand::{Rng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

/// The process's metrics, recorded from the first worker on.
fn metrics() -> &'static PrometheusHandle {
    static M: OnceLock<PrometheusHandle> = OnceLock::new();
    M.get_or_init(|| projector::observability::install_metrics().expect("one recorder"))
}

fn counter(name: &str) -> u64 {
    metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// What the relay sent, and how it went wrong.
struct Relay {
    sent: Vec<EventEnvelope>,
    dropped: usize,
    swapped: usize,
    duplicates: usize,
    /// The event whose place the foreign message claims.
    displaced: EventEnvelope,
}

/// `log` (commit order) as a lossy relay publishes it: `drops` events that have a later
/// event in their stream are lost, `swaps` pairs of a stream's consecutive events go out in
/// the wrong order, `duplicates` events go out again later, and one message with a fresh
/// event id claims the place of a stored event, after its stream moved past it.
///
/// Never touched: the first event of each stream (a stream first seen past its start, never
/// durable for the group, is filled from 0: the counts below leave that out).
fn lossy_relay(log: &[EventEnvelope], seed: u64, drops: usize, swaps: usize) -> Relay {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let stream = |e: &EventEnvelope| format!("{}/{}", e.aggregate_type, e.aggregate_id);
    let mut at: HashMap<(String, i64), usize> = HashMap::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for (i, e) in log.iter().enumerate() {
        at.insert((stream(e), e.sequence_number), i);
        let l = last.entry(stream(e)).or_insert(e.sequence_number);
        *l = (*l).max(e.sequence_number);
    }
    // Pairs (k, k+1) of a stream, k >= 1, each event in one pair at most.
    let mut pairs: Vec<(usize, usize)> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| e.sequence_number >= 1)
        .filter_map(|(i, e)| Some((i, *at.get(&(stream(e), e.sequence_number + 1))?)))
        .collect();
    pairs.shuffle(&mut rng);
    let mut touched = vec![false; log.len()];
    let mut swapped = Vec::new();
    for (i, j) in pairs {
        if swapped.len() == swaps {
            break;
        }
        if !touched[i] && !touched[j] {
            touched[i] = true;
            touched[j] = true;
            swapped.push((i, j));
        }
    }
    let candidates: Vec<usize> = (0..log.len())
        .filter(|&i| {
            let e = &log[i];
            !touched[i] && e.sequence_number >= 1 && e.sequence_number < last[&stream(e)]
        })
        .collect();
    let dropped: Vec<usize> = candidates
        .choose_multiple(&mut rng, drops)
        .copied()
        .collect();
    // Each slot is what goes out at that place of the commit order.
    let mut slots: Vec<Vec<EventEnvelope>> = log.iter().map(|e| vec![e.clone()]).collect();
    for &(i, j) in &swapped {
        slots.swap(i, j);
    }
    for &i in &dropped {
        touched[i] = true;
        slots[i].clear();
    }
    // Duplicates of events that went out, somewhere after the original.
    let mut duplicates = 0;
    while duplicates < 20 {
        let i = rng.random_range(0..log.len());
        if touched[i] {
            continue;
        }
        let later = rng.random_range(i..log.len());
        slots[later].push(log[i].clone());
        duplicates += 1;
    }
    // The foreign message, at the very end: its stream has passed its sequence by then.
    let displaced = loop {
        let i = rng.random_range(0..log.len());
        if !touched[i] && log[i].sequence_number >= 1 {
            break log[i].clone();
        }
    };
    let mut foreign = displaced.clone();
    foreign.event_id = uuid::Uuid::new_v4();
    slots.push(vec![foreign]);
    Relay {
        sent: slots.into_iter().flatten().collect(),
        dropped: dropped.len(),
        swapped: swapped.len(),
        duplicates,
        displaced,
    }
}

/// How many documents (and facts) differ between the fold and the read models.
fn differences(want: &common::Snapshot, got: &common::Snapshot) -> (usize, usize, usize) {
    fn count<V: PartialEq>(w: &BTreeMap<String, V>, g: &BTreeMap<String, V>) -> usize {
        let keys: BTreeSet<&String> = w.keys().chain(g.keys()).collect();
        keys.into_iter().filter(|k| w.get(*k) != g.get(*k)).count()
    }
    (
        count(&want.customers, &got.customers),
        count(&want.orders, &got.orders),
        count(&want.facts, &got.facts),
    )
}

async fn letters(cfg: &Config) -> Vec<Letter> {
    let k = cfg.kafka.clone();
    tokio::task::spawn_blocking(move || read_letters(&k))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_relay_changes_no_read_model() {
    let (cfg, ns) = common::isolated_config("seq");
    let started = Instant::now();
    // The history goes to the event store only; the relay below publishes it.
    let opts = GenerateOptions {
        seed: 77,
        events: 20_000,
        namespace: ns.clone(),
        batch_size: 1_000,
        ..GenerateOptions::default()
    };
    generator::generate(&mut [common::store().await], None, &opts, |_| {})
        .await
        .unwrap();
    let log: Vec<EventEnvelope> = common::event_log_at(&cfg, &ns)
        .await
        .iter()
        .map(Event::to_envelope)
        .collect();
    assert_eq!(log.len(), 20_000);
    let relay = lossy_relay(&log, 5, 103, 59);
    assert_eq!((relay.dropped, relay.swapped), (103, 59));
    kafka::ensure_topics(&cfg.kafka).await.unwrap();
    EventPublisher::new(&cfg.kafka)
        .unwrap()
        .publish(&relay.sent)
        .await
        .unwrap();
    let published = started.elapsed();

    metrics();
    let before = [
        counter("projector_gap_events_total"),
        counter("projector_late_duplicates_total"),
        counter("projector_sequence_conflicts_total"),
    ];
    let report = common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    let after = [
        counter("projector_gap_events_total"),
        counter("projector_late_duplicates_total"),
        counter("projector_sequence_conflicts_total"),
    ];

    let sinks = common::live_sinks(&cfg).await;
    let want = common::fold(&common::event_log_at(&cfg, &ns).await, &ns);
    let got = common::snapshot(&sinks, &ns).await;
    let (c, o, f) = differences(&want, &got);
    eprintln!(
        "relay: {} dropped, {} swapped, {} duplicates, 1 foreign; read models differing from \
         the fold: {c} Customer-360, {o} order views, {f} facts; published in {published:?}, \
         drained in {:?}; {report:?}",
        relay.dropped,
        relay.swapped,
        relay.duplicates,
        started.elapsed() - published,
    );
    common::assert_same(&want, &got, "read models after a lossy relay vs the fold");

    // Every lost event and the first of every swapped pair came from the event store; the
    // second copies of the swapped and repeated events were the stored ones.
    let moved = |i: usize| after[i] - before[i];
    assert_eq!(
        moved(0),
        (relay.dropped + relay.swapped) as u64,
        "events filled in"
    );
    assert_eq!(
        moved(1),
        (relay.swapped + relay.duplicates) as u64,
        "late duplicates"
    );
    assert_eq!(moved(2), 1, "sequence conflicts");

    // The foreign message is the only dead letter, and nothing was parked for it.
    assert_eq!(report.dead_letters, 1, "{report:?}");
    let letters = letters(&cfg).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l.kind, "sequence_conflict");
    assert_eq!(l.sequence, Some(relay.displaced.sequence_number));
    assert!(
        l.reason
            .contains(&format!("holds event {}", relay.displaced.event_id)),
        "{}",
        l.reason
    );
    assert!(parks(&cfg).await.is_empty());
}

async fn parks(cfg: &Config) -> Vec<(String, String, String, String)> {
    ParkStore::new(
        std::sync::Arc::new(Pg::from_config(&cfg.postgres)),
        &cfg.deployment,
    )
    .list()
    .await
    .unwrap()
}

fn customer(id: &str, seq: i64) -> Event {
    let data = if seq == 0 {
        EventData::CustomerCreated(CustomerCreated {
            customer_id: id.to_owned(),
            name: "H".into(),
            email: "h@x".into(),
            phone: None,
            address: None,
        })
    } else {
        EventData::InteractionRecorded(InteractionRecorded {
            customer_id: id.to_owned(),
            agent_id: "a".into(),
            interaction_id: format!("i-{seq}"),
            interaction_type: "chat".into(),
            channel: None,
            sentiment_score: Some(0.8),
        })
    };
    Event::new(
        uuid::Uuid::new_v4(),
        id,
        seq,
        data,
        Default::default(),
        chrono::Utc::now(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_missing_from_the_event_store_holds_its_stream() {
    let (mut cfg, ns) = common::isolated_config("seqhold");
    cfg.worker.gap_wait_secs = 2;
    let hole = format!("{ns}cus-hole");
    let other = format!("{ns}cus-fine");
    common::append_and_publish(&cfg, vec![customer(&hole, 0)]).await;
    common::append_and_publish(&cfg, vec![customer(&other, 0), customer(&other, 1)]).await;
    // Sequence 1 of the hole stream exists nowhere; 2 and 3 are on the wire only.
    EventPublisher::new(&cfg.kafka)
        .unwrap()
        .publish(&[
            customer(&hole, 2).to_envelope(),
            customer(&hole, 3).to_envelope(),
        ])
        .await
        .unwrap();
    let started = Instant::now();
    let report = common::run_worker_until_idle(&cfg, Duration::from_secs(4)).await;
    assert!(started.elapsed() >= Duration::from_secs(2), "waited for it");

    let stream = format!("customer/{hole}");
    let reason = format!("sequences 1..1 of stream {stream} are missing from the event store");
    let p = parks(&cfg).await;
    assert!(
        p.iter()
            .any(|(proj, _, s, r)| proj == "*" && *s == stream && *r == reason),
        "parked for every projector: {p:?}"
    );
    let letters = letters(&cfg).await;
    let of = |seq: i64| -> Vec<&Letter> {
        letters
            .iter()
            .filter(|l| l.stream.as_deref() == Some(&*stream) && l.sequence == Some(seq))
            .collect()
    };
    let gap = of(2);
    assert_eq!(gap.len(), 1, "{letters:?}");
    assert_eq!(
        (gap[0].kind.as_str(), gap[0].reason.as_str()),
        ("sequence_gap", &*reason)
    );
    let held = of(3);
    assert!(!held.is_empty(), "{letters:?}");
    assert!(
        held.iter()
            .all(|l| l.kind == "parked" && l.reason.contains(&reason)),
        "{held:?}"
    );
    assert_eq!(report.dead_letters as usize, letters.len(), "{report:?}");
    // The store holds sequence 0 of the hole stream and all of the other: so do the models.
    common::assert_read_models_equal_fold(&cfg, &ns).await;
}

/// `log` cut in `phases` runs as a relay publishes it across worker restarts: in every run
/// after the first, the first event of each stream already seen (the one a restarted worker
/// reads first) is lost, or swapped with the stream's next one, when the run holds a later
/// event of the stream to show the gap. Returns each run's messages and (lost, swapped).
fn lossy_at_restarts(
    log: &[EventEnvelope],
    phases: usize,
) -> (Vec<Vec<EventEnvelope>>, usize, usize) {
    let stream = |e: &EventEnvelope| format!("{}/{}", e.aggregate_type, e.aggregate_id);
    let cut = |k: usize| log.len() * k / phases;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let (mut lost, mut swapped) = (0, 0);
    let mut runs = Vec::new();
    for k in 0..phases {
        let part = &log[cut(k)..cut(k + 1)];
        let mut slots: Vec<Vec<EventEnvelope>> = part.iter().map(|e| vec![e.clone()]).collect();
        if k > 0 {
            // Where each stream's events are in this run.
            let mut at: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, e) in part.iter().enumerate() {
                at.entry(stream(e)).or_default().push(i);
            }
            for (n, (s, places)) in at.iter().enumerate() {
                if !seen.contains(s) || places.len() < 2 {
                    continue;
                }
                if n % 2 == 0 {
                    slots[places[0]].clear();
                    lost += 1;
                } else {
                    slots.swap(places[0], places[1]);
                    swapped += 1;
                }
            }
        }
        seen.extend(part.iter().map(stream));
        runs.push(slots.into_iter().flatten().collect());
    }
    (runs, lost, swapped)
}

/// A worker killed (-9) and started again between runs of a lossy relay: every stream's first
/// event after each restart is lost or swapped. The restarted worker starts each stream from
/// its durable position, so the gaps are filled and the read models equal the fold. (With
/// `PROJECTOR_WORKER__STREAM_POSITIONS=false` in the environment, the workers take a stream's
/// first event after a restart as it comes: the read models differ.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losses_right_after_restarts_change_no_read_model() {
    let (cfg, ns) = common::isolated_config("seqrst");
    let started = Instant::now();
    let opts = GenerateOptions {
        seed: 93,
        events: 6_000,
        namespace: ns.clone(),
        batch_size: 1_000,
        ..GenerateOptions::default()
    };
    generator::generate(&mut [common::store().await], None, &opts, |_| {})
        .await
        .unwrap();
    let log: Vec<EventEnvelope> = common::event_log_at(&cfg, &ns)
        .await
        .iter()
        .map(Event::to_envelope)
        .collect();
    let (runs, lost, swapped) = lossy_at_restarts(&log, 3);
    assert!(lost > 50 && swapped > 50, "{lost} lost, {swapped} swapped");
    kafka::ensure_topics(&cfg.kafka).await.unwrap();
    let publisher = EventPublisher::new(&cfg.kafka).unwrap();
    let positions_on =
        std::env::var("PROJECTOR_WORKER__STREAM_POSITIONS").as_deref() != Ok("false");
    let mut published = 0i64;
    let mut first_sight_fills = 0.0;
    for (k, run) in runs.iter().enumerate() {
        publisher.publish(run).await.unwrap();
        published += run.len() as i64;
        let mut worker = common::faults::Worker::spawn(&cfg, "w0", &format!("seqrst-{ns}{k}"), &[]);
        let c = cfg.clone();
        common::faults::wait_until(
            Duration::from_secs(120),
            "the worker to commit the run",
            || {
                assert!(worker.running(), "the worker exited; see {:?}", worker.log);
                common::faults::progress(&c) == Some((published, published))
            },
        )
        .await;
        first_sight_fills += worker.metric("projector_first_sight_fills_total").await;
        // kill -9 right after its last commit: its last positions may not be written yet.
        drop(worker);
    }

    let sinks = common::live_sinks(&cfg).await;
    let events = common::event_log_at(&cfg, &ns).await;
    let want = common::fold(&events, &ns);
    let got = common::snapshot(&sinks, &ns).await;
    let (c, o, f) = differences(&want, &got);
    eprintln!(
        "{} events in {} runs, a kill -9 after each: {lost} lost and {swapped} swapped right \
         after a restart; positions {}; {first_sight_fills} events filled at first sight; read \
         models differing from the fold: {c} Customer-360, {o} order views, {f} facts ({:?})",
        log.len(),
        runs.len(),
        if positions_on { "on" } else { "off" },
        started.elapsed()
    );
    common::assert_same(
        &want,
        &got,
        "read models after losses at restarts vs the fold",
    );
    assert!(
        first_sight_fills >= (lost + swapped) as f64,
        "every loss and swap at a restart filled at a first sight: {first_sight_fills}"
    );
    assert!(parks(&cfg).await.is_empty());
}

/// `stream_positions` in PostgreSQL: per group, the greatest position wins (within one write
/// and across writes), and groups never see each other's rows.
#[tokio::test]
async fn stream_positions_keep_the_greatest_per_group_and_stream() {
    use contract::AggregateType;
    use projector::source::sequence::{PgPositions, PositionStore};
    use projector::store::streams::{StreamId, StreamSeq};

    common::store().await; // migrated
    let (cfg, ns) = common::isolated_config("seqpos");
    let pg = std::sync::Arc::new(Pg::from_config(&cfg.postgres));
    let group = |g: &str| PgPositions {
        pg: pg.clone(),
        group: format!("{ns}{g}"),
    };
    let (a, b) = (group("a"), group("b"));
    let at = |id: &str, sequence| StreamSeq {
        aggregate_type: AggregateType::Order,
        aggregate_id: format!("{ns}{id}"),
        sequence,
    };
    let id = |id: &str| StreamId {
        aggregate_type: AggregateType::Order,
        aggregate_id: format!("{ns}{id}"),
    };
    async fn read(p: &PgPositions, ids: Vec<StreamId>) -> Vec<(StreamId, i64)> {
        let mut rows = p.read(&ids).await.unwrap();
        rows.sort();
        rows
    }
    a.record(&[at("o1", 4), at("o2", 7), at("o1", 6)])
        .await
        .unwrap();
    assert_eq!(
        read(&a, vec![id("o1"), id("o2"), id("o3")]).await,
        vec![(id("o1"), 6), (id("o2"), 7)],
        "the greatest of one write; no row for a stream never recorded"
    );
    a.record(&[at("o1", 5), at("o2", 9)]).await.unwrap();
    assert_eq!(
        read(&a, vec![id("o1"), id("o2")]).await,
        vec![(id("o1"), 6), (id("o2"), 9)],
        "a lower position never replaces a greater one"
    );
    assert!(read(&b, vec![id("o1")]).await.is_empty(), "another group");
    b.record(&[at("o1", 1)]).await.unwrap();
    assert_eq!(read(&b, vec![id("o1")]).await, vec![(id("o1"), 1)]);
    assert_eq!(read(&a, vec![id("o1")]).await, vec![(id("o1"), 6)]);
}
