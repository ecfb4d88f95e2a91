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

**Window-local head** (``window_local=True``, PatchGD): torchvision's FCOS head normalises its
conv towers with ``GroupNorm(32)``, whose statistics span the whole feature map, so the head
applied to a window of a map would differ from the head applied to the map and then cropped.
With ``window_local`` the towers use :class:`PixelGroupNorm` (channel groups normalised at
each pixel on its own, groups of at least 16 channels; the same parameters), and the head's output at a map
pixel depends only on the ``halo`` (:attr:`Detector.halo`) pixels around it: windows give
exactly the whole map's output.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from gigapatch.core.errors import ConfigError
from gigapatch.core.registry import Registry
from gigapatch.models.weights import load_weights

__all__ = ["DETECTORS", "Detector", "PixelGroupNorm", "create_detector", "detector_names",
           "merge_detections"]

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


class PixelGroupNorm(nn.Module):
    """Group normalisation at each pixel: ``(B, C, H, W)`` → same shape, each pixel's
    ``C / groups`` channels of a group normalised over those channels only, then the
    per-channel affine of :class:`~torch.nn.GroupNorm` (same ``weight``/``bias``). Unlike
    ``GroupNorm`` its output at a pixel does not depend on other pixels.

    :attr:`inside` (``(B, 1, H, W)`` or ``None``), set by :meth:`Detector.window_head`,
    multiplies the output: zero outside the map, so that a window's next conv sees the zero
    padding the whole map's conv would (the ReLU after it keeps the zeros)."""

    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % groups:
            raise ConfigError(f"PixelGroupNorm: {num_channels} channels are not divisible "
                              f"into {groups} groups.")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.inside: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # every pixel a sample of PyTorch's fused group norm (which saves only its input and
        # two statistics per group for backward)
        flat = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        out = F.group_norm(flat, self.groups, self.weight, self.bias, self.eps)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        return out if self.inside is None else out * self.inside


def _window_local_head(channels: int, num_classes: int) -> FCOSHead:
    """torchvision's FCOS head with :class:`PixelGroupNorm` in its conv towers, in groups of
    at least 16 channels (at most torchvision's 32 groups): a pixel's group of 2 channels
    (64 channels in 32 groups) would normalise to ±1 and lose its values."""
    head = FCOSHead(channels, 1, num_classes)
    norm = partial(PixelGroupNorm, groups=max(1, min(32, channels // 16)))
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, norm_layer=norm)
    return head


class Detector(nn.Module):
    """An FCOS detector without torchvision's resizing transform (see the module doc).

    ``features(x (B, C, H, W))`` → FPN maps ``[(B, F, H/s_l, W/s_l)]``; ``losses(maps,
    targets, image_sizes)`` → FCOS's loss dict; ``detect(maps, image_sizes)`` → one dict per
    image (``boxes`` xyxy, ``scores``, ``labels``) in the input's pixels.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, score_thresh: float = 0.05,
                 detections: int = 100, window_local: bool = False) -> None:
        super().__init__()
        strides = _strides(backbone)
        #: The FPN levels' strides; FCOS's anchor size per level equals its stride.
        self.strides = strides
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        head = _window_local_head(backbone.out_channels, num_classes + 1) if window_local \
            else None
        self.fcos = FCOS(backbone, num_classes + 1, anchor_generator=anchors, head=head,
                         score_thresh=score_thresh, detections_per_img=detections,
                         image_mean=[0.0], image_std=[1.0])
        self.fcos.transform = None  # gigapatch sizes and normalises the input itself

    @property
    def channels(self) -> int:
        """Channels of every FPN map."""
        return int(self.fcos.backbone.out_channels)

    @property
    def halo(self) -> int:
        """The head's receptive-field radius in map pixels: its 3×3 tower convs + the 3×3
        output conv."""
        tower = self.fcos.head.classification_head.conv
        return sum(isinstance(m, nn.Conv2d) for m in tower) + 1

    def window_head(self, windows: torch.Tensor, inside: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """The window-local head on windows of one level's map ``(P, F, side, side)`` whose
        pixels outside the map are zero (``inside`` ``(P, 1, side, side)``: 1 inside) →
        FCOS's head dict (``(P, side², ·)``), equal where the window's pixels are more than
        :attr:`halo` from its edge to the head applied to the whole map."""
        norms = [m for m in self.fcos.head.modules() if isinstance(m, PixelGroupNorm)]
        if not norms:
            raise ConfigError("window_head needs a detector built with window_local=True.")
        for m in norms:
            m.inside = inside
        try:
            return self.fcos.head([windows])
        finally:
            for m in norms:
                m.inside = None

    def base_anchors(self, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """Each level's zero-centred anchor ``(4,)`` (torchvision's rounding); the anchor of
        map pixel ``(i, j)`` at stride ``s`` is it shifted by ``(j·s, i·s, j·s, i·s)``."""
        gen = self.fcos.anchor_generator
        return [gen.generate_anchors(list(sizes), list(ratios), dtype, device)[0]
                for sizes, ratios in zip(gen.sizes, gen.aspect_ratios)]

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

    def decode(self, head: list[dict[str, torch.Tensor]], anchors: list[torch.Tensor],
               image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """FCOS's post-processing of ``P`` parts of one image (e.g. windows): per level
        ``head[l]`` (``cls_logits`` ``(P, A_l, K+1)``, ``bbox_regression`` ``(P, A_l, 4)``,
        ``bbox_ctrness`` ``(P, A_l, 1)``) at anchors ``anchors[l]`` ``(P, A_l, 4)`` in image
        pixels → one detections dict per part, boxes clipped to ``image_size``."""
        split = {key: [h[key] for h in head] for key in head[0]}
        per_part = [[a[i] for a in anchors] for i in range(anchors[0].shape[0])]
        return self.fcos.postprocess_detections(split, per_part, [image_size] * len(per_part))


def merge_detections(parts: list[dict[str, torch.Tensor]], iou: float, keep: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """One image's detections found part by part (tiles, windows) merged: torchvision's
    ``batched_nms`` per class at ``iou``, the best ``keep`` kept."""
    if not parts:
        return {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
                "labels": torch.zeros(0, dtype=torch.int64, device=device)}
    boxes = torch.cat([d["boxes"] for d in parts])
    scores = torch.cat([d["scores"] for d in parts])
    labels = torch.cat([d["labels"] for d in parts])
    best = batched_nms(boxes, scores, labels, iou)[:keep]
    return {"boxes": boxes[best], "scores": scores[best], "labels": labels[best]}


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
                    weights: str | None = None, window_local: bool = False) -> Detector:
    """Build the FCOS detector ``name`` for ``num_classes`` object classes (labels 1..K).

    ``weights``: a local file for the backbone (``model.weights``; e.g. an ImageNet ResNet
    state dict, matched by key suffix) or a whole gigapatch detector's checkpoint.
    ``window_local``: the head normalises pixel by pixel (see the module doc)."""
    if pretrained and weights:
        raise ConfigError("model.pretrained and model.weights both set: choose one.")
    if not name.startswith("fcos_"):
        raise ConfigError(f"task.kind detect needs an FCOS model.encoder: one of "
                          f"{detector_names()} (not {name!r}).")
    det = Detector(DETECTORS.get(name)(in_chans, pretrained), num_classes,
                   window_local=window_local)
    if weights:
        load_weights(det.backbone, weights, f"detector {name} backbone")
    return det


def detector_names() -> list[str]:
    return DETECTORS.names()

