"""The dense latent map Z of PatchGD for segmentation, handled window by window.

For an image cut into an ``m × n`` grid of ``p × p`` patches (no overlap) and an output stride
``s`` (``q = p / s``), Z is ``(B, C, m·q, n·q)``: patch ``(i, j)`` owns the ``q × q`` block at
``(i·q, j·q)``. Z lives on the *host* (CPU; in the compute dtype), so device memory never holds
more than the windows θ2 works on.

θ2's input at a map pixel is ``[Z, G, P]`` (with global context ``concat``; ``add`` uses
``Z + G`` and ``P``): ``G`` the global patch's map upsampled (bilinear) to Z's size, ``P`` the
summary of the whole map (:mod:`~gigapatch.methods.latent_pool`), broadcast; zero outside
the map (the zero padding of θ2's convs).
A *window* is one patch's block plus θ2's halo ``h`` and one more pixel (for the bilinear
upsampling of θ2's output to pixels): side ``q + 2(h + 1)``. Everything here builds those
windows exactly as cropping the whole map would, so the loss and the gradient of a window are
exact (``tests/methods/test_patchgd_dense.py`` checks it against autograd over the whole map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gigapatch.core.grid import PatchGrid

__all__ = ["MapGeometry", "global_windows", "paste", "pixel_logits", "valid", "windows_of"]


@dataclass(frozen=True)
class MapGeometry:
    """Where patches sit in Z: ``grid`` (stride = patch), ``s`` pixels per map pixel, ``halo``
    of θ2; ``margin = halo + 1`` map pixels around each block."""

    grid: PatchGrid
    s: int
    halo: int

    @property
    def q(self) -> int:
        """Map pixels per patch side."""
        return self.grid.patch_size // self.s

    @property
    def size(self) -> tuple[int, int]:
        """``(Hz, Wz)`` of the map."""
        return self.grid.rows * self.q, self.grid.cols * self.q

    @property
    def margin(self) -> int:
        return self.halo + 1

    @property
    def side(self) -> int:
        """Side of a window: the block plus the margin on each side."""
        return self.q + 2 * self.margin

    def origin(self, cell: int) -> tuple[int, int]:
        """Top-left map pixel of cell ``cell``'s block."""
        i, j = divmod(int(cell), self.grid.cols)
        return i * self.q, j * self.q


