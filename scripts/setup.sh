#!/usr/bin/env bash
# Create .venv and install kdfast with its test tools and the on-device runtimes CI tests (OpenVINO,
# ExecuTorch). torch/torchvision are pinned to the pair that imports together (and that this machine's pip
# takes from local disk); everything else comes from PyPI. LiteRT (extra "litert") is left out: ~1 GB of
# jax/transformers, and it caps typing-extensions; its tests skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="dev,openvino,executorch"
echo "setup: creating .venv"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "setup: installing torch==2.14.1 torchvision==0.29.1"
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
echo "setup: installing kdfast[$EXTRAS] (editable)"
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
.venv/bin/python - <<'PY'
from importlib.metadata import version
names = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "openvino", "executorch")
print("setup: installed " + ", ".join(f"{n} {version(n)}" for n in names))
PY
