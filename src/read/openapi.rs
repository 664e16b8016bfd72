//! The OpenAPI 3.1 document the service serves at `/openapi.json`. Schemas come from the
//! answer types themselves (schemars), so the document cannot drift from what is sent.

use projectors::order_view::OrderView;
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use super::types::*;

/// Every path of the API (a test checks the router serves each).
pub const PATHS: [&str; 9] = [
    "/v1/customers/{id}",
    "/v1/customers/{id}/orders",
    "/v1/orders/{id}",
    "/v1/orders",
    "/v1/analytics/revenue",
    "/v1/analytics/funnel",
    "/v1/analytics/sentiment",
    "/v1/analytics/resolution",
    "/v1/projections",
];

fn param(name: &str, place: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": place, "required": place == "path", "schema": schema, "description": description})
}

fn consistency_params() -> Vec<Value> {
    vec![
        param(
            "after_position",
            "query",
            json!({"type": "integer", "minimum": 1}),
            "Answer only once the read model includes the event at this global position (read-your-writes).",
        ),
        param(
            "after_stream",
            "query",
            json!({"type": "string"}),
            "With after_sequence: the event's stream, aggregate_type/aggregate_id (e.g. order/ord-17).",
        ),
        param(
            "after_sequence",
            "query",
            json!({"type": "integer", "minimum": 0}),
            "With after_stream: the event's sequence_number.",
        ),
        param(
            "wait_ms",
            "query",
            json!({"type": "integer", "minimum": 0}),
            "How long to wait for the event (default 3000, at most read.max_wait_ms); then 409 not_yet.",
        ),
    ]
}

fn range_params(per_customer: bool, granular: bool) -> Vec<Value> {
    let mut p = vec![
        param(
            "from",
            "query",
            json!({"type": "string", "format": "date"}),
            "First day included (UTC).",
        ),
        param(
            "to",
            "query",
            json!({"type": "string", "format": "date"}),
            "First day excluded (UTC).",
        ),
    ];
    if granular {
        p.push(param(
            "granularity",
            "query",
            json!({"$ref": "#/components/schemas/Granularity"}),
            "day (default), week or month.",
        ));
    }
    if per_customer {
        p.push(param(
            "customer_id",
            "query",
            json!({"type": "string"}),
            "Only this customer's events.",
        ));
    }
    p.extend(consistency_params());
    p
}

fn errors() -> Value {
    let e = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    let with = |d: &str| {
        let mut v = e.clone();
        v["description"] = json!(d);
        v
    };
    json!({
        "400": with("bad_request: a parameter is invalid or unknown"),
        "401": with("unauthorized: missing or wrong bearer token"),
        "404": with("not_found (no such document) or unknown_event (after_* names no event)"),
        "409": with("not_yet: the answer does not include the named event within wait_ms; `freshness` says where the projection stands"),
        "503": with("busy (too many requests at once) or unavailable (a store did not answer)"),
    })
}

fn get(summary: &str, answer: &str, params: Vec<Value>) -> Value {
    let mut responses = errors();
    responses["200"] = json!({
        "description": "The answer and its freshness",
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{answer}")}}}
    });
    json!({"get": {"summary": summary, "parameters": params, "responses": responses, "security": [{"bearer": []}]}})
}

/// The document.
pub fn document() -> Value {
    let mut g = SchemaSettings::openapi3().into_generator();
    // Named answer types (generic ones get a readable name of their own).
    let named = |name: &str, schema: schemars::Schema| (name.to_owned(), schema.to_value());
    let answers = [
        named("CustomerAnswer", g.subschema_for::<Answer<Customer>>()),
        named("OrderAnswer", g.subschema_for::<Answer<OrderView>>()),
        named("OrderPageAnswer", g.subschema_for::<Answer<OrderPage>>()),
        named(
            "RevenueAnswer",
            g.subschema_for::<Answer<Vec<RevenuePoint>>>(),
        ),
        named("FunnelAnswer", g.subschema_for::<Answer<Funnel>>()),
        named(
            "SentimentAnswer",
            g.subschema_for::<Answer<Vec<SentimentPoint>>>(),
        ),
        named("ResolutionAnswer", g.subschema_for::<Answer<Resolution>>()),
        named("Status", g.subschema_for::<Status>()),
        named("ErrorBody", g.subschema_for::<ErrorBody>()),
        named("Granularity", g.subschema_for::<Granularity>()),
        named("Sort", g.subschema_for::<Sort>()),
    ];
    let mut schemas = serde_json::Map::new();
    for (name, schema) in g.take_definitions(true) {
        schemas.insert(name, schema);
    }
    for (name, schema) in answers {
        // A `$ref` to a definition already listed keeps its own name too.
        schemas.entry(name).or_insert(schema);
    }
    let id = |what: &str| param("id", "path", json!({"type": "string"}), what);
    let mut orders = vec![
        id("The customer id."),
        param(
            "status",
            "query",
            json!({"type": "string", "enum": projectors::order_view::STATUSES}),
            "Only orders in this status.",
        ),
        param(
            "limit",
            "query",
            json!({"type": "integer", "minimum": 1, "maximum": 100}),
            "Orders per page (default 20, at most read.max_page).",
        ),
        param(
            "cursor",
            "query",
            json!({"type": "string"}),
            "next_cursor of the previous page.",
        ),
    ];
    let page = orders.split_off(2);
    let mut by_status = vec![
        param(
            "status",
            "query",
            json!({"type": "string", "enum": projectors::order_view::STATUSES}),
            "The status listed.",
        ),
        param(
            "sort",
            "query",
            json!({"$ref": "#/components/schemas/Sort"}),
            "newest (default): the most recently changed first; oldest: those in this status longest first.",
        ),
    ];
    by_status[0]["required"] = json!(true);
    by_status.extend(page.iter().cloned());
    by_status.extend(consistency_params());
    orders.extend(page);
    orders.extend(consistency_params());
    let mut customer = vec![id("The customer id.")];
    customer.extend(consistency_params());
    let mut order = vec![id("The order id.")];
    order.extend(consistency_params());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "projector read API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Read models of the projection processor, for agents and services. Every answer carries `freshness`: the version read, how far it has applied, and the consumer lag. Pass after_position (or after_stream + after_sequence) to read your own writes: the service waits up to wait_ms for the event, then answers 409 not_yet with where the projection stands, never silently stale."
        },
        "paths": {
            PATHS[0]: get("A customer's Customer-360 view", "CustomerAnswer", customer),
            PATHS[1]: get("A customer's orders, newest first (placed_at, then id), with cursor pagination", "OrderPageAnswer", orders),
            PATHS[2]: get("One order view", "OrderAnswer", order),
            PATHS[3]: get("Every order in one status, by when it last changed (then id), with cursor pagination", "OrderPageAnswer", by_status),
            PATHS[4]: get("Revenue of orders placed, per period", "RevenueAnswer", range_params(true, true)),
            PATHS[5]: get("Orders placed in the range and how many reached each step", "FunnelAnswer", range_params(false, false)),
            PATHS[6]: get("Interactions and mean sentiment per period and type", "SentimentAnswer", range_params(true, true)),
            PATHS[7]: get("Resolution time percentiles of tickets resolved in the range", "ResolutionAnswer", range_params(false, false)),
            PATHS[8]: get("Where each projection stands: live version, rebuilds (rate, ETA), event store head, lag", "Status", vec![]),
            "/healthz": {"get": {"summary": "Liveness (no token needed)", "security": [], "responses": {"200": {"description": "ok"}}}},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{"bearer": []}]
    })
}
