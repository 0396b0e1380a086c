#!/usr/bin/env bash
# Screenshot a gnr run in the MLflow UI with headless Chromium: starts `mlflow server` on loopback,
# runs a tiny demo training that logs (and registers) its model, then saves PNGs of the experiment
# page, the run page and the run's system-metrics tab under OUT (default ./screenshots), opened with
# the links gnr prints (model-training views), and the experiment page without them
# (experiment-plain.png: MLflow 3.17's per-browser default).
#
#   apt-get install -y chromium          # Debian; or point CHROMIUM at another Chrome/Chromium binary
#   scripts/screenshot-run.sh [OUT]
#
# Not part of the test suite (that must not depend on a browser).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-screenshots}" && cd "${1:-screenshots}" && pwd)
BIN=${GNR_BIN:-$ROOT/.venv/bin}
CHROMIUM=${CHROMIUM:-chromium}
STEPS=${STEPS:-30}
WORK=$(mktemp -d)
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URI="http://127.0.0.1:$PORT"

"$BIN/mlflow" server --host 127.0.0.1 --port "$PORT" --workers 1 --backend-store-uri "sqlite:///$WORK/mlflow.db" \
  --artifacts-destination "$WORK/artifacts" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 240); do curl -sf "$URI/health" > /dev/null && break; sleep 0.5; done
curl -sf "$URI/health" > /dev/null || { tail -20 "$WORK/server.log"; exit 1; }

# A sample every second, so that a short run has a few points on its system-metrics charts.
GNR_HOME="$WORK/home" MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  "$BIN/gnr" train gradnorm --max-steps "$STEPS" --tracking-uri "$URI" --experiment screenshot \
  --register gnr-demo --json > "$WORK/summary.json"
read -r RUN EXP < <("$BIN/python" -c '
import json, sys
from mlflow import MlflowClient
run_id = json.load(open(sys.argv[1]))["run_id"]
print(run_id, MlflowClient(sys.argv[2]).get_run(run_id).info.experiment_id)' "$WORK/summary.json" "$URI")

VIEW=$("$BIN/python" -c 'from gnr.tracking import UI_VIEW; print(UI_VIEW)')

shoot() {  # URL PNG [HEIGHT]
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d -p "$WORK")" --hide-scrollbars \
    --window-size=1400,"${3:-1000}" --virtual-time-budget="${BUDGET_MS:-20000}" --screenshot="$2" "$1" \
    2> "$WORK/chromium.log" || { tail -5 "$WORK/chromium.log"; exit 1; }
  echo "$2  <-  $1"
}
shoot "$URI/#/experiments/$EXP$VIEW" "$OUT/experiment.png"
shoot "$URI/#/experiments/$EXP" "$OUT/experiment-plain.png"
shoot "$URI/#/experiments/$EXP/runs/$RUN$VIEW" "$OUT/run.png" 2400
shoot "$URI/#/experiments/$EXP/runs/$RUN/system-metrics$VIEW" "$OUT/system-metrics.png"
