"""Full-image gradient descent ("GD"), the baseline every claim is measured against.

The whole image goes through one network: for image-level tasks the encoder named by
``model.encoder`` with its output size set to the number of classes; for dense tasks
(segmentation) the dense network of that name (:mod:`gigapatch.models.dense`: ``tiny_unet``,
``smp:<arch>[:<encoder>]``) with one logit per class and pixel. With
``method.downsample_to = S`` the image is first resized on the host (antialiased) so that its
longer side is ``S`` pixels: the usual workaround under a memory limit, which loses small
details; a dense prediction is then upsampled back to the full mask (bilinear logits). Memory
grows with the (downsampled) H·W.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.data.batch import Images, LazyBatch
from gigapatch.core.errors import ConfigError
from gigapatch.methods.base import METHODS, Context, Method
from gigapatch.models.dense import create_dense_net
from gigapatch.models.encoders import create_encoder
from gigapatch.tasks import Task
from gigapatch.tasks.segment import fit_to


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

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        d = cfg.method.downsample_to
        if d is not None and d < 8:
            raise ConfigError(f"method.downsample_to = {d} is too small; use ≥ 8 pixels or null.")
        if task.dense:
            self.net = create_dense_net(cfg.model.encoder, self.num_classes, self.in_chans,
                                        cfg.model.pretrained, cfg.model.weights)
        else:
            self.net = create_encoder(
                cfg.model.encoder, self.num_classes, self.in_chans, cfg.model.pretrained,
                weights=cfg.model.weights, checkpoint_activations=cfg.model.checkpoint_activations,
            )

    def host_transform(self, images: torch.Tensor | LazyBatch) -> torch.Tensor:
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

    def train_step(self, images: torch.Tensor, targets: Any, ctx: Context) -> float:
        ctx.zero_grad()
        loss = ctx.run(lambda: self.task.loss(self.logits(images), targets))
        ctx.backward(loss)
        ctx.step()
        return float(loss.detach())

    def predict(self, images: Images) -> torch.Tensor:
        out = self.logits(self.host_transform(images))
        return fit_to(out, images.shape[-2:]) if self.task.dense else out
