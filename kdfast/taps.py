"""One way to tap intermediate outputs by module path: forward hooks on any timm / torchvision / kdfast model.

``feature`` taps keep the module output. ``attention`` taps keep Q, K, V per head, (B, heads, N, d) each,
taken from the attention module's own input projection (a timm ``qkv`` Linear, or the in-projection of an
``nn.MultiheadAttention``) so that Q K^T is never formed here; the losses decide what to do with them.
Hooks live on the inner module, so a model wrapped in ``torch.compile`` or DDP is tapped the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import TapConfig
from kdfast.errors import ConfigError, UsageError
from kdfast.schema import closest


class QKV(NamedTuple):
    """Per-head query, key and value of one attention layer, each (B, heads, N, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The module that owns the parameters: strips ``torch.compile`` (``_orig_mod``) and DDP (``module``)."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def find_module(model: nn.Module, path: str, what: str = "tap path") -> nn.Module:
    """``model.get_submodule(path)``, or a ConfigError naming the closest valid module paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        hint = closest(path, names, "paths", cutoff=0.4, listed=5)
        raise ConfigError(f"{what} {path!r} is not a module of {type(model).__name__}: {hint}") from None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, dim = x.shape
    return x.reshape(batch, tokens, heads, dim // heads).transpose(1, 2)


def _qkv_from_linear(qkv: torch.Tensor, heads: int, q_norm: nn.Module, k_norm: nn.Module) -> QKV:
    """timm ``Attention``: the fused qkv output (B, N, 3 * dim) split as timm does, then its q/k norms."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return QKV(q_norm(q), k_norm(k), v)


def _qkv_from_mha(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> QKV:
    """``nn.MultiheadAttention``: its in-projection applied to the query, key and value inputs."""
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    heads = mha.num_heads
    return QKV(
        _split_heads(F.linear(query, w_q, b_q), heads),
        _split_heads(F.linear(key, w_k, b_k), heads),
        _split_heads(F.linear(value, w_v, b_v), heads),
    )


class Taps(nn.Module):
    """Wraps ``model``; ``taps(x) -> (logits, {name: Tensor | QKV})`` for the named module paths.

    Paths are checked here, at construction (a ConfigError names the closest module paths). An
    ``attention`` path names a timm attention module (or its ``qkv`` Linear) or an
    ``nn.MultiheadAttention``; ``heads`` overrides the module's own head count.
    """

    def __init__(self, model: nn.Module, specs: Mapping[str, TapConfig], where: str | None = None) -> None:
        """``where``: the config key of ``specs`` (``student.taps``) that a bad path's error names."""
        super().__init__()
        self.model = model
        self.specs = dict(specs)
        self.where = where
        self._store: dict[str, Any] = {}
        self.recording = False
        inner = unwrap(model)
        self._handles = [self._attach(name, spec, inner) for name, spec in self.specs.items()]

    def _attach(self, name: str, spec: TapConfig, inner: nn.Module) -> torch.utils.hooks.RemovableHandle:
        module = find_module(inner, spec.path, what=f"{self.where}.{name}.path" if self.where else "tap path")
        store = self._store
        if spec.kind == "feature":

            def keep_output(_module: nn.Module, _args: tuple, output: Any) -> None:
                if self.recording:
                    store[name] = output

            return module.register_forward_hook(keep_output)
        if spec.kind != "attention":
            raise ConfigError(f"tap {name!r}: kind must be 'feature' or 'attention', got {spec.kind!r}")
        if isinstance(module, nn.MultiheadAttention):
            if module.bias_k is not None or module.add_zero_attn:
                raise ConfigError(
                    f"tap {name!r}: MultiheadAttention with add_bias_kv / add_zero_attn is not supported"
                )

            def keep_mha_qkv(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
                if not self.recording:
                    return
                inputs = list(args) + [kwargs[k] for k in ("query", "key", "value")[len(args) :]]
                store[name] = _qkv_from_mha(mha, *inputs[:3])

            return module.register_forward_pre_hook(keep_mha_qkv, with_kwargs=True)
        if isinstance(module, nn.Linear):  # the qkv Linear itself: heads and q/k norms live on its parent
            owner, linear = inner.get_submodule(spec.path.rpartition(".")[0]), module
        else:
            owner, linear = module, getattr(module, "qkv", None)
        if not isinstance(linear, nn.Linear):
            raise ConfigError(
                f"tap {name!r}: {spec.path!r} ({type(module).__name__}) has no 'qkv' Linear; point an "
                "attention tap at a timm attention module, its qkv Linear, or an nn.MultiheadAttention"
            )
        heads = spec.heads or getattr(owner, "num_heads", None)
        if not heads:
            raise ConfigError(f"tap {name!r}: cannot tell the number of heads of {spec.path!r}; set heads: N")
        q_norm = getattr(owner, "q_norm", None) or nn.Identity()
        k_norm = getattr(owner, "k_norm", None) or nn.Identity()

        def keep_qkv(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self.recording:
                store[name] = _qkv_from_linear(output, heads, q_norm, k_norm)

        return linear.register_forward_hook(keep_qkv)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        self._store.clear()
        # Hooks record only inside this call: a plain forward of the model (its own CE stage) neither pays for
        # the Q/K/V projection nor keeps the last batch's tensors alive here.
        self.recording = True
        try:
            logits = self.model(x)
        finally:
            self.recording = False
        missing = [name for name in self.specs if name not in self._store]
        if missing:
            raise UsageError(
                f"tap {missing[0]!r} at {self.specs[missing[0]].path!r} did not run in the forward pass"
            )
        outputs = {name: self._store[name] for name in self.specs}
        self._store.clear()
        return logits, outputs

    def remove(self) -> None:
        """Detach the hooks (the model is left as it was)."""
        for handle in self._handles:
            handle.remove()
