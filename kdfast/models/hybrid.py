"""The AGKD hybrid teacher: a VGG branch and a ViT branch, class logits concatenated, one linear layer."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import vgg19, vit_b_16
from torchvision.models.vgg import VGG, cfgs, make_layers
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from kdfast.models.registry import load_weights, read_state_dict, register_model


class HybridTeacher(nn.Module):
    """AGKD hybrid teacher: z = W [z_vgg ; z_vit] + b, each branch giving K class logits (W: 2K -> K)."""

    def __init__(self, vgg_branch: nn.Module, vit_branch: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.vgg = vgg_branch
        self.vit = vit_branch
        self.head = nn.Linear(2 * num_classes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.vgg(x), self.vit(x)], dim=1))


@register_model
def hybrid_vgg19_vitb16(
    num_classes: int = 1000,
    vgg_weights: str | None = None,
    vit_weights: str | None = None,
    image_size: int = 224,
) -> HybridTeacher:
    """The AGKD paper's teacher: torchvision VGG19 + ViT-B/16, each loaded from a local torchvision state
    dict when given (the ViT position embeddings are interpolated for another ``image_size``), then both
    heads replaced by ``num_classes`` outputs. Taps: ``vgg.features.35`` (before the last pool, 14x14 at
    224) and ``vit.encoder.layers.encoder_layer_11.self_attention``."""
    vgg = vgg19(weights=None)
    if vgg_weights is not None:
        load_weights(vgg, read_state_dict(vgg_weights), vgg_weights)
    vgg.classifier[-1] = nn.Linear(vgg.classifier[-1].in_features, num_classes)
    vit = vit_b_16(weights=None, image_size=image_size)
    if vit_weights is not None:
        state = read_state_dict(vit_weights)
        if image_size != 224 and "encoder.pos_embedding" in state:
            state = interpolate_embeddings(image_size, 16, state)
        load_weights(vit, state, vit_weights)
    vit.heads.head = nn.Linear(vit.heads.head.in_features, num_classes)
    return HybridTeacher(vgg, vit, num_classes)


@register_model
def hybrid_teacher_small(num_classes: int = 10, image_size: int = 32) -> HybridTeacher:
    """The embedded default's teacher: torchvision's VGG (small BN config) + VisionTransformer (4 layers,
    4 heads, width 64, patch 4). Taps: ``vgg.features.13`` (before the last pool, 8x8 at 32) and
    ``vit.encoder.layers.encoder_layer_3.self_attention``."""
    widths = [32, "M", 64, "M", 128, 128, "M"]
    vgg = _small_input_vgg(make_layers(widths, batch_norm=True), widths[-2], num_classes, dropout=0.1)
    vit = VisionTransformer(
        image_size=image_size,
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=num_classes,
    )
    return HybridTeacher(vgg, vit, num_classes)


def _small_input_vgg(features: nn.Sequential, width: int, num_classes: int, dropout: float) -> VGG:
    """torchvision's VGG with a global-average-pool + one linear head, the usual form for 32x32 inputs."""
    # VGG's constructor allocates a 25088 x 4096 classifier that is replaced at once; building it on the meta
    # device skips that 400 MB. ``features`` were made outside, so they stay real.
    with torch.device("meta"):
        vgg = VGG(features, num_classes=num_classes, init_weights=False)
    vgg.avgpool = nn.AdaptiveAvgPool2d(1)
    vgg.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    return vgg


@register_model
def vgg16_bn_cifar(num_classes: int = 10) -> VGG:
    """A small variant of TITN's teacher: the 13 conv layers of VGG16-BN (torchvision's layer config "D" with
    batch norm) with the global-pool + linear head used on CIFAR-sized inputs, 14.7M parameters. The paper's
    teacher is torchvision's ``vgg16_bn`` with its three-layer classifier (134.7M at 100 classes)."""
    return _small_input_vgg(make_layers(cfgs["D"], batch_norm=True), 512, num_classes, dropout=0.5)
