#!/usr/bin/env bash
# One prepared GPU check, run as is on a lent GPU machine (at most 8 minutes):
#   bash benchmarks/gpu_check.sh            # full: synthesis, train steps fp32/bf16 at 256 px,
#                                           # bundle inference, calibration, a 20gpu-m search
#   bash benchmarks/gpu_check.sh --smoke    # the same stages on the CPU at tiny sizes (~2-3 min)
# Results: one JSON ($OUT/gpu_check.json when $OUT is set, else ./gpu_check.json; --out FILE),
# stage logs beside it (<json>.logs/). Exit status 0 only when every stage passed.
# Stages and their sizes: benchmarks/gpu_check.py. GPU_CHECK_BUDGET overrides the search's
# 20gpu-m; PYTHON the interpreter (default: the checkout's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The full check must end inside 8 minutes: the driver's deadline is 465 s, and this is the
# backstop should the driver itself hang (SIGINT: it still writes its JSON). A smoke run on
# a shared CPU gets more (its deadline is 600 s).
limit=468
for arg in "$@"; do if [ "$arg" = --smoke ]; then limit=660; fi; done
exec timeout --signal=INT --kill-after=8 "$limit" "$PYTHON" benchmarks/gpu_check.py --python "$PYTHON" "$@"
