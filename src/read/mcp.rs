//! MCP tools for agents (the official SDK, `rmcp`): the read API's queries as read-only,
//! idempotent tools with output schemas and structured content, the same freshness fields
//! and the same wait-for-an-event parameters. Served over stdio (`projector mcp`) and over
//! Streamable HTTP at `/mcp` of `projector serve` (behind its bearer tokens).

use std::sync::Arc;

use projectors::order_view::OrderView;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{Json, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use super::service::{Range, ReadError, ReadService, Wait};
use super::types::*;

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CustomerParams {
    pub customer_id: String,
    #[serde(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct OrderParams {
    pub order_id: String,
    #[serde(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct OrdersParams {
    pub customer_id: String,
    /// Only orders in this status (created, payment_pending, payment_confirmed, preparing,
    /// shipped, delivered, cancelled, validation_failed).
    pub status: Option<String>,
    /// Orders per page (default 20).
    pub limit: Option<usize>,
    /// next_cursor of the previous page.
    pub cursor: Option<String>,
    #[serde(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StatusParams {
    /// created, payment_pending, payment_confirmed, preparing, shipped, delivered, cancelled
    /// or validation_failed.
    pub status: String,
    /// newest (default): the most recently changed first; oldest: those in this status
    /// longest first.
    pub sort: Option<Sort>,
    /// Orders per page (default 20).
    pub limit: Option<usize>,
    /// next_cursor of the previous page.
    pub cursor: Option<String>,
    #[serde(flatten)]
    pub wait: Wait,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RangeParams {
    /// First day included, YYYY-MM-DD (UTC).
    pub from: Option<String>,
    /// First day excluded, YYYY-MM-DD (UTC).
    pub to: Option<String>,
    /// day (default), week or month; ignored by the funnel and resolution tools.
    pub granularity: Option<Granularity>,
    /// Only this customer's events (revenue and sentiment).
    pub customer_id: Option<String>,
    #[serde(flatten)]
    pub wait: Wait,
}

impl RangeParams {
    fn range(&self) -> Range {
        Range {
            from: self.from.clone(),
            to: self.to.clone(),
            granularity: self.granularity.unwrap_or_default(),
            customer_id: self.customer_id.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct NoParams {}

/// A tool error as the agent reads it: the same body as the HTTP API's errors (with
/// freshness for `not_yet`).
fn tool_error(e: ReadError) -> String {
    let (code, freshness) = match &e {
        ReadError::BadRequest(_) => ("bad_request", None),
        ReadError::NotFound(_) => ("not_found", None),
        ReadError::UnknownEvent(_) => ("unknown_event", None),
        ReadError::NotYet(f) => ("not_yet", Some((**f).clone())),
        ReadError::Unavailable { .. } => ("unavailable", None),
    };
    serde_json::to_string(&ErrorBody {
        error: code.into(),
        message: e.to_string(),
        freshness,
    })
    .unwrap_or_else(|_| e.to_string())
}

#[derive(Clone)]
pub struct ReadTools {
    service: Arc<ReadService>,
}

impl ReadTools {
    pub fn new(service: Arc<ReadService>) -> ReadTools {
        ReadTools { service }
    }
}

#[tool_router]
impl ReadTools {
    #[tool(
        description = "A customer's Customer-360 view: profile, interactions and sentiment, orders, support, `freshness` says which version was read, the last sequence applied per source stream and the consumer lag.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn get_customer_360(
        &self,
        Parameters(p): Parameters<CustomerParams>,
    ) -> Result<Json<Answer<Customer>>, String> {
        self.service
            .customer(&p.customer_id, &p.wait.consistency())
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "A customer's orders, newest first (by placed_at, then order id), optionally of one status, with cursor pagination.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn list_customer_orders(
        &self,
        Parameters(p): Parameters<OrdersParams>,
    ) -> Result<Json<Answer<OrderPage>>, String> {
        self.service
            .customer_orders(
                &p.customer_id,
                p.status.as_deref(),
                p.limit,
                p.cursor.as_deref(),
                &p.wait.consistency(),
            )
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Every order in one status, by when it last changed (newest first, or oldest first: the orders stuck in that status longest), with cursor pagination.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn list_orders_by_status(
        &self,
        Parameters(p): Parameters<StatusParams>,
    ) -> Result<Json<Answer<OrderPage>>, String> {
        self.service
            .orders_by_status(
                &p.status,
                p.sort.unwrap_or_default(),
                p.limit,
                p.cursor.as_deref(),
                &p.wait.consistency(),
            )
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "One order view: status, items, payment, shipping and the status timeline.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn get_order(
        &self,
        Parameters(p): Parameters<OrderParams>,
    ) -> Result<Json<Answer<OrderView>>, String> {
        self.service
            .order(&p.order_id, &p.wait.consistency())
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Revenue (cents) and count of orders placed, per day, week or month; optionally one customer's.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn revenue(
        &self,
        Parameters(p): Parameters<RangeParams>,
    ) -> Result<Json<Answer<Vec<RevenuePoint>>>, String> {
        self.service
            .revenue(&p.range(), &p.wait.consistency())
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Order funnel: orders placed in the range and how many of them were validated, paid, shipped, delivered, cancelled or failed validation.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn order_funnel(
        &self,
        Parameters(p): Parameters<RangeParams>,
    ) -> Result<Json<Answer<Funnel>>, String> {
        self.service
            .funnel(&p.range(), &p.wait.consistency())
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Interactions and mean sentiment (0..1) per period and interaction type; optionally one customer's.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn sentiment(
        &self,
        Parameters(p): Parameters<RangeParams>,
    ) -> Result<Json<Answer<Vec<SentimentPoint>>>, String> {
        self.service
            .sentiment(&p.range(), &p.wait.consistency())
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Support ticket resolution time percentiles (p50, p90, p99 seconds) of tickets resolved in the range.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn ticket_resolution(
        &self,
        Parameters(p): Parameters<RangeParams>,
    ) -> Result<Json<Answer<Resolution>>, String> {
        self.service
            .resolution(&p.range(), &p.wait.consistency())
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Where each projection stands: the live version, rebuilds with progress, rate and ETA, the event store's head and the consumer lag.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn projection_status(
        &self,
        Parameters(_): Parameters<NoParams>,
    ) -> Result<Json<Status>, String> {
        self.service.status().await.map(Json).map_err(tool_error)
    }
}

#[tool_handler]
impl ServerHandler for ReadTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("projector", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Read models of an event-sourced system: Customer-360 views, order views and \
                 analytics. Every answer has `data` and `freshness` (version read, how far it \
                 applied, consumer lag). To read your own write, pass the event's \
                 after_position (or after_stream + after_sequence): the tool waits up to \
                 wait_ms, then fails with `not_yet` and where the projection stands.",
            )
    }
}

/// Serve the tools over stdio until the client closes it.
pub async fn serve_stdio(service: Arc<ReadService>) -> Result<(), std::io::Error> {
    use rmcp::ServiceExt;
    let running = ReadTools::new(service)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(std::io::Error::other)?;
    running.waiting().await.map_err(std::io::Error::other)?;
    Ok(())
}

/// The Streamable HTTP endpoint, to nest at `/mcp` (stateless: any replica answers any
/// request, JSON responses).
pub fn http_router(service: Arc<ReadService>, allowed_hosts: &[String]) -> axum::Router {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true);
    if !allowed_hosts.is_empty() {
        config = config.with_allowed_hosts(allowed_hosts.iter().cloned());
    }
    let mcp = StreamableHttpService::new(
        move || Ok(ReadTools::new(service.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    axum::Router::new().nest_service("/mcp", mcp)
}
