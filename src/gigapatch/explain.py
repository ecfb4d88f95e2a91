"""Show what a prediction rests on: IPS's selected patches, PatchGD's per-patch saliency.

- IPS: the image (a downsampled view of it) with the M selected patches outlined and coloured
  by their attention weight (:func:`draw_patch_weights`).
- PatchGD: occlusion saliency of the Z cells (:func:`occlusion_saliency`): how much the
  predicted class's probability drops when a cell's embedding is replaced by the mean
  embedding, drawn as a heat map over the image (:func:`draw_saliency`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import cm, colors
from matplotlib.patches import Rectangle

from gigapatch.core.grid import PatchGrid
from gigapatch.data.batch import read_resized
from gigapatch.io.readers import ImageReader
from gigapatch.plots import plt, save_figure

__all__ = [
    "draw_mask_overlay",
    "draw_patch_weights",
    "draw_saliency",
    "occlusion_explain",
    "occlusion_saliency",
    "thumbnail",
]

#: Longest side of the drawn image.
MAX_SIDE = 1024


def thumbnail(
    image: torch.Tensor | ImageReader, max_side: int = MAX_SIDE
) -> tuple[np.ndarray, float]:
    """A view of ``(C, H, W)`` ``uint8`` (or [0, 1] float) image no longer than ``max_side``;
    an :class:`~gigapatch.io.readers.ImageReader` is read from its closest pyramid level.

    Returns ``(array (h, w) or (h, w, 3) float in [0, 1], scale)`` with ``scale = h / H``.
    """
    h, w = _size(image)
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if isinstance(image, ImageReader):
        x = read_resized(image, size)[None].float() / 255.0
    else:
        x = image[None].float()
        if not image.is_floating_point():
            x = x / 255.0
        if scale < 1.0:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    arr = x[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return (arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]), size[0] / h


def _size(image: torch.Tensor | ImageReader) -> tuple[int, int]:
    """``(H, W)`` of a ``(C, H, W)`` tensor or a reader."""
    if isinstance(image, ImageReader):
        return image.shape[0], image.shape[1]
    return image.shape[-2], image.shape[-1]


def _figure(image: torch.Tensor, title: str):  # noqa: ANN202 - matplotlib objects
    arr, scale = thumbnail(image)
    h, w = arr.shape[:2]
    fig, ax = plt.subplots(figsize=(7 * w / max(h, w) + 1.2, 7 * h / max(h, w)))
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return fig, ax, scale


def draw_patch_weights(
    image: torch.Tensor | ImageReader,
    grid: PatchGrid,
    cells: torch.Tensor,
    weights: torch.Tensor,
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Draw ``(C, H, W)`` ``image`` (or a reader's image) with patches ``cells`` ``(M,)``
    outlined, coloured by ``weights`` ``(M,)`` (e.g. IPS attention); writes a PNG to ``path``."""

    fig, ax, scale = _figure(image, title)
    w = weights.detach().float().cpu()
    lo, hi = (float(w.min()), float(w.max())) if len(w) else (0.0, 1.0)
    norm = colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    cmap = plt.get_cmap("plasma")
    for cell, weight in sorted(zip(cells.tolist(), w.tolist()), key=lambda t: t[1]):
        y0, x0, h, w_ = grid.box(int(cell))
        ax.add_patch(Rectangle(
            (x0 * scale - 0.5, y0 * scale - 0.5), w_ * scale, h * scale,
            fill=False, edgecolor=cmap(norm(weight)), linewidth=1.5,
        ))
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04,
                 label="attention weight")
    return save_figure(fig, path)


def draw_saliency(
    image: torch.Tensor | ImageReader,
    grid: PatchGrid,
    saliency: torch.Tensor,
    path: str | os.PathLike[str],
    title: str = "",
    label: str = "probability drop when the cell is occluded",
) -> Path:
    """Draw ``(C, H, W)`` ``image`` (or a reader's image) under a heat map of per-cell
    ``saliency`` ``(rows, cols)`` (``label`` names the values); writes a PNG to ``path``."""
    fig, ax, scale = _figure(image, title)
    # One stride-sized tile per cell, centred on the cell's patch.
    off = (grid.patch_size - grid.stride) / 2
    extent = ((off - 0.5) * scale, (off + grid.cols * grid.stride) * scale,
              (off + grid.rows * grid.stride) * scale, (off - 0.5) * scale)
    s = saliency.detach().float().cpu().numpy()
    im = ax.imshow(s, cmap="inferno", alpha=0.55, extent=extent, interpolation="nearest",
                   vmin=min(0.0, float(s.min())), vmax=max(float(s.max()), 1e-12))
    h, w = _size(image)
    ax.set_xlim(-0.5, w * scale - 0.5)
    ax.set_ylim(h * scale - 0.5, -0.5)
    fig.colorbar(im, ax=ax, fraction=0.04, label=label)
    return save_figure(fig, path)


