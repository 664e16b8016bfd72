#!/usr/bin/env bash
# The test suite, against real local services: installs what is missing, starts the services
# (idempotent), checks formatting and lints, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# The fault tests start a second server set of their own (tests/common/faults.rs), and
# tests/alerts.rs that set's Prometheus: whatever happens, the run stops them when it ends (by
# their pid files, nothing else).
stop_fault_set() {
  SERVICES_RUN_ROOT="$PWD/.services-faults" KAFKA_PORT=29092 POSTGRES_PORT=25432 \
    REDIS_PORT=26379 MONGO_PORT=27217 CLICKHOUSE_HTTP_PORT=28123 CLICKHOUSE_TCP_PORT=29001 \
    PROMETHEUS_PORT=29090 \
    bash scripts/services.sh down kafka postgres redis mongo clickhouse prometheus >/dev/null 2>&1 || true
}
trap stop_fault_set EXIT
bash scripts/services.sh up
bash scripts/services.sh up rcluster   # tests/redis_cluster.rs

# An MCP client this project did not write (the official Python SDK, from PyPI), for
# tests/mcp.rs.
if ! .services/mcp-client/bin/python -c 'import mcp' 2>/dev/null; then
  python3 -m venv .services/mcp-client
  .services/mcp-client/bin/pip install --quiet 'mcp==2.3.0'
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
bash scripts/ops-check.sh
cargo nextest run --workspace --locked --no-fail-fast "$@"
