//! `projector serve`: the read API over HTTP (axum). Bearer tokens on everything but
//! `/healthz` and `/openapi.json`; a cap on requests served at once; JSON errors with a
//! machine-readable `error` and a human `message`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::service::{Consistency, Range, ReadError, ReadService, Wait};
use super::types::{ErrorBody, Granularity, Sort};

/// Accepted bearer tokens.
#[derive(Clone, Default)]
pub struct Tokens(Arc<Vec<String>>);

impl Tokens {
    /// From `read.tokens` (environment) and `read.token_file`; empty lines and `#` comments
    /// in the file are skipped.
    pub fn load(cfg: &crate::config::ReadConfig) -> std::io::Result<Tokens> {
        let mut all: Vec<String> = cfg
            .tokens
            .iter()
            .flat_map(|t| t.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(f) = &cfg.token_file {
            let text = std::fs::read_to_string(f)?;
            all.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        Ok(Tokens(Arc::new(all)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn accepts(&self, presented: &str) -> bool {
        // Compare every token in full, whatever matches: the time taken tells nothing.
        self.0.iter().fold(false, |ok, t| {
            ok | constant_time_eq(t.as_bytes(), presented.as_bytes())
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
struct AppState {
    service: Arc<ReadService>,
    tokens: Tokens,
    /// `None`: authentication explicitly switched off (`--no-auth`).
    auth: bool,
    permits: Arc<Semaphore>,
}

/// The router: API under `/v1`, plus `extra` (the MCP endpoint) behind the same guards.
pub fn router(
    service: Arc<ReadService>,
    tokens: Tokens,
    auth: bool,
    extra: Option<Router>,
) -> Router {
    let permits = Arc::new(Semaphore::new(service.config().read.max_concurrent.max(1)));
    let state = AppState {
        service,
        tokens,
        auth,
        permits,
    };
    let mut api = Router::new()
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/customers/{id}/orders", get(customer_orders))
        .route("/v1/orders", get(orders_by_status))
        .route("/v1/orders/{id}", get(order))
        .route("/v1/analytics/revenue", get(revenue))
        .route("/v1/analytics/funnel", get(funnel))
        .route("/v1/analytics/sentiment", get(sentiment))
        .route("/v1/analytics/resolution", get(resolution))
        .route("/v1/projections", get(projections))
        .with_state(state.clone());
    if let Some(extra) = extra {
        api = api.merge(extra);
    }
    let guarded = api
        .layer(middleware::from_fn_with_state(state.clone(), limit))
        .layer(middleware::from_fn_with_state(state, authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi))
        .merge(guarded)
}

async fn authenticate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if !s.auth {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if s.tokens.accepts(t.trim()) => next.run(req).await,
        _ => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>)".into(),
                None,
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

async fn limit(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(Duration::from_secs(1), s.permits.acquire()).await {
        Ok(Ok(_permit)) => next.run(req).await,
        _ => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "more than read.max_concurrent ({}) requests at once; retry shortly",
                    s.service.config().read.max_concurrent
                ),
                None,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

fn error(
    status: StatusCode,
    code: &str,
    message: String,
    freshness: Option<super::types::Freshness>,
) -> Response {
    (
        status,
        Json(ErrorBody {
            error: code.to_owned(),
            message,
            freshness,
        }),
    )
        .into_response()
}

/// How every `ReadError` is answered.
pub fn error_response(e: ReadError) -> Response {
    let message = e.to_string();
    match e {
        ReadError::BadRequest(_) => error(StatusCode::BAD_REQUEST, "bad_request", message, None),
        ReadError::NotFound(_) => error(StatusCode::NOT_FOUND, "not_found", message, None),
        ReadError::UnknownEvent(_) => error(StatusCode::NOT_FOUND, "unknown_event", message, None),
        ReadError::NotYet(f) => {
            let message = match f.consistency.as_ref().and_then(|c| c.parked.as_ref()) {
                Some(reason) => format!(
                    "{message}: the projection holds the event's stream back ({reason}); \
                     it will not come in until an operator unparks the stream"
                ),
                None => format!("{message}; retry, or wait longer with wait_ms"),
            };
            let mut r = error(StatusCode::CONFLICT, "not_yet", message, Some(*f));
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        ReadError::Unavailable { .. } => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message,
                None,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

fn answer<T: Serialize>(r: Result<T, ReadError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

fn bad_query(e: QueryRejection) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", e.body_text(), None)
}

async fn customer(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<Wait>, QueryRejection>,
) -> Response {
    match q {
        Ok(Query(q)) => answer(s.service.customer(&id, &q.consistency()).await),
        Err(e) => bad_query(e),
    }
}

async fn order(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<Wait>, QueryRejection>,
) -> Response {
    match q {
        Ok(Query(q)) => answer(s.service.order(&id, &q.consistency()).await),
        Err(e) => bad_query(e),
    }
}

/// The read-your-writes fields every query string carries. Written out in each parameter
/// struct: serde's `flatten` of [`Wait`] cannot be combined with `deny_unknown_fields`.
fn consistency(
    after_position: Option<i64>,
    after_stream: Option<String>,
    after_sequence: Option<i64>,
    wait_ms: Option<u64>,
) -> Consistency {
    Wait {
        after_position,
        after_stream,
        after_sequence,
        wait_ms,
    }
    .consistency()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersParams {
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    after_position: Option<i64>,
    after_stream: Option<String>,
    after_sequence: Option<i64>,
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusParams {
    status: String,
    sort: Option<Sort>,
    limit: Option<usize>,
    cursor: Option<String>,
    after_position: Option<i64>,
    after_stream: Option<String>,
    after_sequence: Option<i64>,
    wait_ms: Option<u64>,
}

async fn orders_by_status(
    State(s): State<AppState>,
    q: Result<Query<StatusParams>, QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    let c = consistency(
        q.after_position,
        q.after_stream,
        q.after_sequence,
        q.wait_ms,
    );
    answer(
        s.service
            .orders_by_status(
                &q.status,
                q.sort.unwrap_or_default(),
                q.limit,
                q.cursor.as_deref(),
                &c,
            )
            .await,
    )
}

async fn customer_orders(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<OrdersParams>, QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    let c = consistency(
        q.after_position,
        q.after_stream,
        q.after_sequence,
        q.wait_ms,
    );
    answer(
        s.service
            .customer_orders(&id, q.status.as_deref(), q.limit, q.cursor.as_deref(), &c)
            .await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeParams {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<Granularity>,
    customer_id: Option<String>,
    after_position: Option<i64>,
    after_stream: Option<String>,
    after_sequence: Option<i64>,
    wait_ms: Option<u64>,
}

impl RangeParams {
    fn split(self) -> (Range, Consistency) {
        let c = consistency(
            self.after_position,
            self.after_stream,
            self.after_sequence,
            self.wait_ms,
        );
        (
            Range {
                from: self.from,
                to: self.to,
                granularity: self.granularity.unwrap_or_default(),
                customer_id: self.customer_id,
            },
            c,
        )
    }
}

macro_rules! analytics_handler {
    ($name:ident, $method:ident) => {
        async fn $name(
            State(s): State<AppState>,
            q: Result<Query<RangeParams>, QueryRejection>,
        ) -> Response {
            match q {
                Ok(Query(q)) => {
                    let (r, c) = q.split();
                    answer(s.service.$method(&r, &c).await)
                }
                Err(e) => bad_query(e),
            }
        }
    };
}

analytics_handler!(revenue, revenue);
analytics_handler!(funnel, funnel);
analytics_handler!(sentiment, sentiment);
analytics_handler!(resolution, resolution);

async fn projections(State(s): State<AppState>) -> Response {
    answer(s.service.status().await)
}

async fn openapi() -> impl IntoResponse {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (h, super::openapi::document().to_string())
}

/// Bind and serve until `shutdown` resolves; returns once the server stopped.
pub async fn serve(
    addr: &str,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    bound(listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
