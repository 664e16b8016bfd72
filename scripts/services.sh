#!/usr/bin/env bash
# scripts/services.sh: install, start, health-check and stop the backing services of the
# projector on 127.0.0.1, without Docker (only Debian apt, PyPI and crates.io).
#
#   scripts/services.sh [up|down|status|install|env] [SERVICE...]    (default: status, all services)
#   SERVICE: kafka postgres redis mongo clickhouse (the default set), rcluster, prometheus
#
#   up       install what is missing, start what is not answering, wait for a protocol-level
#            health check; prints install and start time per service (idempotent)
#   down     stop the servers this script started (by their pid files; nothing else)
#   status   up/down per service; exit 1 if any is down
#   install  install only
#   env      print `export PROJECTOR_...=...` lines for the ports in use (for non-default ports)
#   pid      print the pid of each server this script started (fault tests signal them)
#
# Service    | port (env)                                      | installed from
# kafka      | KAFKA_PORT=19092                                | PyPI noida-db==0.2.3 (Kafka-protocol broker) in a venv
# postgres   | POSTGRES_PORT=15432                             | Debian postgresql-15; own cluster (initdb), role+db "projector"
# redis      | REDIS_PORT=16379                                | Debian redis-server; AOF on (appendfsync always)
# mongo      | MONGO_PORT=27117                                | crates.io secantus-mdb 0.5.3-beta.196 (secantusd-rs, GPL, separate process)
#            | MONGO_TRANSACTION_LIFETIME_SECS=5 (set after every start)
# clickhouse | CLICKHOUSE_HTTP_PORT=18123 CLICKHOUSE_TCP_PORT=19001 | PyPI chdb-core==26.9.0 + a small launcher
# rcluster   | REDIS_CLUSTER_PORT=17101 (and +1, +2; bus +10000)  | Debian redis-server: a 3-primary Redis Cluster
#            |   (not in the default set: `up rcluster`; the Customer-360 layout's cluster test bed)
# prometheus | PROMETHEUS_PORT=19090                           | Debian prometheus (2.42): not in the default set, `up prometheus`;
#            |   scrapes the targets in <run root>/prometheus/targets/*.json (file_sd) every second and
#            |   evaluates rules/alerts.yml there (deploy/prometheus/alerts.yml, copied on every start;
#            |   a test may rewrite it and POST /-/reload: --web.enable-lifecycle)
#
# Installs go to ${PROJECTOR_SERVICES_HOME:-$HOME/.cache/projector-services}; data, logs and pid
# files to <repo>/.services/<service>/ (gitignored). PostgreSQL's data dir moves to
# /var/tmp/projector-services-<hash>/postgres when the repo path is not usable by the postgres user.
# Data is kept across restarts; <SERVICE>_FRESH=1 (e.g. KAFKA_FRESH=1) wipes it on `up`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
SERVICES_HOME="${PROJECTOR_SERVICES_HOME:-${HOME:-/root}/.cache/projector-services}"
# A second, independent set (other ports, SERVICES_RUN_ROOT) lets the fault tests hang, kill
# and restart servers without disturbing the tests that share the default set.
RUN_ROOT="${SERVICES_RUN_ROOT:-$REPO_ROOT/.services}"
ALL_SERVICES=(kafka postgres redis mongo clickhouse)
EXTRA_SERVICES=(rcluster prometheus)

KAFKA_PORT="${KAFKA_PORT:-19092}"
POSTGRES_PORT="${POSTGRES_PORT:-15432}"
REDIS_PORT="${REDIS_PORT:-16379}"
REDIS_CLUSTER_PORT="${REDIS_CLUSTER_PORT:-17101}"
MONGO_PORT="${MONGO_PORT:-27117}"
CLICKHOUSE_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-18123}"
CLICKHOUSE_TCP_PORT="${CLICKHOUSE_TCP_PORT:-19001}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-19090}"

NOIDA_DB_VERSION="0.2.3"
SECANTUS_VERSION="0.5.3-beta.196"
CHDB_VERSION="26.9.0"
PG_MAJOR="${PG_MAJOR:-15}"
PG_ROLE="projector"    # matches config/local.toml
PG_DATABASE="projector"
CLICKHOUSE_DB="analytics"
PY="${PYTHON:-python3}"

log() { echo "[services] $*" >&2; }
out() { echo "[services] $*"; }
now_ms() { date +%s%3N; }

# ---------------------------------------------------------------- process helpers
# alive PID: exists and is not a zombie (PID 1 in some sandboxes does not reap orphans)
alive() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n "$st" && "$st" != Z ]]
}

# pid_from_file FILE PATTERN: print the pid if it is alive and its command line contains PATTERN
# (guards against a recycled pid after a reboot or crash)
pid_from_file() {
  [[ -s "$1" ]] || return 1
  local pid
  pid=$(head -n1 "$1" | tr -dc '0-9')
  [[ -n "$pid" ]] && alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" \
    && echo "$pid"
}

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# clean_exec CMD...: run CMD with only stdin/stdout/stderr open, so that no descriptor of the
# caller (our lock, a CI runner's pipes) leaks into a long-running server.
# shellcheck disable=SC2016
CLOSE_FDS='for fd in /proc/$$/fd/*; do fd=${fd##*/}; if (( fd > 2 )); then eval "exec $fd>&-"; fi; done'
clean_exec() { bash -c "$CLOSE_FDS"'; exec "$@"' clean_exec "$@"; }

