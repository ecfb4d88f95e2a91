"""PatchGD's latent maps for detection: one Z per FPN level, handled window by window.

For a grid of ``p × p`` patches (no overlap) and FPN strides ``s_l``, level ``l``'s map
``Z_l`` is ``(B, F, m·p/s_l, n·p/s_l)``: patch ``(i, j)`` owns the ``q_l × q_l`` block at
``(i·q_l, j·q_l)``, ``q_l = p / s_l``. Each level is a
:class:`~gigapatch.methods.latent_map.MapGeometry` with the stride ``s_l`` and the FCOS head's
halo, so windows, pasting the re-encoded blocks and the global patch's upsampled maps are
:mod:`.latent_map`'s functions, exact as there. θ2, the FCOS head with pixel-local
normalisation (:class:`~gigapatch.models.detection.PixelGroupNorm`), runs on each window; its
output on the window's block is the whole map's output there (:func:`crop_blocks`).

**Boxes across patch borders.** Boxes are never clipped to patches. Every anchor of a
re-encoded block (one per map pixel, at the image position torchvision's anchor generator
gives it: :func:`block_anchors`) is matched by FCOS's own rule (centre sampling, inside the
box, the scale range of its level) against *all* of its image's boxes in image pixels, and it
regresses the distances to the whole box's sides, which may lie beyond its patch: θ2 sees past
the patch through Z's halo and the global map. An object cut by a patch border is thus learnt
from each sampled patch holding anchors matched to it, and the union over all patches is
exactly the whole map's assignment (``tests/methods/test_patchgd_detect.py``).
"""

from __future__ import annotations

import torch

from gigapatch.core.grid import PatchGrid
from gigapatch.methods.latent_map import MapGeometry

__all__ = ["block_anchors", "crop_blocks", "level_geometries", "per_image"]

Head = dict[str, torch.Tensor]


def level_geometries(grid: PatchGrid, strides: list[int], halo: int) -> list[MapGeometry]:
    """One :class:`MapGeometry` per FPN level (``grid.patch_size`` divisible by each
    stride)."""
    return [MapGeometry(grid, s, halo) for s in strides]


def block_anchors(base: list[torch.Tensor], cells: list[int], geos: list[MapGeometry]
                  ) -> list[torch.Tensor]:
    """The anchors of each cell's block, per level: ``(P, q_l², 4)`` xyxy image pixels, row
    major within the block. ``base[l]`` ``(4,)`` is level ``l``'s zero-centred anchor; map
    pixel ``(y, x)`` at stride ``s`` is shifted by ``(x·s, y·s, x·s, y·s)``, as torchvision's
    ``AnchorGenerator`` does over a whole map."""
    out = []
    for anchor, geo in zip(base, geos):
        q, s = geo.q, geo.s
        offs = torch.arange(q, device=anchor.device, dtype=anchor.dtype)
        origins = torch.tensor([geo.origin(c) for c in cells], device=anchor.device,
                               dtype=anchor.dtype).view(-1, 2)  # (P, 2): y, x
        ys = (origins[:, 0, None] + offs) * s  # (P, q)
        xs = (origins[:, 1, None] + offs) * s
        y = ys[:, :, None].expand(-1, q, q)
        x = xs[:, None, :].expand(-1, q, q)
        shifts = torch.stack([x, y, x, y], dim=-1).reshape(len(cells), q * q, 4)
        out.append(shifts + anchor)
    return out


def crop_blocks(head: Head, geo: MapGeometry) -> Head:
    """The FCOS head's outputs on windows (``(P, side², D)`` each, row major) cut to the
    windows' blocks: ``(P, q², D)``."""
    m, q, side = geo.margin, geo.q, geo.side
    out = {}
    for key, value in head.items():
        p, _, d = value.shape
        block = value.view(p, side, side, d)[:, m : m + q, m : m + q]
        out[key] = block.reshape(p, q * q, d)
    return out


def per_image(parts: list[torch.Tensor], b: int) -> torch.Tensor:
    """Per-level tensors ``(B·k, A_l, D)`` of windows in image-major order → ``(B, Σ_l k·A_l,
    D)``: each image's anchors level by level (the order FCOS's scale ranges expect)."""
    return torch.cat([t.reshape(b, -1, t.shape[-1]) for t in parts], dim=1)
