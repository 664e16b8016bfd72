//! Structured logging: human-readable on a terminal, JSON lines otherwise (for log shippers).
//! Traces: the engine's spans (see [`crate::runtime::spans`]) exported over OTLP/HTTP with
//! protobuf bodies when `telemetry.otlp_endpoint` is set; no exporter is installed otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::config::TelemetryConfig;

/// The `service.name` of every exported span.
pub const SERVICE_NAME: &str = "projector";

/// The longest one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP trace exporter for {url}: {reason}")]
    Exporter { url: String, reason: String },
    #[error("installing OTLP export needs a Tokio runtime")]
    NoRuntime,
}

/// What must be flushed before the process exits.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Export the spans still buffered and stop the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // It blocks until the last batch is sent, and the request runs on this runtime.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "the last spans were not exported");
        }
    }
}

/// Install logging, and span export when `cfg` names an endpoint. Only the first call of a
/// process installs anything (tests may call it repeatedly).
pub fn init(cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    // rmcp logs every stateless MCP request at info: keep it to warnings by default.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn"));
    // The engine's spans go to traces; log lines stay as they were, without their context.
    let not_spans = filter_fn(|m| !(m.is_span() && m.target() == crate::runtime::spans::TARGET));
    let filter = filter.and(not_spans);
    let logs = if std::io::stderr().is_terminal() {
        fmt::layer().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let Some(url) = cfg.traces_url() else {
        let _ = tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .try_init();
        return Ok(Telemetry { provider: None });
    };
    let provider = tracer_provider(&url)?;
    // The engine's own spans only, whatever RUST_LOG keeps in the logs (and never the
    // exporter's own HTTP client, which would feed itself).
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        // Spans are made by helpers in one file and entered from any pool thread: source
        // locations and thread names would say nothing, at a cost in every span.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        // Nothing else here reads the OpenTelemetry context: no switch at every poll.
        .with_context_activation(false)
        .with_filter(Targets::new().with_target("projector", LevelFilter::INFO));
    if tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()
        .is_err()
    {
        let _ = provider.shutdown();
        return Ok(Telemetry { provider: None });
    }
    tracing::info!(%url, "exporting traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn tracer_provider(url: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let failed = |reason: String| TelemetryError::Exporter {
        url: url.to_owned(),
        reason,
    };
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let client = OtlpHttp {
        client: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        runtime,
        failing: AtomicBool::new(false),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client)
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(SERVICE_NAME)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// The exporter's HTTP client: hyper, which the project already has (plain HTTP, no TLS
/// stack). The batch processor exports from a thread of its own, outside the runtime, so
/// each request is spawned onto the runtime and awaited from there.
#[derive(Debug)]
struct OtlpHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    /// Whether the last export failed: a collector that is down is reported once, not at
    /// every batch.
    failing: AtomicBool,
}

impl OtlpHttp {
    fn note(&self, result: &Result<Response<Bytes>, HttpError>) {
        let failed = match result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("answered {}", r.status())),
            Err(e) => Some(e.to_string()),
        };
        let was = self.failing.swap(failed.is_some(), Ordering::Relaxed);
        match (was, failed) {
            (false, Some(error)) => {
                tracing::warn!(%error, "exporting spans failed; they are dropped until the collector answers");
            }
            (true, None) => tracing::info!("exporting spans again"),
            _ => {}
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(body));
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let response = client.request(request).await?;
                let (parts, body) = response.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(EXPORT_TIMEOUT, exchange).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} s", EXPORT_TIMEOUT.as_secs()).into()),
            }
        });
        let result = match task.await {
            Ok(r) => r,
            Err(e) => Err(Box::new(e) as HttpError),
        };
        self.note(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_endpoint_installs_no_exporter() {
        let t = init(&TelemetryConfig::default()).unwrap();
        assert!(!t.exporting());
    }

    #[test]
    fn the_traces_path_is_added_once() {
        let at = |e: &str| {
            TelemetryConfig {
                otlp_endpoint: e.into(),
            }
            .traces_url()
        };
        assert_eq!(at(""), None);
        assert_eq!(at("  "), None);
        assert_eq!(
            at("http://c:4318").as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            at("http://c:4318/v1/traces").as_deref(),
            Some("http://c:4318/v1/traces")
        );
    }
}