# spawn PIDFILE LOGFILE CMD...: start CMD detached (own session, stdio to LOGFILE, no other
# descriptors); the pid written is CMD's own pid (bash execs into it).
# shellcheck disable=SC2016
spawn() {
  local pidfile=$1 logfile=$2
  shift 2
  rm -f "$pidfile"
  setsid bash -c "$CLOSE_FDS"'; echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >"$logfile" 2>&1 &
  local i
  for i in $(seq 1 50); do [[ -s "$pidfile" ]] && return 0; sleep 0.02; done
  log "could not start $*"
  return 1
}

# stop_pid NAME PID SECONDS: SIGTERM, wait, then SIGKILL
stop_pid() {
  local name=$1 pid=$2 secs=$3 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for ${secs}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
}

as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

with_retries() { # with_retries CMD...: three attempts (registry hiccups)
  local n
  for n in 1 2 3; do
    "$@" && return 0
    log "attempt $n failed: $*"
    sleep $((n * 3))
  done
  return 1
}

INSTALL_NOTE=""   # set by *_install: "cached" or "installed"

# ---------------------------------------------------------------- kafka (noida-db)
KAFKA_HOME="$SERVICES_HOME/noida-db-$NOIDA_DB_VERSION"
KAFKA_DIR="$RUN_ROOT/kafka"
KAFKA_PIDFILE="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/kafka.log"

kafka_bin() {
  "$KAFKA_HOME/venv/bin/python" -c \
    'import os, noida_db; print(os.path.join(os.path.dirname(noida_db.__file__), "noida-db"))' 2>/dev/null
}

kafka_install() {
  local have b
  have=$("$KAFKA_HOME/venv/bin/python" -c \
    'import importlib.metadata as m; print(m.version("noida-db"))' 2>/dev/null || true)
  if [[ "$have" == "$NOIDA_DB_VERSION" ]] && b=$(kafka_bin) && [[ -x "$b" ]]; then
    INSTALL_NOTE=cached; return 0
  fi
  log "kafka: pip install noida-db==$NOIDA_DB_VERSION into $KAFKA_HOME/venv"
  rm -rf "$KAFKA_HOME/venv"
  mkdir -p "$KAFKA_HOME"
  "$PY" -m venv "$KAFKA_HOME/venv"
  with_retries "$KAFKA_HOME/venv/bin/pip" install --disable-pip-version-check -q "noida-db==$NOIDA_DB_VERSION"
  b=$(kafka_bin)
  [[ -f "$b" ]] || { log "kafka: binary not found in the wheel: $b"; return 1; }
  chmod 755 "$b"
  INSTALL_NOTE=installed
}

