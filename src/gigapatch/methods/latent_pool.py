"""The global summary ``P`` of dense PatchGD's latent map Z, kept as running sums.

θ2 sees, at every map pixel, a summary of the whole map (``method.z_pool``):

- ``mean``: ``P = Σ_i z_i / n`` over the map's ``n`` pixels;
- ``gated``: ``P = Σ_i w_i z_i / Σ_i w_i`` with ``w_i = σ(a·z_i + c)``, a learnt 1×1 gate
  (part of θ2). On a sparse image (0.1 % of the pixels on objects) the plain mean is almost
  all background, so what θ2 needs from far away (which objects there are, and how many)
  reaches it scaled down by the background's share; the gate learns to weigh the pixels
  that matter, and the normalised sum keeps their proportions (counts), not just presence.
  The gate starts at ``σ(0) = ½`` everywhere, i.e. at the plain mean;
- ``share``: for a map whose channels are class scores with channel 0 the background (a
  frozen θ1 pretrained to segment classes, gigapatch's mask convention; ``model.latent_dim``
  = its number of classes). With ``s_c = Σ_i softmax(z_i)_c / n`` each class's share of the
  map, ``P_0 = log s_0`` (how much of the map is background) and, for the object classes
  ``c ≥ 1``, ``P_c = log s_c − max_{c' ≥ 1} log s_c'``: 0 for the most common object class,
  ``−log 3`` for a class with a third of its area. Nothing to learn, and it counts objects
  per class, whatever the background's size. θ2 also gets one channel per map pixel,
  :meth:`MapPool.pixel_features`: ``a_i = Σ_{c ≥ 1} softmax(z_i)_c P_c``, how common the
  pixel's own class is (0 on the most common class's objects and on background, negative on
  rarer objects). Without it a small θ2 learns that comparison from a few thousand steps
  only weakly; with it, a threshold does.

Z lives on the host and only the re-encoded blocks carry gradients, so a step keeps the
whole map's sums ``(W (B,), WZ (B, C))`` in float64 and, per inner step, swaps the sampled
blocks' terms for their re-encoded ones (differentiable). The rest of the map is weighed with
the gate as it is when its terms are computed; with all cells re-encoded (k = N) the summary
is exact.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gigapatch.core.hostmaps import host_maps
from gigapatch.methods.latent_map import MapGeometry

__all__ = ["MapPool", "PoolSums"]

#: Map rows per band when summing a whole host map (bounds the float64 temporaries).
_BAND_ROWS = 64

#: ``share``: the smallest class share taken into the log (a class absent from the map).
_SHARE_FLOOR = 1e-12

PoolSums = tuple[torch.Tensor, torch.Tensor]  # (W (B,), WZ (B, C))


class MapPool(nn.Module):
    """``method.z_pool``: the summary ``P`` ``(B, C)`` of a dense map from its sums."""

    def __init__(self, channels: int, kind: str = "mean") -> None:
        super().__init__()
        self.kind = kind
        self.gate = nn.Conv2d(channels, 1, 1) if kind == "gated" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def terms(self, z: torch.Tensor) -> PoolSums:
        """Per map ``(P, C, h, w)``: ``(Σ w (P,), Σ w·z (P, C))`` (``w = 1`` for ``mean``;
        ``share`` sums ``softmax(z)`` over the channels instead of ``z``),
        on ``z``'s device and in its dtype; differentiable in ``z`` and the gate."""
        if self.gate is None:
            count = torch.full(z.shape[:1], z.shape[2] * z.shape[3], dtype=z.dtype,
                               device=z.device)
            scores = torch.softmax(z, dim=1) if self.kind == "share" else z
            return count, scores.sum(dim=(2, 3))
        weight, bias = self.gate.weight, self.gate.bias
        w = torch.sigmoid(F.conv2d(z, weight.to(z.device, z.dtype), bias.to(z.device, z.dtype)))
        return w.sum(dim=(1, 2, 3)), (w * z).sum(dim=(2, 3))

    @torch.no_grad()
    def map_sums(self, z: torch.Tensor) -> PoolSums:
        """The whole host map ``(B, C, Hz, Wz)``'s sums in float64, band by band (the bands'
        temporaries are host memory, booked as such:
        :func:`~gigapatch.core.hostmaps.host_maps`)."""
        b, c, hz, _ = z.shape
        w_sum = torch.zeros(b, dtype=torch.float64)
        wz_sum = torch.zeros(b, c, dtype=torch.float64)
        if self.kind == "mean":
            return w_sum + z.shape[2] * z.shape[3], z.sum(dim=(2, 3), dtype=torch.float64)
        with host_maps():
            for top in range(0, hz, _BAND_ROWS):
                w, wz = self.terms(z[:, :, top : top + _BAND_ROWS].to(torch.float64))
                w_sum += w
                wz_sum += wz
        return w_sum, wz_sum

    @torch.no_grad()
    def block_sums(self, z: torch.Tensor, geo: MapGeometry, image: list[int], cells: list[int]
                   ) -> PoolSums:
        """The sums over the blocks of ``cells`` of images ``image`` of host map ``z``,
        per image: ``(B,)``, ``(B, C)`` float64."""
        q = geo.q
        w_sum = torch.zeros(z.shape[0], dtype=torch.float64)
        wz_sum = torch.zeros(z.shape[0], z.shape[1], dtype=torch.float64)
        for bi, cell in zip(image, cells):
            y, x = geo.origin(cell)
            w, wz = self.terms(z[bi : bi + 1, :, y : y + q, x : x + q].to(torch.float64))
            w_sum[bi] += w[0]
            wz_sum[bi] += wz[0]
        return w_sum, wz_sum

    def summary(self, rest: PoolSums, new: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """``P`` ``(B, C)`` from the sums of the map without the sampled blocks (``rest``,
        host float64) and the ``b·k`` re-encoded blocks ``new`` ``(B·k, C, q, q)`` (image
        after image, with gradients), in float32 at least."""
        w_new, wz_new = self.terms(new)
        dtype = torch.promote_types(new.dtype, torch.float32)  # bf16: 3 digits of a map-wide sum
        w = rest[0].to(new.device, dtype) + w_new.to(dtype).view(b, k).sum(1)
        wz = rest[1].to(new.device, dtype) + wz_new.to(dtype).view(b, k, -1).sum(1)
        return self.finish(w, wz)

    def finish(self, w: torch.Tensor, wz: torch.Tensor) -> torch.Tensor:
        """``P`` ``(B, C)`` from the sums ``w`` ``(B,)`` and ``wz`` ``(B, C)``: their ratio,
        or for ``share`` the log shares (background absolute, object classes relative to the
        most common one)."""
        ratio = wz / w[:, None]
        if self.kind != "share":
            return ratio
        logs = ratio.clamp_min(_SHARE_FLOOR).log()
        objects = logs[:, 1:] - logs[:, 1:].max(dim=1, keepdim=True).values
        return torch.cat([logs[:, :1], objects], dim=1)

    @property
    def pixel_channels(self) -> int:
        """How many channels :meth:`pixel_features` adds to θ2's input (1 for ``share``)."""
        return 1 if self.kind == "share" else 0

    def pixel_features(self, z: torch.Tensor, pool: torch.Tensor) -> torch.Tensor | None:
        """``share``: the agreement of each pixel of ``z`` ``(P, C, h, w)`` with its map's
        summary ``pool`` ``(P, C)``, ``Σ_{c ≥ 1} softmax(z)_c · P_c`` ``(P, 1, h, w)``; ``None``
        for the other kinds. Pixel-local: a window gives what the whole map gives there."""
        if self.kind != "share":
            return None
        prob = torch.softmax(z, dim=1)[:, 1:]
        return (prob * pool[:, 1:, None, None].to(z.dtype)).sum(dim=1, keepdim=True)

    @torch.no_grad()
    def whole(self, z: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``P`` ``(B, C)`` float32 of a whole host map ``(B, C, Hz, Wz)``, on ``device``."""
        w, wz = self.map_sums(z)
        return self.finish(w, wz).float().to(device)
