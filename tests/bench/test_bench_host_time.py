"""bench/test_host_time.py runs every case (op x path x mode) on this machine: the launch paths it stubs
follow the kernels' current signatures, and the floor row is built for every op."""

from __future__ import annotations

import re
from pathlib import Path

from support.devices import run_without_interpreter

ROOT = Path(__file__).resolve().parents[2]


def test_host_time_benchmark_runs_every_case():
    # Without the interpreter: the benchmark times Triton's compiled-kernel launch path (binder, key, grid).
    args = ["-m", "pytest", "bench/test_host_time.py", "-q", "-p", "no:cacheprovider", "--benchmark-disable"]
    done = run_without_interpreter(args, ROOT)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    # 5 ops x (triton, custom_op, reference, floor, + pytorch-msssim for the hybrid loss) x 2 modes.
    assert passed and int(passed.group(1)) == 42 and "skipped" not in summary, summary
