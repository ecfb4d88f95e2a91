"""Full-image gradient descent ("GD"), the baseline every claim is measured against.

The whole image goes through one network: for image-level tasks the encoder named by
``model.encoder`` with its output size set to the number of classes; for dense tasks
(segmentation) the dense network of that name (:mod:`gigapatch.models.dense`: ``tiny_unet``,
``smp:<arch>[:<encoder>]``) with one logit per class and pixel. With
``method.downsample_to = S`` the image is first resized on the host (antialiased) so that its
longer side is ``S`` pixels: the usual workaround under a memory limit, which loses small
details; a dense prediction is then upsampled back to the full mask (bilinear logits). For
detection (``task.kind: detect``) the network is the FCOS detector of that name
(:mod:`gigapatch.models.detection`); a downsampled input trains on boxes scaled by the same
factor and its detections are scaled back to image pixels. Memory grows with the
(downsampled) H·W.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.data.batch import Images, LazyBatch, one_image
from gigapatch.core.errors import ConfigError
import gigapatch.methods.base as base
from gigapatch.methods.base import METHODS, Context, Method, band_blocks
from gigapatch.models.dense import create_dense_net
from gigapatch.models.detection import create_detector
from gigapatch.models.encoders import create_encoder
from gigapatch.tasks import Task
from gigapatch.tasks.segment import fit_rows, fit_to


def downsampled_size(h: int, w: int, longer_side: int) -> tuple[int, int]:
    """``(H', W')`` with ``max(H', W') == longer_side`` and the aspect ratio kept."""
    scale = longer_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def downsample(images: torch.Tensor, longer_side: int) -> torch.Tensor:
    """Antialiased resize of ``(B, C, H, W)`` so that ``max(H, W) == longer_side``.

    Returns float images in [0, 1] ``(B, C, H', W')`` (uint8 input is scaled by 1/255);
    images already that small are returned unchanged.
    """
    h, w = images.shape[-2:]
    if max(h, w) <= longer_side:
        return images
    size = downsampled_size(h, w, longer_side)
    x = images.float() / 255.0 if not images.is_floating_point() else images
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


@METHODS.register("full")
class FullImage(Method):
    """``(B, C, H, W)`` → encoder → ``(B, K)`` logits, one optimizer step per batch."""

    budget_knobs = ("input_side",)
    encoder_attr = "net"
    detects = True

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        self._full_hw: tuple[int, ...] | None = None  # the last batch's size before host_transform
        d = cfg.method.downsample_to
        if d is not None and d < 8:
            raise ConfigError(f"method.downsample_to = {d} is too small; use ≥ 8 pixels or null.")
        if task.detects:
            self.net = create_detector(cfg.model.encoder, self.num_classes, self.in_chans,
                                       cfg.model.pretrained, cfg.model.weights)
        elif task.dense:
            self.net = create_dense_net(cfg.model.encoder, self.num_classes, self.in_chans,
                                        cfg.model.pretrained, cfg.model.weights)
        else:
            self.net = create_encoder(
                cfg.model.encoder, self.num_classes, self.in_chans, cfg.model.pretrained,
                weights=cfg.model.weights, checkpoint_activations=cfg.model.checkpoint_activations,
            )

    def host_transform(self, images: torch.Tensor | LazyBatch) -> torch.Tensor:
        self._full_hw = tuple(images.shape[-2:])  # boxes are scaled from this size
        d = self.cfg.method.downsample_to
        if isinstance(images, LazyBatch):  # from disk: read a downsampled pyramid level
            h, w = images.shape[-2:]
            if d is None or max(h, w) <= d:
                return images.load()
            return images.resized(downsampled_size(h, w, d)).float() / 255.0
        return images if d is None else downsample(images, d)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` host images (already host-transformed) → ``(B, K)`` logits, or
        ``(B, K, H, W)`` for dense tasks (at the input's size; the task upsamples)."""
        return self.net(self.prepare(images))

    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        h, w = image_hw
        d = self.cfg.method.downsample_to
        if d is not None and max(h, w) > d:
            h, w = downsampled_size(h, w, d)
        return {"input_size": h if h == w else [h, w]}

    def _scale(self, images: torch.Tensor, full_hw: tuple[int, int]) -> float:
        """Input pixels per image pixel (``≤ 1`` when downsampled)."""
        return images.shape[-1] / full_hw[1]

    def _detect_losses(self, images: torch.Tensor, targets: Any, full_hw: tuple[int, int]
                       ) -> dict[str, torch.Tensor]:
        f = self._scale(images, full_hw)
        scaled = [{"boxes": t["boxes"].to(self.device) * f, "labels": t["labels"].to(self.device)}
                  for t in targets]
        size = [tuple(images.shape[-2:])] * images.shape[0]
        return self.net.losses(self.net.features(self.prepare(images)), scaled, size)

    def train_step(self, images: torch.Tensor, targets: Any, ctx: Context) -> float:
        ctx.zero_grad()
        if self.task.detects:  # boxes in the (downsampled) input's pixels
            loss = ctx.run(lambda: self.task.loss(
                self._detect_losses(images, targets, self._full_hw or tuple(images.shape[-2:])),
                targets))
            ctx.backward(loss)
            ctx.step()
            return float(loss.detach())
        loss = ctx.run(lambda: self.task.loss(self.logits(images), targets))
        ctx.backward(loss)
        ctx.step()
        return float(loss.detach())

    def predict(self, images: Images) -> Any:
        if self.task.detects:
            x = self.host_transform(images)
            f = self._scale(x, tuple(images.shape[-2:]))
            found = self.net.detect(self.net.features(self.prepare(x)),
                                    [tuple(x.shape[-2:])] * x.shape[0])
            return [{**d, "boxes": d["boxes"] / f} for d in found]  # back to image pixels
        out = self.logits(self.host_transform(images))
        return fit_to(out, images.shape[-2:]) if self.task.dense else out

    def mask_blocks(self, images: Images) -> tuple[int, Iterator[tuple[int, int, torch.Tensor]]]:
        """Dense: the first image's class ids in blocks of :data:`~.base.MASK_BLOCK`: the
        network on the (downsampled) input, its logits upsampled band by band
        (:func:`~gigapatch.tasks.segment.fit_rows`), never to the whole image at once."""
        if not self.task.dense:
            return super().mask_blocks(images)
        first = one_image(images)
        logits = self.logits(self.host_transform(first))[0]  # (K, h, w)
        size, block = tuple(first.shape[-2:]), base.MASK_BLOCK
        bands = ((top, fit_rows(logits, size, top, min(block, size[0] - top)))
                 for top in range(0, size[0], block))
        return block, band_blocks(bands, size[1])
