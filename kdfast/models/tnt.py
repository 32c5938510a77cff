"""Transformer-in-transformer (TNT, Han et al. 2021) with a DeiT-style distillation token (Touvron et al.
2021): the TITN student.

Numbering used in the docstrings (TNT Sec. 2.2 and DeiT Sec. 4, in this module's order):
  (1) visual words: each p x p patch is cut into m = (p/s)^2 sub-patches of s x s pixels, each linearly
      projected to c dims, plus a learnable word position embedding: Y_0^i in R^(m x c), i = 1..n
  (2) inner transformer, per patch: Y'_l = Y_{l-1} + MSA(LN(Y_{l-1})),  Y_l = Y'_l + MLP(LN(Y'_l))
  (3) the words join their sentence: Z_{l-1}^i <- Z_{l-1}^i + FC(Vec(LN(Y_l^i))) for the n patch tokens
  (4) outer transformer: Z'_l = Z_{l-1} + MSA(LN(Z_{l-1})),  Z_l = Z'_l + MLP(LN(Z'_l))
  (5) Z_0 = [z_class, z_distill, LN(FC(Vec(LN(Y_0^i))))_i] + E_pos: the class and distillation tokens lead
  (6) DeiT heads: class head Z_cls = W_cls LN(Z_L)[0] + b_cls, distillation head Z_dist = W_dist LN(Z_L)[1]
      + b_dist; with distilled training on, a training-mode forward returns both logits; otherwise one
      (B, K) tensor by ``head_fusion``:
        mean  (Z_cls + Z_dist) / 2, DeiT's inference rule (the default)
        max   max(Z_cls, Z_dist) per class: its argmax is the class of the argmax over the concatenation
              [Z_cls, Z_dist] of the two heads' 2K logits
      TITN's Algorithm 1 concatenates the two heads at inference. Read as the two heads' logits, that is
      "max" (a (B, K) output, as ``student.pt`` promises, with the concatenation's top-1). Read as the two
      tokens' embeddings under one linear classifier, W [z_cls; z_dist] + b with W = [W_cls | W_dist] is
      Z_cls + Z_dist: twice "mean", the same ranking of the classes.
Only Conv / Linear / LayerNorm / attention / reshape ops, so the model exports to plain ONNX.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from kdfast.errors import ConfigError, UsageError
from kdfast.models.registry import register_model

PREFIX_TOKENS = 2  # class, distillation
HEAD_FUSIONS = ("mean", "max")  # eq. 6: how an inference forward turns the two heads into one output


class TNTBlock(nn.Module):
    """One TNT block: the inner transformer on every patch's words (eq. 2), their projection added to the
    patch tokens (eq. 3), the outer transformer on the sentence (eq. 4). ``inner`` and ``outer`` are timm
    ``Block``s, so ``outer.attn`` can be tapped as an attention module."""

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        words: int,
        num_heads: int,
        inner_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        common = {"mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "proj_drop": drop, "attn_drop": attn_drop}
        self.inner = Block(inner_dim, inner_heads, drop_path=drop_path, **common)
        self.proj_norm = nn.LayerNorm(inner_dim)
        self.proj = nn.Linear(words * inner_dim, dim)
        self.outer = Block(dim, num_heads, drop_path=drop_path, **common)

    def forward(self, words: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``words`` (B * n, m, c) and ``tokens`` (B, 2 + n, D) -> both updated, same shapes."""
        words = self.inner(words)
        batch, count, _ = tokens.shape
        sentence = self.proj(self.proj_norm(words).reshape(batch, count - PREFIX_TOKENS, -1))
        prefix, patches = tokens[:, :PREFIX_TOKENS], tokens[:, PREFIX_TOKENS:]
        return words, self.outer(torch.cat([prefix, patches + sentence], dim=1))


