//! Read latency of the agents' side: the read service in this process, driven over real
//! HTTP/1.1 keep-alive connections (hyper's client), each concurrency level for a fixed time.
//! A Customer-360 read and a customer's orders page, through the HTTP API and through MCP
//! (Streamable HTTP, `tools/call`), and a page of the orders in one status (HTTP), which
//! spans every customer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use projector::config::Config;
use projector::read::{ReadService, http, mcp};

/// One measured line.
pub struct Latency {
    pub what: &'static str,
    pub concurrency: usize,
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Clone, Copy)]
enum Call {
    Customer,
    Orders,
    McpCustomer,
    McpOrders,
    ByStatus,
}

impl Call {
    fn label(self) -> &'static str {
        match self {
            Call::Customer => "HTTP Customer-360",
            Call::Orders => "HTTP customer's orders",
            Call::McpCustomer => "MCP get_customer_360",
            Call::McpOrders => "MCP list_customer_orders",
            Call::ByStatus => "HTTP orders in one status",
        }
    }

    fn request(
        self,
        addr: SocketAddr,
        token: &str,
        customer: &str,
        n: u64,
    ) -> hyper::Request<Full<Bytes>> {
        let b = hyper::Request::builder()
            .header("Host", format!("127.0.0.1:{}", addr.port()))
            .header("Authorization", format!("Bearer {token}"));
        let tool = |name: &str| {
            serde_json::json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                "params": {"name": name, "arguments": {"customer_id": customer}}})
            .to_string()
        };
        let built = match self {
            Call::Customer => b
                .uri(format!("/v1/customers/{customer}"))
                .body(Full::default()),
            Call::Orders => b
                .uri(format!("/v1/customers/{customer}/orders?limit=20"))
                .body(Full::default()),
            // The oldest first alternate with the newest first: both ends of the index.
            Call::ByStatus => {
                let sort = if n.is_multiple_of(2) {
                    "oldest"
                } else {
                    "newest"
                };
                b.uri(format!("/v1/orders?status=shipped&sort={sort}&limit=20"))
                    .body(Full::default())
            }
            Call::McpCustomer | Call::McpOrders => {
                let name = if matches!(self, Call::McpCustomer) {
                    "get_customer_360"
                } else {
                    "list_customer_orders"
                };
                b.method("POST")
                    .uri("/mcp")
                    .header("Content-Type", "application/json")
                    .header("Accept", "application/json, text/event-stream")
                    .body(Full::new(Bytes::from(tool(name))))
            }
        };
        built.unwrap_or_default()
    }
}

pub(super) async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Serve the read API here, then measure every call at concurrency 1, 16 and 64 for `each`.
pub async fn measure(
    cfg: &Config,
    customers: &[String],
    each: Duration,
) -> anyhow::Result<Vec<Latency>> {
    anyhow::ensure!(!customers.is_empty(), "no customers to read");
    let service = Arc::new(ReadService::new(cfg).await?);
    let token = format!("bench-{:x}", rand::random::<u64>());
    let tokens = {
        let mut read = cfg.read.clone();
        read.tokens = Some(token.clone());
        read.max_concurrent = 256;
        http::Tokens::load(&read)?
    };
    let app = http::router(
        service.clone(),
        tokens,
        true,
        Some(mcp::http_router(service, &[])),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let customers: Arc<Vec<String>> = Arc::new(customers.to_vec());
    let mut out = Vec::new();
    for call in [
        Call::Customer,
        Call::Orders,
        Call::McpCustomer,
        Call::McpOrders,
        Call::ByStatus,
    ] {
        for concurrency in [1usize, 16, 64] {
            let deadline = Instant::now() + each;
            let mut tasks = Vec::new();
            for t in 0..concurrency {
                let (customers, token) = (customers.clone(), token.clone());
                tasks.push(tokio::spawn(async move {
                    let mut h = hdrhistogram::Histogram::<u64>::new(3)?;
                    let mut sender = connect(addr).await?;
                    let mut n = t as u64 * 7919;
                    while Instant::now() < deadline {
                        n += 1;
                        let customer = &customers[(n as usize) % customers.len()];
                        let req = call.request(addr, &token, customer, n);
                        let t0 = Instant::now();
                        sender.ready().await?;
                        let res = sender.send_request(req).await?;
                        let status = res.status();
                        let body = res.into_body().collect().await?.to_bytes();
                        h.record(t0.elapsed().as_micros() as u64)?;
                        anyhow::ensure!(
                            status.is_success(),
                            "{} answered {status}: {}",
                            call.label(),
                            String::from_utf8_lossy(&body)
                        );
                    }
                    Ok::<_, anyhow::Error>(h)
                }));
            }
            let mut all = hdrhistogram::Histogram::<u64>::new(3)?;
            for t in tasks {
                all.add(t.await??)?;
            }
            out.push(Latency {
                what: call.label(),
                concurrency,
                requests: all.len(),
                p50_us: all.value_at_quantile(0.5),
                p99_us: all.value_at_quantile(0.99),
            });
        }
    }
    server.abort();
    Ok(out)
}
