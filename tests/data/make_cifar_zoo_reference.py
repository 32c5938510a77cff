"""Write ``cifar_zoo_reference.json`` by running the reference, mdistiller's ``mdistiller/models/cifar``.

    python tests/data/make_cifar_zoo_reference.py /path/to/mdistiller

For each model: the parameter count, the state dict's size and name/shape hash, and the logits and features
(``feats``, ``preact_feats``, ``pooled_feat``, keyed as kdfast's ``tap_points``) on the seeded weights and
input of ``tests/support/zoo_probe.py``. Only the reference code runs here; kdfast is not imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.zoo_probe import fingerprint, layout_sha256, probe_input, seeded_state  # noqa: E402

# kdfast name -> (reference file, reference builder)
MODELS = {
    **{f"resnet{d}": ("resnet", f"resnet{d}") for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ("resnet", "resnet8x4"),
    "resnet32x4": ("resnet", "resnet32x4"),
    **{name: ("wrn", name) for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{f"vgg{d}": ("vgg", f"vgg{d}_bn") for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": ("mobilenetv2", "mobile_half"),
    "ShuffleV1": ("ShuffleNetv1", "ShuffleV1"),
    "ShuffleV2": ("ShuffleNetv2", "ShuffleV2"),
}


def _module(folder: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"reference_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(mdistiller: Path) -> None:
    folder = mdistiller / "mdistiller" / "models" / "cifar"
    out = {}
    for name, (file, builder) in MODELS.items():
        with contextlib.redirect_stdout(io.StringIO()):  # mobile_half prints its settings
            model = getattr(_module(folder, file), builder)(num_classes=100)
        state = model.state_dict()
        entry = {"params": sum(p.numel() for p in model.parameters()), "state_entries": len(state)}
        entry["state_sha256"] = layout_sha256(state)
        model.load_state_dict(seeded_state(state))
        model.eval()
        with torch.no_grad():
            logits, feats = model(probe_input())
        taps = {f"feat{i}": f for i, f in enumerate(feats["feats"])}
        taps |= {f"preact{i}": f for i, f in enumerate(feats.get("preact_feats", [])) if i > 0}
        taps["embedding"] = feats["pooled_feat"]
        entry["logits"] = fingerprint(logits)
        entry["taps"] = {key: fingerprint(value) for key, value in taps.items()}
        out[name] = entry
    lines = ",\n".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in out.items())
    (Path(__file__).parent / "cifar_zoo_reference.json").write_text("{\n" + lines + "\n}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
