#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200, under 9 minutes): the environment, `pytest -m gpu`, the headline
# kernel benchmarks, the AGKD paper-pair training step eager vs compiled, `python -m export.trt` of a student
# and one epoch of `python -m kdfast.train --qad` on it; each result written to OUTDIR as soon as it exists,
# OUTDIR/RESULTS.md rendered after every step and a summary table printed last. `--dry-run` runs the same driver on CPU at tiny shapes (CI does).
#
#   bash bench/gpu.sh [--dry-run] OUTDIR
#
# Uses the Python on PATH (or $PYTHON); installs nothing. The steps are in bench/gpu_run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_run.py "$@"
