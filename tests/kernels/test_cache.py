"""torch.compile's caches must not replay a graph compiled against another kdfast's kernels.

CI once failed on exactly that: a /tmp Inductor cache from an older checkout served a compiled backward
calling ``kdfast::ssim_bwd`` without the arguments added since. kernels/_cache.py salts the cache key.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from kernels._cache import TAG_PREFIX, salt_compile_caches, source_digest

ROOT = Path(__file__).resolve().parents[2]


def test_importing_kernels_tags_the_cache_key_with_a_digest_of_their_sources():
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    assert kernels  # imported above, which set the tag
    assert TAG_PREFIX + digest.hexdigest()[:16] in torch.compiler.config.cache_key_tag.split("+")


def test_digest_changes_with_any_kernel_source(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(copy)
    ssim = copy / "ssim.py"
    ssim.write_text(ssim.read_text() + "\n# a changed backward\n")
    assert source_digest(copy) != before
    (copy / "new_op.py").write_text("")
    assert len({before, source_digest(copy)}) == 2


def test_salt_keeps_the_users_tag_and_replaces_an_earlier_kdfast_tag():
    # Not monkeypatch: its undo deletes a torch config key (the config module keeps none in __dict__), and
    # every later compile then fails with "cache_key_tag does not exist".
    config = torch.compiler.config
    saved = config.cache_key_tag
    try:
        config.cache_key_tag = "mine"
        assert salt_compile_caches("aaaa") == "mine+kdfast-kernels-aaaa"
        assert salt_compile_caches("bbbb") == "mine+kdfast-kernels-bbbb"
        config.cache_key_tag = ""
        assert salt_compile_caches("cccc") == "kdfast-kernels-cccc"
    finally:
        config.cache_key_tag = saved
    assert config.cache_key_tag == saved


PROBE = textwrap.dedent(
    """
    import sys
    import torch
    scale, digest = float(sys.argv[1]), sys.argv[2]
    from kernels._cache import salt_compile_caches
    salt_compile_caches(digest)

    @torch.library.custom_op("kdfast_probe::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    double.register_autograd(lambda ctx, grad: grad * scale)
    f = torch.compile(lambda x: double(x).sum(), fullgraph=True)
    x = torch.ones(3, requires_grad=True)
    f(x).backward()
    print(x.grad[0].item())
    """
)


@pytest.mark.slow
def test_a_changed_backward_is_recompiled_when_the_digest_changes(tmp_path):
    """Three processes share one Inductor cache. The op's backward scales by 2, then by 3: with the same
    digest the cache replays the old backward (the failure this guards against, shown so the test can
    fail); with a new digest it compiles the new one."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "PYTHONPATH": str(ROOT)}

    def grad(scale: int, digest: str) -> float:
        done = subprocess.run(
            [sys.executable, str(probe), str(scale), digest],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    assert grad(2, "old") == 2.0
    assert grad(3, "old") == 2.0  # stale: the cache key did not see the new backward
    assert grad(3, "new") == 3.0
