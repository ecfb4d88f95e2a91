"""FCOS detectors built by name, on torchvision's detection models.

:class:`Detector` holds a torchvision :class:`~torchvision.models.detection.FCOS` and uses its
parts, not copies of them: the backbone + FPN (:meth:`Detector.features`), the head
(classification, box regression, centerness), the anchor generator, the loss
(``FCOS.compute_loss``: focal, GIoU, centerness BCE) and the post-processing
(``FCOS.postprocess_detections``: score threshold, top-k, batched NMS). What it leaves out is
torchvision's ``GeneralizedRCNNTransform``, which would resize every image to 800–1333 px:
gigapatch decides the input size itself (the whole image, a downsampled one, a tile or a
patch) and normalises it as every method does (``Method.prepare``).

Names (``model.encoder`` of the detection task):

- ``fcos_tiny``: a 4-stage conv backbone (16/32/64/128 channels, GroupNorm) with an FPN over
  strides 4, 8, 16 plus a max-pooled level at 32 (64 channels), for tests and CPU runs (stride
  4 keeps 14-px objects);
- ``fcos_resnet18``, ``fcos_resnet34``, ``fcos_resnet50``: torchvision ResNets with an FPN over
  ``layer2``–``layer4`` plus P6/P7 (strides 8–128, 256 channels), as torchvision's FCOS;
  ``pretrained=True`` loads the backbone's ImageNet weights (torchvision's hub).

Labels are ``1..K`` (``num_classes = K`` object classes; the head has ``K + 1`` outputs,
index 0 never a target, torchvision's convention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from gigapatch.core.errors import ConfigError
from gigapatch.core.registry import Registry
from gigapatch.models.weights import load_weights

__all__ = ["DETECTORS", "Detector", "create_detector", "detector_names"]

BackboneBuilder = Callable[[int, bool], nn.Module]
DETECTORS: Registry[BackboneBuilder] = Registry("detector")

Targets = list[dict[str, torch.Tensor]]


class _TinyBody(nn.Module):
    """Four stride-2 conv stages (16, 32, 64, 128 channels): outputs at strides 2–16."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        stages, c = [], in_chans
        for w in (16, 32, 64, 128):
            stages.append(nn.Sequential(
                nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(8, w // 2), w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, w // 2), w), nn.ReLU(inplace=True)))
            c = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - via the FPN
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@DETECTORS.register("fcos_tiny")
def _tiny(in_chans: int, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ConfigError("fcos_tiny has no pretrained weights; set model.pretrained: false.")
    return BackboneWithFPN(_TinyBody(in_chans), {"layer2": "0", "layer3": "1", "layer4": "2"},
                           [32, 64, 128], 64)


def _resnet(arch: str, in_chans: int, pretrained: bool) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights="DEFAULT" if pretrained else None)
    if in_chans != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_chans, old.out_channels, 7, 2, 3, bias=False)
        with torch.no_grad():
            net.conv1.weight.copy_(old.weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1)
                                   * (3 / in_chans))
    return _resnet_fpn_extractor(net, 5, returned_layers=[2, 3, 4],
                                 extra_blocks=LastLevelP6P7(256, 256))


for _arch in ("resnet18", "resnet34", "resnet50"):
    DETECTORS.register(f"fcos_{_arch}")(
        lambda in_chans, pretrained, _a=_arch: _resnet(_a, in_chans, pretrained))


class Detector(nn.Module):
    """An FCOS detector without torchvision's resizing transform (see the module doc).

    ``features(x (B, C, H, W))`` → FPN maps ``[(B, F, H/s_l, W/s_l)]``; ``losses(maps,
    targets, image_sizes)`` → FCOS's loss dict; ``detect(maps, image_sizes)`` → one dict per
    image (``boxes`` xyxy, ``scores``, ``labels``) in the input's pixels.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, score_thresh: float = 0.05,
                 detections: int = 100) -> None:
        super().__init__()
        strides = _strides(backbone)
        #: The FPN levels' strides; FCOS's anchor size per level equals its stride.
        self.strides = strides
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        self.fcos = FCOS(backbone, num_classes + 1, anchor_generator=anchors,
                         score_thresh=score_thresh, detections_per_img=detections,
                         image_mean=[0.0], image_std=[1.0])
        self.fcos.transform = None  # gigapatch sizes and normalises the input itself

    @property
    def backbone(self) -> nn.Module:
        return self.fcos.backbone

    @property
    def head(self) -> nn.Module:
        return self.fcos.head

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fcos.backbone(x).values())

    def _anchors(self, maps: list[torch.Tensor], image_sizes: list[tuple[int, int]]
                 ) -> list[torch.Tensor]:
        b, _, h, w = maps[0].shape
        dummy = torch.empty(b, 1, *max(image_sizes), device=maps[0].device, dtype=maps[0].dtype)
        return self.fcos.anchor_generator(ImageList(dummy, image_sizes), maps)

    def losses(self, maps: list[torch.Tensor], targets: Targets,
               image_sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        head = self.fcos.head(maps)
        anchors = self._anchors(maps, image_sizes)
        per_level = [m.shape[2] * m.shape[3] for m in maps]
        return self.fcos.compute_loss(targets, head, anchors, per_level)

    def detect(self, maps: list[torch.Tensor], image_sizes: list[tuple[int, int]]
               ) -> list[dict[str, torch.Tensor]]:
        head = self.fcos.head(maps)
        anchors = self._anchors(maps, image_sizes)
        per_level = [m.shape[2] * m.shape[3] for m in maps]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return self.fcos.postprocess_detections(split, split_anchors, image_sizes)


def _strides(backbone: nn.Module) -> list[int]:
    """The FPN's levels (one stride each), found by a forward pass on a small input."""
    with torch.no_grad():
        chans = next(p for p in backbone.parameters() if p.dim() == 4).shape[1]
        was = backbone.training
        backbone.eval()
        out = backbone(torch.zeros(1, chans, 256, 256))
        backbone.train(was)
    return [256 // v.shape[-1] for v in out.values()]


def create_detector(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                    weights: str | None = None) -> Detector:
    """Build the FCOS detector ``name`` for ``num_classes`` object classes (labels 1..K).

    ``weights``: a local file for the backbone (``model.weights``; e.g. an ImageNet ResNet
    state dict, matched by key suffix) or a whole gigapatch detector's checkpoint."""
    if pretrained and weights:
        raise ConfigError("model.pretrained and model.weights both set: choose one.")
    if not name.startswith("fcos_"):
        raise ConfigError(f"task.kind detect needs an FCOS model.encoder: one of "
                          f"{detector_names()} (not {name!r}).")
    det = Detector(DETECTORS.get(name)(in_chans, pretrained), num_classes)
    if weights:
        load_weights(det.backbone, weights, f"detector {name} backbone")
    return det


def detector_names() -> list[str]:
    return DETECTORS.names()

