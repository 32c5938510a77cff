"""The compile harness (``bench/compile_targets.py``): every Triton launch of the kernels compiles for sm_80
and sm_90 without a GPU, within the targets' limits, and ``bench/RESOURCES.md`` is what the harness writes
today. First, that the harness sees what it must: Triton's specialization rules in what it captures, and a
compile error, a shared-memory overflow and a spill in kernels written to have them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from support.devices import run_without_interpreter

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "bench" / "compile_targets.py"
PUBLIC_KERNELS = {
    "_ssim_fwd_kernel",
    "_ssim_reduce_kernel",
    "_ssim_bwd_kernel",
    "_attention_kl_fwd_kernel",
    "_attention_kl_bwd_kernel",
    "_pool_kernel",
    "_resize_normalize_kernel",
    "_attention_map_backward_kernel",
    "_resize_forward_kernel",
    "_resize_backward_kernel",
}


BAD_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def pointer_becomes_int(x_ptr, out_ptr, n, FLAG: tl.constexpr):
    """The SSIM backward bug's pattern: a name bound to a pointer, then re-bound to an integer in a loop."""
    at = x_ptr
    total = 0.0
    if FLAG:
        total += tl.load(at)
    for i in range(n):
        at = i * 2
        total += at
    tl.store(out_ptr, total)


