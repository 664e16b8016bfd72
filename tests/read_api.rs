//! The read service against the real servers, as an agent uses it: `projector serve` as a
//! child process beside a live worker. Every answer equals the fold of the event log and says
//! how fresh it is; read-your-writes waits for a new event, and answers `not_yet` (409) with
//! where the projection stands when the event cannot be in; tokens and parameters are
//! checked; an answer stays available across a rebuild's switch and names the new version.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::ReadServer;
use common::faults::Worker;
use contract::Event;
use projectors::Projector;
use projectors::customer360::Customer360Projector;
use projectors::order_view::OrderViewProjector;
use serde_json::Value;

/// The position of the last event in the log that changes the view `key` of `p` (what an
/// agent that wrote it would pass as `after_position`).
fn last_write<P: Projector>(p: &P, log: &[Event], key: &str) -> i64 {
    log.iter()
        .filter(|e| e.event_type().is_some_and(|t| p.handles().contains(&t)))
        .filter(|e| p.view_key(e) == Some(key))
        .map(|e| e.header.global_position)
        .max()
        .expect("the view has events")
}

/// The customer with the most orders in the fold (the richest answers).
fn busiest(snap: &common::Snapshot) -> String {
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for (o, _) in snap.orders.values() {
        *per.entry(o.customer_id.as_str()).or_default() += 1;
    }
    per.into_iter()
        .max_by_key(|(c, n)| (*n, std::cmp::Reverse(*c)))
        .map(|(c, _)| c.to_owned())
        .unwrap()
}

