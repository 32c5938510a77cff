"""Fused distillation ops: an eager reference (the specification) and a Triton kernel for each.

Every op takes ``impl="auto" | "triton" | "reference"``. ``auto`` runs Triton on CUDA tensors and the
reference elsewhere; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests use this).
"""

from kernels._cache import salt_compile_caches, source_digest
from kernels.attention_kl import attention_kl, attention_kl_reference
from kernels.attention_map import attention_map, attention_map_reference, resize, resize_reference
from kernels.ssim import ssim, ssim_cosine_loss, ssim_cosine_loss_reference, ssim_reference

# A torch.compile cache written by another kdfast must not serve these ops (kernels/_cache.py says why).
salt_compile_caches(source_digest())

__all__ = [
    "attention_kl",
    "attention_kl_reference",
    "attention_map",
    "attention_map_reference",
    "resize",
    "resize_reference",
    "ssim",
    "ssim_cosine_loss",
    "ssim_cosine_loss_reference",
    "ssim_reference",
]
