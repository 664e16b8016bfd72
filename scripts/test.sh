#!/usr/bin/env bash
# The test suite, against real local services: installs what is missing, starts the services
# (idempotent), checks formatting and lints, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
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
