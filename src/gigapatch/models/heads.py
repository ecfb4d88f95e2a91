"""Heads θ2 over the latent grid Z, built by name.

A head maps ``Z: (B, C, m, n)`` to logits ``(B, num_classes)`` for any grid size ``m × n``.

- ``conv``: the PatchGD paper's small CNN over Z: a 3×3 conv, two strided 3×3 convs (each with
  GroupNorm and ReLU), global pooling and a linear layer. Striding early keeps its
  activations small when the grid is large.
- ``linear``: global pooling over the grid, then one linear layer.

Both end in a global pooling, average (default) or max (see :func:`create_head`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gigapatch.core.errors import ConfigError
from gigapatch.core.registry import Registry

HeadBuilder = Callable[..., nn.Module]
HEADS: Registry[HeadBuilder] = Registry("head")


def create_head(
    name: str, in_chans: int, num_classes: int, width: int = 64, pool: str = "avg"
) -> nn.Module:
    """Build the head ``name``: ``(B, in_chans, m, n)`` → ``(B, num_classes)``.

    ``pool`` is the global pooling over the grid: ``avg`` suits labels that add up evidence
    from many cells (counts, sums, grades); ``max`` suits labels decided by one small region
    (a single lesion, one digit on a large canvas) and learns those much faster.
    """
    return HEADS.get(name)(in_chans, num_classes, width, _pool(pool))


def _pool(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "max":
        return nn.AdaptiveMaxPool2d(1)
    raise ConfigError(f"model.head_pool = {kind!r} is invalid: choose 'avg' or 'max'.")


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(max(1, min(8, cout // 4)), cout),
        nn.ReLU(inplace=True),
    ]


@HEADS.register("conv")
class ConvHead(nn.Module):
    """3×3 conv (stride 1) → 3×3 conv (stride 2) → 3×3 conv (stride 2) → global pool → linear."""

    def __init__(
        self, in_chans: int, num_classes: int, width: int = 64, pool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_block(in_chans, width, 1), *_block(width, width, 2), *_block(width, width, 2)
        )
        self.pool = pool or nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(z)).flatten(1))


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Global pooling over the grid, then a linear layer (``width`` is unused)."""

    def __init__(
        self, in_chans: int, num_classes: int, width: int = 64, pool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.pool = pool or nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chans, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(z).flatten(1))


class DenseHead(nn.Module):
    """θ2 for dense latent maps: ``layers`` 3×3 convs without padding (each with ReLU), then a
    1×1 conv to ``out_channels``: ``(P, in, h, w)`` → ``(P, out, h − 2·halo, w − 2·halo)``.

    Its receptive field is ``2·layers + 1`` map pixels: an output pixel depends on the input
    within :attr:`halo` = ``layers`` pixels of it, so applied to a window plus that halo it
    gives exactly what it gives on the whole (zero-padded) map there. No normalisation layer:
    a GroupNorm's statistics would span the window and break that locality.

    With ``cond_chans > 0`` (``model.head_film``) every conv's output is modulated by a
    per-window vector ``cond`` ``(P, cond_chans)`` (FiLM, Perez et al. 2018): ``h ← h·(1 + γ) +
    β`` before the ReLU, ``(γ, β)`` a linear map of ``cond``, zero at the start (the plain
    head). The modulation is the same at every pixel of a window, so the halo is unchanged;
    it lets θ2 *multiply* local features by global ones (e.g. "my digit's class" by "the
    image's most frequent class"), which concatenating ``cond`` as channels cannot do.
    """

    def __init__(self, in_chans: int, out_channels: int, width: int = 32, layers: int = 2,
                 cond_chans: int = 0) -> None:
        super().__init__()
        if layers < 0:
            raise ConfigError(f"model.head_layers = {layers} must be ≥ 0.")
        body: list[nn.Module] = []
        for i in range(layers):
            body += [nn.Conv2d(in_chans if i == 0 else width, width, 3), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)
        self.out = nn.Conv2d(width if layers else in_chans, out_channels, 1)
        self.halo, self.width = layers, width
        self.film = nn.Linear(cond_chans, 2 * width * layers) if cond_chans and layers else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(P, in, h, w)``, ``cond`` ``(P, cond_chans)`` (with FiLM only)."""
        if self.film is None:
            return self.out(self.body(x))
        if cond is None:
            raise ValueError("this DenseHead is conditioned (FiLM): pass cond (P, cond_chans).")
        gb = self.film(cond.to(x.dtype)).view(x.shape[0], self.halo, 2, self.width, 1, 1)
        convs = [m for m in self.body if isinstance(m, nn.Conv2d)]
        for i, conv in enumerate(convs):
            x = F.relu(conv(x) * (1 + gb[:, i, 0]) + gb[:, i, 1])
        return self.out(x)