def occlusion_saliency(
    method, images, chunk: int = 64, exact_up_to: int = 1024  # noqa: ANN001
) -> torch.Tensor:
    """Occlusion saliency ``(rows, cols)``; see :func:`occlusion_explain`."""
    return occlusion_explain(method, images, chunk, exact_up_to)[1]


def occlusion_explain(
    method, images, chunk: int = 64, exact_up_to: int = 1024  # noqa: ANN001
) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion saliency of PatchGD's Z cells for one image ``(1, C, H, W)`` (tensor or
    :class:`~gigapatch.data.batch.LazyBatch`) → ``(rows, cols)``.

    A cell's saliency is the drop in the predicted class's probability when its embedding is
    replaced by the mean embedding over the grid (positive: the cell supported the
    prediction). Up to ``exact_up_to`` cells this is computed exactly, ``chunk`` cells at a
    time (N applications of θ2); on larger grids it is its first-order approximation
    ``∂p/∂Z · (Z − mean)``, one backward pass through θ2. Costs one fill. Call in eval mode.

    Returns ``(logits (1, K), saliency (rows, cols))``: the prediction comes with it, so
    explaining costs no second fill.
    """
    if images.shape[0] != 1:
        raise ValueError("saliency is computed for one image at a time")
    grid = method.grid(images)
    with torch.no_grad():
        z = method.fill(images, grid)  # (1, N, C)
        g = None
        if method.cfg.method.global_context != "none":
            g = method.encode(method.global_patch(images))
        logits = method.logits(z, grid, g)  # (1, K)
    mean = z.mean(dim=1, keepdim=True)  # (1, 1, C)
    n = grid.num_patches
    if n > exact_up_to:
        with torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            probs = method.logits(zz, grid, g).softmax(dim=1)[0]
            (grad,) = torch.autograd.grad(probs[int(probs.argmax())], zz)
        return logits, (grad * (z - mean)).sum(dim=-1)[0].cpu().view(grid.rows, grid.cols)
    with torch.no_grad():
        probs = logits.softmax(dim=1)[0]
        top = int(probs.argmax())
        drops = torch.empty(n)
        for start in range(0, n, chunk):
            cells = torch.arange(start, min(start + chunk, n))
            zz = z.expand(len(cells), -1, -1).clone()  # (P, N, C)
            zz[torch.arange(len(cells)), cells.to(zz.device)] = mean[0]
            gg = None if g is None else g.expand(len(cells), -1)
            p = method.logits(zz, grid, gg).softmax(dim=1)[:, top]
            drops[start : start + len(cells)] = probs[top].cpu() - p.cpu()
    return logits, drops.view(grid.rows, grid.cols)


def draw_mask_overlay(
    image: torch.Tensor | ImageReader,
    mask: torch.Tensor,
    path: str | os.PathLike[str],
    title: str = "",
    num_classes: int | None = None,
) -> Path:
    """Draw class ids ``mask`` over ``(C, H, W)`` ``image`` (a thumbnail of at most
    :data:`MAX_SIDE` px): background (0) transparent, classes 1.. in distinct colours. The
    mask may be at any resolution covering the image (e.g. already a thumbnail)."""
    fig, ax, scale = _figure(image, title)
    h, w = _size(image)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    k = int(num_classes or int(small.max()) + 1)
    cmap = plt.get_cmap("tab10" if k <= 11 else "tab20")
    rgba = np.zeros((*size, 4), dtype=np.float32)
    ids = small.numpy()
    for c in range(1, k):
        where = ids == c
        if where.any():
            rgba[where] = (*cmap((c - 1) % cmap.N)[:3], 0.6)
    ax.imshow(rgba, interpolation="nearest")
    return save_figure(fig, path)


def draw_boxes(
    image: torch.Tensor | ImageReader,
    detections: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    title: str = "",
    min_score: float = 0.3,
    names: list[str] | None = None,
) -> Path:
    """Draw ``detections`` (``boxes`` xyxy in image pixels, ``scores``, ``labels``) with a
    score ≥ ``min_score`` on a thumbnail of ``(C, H, W)`` ``image``: one colour per class,
    label and score beside each box. ``names[label - 1]`` names a class (default the label)."""
    fig, ax, scale = _figure(image, title)
    cmap = plt.get_cmap("tab10")
    keep = detections["scores"] >= min_score
    for box, score, label in zip(detections["boxes"][keep].tolist(),
                                 detections["scores"][keep].tolist(),
                                 detections["labels"][keep].tolist()):
        x0, y0, x1, y1 = (v * scale for v in box)
        colour = cmap((int(label) - 1) % cmap.N)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.2))
        name = names[int(label) - 1] if names and 0 < int(label) <= len(names) else str(label)
        ax.text(x0, y0 - 1, f"{name} {score:.2f}", color=colour, fontsize=6, va="bottom")
    return save_figure(fig, path)
