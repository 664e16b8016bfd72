//! Structured logging: human-readable on a terminal, JSON lines otherwise (for log shippers).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    // rmcp logs every stateless MCP request at info: keep it to warnings by default.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Ignore the error of a second init (tests may call it repeatedly).
    if std::io::stderr().is_terminal() {
        let _ = builder.try_init();
    } else {
        let _ = builder.json().flatten_event(true).try_init();
    }
}
