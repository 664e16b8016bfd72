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
cargo fmt --all -- --check
# The demo's `cargo build` and this test build share every dependency only while the
# dev-dependencies turn on no feature the normal build lacks (Cargo.toml, feature unification).
features() { cargo tree --workspace --locked -e "$1" --prefix none -f '{p} [{f}]' | sort -u; }
if unified=$(comm -23 <(features normal,build) <(features normal,build,dev)) && [[ -n $unified ]]; then
  echo "dev-dependencies change these dependencies' features (add them to [dependencies]):" >&2
  echo "$unified" >&2
  exit 1
fi

# What the tests need beside the build is prepared while it compiles (on a fresh machine the
# servers' install alone takes minutes): the servers, the tests' Redis Cluster
# (tests/redis_cluster.rs), an MCP client this project did not write (the official Python
# SDK, from PyPI, for tests/mcp.rs), and the operations files' checks.
mkdir -p .services
(
  bash scripts/services.sh up
  bash scripts/services.sh up rcluster
  if ! .services/mcp-client/bin/python -c 'import mcp' 2>/dev/null; then
    python3 -m venv .services/mcp-client
    .services/mcp-client/bin/pip install --quiet 'mcp==2.3.0'
  fi
  bash scripts/ops-check.sh
) >.services/test-prepare.log 2>&1 &
PREPARE=$!

# Clippy lints the workspace while the test build compiles it (clippy-driver as the workspace
# members' rustc, as `cargo clippy` itself runs it): one compile instead of a check build of
# everything and then the real one. nextest builds every target there is (lib, bins, tests;
# there are no benches or examples), so this covers `clippy --all-targets -- -D warnings`.
export RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
cargo nextest run --workspace --locked --no-run "$@"
status=0
wait "$PREPARE" || status=$?
cat .services/test-prepare.log
if (( status )); then
  echo "preparing the services and checks failed (above)" >&2
  exit "$status"
fi
cargo nextest run --workspace --locked --no-fail-fast "$@"