class TNTDistilled(nn.Module):
    """TNT with class and distillation tokens and two heads (eq. 1-6). ``set_distilled_training(True)``
    makes a training-mode forward return ``(class_logits, distill_logits)``, as timm's DeiT distilled
    models do; in eval mode, or with it off, the forward returns one (B, num_classes) tensor, the two heads
    fused by ``head_fusion`` (eq. 6: "mean" or "max"). The exported model computes the same."""

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        patch_size: int = 16,
        sub_patch: int = 4,
        in_chans: int = 3,
        embed_dim: int = 384,
        inner_dim: int = 24,
        depth: int = 12,
        num_heads: int = 6,
        inner_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_fusion: str = "mean",
    ) -> None:
        super().__init__()
        if head_fusion not in HEAD_FUSIONS:
            raise ConfigError(
                f"arch.kwargs.head_fusion of the TNT student must be one of {', '.join(HEAD_FUSIONS)}, "
                f"got {head_fusion!r}"
            )
        self.head_fusion = head_fusion
        for whole, part, names in (
            (img_size, patch_size, "img_size and patch_size"),
            (patch_size, sub_patch, "patch_size and sub_patch"),
            (embed_dim, num_heads, "embed_dim and num_heads"),
            (inner_dim, inner_heads, "inner_dim and inner_heads"),
        ):
            if part < 1 or whole % part:
                raise ConfigError(f"arch.kwargs of the TNT student: {names} ({whole}, {part}) must divide")
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.side = patch_size // sub_patch  # words per patch side
        words = self.side**2
        self.num_classes = num_classes
        self.distilled_training = False
        self.word_embed = nn.Conv2d(in_chans, inner_dim, sub_patch, stride=sub_patch)
        self.word_pos = nn.Parameter(torch.zeros(1, words, inner_dim))
        self.patch_embed = nn.Sequential(
            nn.LayerNorm(words * inner_dim), nn.Linear(words * inner_dim, embed_dim), nn.LayerNorm(embed_dim)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, PREFIX_TOKENS + self.grid**2, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            TNTBlock(
                embed_dim,
                inner_dim,
                words,
                num_heads,
                inner_heads,
                mlp_ratio,
                qkv_bias,
                drop_rate,
                attn_drop_rate,
                drop_path_rate * i / max(depth - 1, 1),  # stochastic depth grows linearly with depth
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.head_dist = nn.Linear(embed_dim, num_classes)
        for param in (self.word_pos, self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)
        self.apply(_init_linear)

    def set_distilled_training(self, enable: bool = True) -> None:
        """Switch the training-mode output between the (class, distillation) pair and their fusion (eq. 6)."""
        self.distilled_training = enable

    def words(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1: images (B, C, H, W) -> visual words (B * n, m, c), patches in row-major order. The
        sub-patch projection runs once over the whole image: sub-patches tile every patch, so this is the
        per-patch linear projection of the paper."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise UsageError(
                f"the TNT student takes {self.img_size}x{self.img_size} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}: set data.image_size or the arch kwarg img_size to match"
            )
        feature = self.word_embed(x)
        batch, dim = feature.shape[:2]
        grid, side = self.grid, self.side
        patches = feature.reshape(batch, dim, grid, side, grid, side).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(batch * grid * grid, side * side, dim) + self.word_pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1-5: images -> the normalized outer tokens LN(Z_L), (B, 2 + n, D)."""
        batch = x.shape[0]
        words = self.words(x)
        patches = self.patch_embed(words.reshape(batch, self.grid**2, -1))
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(batch, -1, -1)
        tokens = self.pos_drop(torch.cat([prefix, patches], dim=1) + self.pos_embed)
        for block in self.blocks:
            words, tokens = block(words, tokens)
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6: the class head on the class token, the distillation head on the distillation token; both,
        or their fusion by ``head_fusion``."""
        logits, distill = self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])
        if self.distilled_training and self.training:
            return logits, distill
        if self.head_fusion == "max":
            return torch.maximum(logits, distill)
        return (logits + distill) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


def _init_linear(module: nn.Module) -> None:
    # ViT/TNT initialization: truncated normal std 0.02 for every Linear, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model
def tnt_distilled_digits(num_classes: int = 10, **kwargs: object) -> TNTDistilled:
    """A ~0.2M-parameter TNT student for 32x32 inputs: 8x8 patches (16 patches) of 2x2-pixel words (16 per
    patch), outer 64 wide / 2 heads, inner 16 wide / 2 heads, depth 4. Kwargs override any of these."""
    config = {
        "img_size": 32,
        "patch_size": 8,
        "sub_patch": 2,
        "embed_dim": 64,
        "inner_dim": 16,
        "depth": 4,
        "num_heads": 2,
        "inner_heads": 2,
        **kwargs,
    }
    return TNTDistilled(num_classes, **config)


@register_model
def tnt_distilled_ti(num_classes: int = 1000, **kwargs: object) -> TNTDistilled:
    """TNT-Ti (Han et al. 2021, NeurIPS version, Table 1: 6.1M parameters at 1000 classes) with a
    distillation token: outer 192 wide / 3 heads, inner 12 wide / 3 heads, depth 12, MLP ratio 4, 224x224
    with 16x16 patches of 4x4 words. TITN's CIFAR geometry (Table 1) is ``img_size: 32, patch_size: 8,
    sub_patch: 2``: 16 patches of 16 words of 2x2 pixels, 5,879,588 parameters and 111.3M multiply-accumulates
    per image at 100 classes; 4x4 patches of single-pixel words have nearly the same parameters (5,888,696)
    at 3.8x the compute. Kwargs override any of these."""
    config = {"embed_dim": 192, "inner_dim": 12, "num_heads": 3, "inner_heads": 3, **kwargs}
    return TNTDistilled(num_classes, **config)


@register_model
def tnt_distilled_s(num_classes: int = 1000, **kwargs: object) -> TNTDistilled:
    """TNT-S (Han et al. 2021, Table 1) with a distillation token: 224x224, 16x16 patches of 4x4 words,
    outer 384 wide / 6 heads, inner 24 wide / 4 heads, depth 12, MLP ratio 4 (~24M parameters)."""
    return TNTDistilled(num_classes, **kwargs)
