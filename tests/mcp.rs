//! The MCP tools as agents use them, against the real servers: the SDK's own client starts
//! `projector mcp` over stdio; a plain JSON-RPC client talks Streamable HTTP to `/mcp` of
//! `projector serve` behind its bearer token. Answers equal the fold of the event log, carry
//! freshness, and an event that cannot come in fails as `not_yet` with where things stand.

mod common;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::{Value, json};

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_use_the_tools_over_stdio_and_streamable_http() {
    let (cfg, ns) = common::isolated_config("mcp");
    common::generate(&cfg, &ns, 1_000, 21, 0.0, 0.0).await;
    common::run_worker_until_idle(&cfg, std::time::Duration::from_secs(3)).await;
    let log = common::event_log_at(&cfg, &ns).await;
    let want = common::fold(&log, &ns);
    let (customer, (view, guard)) = want.customers.iter().next().unwrap();
    let (order_id, (order, _)) = want.orders.iter().next().unwrap();

    // stdio, with the SDK's client.
    let env = common::config_env(&cfg);
    let transport = TokioChildProcess::new(
        tokio::process::Command::new(common::projector_bin()).configure(|c| {
            c.arg("mcp").envs(env.clone()).env("RUST_LOG", "warn");
        }),
    )
    .unwrap();
    let client = ().serve(transport).await.unwrap();
    let info = client.peer_info().unwrap();
    assert_eq!(info.server_info.as_ref().unwrap().name, "projector");
    assert!(
        info.instructions
            .as_deref()
            .unwrap()
            .contains("after_position")
    );
    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "get_customer_360",
            "get_order",
            "list_customer_orders",
            "list_orders_by_status",
            "order_funnel",
            "projection_status",
            "revenue",
            "sentiment",
            "ticket_resolution"
        ]
    );
    for t in &tools {
        let a = t.annotations.as_ref().unwrap();
        assert_eq!(
            (a.read_only_hint, a.idempotent_hint, a.open_world_hint),
            (Some(true), Some(true), Some(false)),
            "{}",
            t.name
        );
        let schema = t
            .output_schema
            .as_ref()
            .unwrap_or_else(|| panic!("{} has an output schema", t.name));
        let props = schema.get("properties").unwrap_or(&Value::Null);
        if t.name != "projection_status" {
            assert!(props.get("freshness").is_some(), "{}: {schema:?}", t.name);
        }
    }
    let r = client
        .call_tool(
            CallToolRequestParams::new("get_customer_360")
                .with_arguments(args(json!({"customer_id": customer}))),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(false));
    let body = r.structured_content.unwrap();
    assert_eq!(
        body["data"],
        serde_json::to_value(projector::read::types::Customer::from(view.clone())).unwrap()
    );
    assert_eq!(
        body["freshness"]["streams"],
        serde_json::to_value(common::open_streams(guard)).unwrap()
    );
    assert_eq!(body["freshness"]["version"], "live");

    // Wait for an event that is in: answered, with the report.
    let last = log.last().unwrap();
    let r = client
        .call_tool(
            CallToolRequestParams::new("order_funnel").with_arguments(args(
                json!({"after_position": last.header.global_position, "wait_ms": 5000}),
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(false));
    let body = r.structured_content.unwrap();
    assert_eq!(body["freshness"]["consistency"]["included"], true);
    let placed = want
        .facts
        .values()
        .filter(|f| f.event_type == "order.placed")
        .count();
    assert_eq!(body["data"]["placed"].as_u64().unwrap() as usize, placed);

    // An event appended but never published cannot come in: not_yet, with freshness.
    let mut e = log
        .iter()
        .rev()
        .find(|e| {
            e.header.aggregate_id == *customer && e.header.aggregate_type.as_str() == "customer"
        })
        .unwrap()
        .clone();
    e.header.event_id = uuid::Uuid::new_v4();
    e.header.sequence_number = guard[&format!("customer/{customer}")] + 1;
    let envs = common::append(&cfg, &[e]).await;
    let r = client
        .call_tool(
            CallToolRequestParams::new("get_customer_360").with_arguments(args(json!({
                "customer_id": customer,
                "after_stream": format!("customer/{customer}"),
                "after_sequence": envs[0].sequence_number,
                "wait_ms": 200
            }))),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(true));
    let text = &r.content[0].as_text().unwrap().text;
    let err: Value = serde_json::from_str(text).unwrap();
    assert_eq!(err["error"], "not_yet");
    assert_eq!(err["freshness"]["consistency"]["included"], false);
    let r = client
        .call_tool(
            CallToolRequestParams::new("list_customer_orders")
                .with_arguments(args(json!({"customer_id": customer, "status": "lost"}))),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(true));
    // The orders stuck longest in one status: the fold's, oldest change first.
    let mut stuck: Vec<_> = want
        .orders
        .values()
        .map(|(o, _)| o)
        .filter(|o| o.status == order.status)
        .collect();
    stuck.sort_by(|a, b| (a.updated_at, &a.order_id).cmp(&(b.updated_at, &b.order_id)));
    stuck.truncate(5);
    let r = client
        .call_tool(
            CallToolRequestParams::new("list_orders_by_status").with_arguments(args(
                json!({"status": order.status, "sort": "oldest", "limit": 5}),
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let body = r.structured_content.unwrap();
    assert_eq!(
        body["data"]["orders"],
        serde_json::to_value(&stuck).unwrap()
    );
    let r = client
        .call_tool(
            CallToolRequestParams::new("list_orders_by_status")
                .with_arguments(args(json!({"status": "lost"}))),
        )
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(true));
    client.cancel().await.unwrap();

    // Streamable HTTP at /mcp of the read service: bearer token required.
    let api = common::ReadServer::spawn(&cfg, &[]);
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "plain-json-rpc", "version": "0"}}});
    let (status, _) = common::http_post_json(&api.addr, "/mcp", &[], &init)
        .await
        .unwrap();
    assert_eq!(status, 401);
    let auth = format!("Bearer {}", api.token);
    let h = [("Authorization", auth.as_str())];
    let (status, body) = common::http_post_json(&api.addr, "/mcp", &h, &init)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["result"]["serverInfo"]["name"], "projector");
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "get_order", "arguments": {"order_id": order_id}}});
    let (status, body) = common::http_post_json(&api.addr, "/mcp", &h, &call)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let result = &body["result"];
    assert_eq!(result["isError"], false, "{body}");
    assert_eq!(
        result["structuredContent"]["data"],
        serde_json::to_value(order).unwrap()
    );
    assert_eq!(
        result["structuredContent"]["freshness"]["projection"],
        "order_view"
    );
}
