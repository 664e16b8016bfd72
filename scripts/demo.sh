#!/usr/bin/env bash
# The main job end to end: services up, a realistic event history written to the event store
# and Kafka, the worker projecting it, and one answer from each read model.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS="${DEMO_EVENTS:-20000}"
SEED="${DEMO_SEED:-42}"
# A fresh namespace per run, so the demo can run again on the same services.
NS="${DEMO_NAMESPACE:-demo$(date +%s)-}"

bash scripts/install-deps.sh
# The servers install and start while the project builds: on a fresh machine each takes
# minutes (the MongoDB-protocol server is compiled from crates.io), and neither keeps both
# cores busy all the time.
mkdir -p .services
bash scripts/services.sh up >.services/demo-up.log 2>&1 &
UP=$!
cargo build --locked --quiet
if ! wait "$UP"; then
  cat .services/demo-up.log >&2
  echo "scripts/services.sh up failed (above)" >&2
  exit 1
fi
cat .services/demo-up.log
BIN=target/debug/projector
START=$SECONDS

"$BIN" migrate
"$BIN" generate --events "$EVENTS" --seed "$SEED" --namespace "$NS" --duplicates 0.02 --redeliveries 0.1
# The worker projects the history into Redis, MongoDB and ClickHouse, then exits once idle.
"$BIN" run --exit-when-idle 5
"$BIN" show --namespace "$NS"

# The agents' side: the read API answers with freshness (MCP tools at /mcp, or `projector mcp`).
TOKEN="demo-$RANDOM$RANDOM$RANDOM"
PROJECTOR_READ__TOKENS="$TOKEN" "$BIN" serve --addr 127.0.0.1:18080 >/dev/null 2>&1 &
SERVE=$!
trap 'kill "$SERVE" 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf 127.0.0.1:18080/healthz >/dev/null && break; sleep 0.1; done
echo "== Read API: GET /v1/customers/${NS}cus-1 (data.context and freshness shown)"
curl -sf -H "Authorization: Bearer $TOKEN" "127.0.0.1:18080/v1/customers/${NS}cus-1" |
  python3 -c 'import json,sys; a=json.load(sys.stdin); f=a["freshness"]; print(json.dumps({"context": a["data"]["context"], "freshness": {k: f.get(k) for k in ("version", "streams", "last_event_at", "lag")}}, indent=1))'

# What an operator runs first on any deployment: every server, durability setting, topic, group,
# version and parked stream checked, one row each (the group is empty: the worker has exited).
echo "== projector doctor"
"$BIN" doctor || echo "(projector doctor found a failure: see its rows above)"

ELAPSED=$((SECONDS - START))
echo "== Done: $EVENTS events generated, published and projected into three read models in ${ELAPSED} s" \
  "($((EVENTS / (ELAPSED > 0 ? ELAPSED : 1))) events/s end to end, with start-up and a 5 s idle wait; debug build)."
echo "Next: '$BIN serve' (read API and MCP for agents), '$BIN rebuild-projection status'," \
  "'$BIN dlq list', 'cargo run --release -- bench'; the README says what each shows."
