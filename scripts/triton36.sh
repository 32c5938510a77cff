#!/usr/bin/env bash
# The GPU machine's Triton (3.6) beside the project's environment, for CI's compile check and kernel tests under
# it: `pip install --no-deps --target .triton36 triton==3.6.0` (one wheel, ~190 MB; nothing else). With
# PYTHONPATH=.triton36 in front, .venv's Python imports Triton 3.6 instead of its own 3.8 and keeps .venv's torch
# 2.14: the compile check needs torch only to run the ops' launch code on CPU tensors (no torch.compile, none of
# torch's own Triton integration), and torch 2.11, the GPU machine's, would add several GB of CUDA wheels.
#
#   bash scripts/triton36.sh                                              # once: creates .triton36/
#   PYTHONPATH=.triton36:. .venv/bin/python bench/compile_targets.py --check
#   PYTHONPATH=.triton36:. .venv/bin/python -m pytest -q tests/kernels
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -f .triton36/triton/__init__.py ]; then
    printf '[triton36] installing triton 3.6.0 into .triton36 (one wheel, about 190 MB)\n'
    rm -rf .triton36.partial
    "$PY" -m pip install --quiet --no-deps --target .triton36.partial "triton==3.6.0"
    mv .triton36.partial .triton36
fi
PYTHONPATH=.triton36 "$PY" -c "
import sys, triton
if not triton.__version__.startswith('3.6.'):
    sys.exit(f'.triton36 holds Triton {triton.__version__}, not 3.6: remove the folder and run this again')
print(f'[triton36] Triton {triton.__version__} from {triton.__file__}')
"
