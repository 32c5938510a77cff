"""Keeping torch.compile's on-disk caches from replaying an older kdfast's kernels.

torch.compile keys a cached graph (Inductor's FX graph cache, AOTAutograd's cache) by the graph Dynamo
traced: the custom ops it calls, their arguments and the inputs' metadata. The code behind a custom op is not
in that key, nor is the backward graph its ``register_autograd`` function traces. So after an upgrade that
changes an op's backward (new arguments to ``kdfast::ssim_bwd``, say), a cache left in ``/tmp`` by the older
kdfast hands back a compiled backward that calls the op with the old arguments and fails ("missing value for
argument ..."), or, worse, runs the old code. kdfast folds a digest of its kernel sources into
``torch.compiler.config.cache_key_tag``, which every torch.compile cache key includes, so a graph cached
by a different kdfast is never a hit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

TAG_PREFIX = "kdfast-kernels-"
KERNELS = Path(__file__).resolve().parent


def source_digest(root: Path = KERNELS) -> str:
    """SHA-256 (16 hex digits) over the names and bytes of the ``*.py`` files in ``root``, in name order."""
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def salt_compile_caches(digest: str) -> str | None:
    """Append ``kdfast-kernels-<digest>`` to ``torch.compiler.config.cache_key_tag`` (keeping a tag the
    user set, replacing an earlier kdfast tag) and return the new tag; None on a torch without the option."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return None
    tags = str(config.cache_key_tag).split("+")
    parts = [part for part in tags if part and not part.startswith(TAG_PREFIX)]
    config.cache_key_tag = "+".join([*parts, TAG_PREFIX + digest])
    return config.cache_key_tag