def windows_of(z: torch.Tensor, image: list[int], cells: list[int], geo: MapGeometry,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Windows of host map ``z`` ``(B, C, Hz, Wz)`` around the blocks of ``cells`` of images
    ``image`` (``P`` each) → ``(P, C, side, side)`` on ``device``, zeros outside the map."""
    hz, wz = geo.size
    m, side = geo.margin, geo.side
    out = torch.zeros(len(cells), z.shape[1], side, side, dtype=z.dtype)
    for w, (b, cell) in enumerate(zip(image, cells)):
        y, x = geo.origin(cell)
        y0, x0 = y - m, x - m
        ya, yb, xa, xb = max(y0, 0), min(y0 + side, hz), max(x0, 0), min(x0 + side, wz)
        out[w, :, ya - y0 : yb - y0, xa - x0 : xb - x0] = z[b, :, ya:yb, xa:xb]
    return out.to(device=device, dtype=dtype, non_blocking=True)


def paste(windows: torch.Tensor, image: list[int], cells: list[int], new: torch.Tensor,
          new_image: list[int], new_cells: list[int], geo: MapGeometry) -> torch.Tensor:
    """``windows`` (from :func:`windows_of`) with the blocks ``new`` ``(P', C, q, q)`` (cells
    ``new_cells`` of images ``new_image``; with gradients) written wherever they fall inside a
    window, also in its margin. Differentiable in ``new``.

    One gather from ``[windows, new]`` with an index built from the cell positions: its
    memory does not depend on which cells were sampled (adjacent or not), so a fake-tensor
    estimate, which cannot see the positions, prices it exactly."""
    p, c, side, _ = windows.shape
    q, m = geo.q, geo.margin
    base = p * side * side
    index = torch.arange(base, device=windows.device).view(p, side, side)
    block = torch.arange(q * q, device=windows.device).view(q, q)
    for w, (b, cell) in enumerate(zip(image, cells)):
        wy, wx = geo.origin(cell)
        wy, wx = wy - m, wx - m
        for n, (nb, ncell) in enumerate(zip(new_image, new_cells)):
            if nb != b:
                continue
            ny, nx = geo.origin(ncell)
            ya, yb = max(ny, wy), min(ny + q, wy + side)
            xa, xb = max(nx, wx), min(nx + q, wx + side)
            if ya < yb and xa < xb:
                index[w, ya - wy : yb - wy, xa - wx : xb - wx] = \
                    base + n * q * q + block[ya - ny : yb - ny, xa - nx : xb - nx]
    src = torch.cat([windows.transpose(0, 1).reshape(c, -1),
                     new.to(windows.dtype).transpose(0, 1).reshape(c, -1)], dim=1)
    return src[:, index.flatten()].view(c, p, side, side).transpose(0, 1)


def valid(image: list[int], cells: list[int], geo: MapGeometry, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """``(P, 1, side, side)``: 1 where a window lies inside the map, 0 outside."""
    hz, wz = geo.size
    ys, xs = _coords(cells, geo, device)
    inside = ((ys >= 0) & (ys < hz))[:, :, None] & ((xs >= 0) & (xs < wz))[:, None, :]
    return inside[:, None].to(dtype)


def global_windows(g: torch.Tensor, image: list[int], cells: list[int], geo: MapGeometry
                   ) -> torch.Tensor:
    """The global patch's map ``g`` ``(B, C, q, q)`` upsampled (bilinear, as
    ``F.interpolate(g, size=(Hz, Wz), align_corners=False)``) and cropped to the windows:
    ``(P, C, side, side)``, zero outside the map. Differentiable in ``g``."""
    hz, wz = geo.size
    gh, gw = g.shape[-2:]
    ys, xs = _coords(cells, geo, g.device)  # (P, side) map pixel rows / columns
    sy = ((ys.to(g.dtype) + 0.5) * gh / hz - 0.5).clamp(0, gh - 1)
    sx = ((xs.to(g.dtype) + 0.5) * gw / wz - 0.5).clamp(0, gw - 1)
    ny = sy / max(gh - 1, 1) * 2 - 1 if gh > 1 else torch.zeros_like(sy)
    nx = sx / max(gw - 1, 1) * 2 - 1 if gw > 1 else torch.zeros_like(sx)
    side = geo.side
    grid = torch.stack([nx[:, None, :].expand(-1, side, -1), ny[:, :, None].expand(-1, -1, side)],
                       dim=-1)  # (P, side, side, 2) as (x, y)
    src = torch.stack([g[i] for i in image])
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out * valid(image, cells, geo, g.device, g.dtype)


def pixel_logits(logits: torch.Tensor, image: list[int], cells: list[int], geo: MapGeometry
                 ) -> torch.Tensor:
    """θ2's output on windows ``(P, K, q + 2, q + 2)`` (block plus one map pixel) → pixel logits
    of the patches ``(P, K, p, p)``, as upsampling θ2's whole-map output bilinearly to pixels
    would give them (map borders replicated, as ``F.interpolate`` clamps)."""
    hz, wz = geo.size
    q, s = geo.q, geo.s
    rows, cols = [], []
    for cell in cells:
        y, x = geo.origin(cell)
        rows.append(torch.arange(y - 1, y + q + 1).clamp(0, hz - 1) - (y - 1))
        cols.append(torch.arange(x - 1, x + q + 1).clamp(0, wz - 1) - (x - 1))
    r = torch.stack(rows).to(logits.device)  # (P, q+2): in-window index of each row
    c = torch.stack(cols).to(logits.device)
    k = logits.shape[1]
    fixed = logits.gather(2, r[:, None, :, None].expand(-1, k, -1, q + 2))
    fixed = fixed.gather(3, c[:, None, None, :].expand(-1, k, q + 2, -1))
    up = F.interpolate(fixed, scale_factor=s, mode="bilinear", align_corners=False)
    return up[..., s : s + q * s, s : s + q * s]


def _coords(cells: list[int], geo: MapGeometry, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Map rows and columns of each window's pixels: two ``(P, side)`` long tensors."""
    m, side = geo.margin, geo.side
    offs = torch.arange(side, device=device) - m
    origins = [geo.origin(c) for c in cells]  # Python ints: no tensors built from data
    return (torch.stack([offs + y for y, _ in origins]),
            torch.stack([offs + x for _, x in origins]))