@triton.jit
def matmul_tile(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK x BLOCK tile of A @ B: shared memory grows with BLOCK, BLOCK_K and num_stages, registers with
    BLOCK^2 / threads."""
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs[:, None] * K + (k + offs_k)[None, :])
        b = tl.load(b_ptr + (k + offs_k)[:, None] * BLOCK + offs[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)
'''

SELF_TEST = """
import json
import sys

import torch

import bad_kernels as bk
import compile_targets as ct


def main():
    # What the harness captures from the real ops follows Triton's rules: integers equal to 1 become
    # constants, multiples of 16 get divisibility 16, other integers neither; SSIM's forward keeps C free.
    capture = ct.Capture()
    capture.run_cases([
        ("n197", ct.attention_kl_case((1, 2, 197, 64))),
        ("n1024", ct.attention_kl_case((1, 2, 1024, 64))),
        ("ssim", ct.ssim_case((3, 1, 14, 14))),
    ])
    facts = {}
    for launch, cases in capture.cases.items():
        names = [name for name, _ in launch.signature]
        divisible = [names[path[0]] for path, _ in launch.attrs]
        consts = {k: str(v) for k, v in launch.named_constexprs().items()}
        facts.setdefault(launch.kernel, []).append(
            {"cases": cases, "ones": list(launch.ones), "divisible": divisible,
             "options": dict(launch.options), "constexprs": consts}
        )

    # Kernels written to break each check.
    x, out = torch.empty(64), torch.empty(64)

    def matmul(block, k, block_k, **options):
        a = torch.empty(block, k, dtype=torch.float16)
        b = torch.empty(k, block, dtype=torch.float16)
        c = torch.empty(block, block)
        return lambda: bk.matmul_tile[(1,)](a, b, c, k, BLOCK=block, BLOCK_K=block_k, **options)

    bad = ct.Capture()
    bad.run_cases([
        ("type change", lambda: bk.pointer_becomes_int[(1,)](x, out, 3, FLAG=True)),
        ("too much shared", matmul(256, 512, 128, num_stages=4, num_warps=8)),
        ("spills", matmul(128, 256, 64, num_stages=2, num_warps=1)),
    ])
    results = ct.compile_all(sorted(bad.cases), [80, 90], 1, progress=False)
    problems = ct.problems(results, bad)
    generous = ct.SpillBudget("matmul_tile", "all", lambda c: True, {80: 1 << 20, 90: 1 << 20}, "test")
    ct.SPILL_BUDGETS.append(generous)
    budgeted = ct.problems(results, bad)
    compiled = [
        {"kernel": launch.kernel, "arch": arch, "case": bad.cases[launch][0], "shared": r.shared,
         "spills": r.spill_stores, "registers": r.registers, "mma": r.tensor_cores, "error": r.error}
        for (launch, arch), r in results.items()
    ]
    print(json.dumps({"facts": facts, "problems": problems, "budgeted": budgeted, "compiled": compiled}))


if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def self_test(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("harness")
    (folder / "bad_kernels.py").write_text(textwrap.dedent(BAD_KERNELS))
    (folder / "self_test.py").write_text(
        f"import sys\nsys.path[:0] = [{str(ROOT / 'bench')!r}, {str(ROOT)!r}]\n" + SELF_TEST
    )
    done = run_without_interpreter(["self_test.py"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_capture_follows_tritons_specialization_rules(self_test):
    facts = self_test["facts"]
    fwd = {f["cases"][0]: f for f in facts["_attention_kl_fwd_kernel"] if len(f["cases"]) == 1}
    # One specialization per autotune config and per N class: 4 configs x (197 not divisible, 1024 divisible).
    assert len(facts["_attention_kl_fwd_kernel"]) == 8
    assert "N" not in fwd["n197"]["divisible"] and "N" in fwd["n1024"]["divisible"]
    assert {"s_qa_d", "s_ka_d", "s_qb_d", "s_kb_d"} <= set(fwd["n197"]["ones"])  # contiguous D: stride 1
    configs = {
        (f["constexprs"]["BLOCK_M"], f["constexprs"]["BLOCK_N"], f["options"]["num_warps"])
        for f in facts["_attention_kl_fwd_kernel"]
    }
    assert configs == {("128", "64", 8), ("64", "64", 4), ("128", "32", 4), ("64", "32", 4)}
    (ssim_fwd,) = facts["_ssim_fwd_kernel"]
    assert "C" not in ssim_fwd["ones"] and {"sxw", "syw"} <= set(ssim_fwd["ones"])
    assert ssim_fwd["constexprs"]["BI_H"] == "16" and ssim_fwd["options"] == {"num_warps": 4}


def test_harness_reports_compile_errors_shared_memory_and_spills(self_test):
    problems = self_test["problems"]
    for arch, limit in ((80, 166912), (90, 232448)):
        assert any(
            f"pointer_becomes_int sm_{arch}" in p
            and "does not compile" in p
            and "Loop-carried variable at" in p
            for p in problems
        ), problems
        assert any(
            f"matmul_tile sm_{arch}" in p and "(too much shared)" in p and f"> {limit} B per block" in p
            for p in problems
        ), problems
        assert any(f"matmul_tile sm_{arch}" in p and "(spills)" in p and "spills" in p for p in problems), (
            problems
        )
    spilling = [r for r in self_test["compiled"] if r["case"] == "spills"]
    assert all(r["spills"] > 0 and r["shared"] < 166912 and r["mma"] != "-" for r in spilling), spilling
    # A budget that covers the kernel leaves only the errors and the shared-memory overflow.
    budgeted = self_test["budgeted"]
    assert not any("spills" in p and "budget" in p for p in budgeted) and len(budgeted) == 4, budgeted


@pytest.mark.slow
def test_every_launch_compiles_for_sm80_and_sm90_and_the_report_is_current(tmp_path):
    report, results = tmp_path / "RESOURCES.md", tmp_path / "resources.json"
    done = run_without_interpreter([str(HARNESS), "--out", str(report), "--json", str(results)], ROOT)
    data = json.loads(results.read_text())
    assert done.returncode == 0 and not data["problems"], "\n".join(data["problems"]) or done.stderr[-3000:]
    rows = data["results"]
    assert {r["kernel"] for r in rows} == PUBLIC_KERNELS
    for arch in (80, 90):
        mine = [r for r in rows if r["arch"] == arch]
        assert len(mine) == data["specializations"] >= 90
        assert all(r["registers"] > 0 and r["error"] is None for r in mine)
    # Tensor cores wherever the kernels have dots (fp32 attention_kl as TF32), none where an SSIM plane is
    # smoothed along neither side (no dots at all).
    for r in rows:
        if r["kernel"].startswith(("_ssim_fwd", "_ssim_bwd", "_attention_kl")):
            no_dots = "ID_H=True ID_W=True" in r["spec"]
            assert (r["tensor_cores"] == "-") == no_dots, r
    committed = (ROOT / "bench" / "RESOURCES.md").read_text()
    assert report.read_text() == committed, (
        "bench/RESOURCES.md is out of date: regenerate it with `python bench/compile_targets.py`"
    )
