#!/usr/bin/env bash
# Create .venv and install kdfast with its test tools and the on-device runtimes CI tests (OpenVINO,
# ExecuTorch). torch/torchvision are pinned to the pair that imports together (and that this machine's pip
# takes from local disk); everything else comes from PyPI. LiteRT (extra "litert") is left out: ~1 GB of
# jax/transformers, and it caps typing-extensions; its tests skip without it.
# Each step announces itself in one line; pip's own progress follows.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="dev,openvino,executorch"
step() { printf '\n[setup %s] %s\n' "$1" "$2"; }
step 1/4 "creating .venv with $(python3 --version)"
python3 -m venv .venv
step 2/4 "upgrading pip"
.venv/bin/python -m pip install --upgrade pip
step 3/4 "installing torch 2.14.1 and torchvision 0.29.1 (about 1 GB: a minute or more)"
.venv/bin/python -m pip install "torch==2.14.1" "torchvision==0.29.1"
step 4/4 "installing kdfast[$EXTRAS] (editable): timm, ONNX, ONNX Runtime, Triton, OpenVINO, ExecuTorch, test tools"
.venv/bin/python -m pip install -e ".[$EXTRAS]"
.venv/bin/python - <<'PY'
from importlib.metadata import version
names = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "openvino", "executorch")
print("\n[setup] installed " + ", ".join(f"{n} {version(n)}" for n in names))
PY
printf '[setup] done: .venv/bin/python -m kdfast.train distills the embedded default\n'
