"""Graph simplifications the generic constant folder cannot do, because the shapes they fold depend on the
dynamic batch: two patterns ``torch.onnx.export(dynamo=True)`` emits for every attention block.

Both are checked by the export's own parity gates (the rewritten fp32 file against PyTorch at batch 1 and N)
and, in the tests, on a timm ViT.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet, rewrite

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


def _ints(value: ir.Value) -> list[int] | None:
    """The value of a constant int tensor, or None when it is not a constant."""
    const = value.const_value
    if const is None:
        return None
    return [int(v) for v in np.asarray(const.numpy()).reshape(-1)]


class LastTwoAxesTranspose(RewriteRuleClassBase):
    """``Reshape(Transpose(Reshape(k, [-1, n, d]), [0, 2, 1]), [*k.shape[:-2], d, n])`` -> ``Transpose(k)``
    swapping the last two axes: the exporter's ``k.transpose(-2, -1)`` inside scaled dot-product attention,
    written through a 3-D view whose shapes come from ``Shape(k)`` at run time (9 nodes -> 1)."""

    def pattern(self, op, k, minus_one, n_start, n_end, d_start, d_end, lead_start, lead_end):
        shape = op.Shape(k)
        n = op.Slice(shape, n_start, n_end)
        d = op.Slice(shape, d_start, d_end)
        lead = op.Slice(shape, lead_start, lead_end)
        flat = op.Reshape(k, op.Concat(minus_one, n, d, axis=0))
        return op.Reshape(op.Transpose(flat, perm=[0, 2, 1]), op.Concat(lead, d, n, axis=0))

    def check(self, context, k, minus_one, n_start, n_end, d_start, d_end, lead_start, lead_end, **_):
        result = MatchResult()
        if k.shape is None or len(k.shape) < 3:
            return result.fail("rank of k unknown or below 3")
        expected = {
            "minus_one": (minus_one, [[-1]]),
            "n": ((n_start, n_end), [[-2], [-1]]),
            "d": ((d_start, d_end), [[-1], [_INT64_MAX]]),
        }
        for name, (values, want) in expected.items():
            got = [_ints(v) for v in (values if isinstance(values, tuple) else (values,))]
            if got != want:
                return result.fail(f"{name} slice is {got}, not {want}")
        if _ints(lead_start) not in ([0], [_INT64_MIN]) or _ints(lead_end) != [-2]:
            return result.fail("lead slice is not [:-2]")
        return result

    def rewrite(self, op, k, **_):
        rank = len(k.shape)
        return op.Transpose(k, perm=[*range(rank - 2), rank - 1, rank - 2])


class UnitSliceSqueeze(RewriteRuleClassBase):
    """``Squeeze(Slice(x, [i], [i + 1], [a]), [a])`` -> ``Gather(x, i, axis=a)``: the exporter's
    ``qkv.unbind(0)`` (two nodes -> one per output)."""

    def pattern(self, op, x, start, end, axes, squeeze_axes):
        return op.Squeeze(op.Slice(x, start, end, axes), squeeze_axes)

    def check(self, context, x, start, end, axes, squeeze_axes, **_):
        result = MatchResult()
        start_v, end_v, axes_v, squeeze_v = (_ints(v) for v in (start, end, axes, squeeze_axes))
        if None in (start_v, end_v, axes_v, squeeze_v) or len(axes_v) != 1 or axes_v != squeeze_v:
            return result.fail("not a single constant axis sliced and squeezed")
        if not 0 <= start_v[0] or end_v[0] != start_v[0] + 1:
            return result.fail("not a unit slice from a non-negative start")
        return result

    def rewrite(self, op, x, start, axes, **_):
        index = op.Constant(value=ir.tensor(np.array(_ints(start)[0], dtype=np.int64)))
        return op.Gather(x, index, axis=_ints(axes)[0])


RULES = RewriteRuleSet([LastTwoAxesTranspose.rule(), UnitSliceSqueeze.rule()])


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with :data:`RULES` applied wherever they match."""
    return rewrite(model, pattern_rewrite_rules=RULES)
