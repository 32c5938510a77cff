#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200; an 8-minute plan inside a 10-minute call): QAD and the export
# first (no compilation), then the headline kernel benchmarks, `pytest -m gpu` and the AGKD paper-pair training
# step eager vs compiled; the plan is printed first, each result written to OUTDIR as soon as it exists,
# OUTDIR/RESULTS.md rendered after every step and a summary table printed last. `--dry-run` runs the same plan
# on CPU at tiny shapes (CI does).
#
#   bash bench/gpu.sh [--dry-run] OUTDIR
#
# Uses python3 (or $PYTHON); installs nothing into it: pytorch-msssim (the hybrid loss's baseline, absent on the
# GPU machine) travels as a wheel in bench/wheels/ and is unpacked into a temporary folder put on PYTHONPATH
# (a pure-Python wheel is a zip: no pip, no network). The steps are in bench/gpu_run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extra="$(mktemp -d "${TMPDIR:-/tmp}/kdfast-gpu-wheels.XXXXXX")"
trap 'rm -rf "$extra"' EXIT
for wheel in bench/wheels/*.whl; do
    "$PY" -m zipfile -e "$wheel" "$extra"
done
PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu_run.py "$@"
