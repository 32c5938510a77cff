"""kdfast.spec sits below the config loader and the method registry: importing it, or the registry, loads
neither the config loader nor any method, so no module depends on which of them is imported first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.startswith('kdfast'))))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return set(done.stdout.split())


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("kdfast.spec", {"kdfast", "kdfast.spec"}),
        (
            "kdfast.methods.registry",
            {"kdfast", "kdfast.spec", "kdfast.errors", "kdfast.schema"}
            | {"kdfast.methods", "kdfast.methods.registry"},
        ),
    ],
)
def test_the_building_blocks_load_nothing_above_them(module, allowed):
    assert _loaded_after(module) <= allowed


def test_the_config_and_the_registry_share_one_tap_and_one_method_type():
    from kdfast import config, spec
    from kdfast.methods import kd, registry

    assert config.TapConfig is spec.TapConfig and registry.Method is spec.Method
    assert isinstance(kd.METHOD, spec.Method) and registry.method("kd") is kd.METHOD
