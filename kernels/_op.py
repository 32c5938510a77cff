"""One description per fused op; its eager and its ``torch.compile`` autograd paths are both built from it.

An op of this package is a forward launcher and a backward launcher around Triton kernels. ``torch.compile``
must see the op as one node of its graph, so the launchers are registered as ``torch.library`` custom ops
(schema inferred from the launchers' type hints, a fake for the shapes, ``register_autograd``). Called
eagerly, a custom op's dispatcher round trips cost about half the host time of a call, so the same launchers
also run inside an ``autograd.Function``. :class:`FusedOp` builds both from one description, so the two paths
save the same tensors and call the backward with the same arguments by construction.

The calling convention every description follows:

- ``forward(*inputs) -> Tensor | tuple[Tensor, ...]``: the first ``grad_inputs`` inputs are the tensors that
  may take gradients, the rest constants (ints, floats, bools);
- ``save(inputs, outputs) -> (tensors, constants)``: what the backward reads;
- ``backward(*grads, *tensors, *constants, *needs)``: ``grads`` are the gradients of the outputs named by
  ``grad_outputs`` (None for an output that got none), ``needs`` one bool per gradient input; it returns one
  gradient per gradient input (a Tensor when there is one), any tensor (an empty one) where not needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NAMESPACE = "kdfast"


class FusedOp:
    """The custom ops ``kdfast::<name>`` and ``kdfast::<name>_backward`` and an ``autograd.Function``, all
    three around the same launchers; ``op(index, *inputs)`` returns the forward's output ``index`` (all of
    a single-output forward when None), through the custom op under ``torch.compile`` and the Function
    otherwise."""

    def __init__(
        self,
        name: str,
        *,
        forward: Callable,
        forward_fake: Callable,
        backward: Callable,
        backward_fake: Callable,
        grad_inputs: int,
        grad_outputs: Sequence[int],
        save: Callable[[tuple, tuple], tuple[tuple[torch.Tensor, ...], tuple]],
    ) -> None:
        self.name = name
        self.grad_inputs = grad_inputs
        self.grad_outputs = tuple(grad_outputs)
        self.save = save
        self.forward = forward
        self.backward = backward
        self.forward_op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.forward_op.register_autograd(self._compiled_backward, setup_context=self._setup)
        self.function = self._eager_function()

    def __call__(self, index: int | None, *inputs):
        if torch.compiler.is_compiling():
            outputs = self.forward_op(*inputs)
            return outputs if index is None else outputs[index]
        return self.function.apply(index, *inputs)

    def _setup(self, ctx, inputs: tuple, output) -> None:
        tensors, constants = self.save(inputs, output)
        ctx.save_for_backward(*tensors)
        ctx.constants = constants
        # Unused output gradients stay None, so a backward skips them instead of reading zeros.
        ctx.set_materialize_grads(False)

    def _input_grads(self, ctx, grads, backward: Callable, skip: int = 0) -> tuple:
        """One entry per forward input: the gradient where ``ctx`` needs it, else None (``skip``: leading
        arguments of ``ctx``'s function that are not the forward's inputs)."""
        needs = ctx.needs_input_grad
        wanted = needs[skip : skip + self.grad_inputs]
        constants = (None,) * (len(needs) - skip - self.grad_inputs)
        if not any(wanted):
            return (None,) * self.grad_inputs + constants
        result = backward(*[grads[i] for i in self.grad_outputs], *ctx.saved_tensors, *ctx.constants, *wanted)
        if self.grad_inputs == 1:
            result = (result,)
        return (*[g if need else None for g, need in zip(result, wanted, strict=True)], *constants)

    def _compiled_backward(self, ctx, *grads) -> tuple:
        return self._input_grads(ctx, grads, self.backward_op)

    def _eager_function(self) -> type[torch.autograd.Function]:
        op = self

        class Function(torch.autograd.Function):
            """Returns the one output the caller asked for: each further output of an autograd.Function
            costs host time in the forward and the backward (the others stay saved where the backward
            reads them)."""

            @staticmethod
            def forward(ctx, index, *inputs):
                outputs = op.forward(*inputs)
                op._setup(ctx, inputs, outputs)
                ctx.index = index
                return outputs if index is None else outputs[index]

            @staticmethod
            def backward(ctx, grad):
                if ctx.index is None:
                    grads = (grad,)
                else:
                    grads = [None] * (max(op.grad_outputs) + 1)
                    grads[ctx.index] = grad
                return None, *op._input_grads(ctx, grads, op.backward, skip=1)

        Function.__name__ = Function.__qualname__ = f"FusedOp[{self.name}]"
        return Function
