#!/usr/bin/env bash
# scripts/install-deps.sh: install what a fresh Debian 12 machine lacks to build and test the
# projector: Debian packages (PostgreSQL 15 server, Redis, cmake + libcurl headers for rdkafka,
# compilers, curl, python venv support) and cargo-nextest. Idempotent; when everything is
# present it only checks (no apt-get update, well under a second).
# The servers themselves are installed and started by scripts/services.sh.
set -euo pipefail

log() { echo "[install-deps] $*"; }
as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else log "need root (or sudo) for: $*"; return 1; fi
}
have() { command -v "$1" >/dev/null 2>&1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
need_postgres=0
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_postgres=1
{ have redis-server && have redis-cli; } || missing+=(redis-server)
have cmake || missing+=(cmake)
have pkg-config || missing+=(pkg-config)
installed libcurl4-openssl-dev || missing+=(libcurl4-openssl-dev)
{ have cc && have c++ && have make; } || missing+=(build-essential)
have curl || missing+=(curl)
if ! have python3; then
  missing+=(python3 python3-venv python3-pip)
else
  # scripts/services.sh needs `python3 -m venv` (with ensurepip) and `python3 -m pip`
  tmp=$(mktemp -d)
  if ! { python3 -c 'import ensurepip' 2>/dev/null && python3 -m venv --without-pip "$tmp/v" >/dev/null 2>&1; }; then
    missing+=(python3-venv)
  fi
  rm -rf "$tmp"
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
fi

if (( ${#missing[@]} + need_postgres )); then
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get update"
  as_root apt-get update -qq
  if (( need_postgres )); then
    # Debian 12 ships PostgreSQL 15; elsewhere take the distribution's default version
    if apt-cache show postgresql-15 >/dev/null 2>&1; then missing+=(postgresql-15); else missing+=(postgresql); fi
  fi
  log "apt-get install ${missing[*]}"
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages: all present"
fi

if ! have cargo; then
  log "cargo not found: install Rust with rustup (https://rustup.rs), then re-run"
  exit 1
fi
if cargo nextest --version >/dev/null 2>&1; then
  log "cargo-nextest: $(cargo nextest --version | head -n1)"
else
  log "cargo install --locked cargo-nextest"
  cargo install --locked cargo-nextest
fi
