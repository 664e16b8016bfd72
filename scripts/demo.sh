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
bash scripts/services.sh up
cargo build --locked --quiet
BIN=target/debug/projector

"$BIN" migrate
"$BIN" generate --events "$EVENTS" --seed "$SEED" --namespace "$NS" --duplicates 0.02 --redeliveries 0.1
# The worker projects the history into Redis, MongoDB and ClickHouse, then exits once idle.
"$BIN" run --exit-when-idle 5
"$BIN" show --namespace "$NS"
