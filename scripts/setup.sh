#!/usr/bin/env bash
# Create .venv and install kdfast with its test tools. torch/torchvision are pinned to the pair that
# imports together (and that this machine's pip takes from local disk); everything else comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev]"
