#!/usr/bin/env bash
# Checks the operations files: the Kubernetes manifests against the Kubernetes API schemas
# (kubernetes-validate, from PyPI) and the Prometheus alert rules (promtool, from Debian's
# prometheus package, unpacked: nothing is installed system-wide or started). The tools live
# under .services/tools.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=.services/tools
mkdir -p "$TOOLS"
if ! "$TOOLS/venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0'
fi
if [ ! -x "$TOOLS/prometheus/usr/bin/promtool" ]; then
  (
    cd "$TOOLS"
    apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
    dpkg -x prometheus_*.deb prometheus
    rm -f prometheus_*.deb
  )
fi

# Every manifest but the kustomization itself (not a Kubernetes resource).
"$TOOLS/venv/bin/kubernetes-validate" --strict --quiet \
  $(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
echo "[ops-check] Kubernetes manifests valid against the 1.37 schemas"
"$TOOLS/prometheus/usr/bin/promtool" check rules deploy/prometheus/alerts.yml
"$TOOLS/prometheus/usr/bin/promtool" check config --syntax-only deploy/prometheus/prometheus.yml
python3 -c 'import json,sys; json.load(open("deploy/grafana/dashboards/projector.json"))'
echo "[ops-check] alert rules, Prometheus config and dashboard JSON valid"
