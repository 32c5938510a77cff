"""Teachers and students from timm, torchvision and kdfast through one door, :func:`build_model`."""

from kdfast.models import cifar, hybrid, small_vgg, students, tnt
from kdfast.models.hybrid import HybridTeacher
from kdfast.models.registry import build_model, kdfast_models, load_weights, read_state_dict, register_model
from kdfast.models.students import EdgeCNN

__all__ = [
    "EdgeCNN",
    "HybridTeacher",
    "build_model",
    "cifar",
    "hybrid",
    "kdfast_models",
    "load_weights",
    "read_state_dict",
    "register_model",
    "small_vgg",
    "students",
    "tnt",
]
