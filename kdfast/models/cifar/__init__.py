"""The CIFAR model zoo of the distillation benchmarks, as RepDistiller (Tian et al., ICLR 2020, "Contrastive
Representation Distillation") and mdistiller (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation")
define it: the same layers, the same state-dict names (so the trained teachers of mdistiller's
``cifar_teachers.tar`` load as ``teacher.weights``), the same forward at 32x32.

Registered kdfast models (``{source: kdfast, name: ...}``), by the names those repositories use:
``resnet8/14/20/32/44/56/110``, ``resnet8x4``, ``resnet32x4`` (:mod:`.resnet`); ``wrn_16_1``, ``wrn_16_2``,
``wrn_40_1``, ``wrn_40_2`` (:mod:`.wrn`); ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (:mod:`.vgg`,
with batch norm); ``MobileNetV2`` (:mod:`.mobilenetv2`, the CIFAR half-width variant); ``ShuffleV1``,
``ShuffleV2`` (:mod:`.shufflenet`).

Every model has ``tap_points``: the module paths of the features distillation methods read, named by
mdistiller's feature index: ``feat0`` (the stem), ``feat1`` ... (the stage outputs, after their activation),
``preact1`` ... (the same stages before their last activation, where the reference defines one), and
``embedding`` (the pooled pre-logit vector, (B, C)). A config names them as taps, e.g.
``student.taps.f2: {path: layer2}``. No activation runs in place, so a tapped tensor keeps its value.
"""

from kdfast.models.cifar import mobilenetv2, resnet, shufflenet, vgg, wrn

__all__ = ["mobilenetv2", "resnet", "shufflenet", "vgg", "wrn"]