/// The orders of every page of a listing (`path`, its query already begun), following
/// `next_cursor` for at most `most` pages.
async fn every_page(api: &ReadServer, path: &str, most: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let mut cursor = String::new();
    for _ in 0..most {
        let (status, body) = api.get(&format!("{path}{cursor}")).await;
        assert_eq!(status, 200, "{body}");
        got.extend(body["data"]["orders"].as_array().unwrap().iter().cloned());
        match body["data"]["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    got
}

/// The same through the read service in this process: the order ids of every page `page`
/// gives for a cursor, for at most 20 pages.
async fn every_service_page<F, P>(page: F) -> Vec<String>
where
    F: Fn(Option<String>) -> P,
    P: std::future::Future<Output = projector::read::types::OrderPage>,
{
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..20 {
        let p = page(cursor).await;
        got.extend(p.orders.into_iter().map(|o| o.order_id));
        cursor = p.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_typed_fresh_answers_and_read_their_own_writes() {
    let (cfg, ns) = common::isolated_config("read");
    let store = common::store().await;
    // A rebuilt version that starts at today's head replays this test's events only.
    common::seed_at_head(&cfg, &store, "vr").await;
    common::generate(&cfg, &ns, 2_000, 5, 0.02, 0.02).await;
    let log = common::event_log_at(&cfg, &ns).await;
    let want = common::fold(&log, &ns);
    let mut worker = Worker::spawn(&cfg, "r0", "read_api", &[]);
    let api = ReadServer::spawn(&cfg, &[("PROJECTOR_READ__MAX_WAIT_MS", "120000".into())]);

    // Read-your-writes: wait (up to two minutes) for the history's last event.
    let last = log.last().unwrap();
    let customer = busiest(&want);
    let (status, body) = api
        .get(&format!(
            "/v1/analytics/funnel?after_position={}&wait_ms=120000",
            last.header.global_position
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["freshness"]["consistency"]["included"], true);
    assert!(worker.running());
    // The live worker announces its version, for agents that read Redis directly, when its
    // Customer-360 stage opens it (that stage may still be busy when analytics is done).
    let mut con = projector::sinks::redis::RedisSink::connect(&cfg.redis, "x")
        .await
        .unwrap()
        .connection();
    let mut pointer: Option<String> = None;
    for _ in 0..100 {
        pointer = redis::cmd("GET")
            .arg(cfg.redis_pointer_key())
            .query_async(&mut con)
            .await
            .unwrap();
        if pointer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pointer = pointer.expect("the live version is announced");
    assert!(pointer.contains("\"version\":\"live\""), "{pointer}");

    // A Customer-360 answer is the fold's view, with the guard as its per-stream freshness.
    // Each stage runs at its own pace: analytics being done says nothing of the documents, so
    // the reads below wait for their own last writes.
    let (status, body) = api
        .get(&format!(
            "/v1/customers/{customer}?after_position={}&wait_ms=120000",
            last_write(&Customer360Projector, &log, &customer)
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let (view, guard) = &want.customers[&customer];
    assert_eq!(
        body["data"],
        serde_json::to_value(projector::read::types::Customer::from(view.clone())).unwrap()
    );
    assert_eq!(
        body["freshness"]["streams"],
        serde_json::to_value(common::open_streams(guard)).unwrap()
    );
    assert_eq!(body["freshness"]["version"], "live");
    assert_eq!(body["freshness"]["projection"], "customer360");
    assert!(body["freshness"]["lag"]["messages"].is_i64(), "{body}");
    assert!(body["freshness"]["read_at"].is_string());
    // A finished stream (an order with its outcome) is kept beside the document, not in its
    // guard: asking after its last event is still answered at once.
    let finished = guard
        .iter()
        .find(|(_, seq)| **seq == projectors::document::FINISHED)
        .map(|(s, _)| s.clone())
        .expect("the customer has a finished order or ticket");
    let last_seq = log
        .iter()
        .filter(|e| projectors::document::stream_key(e) == finished)
        .map(|e| e.header.sequence_number)
        .max()
        .unwrap();
    let (status, body) = api
        .get(&format!(
            "/v1/customers/{customer}?after_stream={finished}&after_sequence={last_seq}&wait_ms=2000"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["freshness"]["consistency"]["included"], true);
    assert!(body["freshness"]["streams"].get(&finished).is_none());

    // The customer's orders, newest first, page by page, equal the fold's.
    let mut theirs: Vec<_> = want
        .orders
        .values()
        .filter(|(o, _)| o.customer_id == customer)
        .map(|(o, _)| o.clone())
        .collect();
    theirs.sort_by(|a, b| (b.placed_at, &b.order_id).cmp(&(a.placed_at, &a.order_id)));
    for o in &theirs {
        let (status, body) = api
            .get(&format!(
                "/v1/orders/{}?after_position={}&wait_ms=120000",
                o.order_id,
                last_write(&OrderViewProjector, &log, &o.order_id)
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["freshness"]["consistency"]["included"], true);
    }
    let got = every_page(
        &api,
        &format!("/v1/customers/{customer}/orders?limit=2"),
        100,
    )
    .await;
    assert_eq!(
        Value::Array(got),
        serde_json::to_value(&theirs).unwrap(),
        "pages in order, nothing missing or repeated"
    );
    let status_of = theirs[0].status.clone();
    let (_, body) = api
        .get(&format!(
            "/v1/customers/{customer}/orders?status={status_of}&limit=100"
        ))
        .await;
    let n = theirs.iter().filter(|o| o.status == status_of).count();
    assert_eq!(body["data"]["orders"].as_array().unwrap().len(), n);

    // Every order in one status, by when it last changed, page by page in both directions,
    // equals the fold's. Each order is waited for first: the list spans every partition.
    for id in want.orders.keys() {
        let (status, body) = api
            .get(&format!(
                "/v1/orders/{id}?after_position={}&wait_ms=120000",
                last_write(&OrderViewProjector, &log, id)
            ))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut per_status: BTreeMap<&str, usize> = BTreeMap::new();
    for (o, _) in want.orders.values() {
        *per_status.entry(o.status.as_str()).or_default() += 1;
    }
    let (common_status, _) = per_status.iter().max_by_key(|(_, n)| **n).unwrap();
    let mut in_status: Vec<_> = want
        .orders
        .values()
        .filter(|(o, _)| o.status == *common_status)
        .map(|(o, _)| o.clone())
        .collect();
    assert!(in_status.len() > 7, "several pages: {}", in_status.len());
    in_status.sort_by(|a, b| (a.updated_at, &a.order_id).cmp(&(b.updated_at, &b.order_id)));
    for sort in ["oldest", "newest"] {
        let path = format!("/v1/orders?status={common_status}&sort={sort}&limit=7");
        let got = every_page(&api, &path, 1_000).await;
        assert_eq!(
            Value::Array(got),
            serde_json::to_value(&in_status).unwrap(),
            "{sort} first: pages in order, nothing missing or repeated"
        );
        in_status.reverse();
    }

    // One order.
    let order = &theirs[0];
    let (status, body) = api.get(&format!("/v1/orders/{}", order.order_id)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], serde_json::to_value(order).unwrap());

    // Analytics over the isolated table equal the fold's facts.
    let placed: Vec<_> = want
        .facts
        .values()
        .filter(|f| f.event_type == "order.placed")
        .collect();
    let (status, body) = api.get("/v1/analytics/revenue?granularity=month").await;
    assert_eq!(status, 200, "{body}");
    let revenue: i64 = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revenue_cents"].as_i64().unwrap())
        .sum();
    assert_eq!(revenue, placed.iter().map(|f| f.amount_cents).sum::<i64>());
    assert!(
        body["freshness"]["max_global_position"].as_i64().unwrap() >= last.header.global_position
    );
    let (_, body) = api.get("/v1/analytics/funnel").await;
    assert_eq!(
        body["data"]["placed"].as_u64().unwrap() as usize,
        placed.len()
    );
    let (_, body) = api
        .get(&format!("/v1/analytics/revenue?customer_id={customer}"))
        .await;
    let mine: i64 = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revenue_cents"].as_i64().unwrap())
        .sum();
    assert_eq!(
        mine,
        placed
            .iter()
            .filter(|f| f.customer_id == customer)
            .map(|f| f.amount_cents)
            .sum::<i64>()
    );
    for path in [
        "/v1/analytics/sentiment?granularity=week",
        "/v1/analytics/resolution?from=2000-01-01",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = api.get("/v1/projections").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["projections"].as_array().unwrap().len(), 3);
    assert!(body["event_store_head"].as_i64().unwrap() >= last.header.global_position);

    // A write through the generator, then a read that must include it.
    let ns2 = common::unique_namespace("readw");
    common::generate(&cfg, &ns2, 200, 9, 0.0, 0.0).await;
    let log2 = common::event_log_at(&cfg, &ns2).await;
    let e = log2
        .iter()
        .rev()
        .find(|e| e.header.aggregate_type.as_str() == "customer")
        .unwrap();
    let (status, body) = api
        .get(&format!(
            "/v1/customers/{}?after_position={}&wait_ms=30000",
            e.header.aggregate_id, e.header.global_position
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let c = &body["freshness"]["consistency"];
    assert_eq!(c["included"], true);
    assert_eq!(c["affects_answer"], true);
    assert_eq!(c["event"]["sequence"], e.header.sequence_number);
    let stream = format!("customer/{}", e.header.aggregate_id);
    assert!(body["freshness"]["streams"][&stream].as_i64().unwrap() >= e.header.sequence_number);
    // The same by stream and sequence; and an event about someone else does not hold the answer.
    let (status, body) = api
        .get(&format!(
            "/v1/customers/{}?after_stream={stream}&after_sequence={}",
            e.header.aggregate_id, e.header.sequence_number
        ))
        .await;
    assert_eq!(
        (status, &body["freshness"]["consistency"]["included"]),
        (200, &Value::Bool(true))
    );
    let (status, body) = api
        .get(&format!(
            "/v1/customers/{customer}?after_position={}",
            e.header.global_position
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["freshness"]["consistency"]["affects_answer"], false);

    // An event in the store that was never published cannot come in: 409 with freshness.
    let mut unpublished = e.clone();
    unpublished.header.event_id = uuid::Uuid::new_v4();
    unpublished.header.sequence_number = log2
        .iter()
        .filter(|x| {
            x.header.aggregate_id == e.header.aggregate_id
                && x.header.aggregate_type == e.header.aggregate_type
        })
        .map(|x| x.header.sequence_number)
        .max()
        .unwrap()
        + 1;
    let envs = common::append(&cfg, &[unpublished]).await;
    let (status, body) = api
        .get(&format!(
            "/v1/customers/{}?after_position={}&wait_ms=300",
            e.header.aggregate_id, envs[0].global_position
        ))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "not_yet");
    let f = &body["freshness"];
    assert_eq!(f["consistency"]["included"], false);
    assert!(f["consistency"]["waited_ms"].as_u64().unwrap() >= 200);
    assert_eq!(f["version"], "live");

    // Tokens, parameters, unknowns.
    let (status, _) = common::http_get(&api.addr, &format!("/v1/customers/{customer}"))
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = common::http_request(
        &api.addr,
        &format!("/v1/customers/{customer}"),
        &[("Authorization", "Bearer wrong")],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    assert_eq!(
        common::http_get(&api.addr, "/healthz").await.unwrap().0,
        200
    );
    let (status, doc) = common::http_get(&api.addr, "/openapi.json").await.unwrap();
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for p in projector::read::openapi::PATHS {
        assert!(doc["paths"][p]["get"].is_object(), "{p} documented");
    }
    for (path, code, error) in [
        (
            format!("/v1/customers/{customer}/orders?limit=0"),
            400,
            "bad_request",
        ),
        (
            format!("/v1/customers/{customer}/orders?status=lost"),
            400,
            "bad_request",
        ),
        (
            format!("/v1/customers/{customer}/orders?cursor=zz"),
            400,
            "bad_request",
        ),
        ("/v1/orders".into(), 400, "bad_request"),
        ("/v1/orders?status=lost".into(), 400, "bad_request"),
        (
            "/v1/orders?status=shipped&sort=sideways".into(),
            400,
            "bad_request",
        ),
        (
            "/v1/orders?status=shipped&limit=0".into(),
            400,
            "bad_request",
        ),
        (
            "/v1/analytics/revenue?granularity=year".into(),
            400,
            "bad_request",
        ),
        (
            "/v1/analytics/revenue?from=yesterday".into(),
            400,
            "bad_request",
        ),
        ("/v1/analytics/funnel?limit=3".into(), 400, "bad_request"),
        (
            format!("/v1/customers/{customer}?after_stream=customer"),
            400,
            "bad_request",
        ),
        (format!("/v1/customers/{ns}nobody"), 404, "not_found"),
        (
            format!("/v1/customers/{customer}?after_position=999999999999"),
            404,
            "unknown_event",
        ),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (code, Some(error)),
            "{path}: {body}"
        );
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // A rebuild switches readers while an agent keeps asking: never an error, and the
    // answers name the new version once it is live.
    let asking = {
        let (addr, token, customer) = (api.addr.clone(), api.token.clone(), customer.clone());
        tokio::spawn(async move {
            let auth = format!("Bearer {token}");
            let mut seen = Vec::new();
            for _ in 0..2_000 {
                let (status, body) = common::http_request(
                    &addr,
                    &format!("/v1/customers/{customer}"),
                    &[("Authorization", &auth)],
                )
                .await
                .unwrap();
                let body: Value = serde_json::from_str(&body).unwrap();
                seen.push((
                    status,
                    body["freshness"]["version"].as_str().map(str::to_owned),
                ));
                if seen.last().unwrap().1.as_deref() == Some("vr") && seen.len() > 5 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let out = Command::new(common::projector_bin())
        .args([
            "rebuild-projection",
            "--all",
            "--version",
            "vr",
            "--grace-seconds",
            "3",
        ])
        .envs(common::config_env(&cfg))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = asking.await.unwrap();
    assert!(
        seen.iter().all(|(s, _)| *s == 200),
        "no error across the switch: {seen:?}"
    );
    assert_eq!(seen.last().unwrap().1.as_deref(), Some("vr"));
    let (status, body) = api.get(&format!("/v1/customers/{customer}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["freshness"]["version"], "vr");
    assert_eq!(
        body["data"],
        serde_json::to_value(projector::read::types::Customer::from(view.clone())).unwrap()
    );

    worker.stop();
    for p in projectors::names() {
        projector::rebuild::retire(&cfg, &store, p, "vr").await.ok();
    }
}

/// Pages of one status hold every order exactly once, in MongoDB's own order, also when
/// several orders share a time and when some have none: MongoDB compares values of one type
/// only (a null is never `$lt` a string) and sorts nulls first, so the cursor's filter has to
/// say where the nulls are. Crafted views, written straight to the live collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_one_status_hold_every_order_once_nulls_and_ties_included() {
    use projector::read::types::Sort;
    use projectors::Doc;
    use projectors::order_view::OrderView;

    let (cfg, _ns) = common::isolated_config("rnull");
    let at = |s: &str| Some(s.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    let times = [
        None,
        None,
        at("2026-01-02T00:00:00Z"),
        at("2026-01-02T00:00:00Z"),
        at("2026-01-02T00:00:00Z"),
        at("2026-01-01T00:00:00Z"),
        at("2026-01-03T00:00:00Z"),
    ];
    let views: Vec<OrderView> = times
        .iter()
        .enumerate()
        .map(|(i, t)| OrderView {
            order_id: format!("ord-{i}"),
            customer_id: format!("cus-{i}"),
            status: "shipped".into(),
            updated_at: *t,
            placed_at: *t,
            ..OrderView::default()
        })
        .collect();
    let collection = projector::versions::views_for(&cfg, "live").mongo_collection;
    let sink = projector::sinks::mongo::MongoSink::connect(&cfg.mongo, &collection)
        .await
        .unwrap();
    for v in &views {
        let doc = Doc {
            view: v.clone(),
            guard: Default::default(),
            rev: 1,
        };
        let raw = mongodb::bson::to_document(&doc).unwrap();
        sink.collection().insert_one(raw).await.unwrap();
    }
    // Another status and another customer's orders stay out of the lists.
    let mut other = views[6].clone();
    other.order_id = "ord-other".into();
    other.status = "created".into();
    let raw = mongodb::bson::to_document(&Doc {
        view: other,
        guard: Default::default(),
        rev: 1,
    })
    .unwrap();
    sink.collection().insert_one(raw).await.unwrap();

    let mut oldest_first = views.clone();
    oldest_first.sort_by(|a, b| (a.updated_at, &a.order_id).cmp(&(b.updated_at, &b.order_id)));
    let service = projector::read::ReadService::new(&cfg).await.unwrap();
    let c = projector::read::service::Consistency::default();
    for (sort, want) in [
        (Sort::Oldest, oldest_first.clone()),
        (Sort::Newest, oldest_first.iter().rev().cloned().collect()),
    ] {
        let got = every_service_page(|cursor| {
            let (service, c) = (&service, &c);
            async move {
                service
                    .orders_by_status("shipped", sort, Some(2), cursor.as_deref(), c)
                    .await
                    .unwrap()
                    .data
            }
        })
        .await;
        let want: Vec<String> = want.iter().map(|o| o.order_id.clone()).collect();
        assert_eq!(got, want, "{sort:?}");
    }
    // A customer's orders, newest placed first, the same way (one customer with all of them).
    for v in &views {
        sink.collection()
            .update_one(
                mongodb::bson::doc! {"_id": &v.order_id},
                mongodb::bson::doc! {"$set": {"customer_id": "cus-all"}},
            )
            .await
            .unwrap();
    }
    let got = every_service_page(|cursor| {
        let (service, c) = (&service, &c);
        async move {
            service
                .customer_orders("cus-all", None, Some(3), cursor.as_deref(), c)
                .await
                .unwrap()
                .data
        }
    })
    .await;
    let newest: Vec<String> = oldest_first
        .iter()
        .rev()
        .map(|o| o.order_id.clone())
        .collect();
    assert_eq!(got, newest);
}