# ApiVersions v0 request; expect our correlation id and error_code 0 back (bash + coreutils only)
kafka_health() {
  local resp
  resp=$(timeout 3 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'"$KAFKA_PORT"' || exit 1
    # size=12 | api_key=18 (ApiVersions) | api_version=0 | correlation_id="KAFA" | client_id="ci"
    printf "\x00\x00\x00\x0c\x00\x12\x00\x00\x4b\x41\x46\x41\x00\x02ci" >&3
    head -c 10 <&3 | od -An -tx1 | tr -d " \n"
  ' 2>/dev/null) || return 1
  [[ "${resp:8:8}" == "4b414641" && "${resp:16:4}" == "0000" ]]
}
kafka_pidfile() { echo "$KAFKA_PIDFILE"; }
kafka_pid() { pid_from_file "$KAFKA_PIDFILE" noida-db; }
kafka_ports() { echo "$KAFKA_PORT:KAFKA_PORT"; }
kafka_endpoint() { echo "127.0.0.1:$KAFKA_PORT"; }
kafka_logs() { echo "$KAFKA_LOG"; }
kafka_wipe() { rm -rf "$KAFKA_DIR/data"; }
kafka_launch() {
  mkdir -p "$KAFKA_DIR/data"
  spawn "$KAFKA_PIDFILE" "$KAFKA_LOG" "$(kafka_bin)" start --only kafka --host 127.0.0.1 \
    --kafka-port "$KAFKA_PORT" --data-dir "$KAFKA_DIR/data"
}
kafka_stop() { stop_pid kafka "$1" 60; }   # it writes its JSON data snapshot on SIGTERM (seconds at 1 GB)

# ---------------------------------------------------------------- postgres
PG_BIN="${PG_BIN:-}"
PG_DIR=""   # set by pg_dirs

pg_find_bin() {
  [[ -n "$PG_BIN" && -x "$PG_BIN/postgres" ]] && return 0
  local d others=()
  mapfile -t others < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
  for d in "/usr/lib/postgresql/$PG_MAJOR/bin" "${others[@]}"; do
    if [[ -x "$d/postgres" && -x "$d/initdb" && -x "$d/psql" ]]; then PG_BIN=$d; return 0; fi
  done
  return 1
}

# run as the postgres OS user when we are root (postgres refuses to run as root)
AS_PG=()
if [[ $EUID -eq 0 ]]; then AS_PG=(runuser -u postgres --); fi
as_pg() { "${AS_PG[@]}" "$@"; }

# Pick the cluster directory: <repo>/.services/postgres when the postgres OS user can reach the
# repo, else /var/tmp/projector-services-<hash of repo path>/postgres (logged on `up`).
pg_dirs() {
  [[ -n "$PG_DIR" ]] && return 0
  PG_DIR="$RUN_ROOT/postgres"
  if [[ $EUID -eq 0 ]] && id -u postgres >/dev/null 2>&1 \
      && ! runuser -u postgres -- test -x "$REPO_ROOT" 2>/dev/null; then
    PG_DIR="/var/tmp/projector-services-$(printf '%s' "$RUN_ROOT" | sha1sum | cut -c1-12)/postgres"
  fi
  PG_DATA="$PG_DIR/data"
  PG_LOG="$PG_DIR/postgres.log"
  PG_SOCK="$PG_DIR/socket"
  # unix socket paths are limited to 107 bytes
  if (( ${#PG_SOCK} > 80 )); then
    PG_SOCK="/tmp/projector-pg-$(printf '%s' "$RUN_ROOT" | sha1sum | cut -c1-12)"
  fi
}

pg_prepare_dirs() {
  pg_dirs
  mkdir -p "$PG_DIR" "$PG_SOCK"
  if [[ $PG_DIR != "$RUN_ROOT"/* ]]; then
    log "postgres: $REPO_ROOT is not reachable by the postgres OS user; the cluster lives in $PG_DIR"
    mkdir -p "$RUN_ROOT/postgres"
    echo "$PG_DIR" >"$RUN_ROOT/postgres/LOCATION"
  fi
  if [[ $EUID -eq 0 ]]; then
    chmod 0755 "$RUN_ROOT" "$(dirname "$PG_DIR")"
    chown postgres:postgres "$PG_DIR" "$PG_SOCK"
  fi
  chmod 0700 "$PG_SOCK"
}

postgres_install() {
  INSTALL_NOTE=cached
  if ! pg_find_bin; then
    if apt-cache show "postgresql-$PG_MAJOR" >/dev/null 2>&1; then apt_install "postgresql-$PG_MAJOR"
    else apt_install postgresql; fi
    pg_find_bin || { log "postgres: no server binaries under /usr/lib/postgresql"; return 1; }
    INSTALL_NOTE=installed
  fi
  if [[ $EUID -eq 0 ]] && ! id -u postgres >/dev/null 2>&1; then
    log "postgres: creating the postgres OS user"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/sh postgres
  fi
}

psql_as() { # psql_as ROLE DB ARGS...: over TCP 127.0.0.1 (trust), unaligned, tuples only
  local role=$1 db=$2
  shift 2
  "$PG_BIN/psql" -X -q -tA -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$role" -d "$db" "$@"
}
postgres_health() {
  pg_find_bin || return 1
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -t 2 || return 1
  [[ "$(psql_as "$PG_ROLE" "$PG_DATABASE" -c 'select 1' 2>/dev/null)" == 1 ]]
}
postgres_ready() { pg_find_bin && "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -t 2; }
postgres_pid() { pg_dirs; pid_from_file "$PG_DATA/postmaster.pid" postgres; }
postgres_ports() { echo "$POSTGRES_PORT:POSTGRES_PORT"; }
postgres_endpoint() { echo "postgres://$PG_ROLE@127.0.0.1:$POSTGRES_PORT/$PG_DATABASE"; }
postgres_logs() { pg_dirs; echo "$PG_LOG" "$PG_DIR/pg_ctl.log"; }
postgres_wipe() { pg_dirs; rm -rf "$PG_DATA"; }
postgres_launch() {
  pg_prepare_dirs
  if [[ -f "$PG_DATA/PG_VERSION" ]]; then
    local have bin_major
    have=$(cat "$PG_DATA/PG_VERSION")
    bin_major=$("$PG_BIN/postgres" --version | grep -oE '[0-9]+' | head -n1)
    if [[ "$have" != "$bin_major" ]]; then
      log "postgres: cluster in $PG_DATA is version $have but the binaries are $PG_BIN; use POSTGRES_FRESH=1 to recreate it"
      return 1
    fi
  else
    rm -rf "$PG_DATA"   # absent or a half-initialised directory
    log "postgres: initdb $PG_DATA"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=peer --auth-host=trust >"$PG_DIR/initdb.log" 2>&1 \
      || { cat "$PG_DIR/initdb.log" >&2; return 1; }
    # Local dev cluster: trust for TCP from 127.0.0.1 only, no passwords anywhere.
    cat >"$PG_DATA/pg_hba.conf" <<'EOF'
# written by scripts/services.sh (local development cluster; listens on 127.0.0.1 only)
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  peer
host    all       all   127.0.0.1/32   trust
EOF
    chown postgres:postgres "$PG_DATA/pg_hba.conf" 2>/dev/null || true
  fi
  # fsync and synchronous_commit stay at their (durable) defaults.
  clean_exec "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 \
    -o "-p $POSTGRES_PORT -k '$PG_SOCK' -c listen_addresses=127.0.0.1 -c shared_buffers=512MB -c max_wal_size=8GB -c checkpoint_timeout=15min -c wal_buffers=64MB -c max_connections=200" start \
    </dev/null >"$PG_DIR/pg_ctl.log" 2>&1
}
postgres_after_start() { # role and database, idempotent
  if [[ "$(psql_as postgres postgres -c "select 1 from pg_roles where rolname = '$PG_ROLE'")" != 1 ]]; then
    psql_as postgres postgres -c "create role $PG_ROLE login superuser"
  fi
  if [[ "$(psql_as postgres postgres -c "select 1 from pg_database where datname = '$PG_DATABASE'")" != 1 ]]; then
    psql_as postgres postgres -c "create database $PG_DATABASE owner $PG_ROLE"
  fi
}
postgres_stop() {
  pg_dirs
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop </dev/null >>"$PG_DIR/pg_ctl.log" 2>&1 \
    || stop_pid postgres "$1" 60
}

# ---------------------------------------------------------------- redis
REDIS_DIR="$RUN_ROOT/redis"
REDIS_PIDFILE="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

redis_install() {
  INSTALL_NOTE=cached
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server
    INSTALL_NOTE=installed
  fi
}
redis_health() { [[ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }
redis_pid() { pid_from_file "$REDIS_PIDFILE" redis-server; }
redis_ports() { echo "$REDIS_PORT:REDIS_PORT"; }
redis_endpoint() { echo "redis://127.0.0.1:$REDIS_PORT/"; }
redis_logs() { echo "$REDIS_LOG" "$REDIS_DIR/redis-start.log"; }
redis_wipe() { rm -rf "$REDIS_DIR/data"; }
redis_launch() {
  mkdir -p "$REDIS_DIR/data"
  rm -f "$REDIS_PIDFILE"
  : >"$REDIS_LOG"
  # AOF on, fsynced before every acknowledgement: the worker commits Kafka offsets once Redis
  # has acknowledged, so an acknowledged write must survive a crash (Redis 7.0 has no
  # WAITAOF). RDB snapshots off.
  clean_exec redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
    --appendonly yes --appendfsync always \
    --daemonize yes --pidfile "$REDIS_PIDFILE" --dir "$REDIS_DIR/data" --logfile "$REDIS_LOG" \
    </dev/null >"$REDIS_DIR/redis-start.log" 2>&1
}
redis_stop() { stop_pid redis "$1" 20; }

# ---------------------------------------------------------------- rcluster (Redis Cluster)
# Three primaries, no replicas, each with its own data dir, AOF fsynced like `redis`. A node
# that was killed comes back alone on `up` (its nodes.conf keeps its id and slots).
RC_DIR="$RUN_ROOT/rcluster"
RC_PORTS=("$REDIS_CLUSTER_PORT" "$((REDIS_CLUSTER_PORT + 1))" "$((REDIS_CLUSTER_PORT + 2))")

rcluster_install() { redis_install; }
rc_node_pid() { pid_from_file "$RC_DIR/$1/redis.pid" redis-server; }
rc_ping() { [[ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == PONG ]]; }
# pid: the first node's, only while every node runs (a missing node makes `up` start it)
rcluster_pid() {
  local p
  for p in "${RC_PORTS[@]}"; do rc_node_pid "$p" >/dev/null || return 1; done
  rc_node_pid "${RC_PORTS[0]}"
}
rcluster_ready() { local p; for p in "${RC_PORTS[@]}"; do rc_ping "$p" || return 1; done; }
rcluster_health() {
  rcluster_ready &&
    timeout 3 redis-cli -h 127.0.0.1 -p "${RC_PORTS[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}
# only the ports of nodes not running: the others are ours
rcluster_ports() {
  local p
  for p in "${RC_PORTS[@]}"; do
    rc_node_pid "$p" >/dev/null || echo "$p:REDIS_CLUSTER_PORT $((p + 10000)):REDIS_CLUSTER_PORT"
  done
}
rcluster_endpoint() { echo "redis://127.0.0.1:${RC_PORTS[0]}/ (+2 primaries)"; }
rcluster_logs() { local p; for p in "${RC_PORTS[@]}"; do echo "$RC_DIR/$p/redis.log"; done; }
rcluster_wipe() { local p; for p in "${RC_PORTS[@]}"; do rm -rf "${RC_DIR:?}/$p"; done; }
rcluster_launch() {
  local p d
  for p in "${RC_PORTS[@]}"; do
    rc_node_pid "$p" >/dev/null && continue
    d="$RC_DIR/$p"
    mkdir -p "$d"
    rm -f "$d/redis.pid"
    clean_exec redis-server --port "$p" --bind 127.0.0.1 --save "" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
      --appendonly yes --appendfsync always \
      --daemonize yes --pidfile "$d/redis.pid" --dir "$d" --logfile "$d/redis.log" \
      </dev/null >"$d/redis-start.log" 2>&1 || return 1
  done
}
# Form the cluster once (slots spread over the three); later starts find it in nodes.conf.
rcluster_after_start() {
  local i addrs=()
  if ! timeout 3 redis-cli -h 127.0.0.1 -p "${RC_PORTS[0]}" cluster info | grep -q '^cluster_slots_assigned:16384'; then
    for i in "${RC_PORTS[@]}"; do addrs+=("127.0.0.1:$i"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes \
      >"$RC_DIR/create.log" 2>&1 || { log "rcluster: cluster create failed"; cat "$RC_DIR/create.log" >&2; return 1; }
  fi
  for ((i = 0; i < 300; i++)); do rcluster_health && return 0; sleep 0.1; done
  log "rcluster: cluster_state is not ok after 30 s"
  return 1
}
rcluster_stop() {
  local p pid
  for p in "${RC_PORTS[@]}"; do
    if pid=$(rc_node_pid "$p"); then stop_pid "rcluster:$p" "$pid" 20; fi
  done
}
# down with some nodes already gone
rcluster_stop_any() {
  local p
  for p in "${RC_PORTS[@]}"; do rc_node_pid "$p" >/dev/null && { rcluster_stop; return 0; }; done
  return 1
}

# ---------------------------------------------------------------- mongo (secantusd-rs)
SECANTUS_ROOT="$SERVICES_HOME/secantus-$SECANTUS_VERSION"
SECANTUS_BIN="$SECANTUS_ROOT/bin/secantusd-rs"
MONGO_DIR="$RUN_ROOT/mongo"
MONGO_PIDFILE="$MONGO_DIR/mongo.pid"
MONGO_LOG="$MONGO_DIR/mongo.log"

mongo_install() {
  if [[ -x "$SECANTUS_BIN" ]] && "$SECANTUS_BIN" --version 2>/dev/null | grep -qF "$SECANTUS_VERSION"; then
    INSTALL_NOTE=cached; return 0
  fi
  command -v cargo >/dev/null 2>&1 || { log "mongo: cargo is needed to build secantusd-rs"; return 1; }
  command -v cmake >/dev/null 2>&1 || apt_install cmake make gcc g++   # WiredTiger is built with CMake
  mkdir -p "$SECANTUS_ROOT"
  log "mongo: cargo install secantus-mdb $SECANTUS_VERSION into $SECANTUS_ROOT (about 10 min on 2 cores; log $SECANTUS_ROOT/install.log)"
  # The crate declares rust-version 1.98 but builds with 1.95: --ignore-rust-version.
  # LTO off + 16 codegen units: much faster build, no practical difference for a dev server.
  if ! CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
      CARGO_TARGET_DIR="$SECANTUS_ROOT/build" \
      cargo install secantus-mdb --version "$SECANTUS_VERSION" --locked --ignore-rust-version \
        --root "$SECANTUS_ROOT" >"$SECANTUS_ROOT/install.log" 2>&1; then
    tail -n 30 "$SECANTUS_ROOT/install.log" >&2
    return 1
  fi
  rm -rf "$SECANTUS_ROOT/build"
  INSTALL_NOTE=installed
}

# One admin command over OP_MSG, its fields as name=integer arguments (python3 stdlib only):
# exit 0 iff the reply has ok: 1 (1: refused, 2: no answer).
mongo_admin() {
  "$PY" - "$MONGO_PORT" "$@" <<'PY'
import socket, struct, sys
port, fields = int(sys.argv[1]), [a.split("=", 1) for a in sys.argv[2:]]
def cstr(s): return s.encode() + b"\x00"
body = b"".join(b"\x10" + cstr(k) + struct.pack("<i", int(v)) for k, v in fields)
db = b"admin\x00"; body += b"\x02" + cstr("$db") + struct.pack("<i", len(db)) + db
doc = struct.pack("<i", len(body) + 5) + body + b"\x00"
msg = struct.pack("<I", 0) + b"\x00" + doc
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.settimeout(5)
    s.sendall(struct.pack("<iiii", 16 + len(msg), 1, 0, 2013) + msg)
    buf = b""
    while len(buf) < 4 or len(buf) < struct.unpack("<i", buf[:4])[0]:
        c = s.recv(65536)
        if not c: break
        buf += c
except OSError:
    sys.exit(2)
ok = (b"\x01ok\x00" + struct.pack("<d", 1.0)) in buf or b"\x10ok\x00\x01\x00\x00\x00" in buf
if not ok and fields[0][0] != "ping":
    print("mongo: %s refused: %r" % (fields[0][0], buf[:300]), file=sys.stderr)
sys.exit(0 if ok else 1)
PY
}
mongo_health() { mongo_admin ping=1 2>/dev/null; }
# A worker killed between a transaction's update and its commit leaves the transaction open,
# and its documents locked to every other writer, until the server gives up on it: after
# transactionLifetimeLimitSeconds, MongoDB's default 60 (measured here: a rebuild resumed
# after a kill -9 retried WriteConflict for 60 s). The worker's transactions take
# milliseconds, and one the server cuts short is retried. `projector doctor` checks it.
MONGO_TRANSACTION_LIFETIME_SECS="${MONGO_TRANSACTION_LIFETIME_SECS:-5}"
mongo_after_start() {
  mongo_admin setParameter=1 "transactionLifetimeLimitSeconds=$MONGO_TRANSACTION_LIFETIME_SECS"
}
mongo_pidfile() { echo "$MONGO_PIDFILE"; }
mongo_pid() { pid_from_file "$MONGO_PIDFILE" secantusd-rs; }
mongo_ports() { echo "$MONGO_PORT:MONGO_PORT"; }
mongo_endpoint() { echo "mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"; }
mongo_logs() { echo "$MONGO_LOG"; }
mongo_wipe() { rm -rf "$MONGO_DIR/data"; }
mongo_launch() {
  mkdir -p "$MONGO_DIR/data"
  # --log-file-max 16MB: WiredTiger pre-allocates its WAL file; the 128MB default wastes disk.
  # --sync-on-commit: without it the server acknowledges `j: true` writes before its log is
  # on disk, and a kill -9 loses the last few hundred ms of them (measured: 30 of 500
  # acknowledged updates reverted). The worker commits offsets after that acknowledgement.
  spawn "$MONGO_PIDFILE" "$MONGO_LOG" "$SECANTUS_BIN" --host 127.0.0.1 --port "$MONGO_PORT" \
    --storage-path "$MONGO_DIR/data" --cache-size 512M --log-file-max 16MB --log-level WARNING \
    --sync-on-commit
}
mongo_stop() { stop_pid mongo "$1" 30; }

# ---------------------------------------------------------------- clickhouse (chdb-core)
CH_SITE="$SERVICES_HOME/chdb-core-$CHDB_VERSION"
CH_DIR="$RUN_ROOT/clickhouse"
CH_PIDFILE="$CH_DIR/clickhouse.pid"
CH_URL="http://127.0.0.1:$CLICKHOUSE_HTTP_PORT"

clickhouse_install() {
  if [[ -f "$CH_SITE/.complete" && -f "$CH_SITE/chdb/_chdb.abi3.so" ]]; then
    INSTALL_NOTE=cached; return 0
  fi
  if ! "$PY" -m pip --version >/dev/null 2>&1; then apt_install python3-pip; fi
  log "clickhouse: pip install chdb-core==$CHDB_VERSION into $CH_SITE (~180 MB)"
  rm -rf "$CH_SITE"
  # --no-deps: the engine needs none of chdb's Python dependencies (numpy/pandas/pyarrow)
  with_retries "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-cache-dir --no-deps --target "$CH_SITE" "chdb-core==$CHDB_VERSION"
  touch "$CH_SITE/.complete"
  INSTALL_NOTE=installed
}

ch_query() { # ch_query SQL -> stdout
  if command -v curl >/dev/null 2>&1; then
    curl -sS -m 10 --fail-with-body "$CH_URL/" --data-binary "$1"
  else
    "$PY" -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], data=sys.argv[2].encode(), timeout=10).read().decode(), end="")' "$CH_URL/" "$1"
  fi
}
# http_get URL -> the body on stdout (2 s limit; curl, else Python's stdlib)
http_get() {
  if command -v curl >/dev/null 2>&1; then
    curl -s -m 2 "$1" 2>/dev/null
  else
    "$PY" -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=2).read().decode(), end="")' "$1" 2>/dev/null
  fi
}
clickhouse_health() {
  local pong
  pong=$(http_get "$CH_URL/ping") || return 1
  [[ "$pong" == "Ok." ]] || return 1
  [[ -n "$(ch_query 'SELECT version()' 2>/dev/null)" ]] && port_open "$CLICKHOUSE_TCP_PORT"
}
clickhouse_pidfile() { echo "$CH_PIDFILE"; }
clickhouse_pid() { pid_from_file "$CH_PIDFILE" chdb_server.py; }
clickhouse_ports() { echo "$CLICKHOUSE_HTTP_PORT:CLICKHOUSE_HTTP_PORT $CLICKHOUSE_TCP_PORT:CLICKHOUSE_TCP_PORT"; }
clickhouse_endpoint() { echo "$CH_URL (native tcp 127.0.0.1:$CLICKHOUSE_TCP_PORT)"; }
clickhouse_logs() { echo "$CH_DIR/stdout.log" "$CH_DIR/server.err.log"; }
clickhouse_wipe() { rm -rf "$CH_DIR/data"; }
clickhouse_launch() {
  mkdir -p "$CH_DIR/data" "$CH_DIR/conf"
  # chdb-core ships the ClickHouse engine (clickhouse-local); since 26.7 it can open the
  # server's own HTTP and native TCP listeners. The launcher keeps one sleeping query running
  # so the process serves until it is stopped. Never run an unfiltered KILL QUERY against it.
  cat >"$CH_DIR/chdb_server.py" <<'EOF'
"""Serve a real ClickHouse HTTP + native TCP endpoint from the chdb-core wheel.
usage: python3 chdb_server.py CONF_DIR DATA_DIR   (CONF_DIR/config.xml: ports, listen_host, logs)"""
import os, sys, tempfile
conf_dir, data_dir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
os.makedirs(data_dir, exist_ok=True)
# `import chdb` opens a throw-away in-memory engine that would also read ./config.xml:
# import from a neutral directory, then switch to CONF_DIR for the serving engine.
os.chdir(tempfile.gettempdir())
import chdb._chdb as _chdb
os.chdir(conf_dir)
r = _chdb.query(
    "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
    "SELECT sleepEachRow(1) FROM system.numbers FORMAT Null SETTINGS max_block_size = 1",
    # this format becomes the server's default output format (clickhouse-server: TabSeparated)
    "TabSeparated", path=data_dir)
print("chdb server stopped:", r.error_message(), file=sys.stderr)
sys.exit(1)
EOF
  cat >"$CH_DIR/conf/config.xml" <<EOF
<clickhouse>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CLICKHOUSE_HTTP_PORT</http_port>
    <tcp_port>$CLICKHOUSE_TCP_PORT</tcp_port>
    <log-level>warning</log-level>
    <logger>
        <log>$CH_DIR/server.log</log>
        <errorlog>$CH_DIR/server.err.log</errorlog>
    </logger>
    <!-- The Kafka table engine (the benchmark's peer): the local broker ignores fetch size
         limits, so allow large fetch responses. -->
    <kafka>
        <receive_message_max_bytes>1000000000</receive_message_max_bytes>
    </kafka>
</clickhouse>
EOF
  spawn "$CH_PIDFILE" "$CH_DIR/stdout.log" env PYTHONPATH="$CH_SITE" \
    "$PY" "$CH_DIR/chdb_server.py" "$CH_DIR/conf" "$CH_DIR/data"
}
clickhouse_after_start() { ch_query "CREATE DATABASE IF NOT EXISTS $CLICKHOUSE_DB" >/dev/null; }
clickhouse_stop() { stop_pid clickhouse "$1" 15; }

# ---------------------------------------------------------------- prometheus (Debian's package)
# Not in the default set. Everything it reads and writes is under the run root: its config
# (scrape and rule evaluation every second, targets from file_sd), the rules (a copy of the
# shipped ones, which a test may rewrite and reload) and its TSDB. The package's own service
# (:9090) is never started or relied on.
PROM_DIR="$RUN_ROOT/prometheus"
PROM_PIDFILE="$PROM_DIR/prometheus.pid"
PROM_CONFIG="$PROM_DIR/prometheus.yml"
PROM_URL="http://127.0.0.1:$PROMETHEUS_PORT"
PROM_BIN=/usr/bin/prometheus

prometheus_install() {
  INSTALL_NOTE=cached
  [[ -x $PROM_BIN ]] && return 0
  # The package's maintainer scripts start (and enable) its own instance on :9090: deny
  # service starts while it installs, through a policy-rc.d of our own unless one is there
  # already (container images ship one that denies every start).
  local policy=/usr/sbin/policy-rc.d ours=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# scripts/services.sh, while installing prometheus: start no service\nexit 101\n' \
      | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    ours=1
  fi
  apt_install prometheus || rc=$?
  if (( ours )); then as_root rm -f "$policy"; fi
  (( rc == 0 )) || return "$rc"
  # An enabled unit would still start at the next boot.
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  [[ -x $PROM_BIN ]] || { log "prometheus: $PROM_BIN not found after the install"; return 1; }
  INSTALL_NOTE=installed
}

prometheus_health() {
  local body
  body=$(http_get "$PROM_URL/-/ready") || return 1
  [[ $body == *Ready* ]]
}
prometheus_pidfile() { echo "$PROM_PIDFILE"; }
# Its config path is in its command line: never the package's own instance, nor another run root's.
prometheus_pid() { pid_from_file "$PROM_PIDFILE" "$PROM_CONFIG"; }
prometheus_ports() { echo "$PROMETHEUS_PORT:PROMETHEUS_PORT"; }
prometheus_endpoint() { echo "$PROM_URL (targets: $PROM_DIR/targets/*.json)"; }
prometheus_logs() { echo "$PROM_DIR/prometheus.log"; }
prometheus_wipe() { rm -rf "$PROM_DIR/data"; }
prometheus_launch() {
  mkdir -p "$PROM_DIR/data" "$PROM_DIR/targets" "$PROM_DIR/rules"
  cp "$REPO_ROOT/deploy/prometheus/alerts.yml" "$PROM_DIR/rules/alerts.yml"
  # scrape_timeout may not exceed the interval (its default is 10 s).
  cat >"$PROM_CONFIG" <<EOF
# written by scripts/services.sh on every start
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $PROM_DIR/rules/*.yml
scrape_configs:
  - job_name: projector
    file_sd_configs:
      - files: ["$PROM_DIR/targets/*.json"]
        refresh_interval: 1s
EOF
  spawn "$PROM_PIDFILE" "$PROM_DIR/prometheus.log" "$PROM_BIN" \
    --config.file="$PROM_CONFIG" --storage.tsdb.path="$PROM_DIR/data" \
    --storage.tsdb.retention.time=1d --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    --web.enable-lifecycle
}
prometheus_stop() { stop_pid prometheus "$1" 30; }

# ---------------------------------------------------------------- generic driver
health_timeout() { case $1 in postgres) echo 30 ;; redis | rcluster) echo 15 ;; *) echo 60 ;; esac; }

# ready SERVICE: the server answers its protocol (postgres: before our role/database exist)
ready() { if declare -F "${1}_ready" >/dev/null; then "${1}_ready"; else "${1}_health"; fi; }

# wait_healthy SERVICE: poll the protocol check; give up early if the process died.
# "Died" is judged by the pid spawn wrote, not by ${svc}_pid: that one also matches the command
# line, which reads empty while the process is between two execve() (bash, then env, then the
# server), and CI once took a healthy ClickHouse launcher for dead that way, 153 ms in.
wait_healthy() {
  local svc=$1 deadline spawned=""
  if declare -F "${svc}_pidfile" >/dev/null; then
    spawned=$(head -n1 "$("${svc}_pidfile")" 2>/dev/null | tr -dc '0-9')
  fi
  deadline=$(( $(now_ms) + $(health_timeout "$svc") * 1000 ))
  while (( $(now_ms) < deadline )); do
    ready "$svc" && return 0
    if [[ -n $spawned ]] && ! alive "$spawned"; then
      log "$svc: process exited during start-up (pid $spawned)"
      return 1
    fi
    sleep 0.1
  done
  log "$svc: no healthy answer within $(health_timeout "$svc") s"
  return 1
}

# foreign_port SERVICE: print "PORT (VAR)" of the first port already in use, else fail
foreign_port() {
  local p
  for p in $("${1}_ports"); do
    if port_open "${p%%:*}"; then echo "${p%%:*} (set ${p#*:} to use another port)"; return 0; fi
  done
  return 1
}

START_NOTE=""
start_service() {
  local svc=$1 pid busy fresh_var="${1^^}_FRESH"
  if pid=$("${svc}_pid"); then
    if [[ "${!fresh_var:-0}" == 1 ]]; then
      log "$svc: $fresh_var=1: stopping pid $pid to start with empty data"
      "${svc}_stop" "$pid"
    elif ready "$svc"; then
      START_NOTE="already running, pid $pid"
      return 0
    else
      log "$svc: pid $pid is alive but does not answer; restarting it"
      "${svc}_stop" "$pid"
    fi
  fi
  # A server we just stopped may hold its port a moment longer (or a child of it does).
  local i
  for ((i = 0; i < 100; i++)); do foreign_port "$svc" >/dev/null || break; sleep 0.1; done
  if busy=$(foreign_port "$svc"); then
    log "$svc: port $busy is already served by a process that services.sh did not start; stop it first"
    START_NOTE="port conflict"
    return 1
  fi
  if [[ "${!fresh_var:-0}" == 1 ]]; then log "$svc: $fresh_var=1: wiping its data"; "${svc}_wipe"; fi
  "${svc}_launch" || return 1
  wait_healthy "$svc" || return 1
  START_NOTE="started, pid $("${svc}_pid" || echo '?')"
}

after_start() { if declare -F "${1}_after_start" >/dev/null; then "${1}_after_start"; fi; }

print_logs() {
  local f
  for f in $("${1}_logs"); do
    [[ -s "$f" ]] || continue
    echo "----- tail of $f" >&2
    tail -n 25 "$f" >&2
  done
}

cmd_up() {
  local svc t0 t1 t2 failed=() ok=()
  for svc in "$@"; do
    INSTALL_NOTE="" START_NOTE=""
    t0=$(now_ms)
    if ! "${svc}_install"; then
      out "$(printf '%-10s FAILED to install (after %d ms)' "$svc" $(( $(now_ms) - t0 )))"
      failed+=("$svc"); continue
    fi
    t1=$(now_ms)
    if start_service "$svc" && after_start "$svc" && "${svc}_health"; then
      t2=$(now_ms)
      out "$(printf '%-10s up    %-52s install %6d ms (%s)  start %6d ms (%s)' "$svc" "$("${svc}_endpoint")" \
        $(( t1 - t0 )) "$INSTALL_NOTE" $(( t2 - t1 )) "$START_NOTE")"
      ok+=("$svc")
    else
      t2=$(now_ms)
      out "$(printf '%-10s FAILED to start after %d ms (%s)' "$svc" $(( t2 - t1 )) "${START_NOTE:-no healthy answer}")"
      [[ $START_NOTE == "port conflict" ]] || print_logs "$svc"
      failed+=("$svc")
    fi
  done
  if (( ${#failed[@]} )); then
    out "FAILED: ${failed[*]}${ok[*]:+ (up: ${ok[*]})}"
    return 1
  fi
  out "all up: ${ok[*]} (data, logs and pid files in $RUN_ROOT)"
}

cmd_install() {
  local svc t0 failed=()
  for svc in "$@"; do
    INSTALL_NOTE="" t0=$(now_ms)
    if "${svc}_install"; then
      out "$(printf '%-10s install %6d ms (%s)' "$svc" $(( $(now_ms) - t0 )) "$INSTALL_NOTE")"
    else
      out "$(printf '%-10s install FAILED' "$svc")"; failed+=("$svc")
    fi
  done
  (( ${#failed[@]} == 0 )) || { out "FAILED: ${failed[*]}"; return 1; }
}

cmd_down() {
  local svc pid busy i
  for ((i = $# ; i >= 1; i--)); do   # reverse order
    svc=${!i}
    if pid=$("${svc}_pid"); then
      "${svc}_stop" "$pid"
      out "$(printf '%-10s stopped (pid %s)' "$svc" "$pid")"
    elif declare -F "${svc}_stop_any" >/dev/null && "${svc}_stop_any"; then
      out "$(printf '%-10s stopped (the nodes still running)' "$svc")"
    elif busy=$(foreign_port "$svc"); then
      out "$(printf '%-10s not started by services.sh; port %s is served by another process (left alone)' "$svc" "${busy%% *}")"
    else
      out "$(printf '%-10s not running' "$svc")"
    fi
    if declare -F "${svc}_pidfile" >/dev/null && ! "${svc}_pid" >/dev/null; then
      rm -f "$("${svc}_pidfile")"   # stale
    fi
  done
}

cmd_status() {
  local svc pid down=()
  for svc in "$@"; do
    if "${svc}_health"; then
      if pid=$("${svc}_pid"); then
        out "$(printf '%-10s up    %-52s pid %s' "$svc" "$("${svc}_endpoint")" "$pid")"
      else
        out "$(printf '%-10s up    %-52s (not started by services.sh)' "$svc" "$("${svc}_endpoint")")"
      fi
    else
      out "$(printf '%-10s down  %s' "$svc" "$("${svc}_endpoint")")"
      down+=("$svc")
    fi
  done
  (( ${#down[@]} == 0 )) || { out "down: ${down[*]}"; return 1; }
}

cmd_env() {
  echo "export PROJECTOR_KAFKA__BROKERS='127.0.0.1:$KAFKA_PORT'"
  echo "export PROJECTOR_POSTGRES__URL='postgres://$PG_ROLE@127.0.0.1:$POSTGRES_PORT/$PG_DATABASE'"
  echo "export PROJECTOR_REDIS__URL='redis://127.0.0.1:$REDIS_PORT/'"
  echo "# Redis Cluster instead (scripts/services.sh up rcluster):"
  echo "#   PROJECTOR_REDIS__CLUSTER=true PROJECTOR_REDIS__URL='redis://127.0.0.1:${RC_PORTS[0]}/,redis://127.0.0.1:${RC_PORTS[1]}/,redis://127.0.0.1:${RC_PORTS[2]}/'"
  echo "export PROJECTOR_MONGO__URI='mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true'"
  echo "export PROJECTOR_CLICKHOUSE__URL='$CH_URL'"
  echo "# Prometheus (scripts/services.sh up prometheus): $PROM_URL, targets in $PROM_DIR/targets/*.json"
}

usage() {
  echo "usage: $0 [up|down|status|install|env|pid] [${ALL_SERVICES[*]} ${EXTRA_SERVICES[*]}]" >&2
  exit 2
}

main() {
  local cmd=${1:-status}
  [[ $# -gt 0 ]] && shift
  local svc s known
  for svc in "$@"; do
    known=0
    for s in "${ALL_SERVICES[@]}" "${EXTRA_SERVICES[@]}"; do [[ $svc == "$s" ]] && known=1; done
    (( known )) || { log "unknown service: $svc"; usage; }
  done
  (( $# )) || set -- "${ALL_SERVICES[@]}"
  case $cmd in
    up | down | install)
      mkdir -p "$RUN_ROOT" "$SERVICES_HOME"
      # one up/down/install at a time (servers are started without this descriptor)
      exec 9>"$RUN_ROOT/.lock"
      flock -w 1800 9 || { log "another services.sh is still running"; exit 1; }
      "cmd_$cmd" "$@" ;;
    status) cmd_status "$@" ;;
    pid)
      for svc in "$@"; do echo "$svc $("${svc}_pid" || echo -)"; done ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *) log "unknown command: $cmd"; usage ;;
  esac
}

main "$@"
