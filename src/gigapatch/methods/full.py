"""Full-image gradient descent ("GD"), the baseline every claim is measured against.

The whole image goes through one network: the encoder named in the config, with its output
size set to the number of classes. With ``method.downsample_to = S`` the image is first resized
on the host (antialiased) so that its longer side is ``S`` pixels: the usual workaround under a
memory limit, which loses small details. Memory grows with the (downsampled) H·W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.data.batch import LazyBatch
from gigapatch.core.errors import ConfigError
from gigapatch.methods.base import METHODS, Method
from gigapatch.models.encoders import create_encoder


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

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        d = cfg.method.downsample_to
        if d is not None and d < 8:
            raise ConfigError(f"method.downsample_to = {d} is too small; use ≥ 8 pixels or null.")
        self.net = create_encoder(
            cfg.model.encoder, self.num_classes, self.in_chans, cfg.model.pretrained
        )

    def host_transform(self, images: torch.Tensor | LazyBatch) -> torch.Tensor:
        d = self.cfg.method.downsample_to
        if isinstance(images, LazyBatch):  # from disk: read a downsampled pyramid level
            h, w = images.shape[-2:]
            if d is None or max(h, w) <= d:
                return images.load()
            return images.resized(downsampled_size(h, w, d)).float() / 255.0
        return images if d is None else downsample(images, d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` host images (already host-transformed) → ``(B, K)`` logits."""
        return self.net(self.prepare(images))

    def train_step(
        self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self(images), targets)
        loss.backward()
        self.optimizer_step(optimizer)
        return float(loss.detach())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(self.host_transform(images))
