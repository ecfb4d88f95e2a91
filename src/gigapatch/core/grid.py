"""Patch grids: cut an image into an m×n grid of p×p patches and put it back together.

A :class:`PatchGrid` is pure geometry (no pixels): image size, patch size and stride give the
grid shape and the pixel box of every cell. The last row/column is padded, never dropped.
Extraction is a strided *view* (``Tensor.unfold``), so cutting an image into patches costs no
copy until a patch is actually used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gigapatch.core.errors import ConfigError

#: ``take(image_idx (P,), cells (P,)) -> (P, C, p, p)``: copies patches out (see ``taker``).
Take = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of a patch grid over an image of ``height × width`` pixels.

    Args:
        height, width: image size in pixels.
        patch_size: side ``p`` of the square patches.
        stride: step between patch origins (default ``p``: no overlap; ``< p``: overlap).

    Cell ``(i, j)`` covers rows ``i*stride … i*stride+p`` and columns ``j*stride … j*stride+p``
    of the image padded (bottom/right) to :attr:`padded_size`. Cells are numbered row-major:
    ``index = i * cols + j``.
    """

    height: int
    width: int
    patch_size: int
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.stride is None:
            object.__setattr__(self, "stride", self.patch_size)
        p, s = self.patch_size, self.stride
        if not (isinstance(p, int) and p > 0):
            raise ConfigError(f"patch_size must be a positive integer, got {p!r}.")
        if not (isinstance(s, int) and 0 < s <= p):
            raise ConfigError(
                f"stride must be an integer in 1..patch_size ({p}), got {s!r}; "
                "use stride = patch_size for no overlap."
            )
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"image size must be positive, got {self.height}×{self.width}.")
        if p > self.height or p > self.width:
            raise ConfigError(
                f"patch_size {p} is larger than the image ({self.height}×{self.width}); "
                f"choose patch_size ≤ {min(self.height, self.width)} or use a larger image."
            )

    @property
    def rows(self) -> int:
        """Number of grid rows ``m``."""
        return math.ceil((self.height - self.patch_size) / self.stride) + 1

    @property
    def cols(self) -> int:
        """Number of grid columns ``n``."""
        return math.ceil((self.width - self.patch_size) / self.stride) + 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``."""
        return self.rows, self.cols

    @property
    def num_patches(self) -> int:
        """``N = m·n``."""
        return self.rows * self.cols

    @property
    def padded_size(self) -> tuple[int, int]:
        """Image size after bottom/right padding so that the grid covers every pixel."""
        return (
            (self.rows - 1) * self.stride + self.patch_size,
            (self.cols - 1) * self.stride + self.patch_size,
        )

    def box(self, index: int) -> tuple[int, int, int, int]:
        """Pixel box ``(y, x, h, w)`` of cell ``index`` in padded-image coordinates."""
        if not 0 <= index < self.num_patches:
            raise IndexError(f"cell {index} outside a grid of {self.num_patches} cells")
        i, j = divmod(index, self.cols)
        return i * self.stride, j * self.stride, self.patch_size, self.patch_size

    def boxes(self) -> torch.Tensor:
        """All boxes as a long tensor ``(N, 4)`` of ``(y, x, h, w)``, row-major."""
        ii, jj = torch.meshgrid(
            torch.arange(self.rows), torch.arange(self.cols), indexing="ij"
        )
        y = ii.reshape(-1) * self.stride
        x = jj.reshape(-1) * self.stride
        p = torch.full_like(y, self.patch_size)
        return torch.stack([y, x, p, p], dim=1)

    def cell_of_pixel(self, y: int, x: int) -> int:
        """Index of the first (top-left-most) cell whose box contains pixel ``(y, x)``."""
        if not (0 <= y < self.height and 0 <= x < self.width):
            raise IndexError(f"pixel ({y}, {x}) outside a {self.height}×{self.width} image")
        i = min(y // self.stride, self.rows - 1)
        j = min(x // self.stride, self.cols - 1)
        return i * self.cols + j

    def pad(self, images: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Pad ``(B, C, H, W)`` bottom/right to :attr:`padded_size` (constant ``value``)."""
        self._check(images)
        ph, pw = self.padded_size
        if (ph, pw) == (self.height, self.width):
            return images
        return F.pad(images, (0, pw - self.width, 0, ph - self.height), value=value)

    def patch_view(self, images: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """All patches of a batch as a strided view (no copy when no padding is needed).

        Args:
            images: ``(B, C, H, W)`` with ``H, W`` equal to this grid's image size.
        Returns:
            ``(B, m, n, C, p, p)``, a view of ``images`` (or of one padded copy when the grid
            does not divide the image).
        """
        x = self.pad(images, value)
        p, s = self.patch_size, self.stride
        return x.unfold(2, p, s).unfold(3, p, s).permute(0, 2, 3, 1, 4, 5)

    def patches(self, images: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """All patches of a batch, row-major: ``(B, C, H, W)`` → ``(B, N, C, p, p)``.

        This materialises every patch; use :meth:`gather` to copy out only a few.
        """
        v = self.patch_view(images, value)
        return v.reshape(v.shape[0], self.num_patches, *v.shape[3:])

    def taker(self, images: Any) -> Take:
        """A function ``take(image_idx (P,), cells (P,)) -> (P, C, p, p)`` copying out patches.

        ``images`` is a ``(B, C, H, W)`` tensor (the patch view is made once, here) or a
        :class:`~gigapatch.data.batch.LazyBatch` (each call reads just those patches from disk).
        Make one taker per batch and call it per chunk.
        """
        if isinstance(images, torch.Tensor):
            v = self.patch_view(images)  # (B, m, n, C, p, p), a view

            def take(bi: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
                bi, cells = bi.to(v.device), cells.to(v.device)
                return v[bi, cells // self.cols, cells % self.cols]

            return take
        p = self.patch_size

        def read(bi: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
            cells = cells.cpu()
            boxes = torch.stack([cells // self.cols, cells % self.cols], dim=1) * self.stride
            return images.take(boxes, bi.cpu(), p)

        return read

    def gather(self, images: Any, index: torch.Tensor) -> torch.Tensor:
        """Copy out selected patches and nothing else.

        Args:
            images: ``(B, C, H, W)`` tensor or :class:`~gigapatch.data.batch.LazyBatch`.
            index: ``(B, k)`` long cell indices per image (row-major).
        Returns:
            ``(B, k, C, p, p)``, a new tensor holding only the ``B·k`` selected patches.
        """
        return self.gather_with(self.taker(images), index)

    @staticmethod
    def gather_with(take: Take, index: torch.Tensor) -> torch.Tensor:
        """:meth:`gather` with a ``take`` from :meth:`taker`: ``(B, k)`` → ``(B, k, C, p, p)``."""
        b, k = index.shape
        bi = torch.arange(b)[:, None].expand(b, k).reshape(-1)
        out = take(bi, index.reshape(-1))
        return out.view(b, k, *out.shape[1:])

    def assemble(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patches`: ``(B, N, C, p, p)`` → ``(B, C, H, W)``.

        Each pixel is read from the last (bottom-right-most) cell covering it, so overlapping
        patches cut from one image give that image back exactly, for any dtype; padding is
        cropped. Vectorised: one gather, no loop over patches.
        """
        b, n, c, p, _ = patches.shape
        if n != self.num_patches or p != self.patch_size:
            raise ValueError(
                f"expected (B, {self.num_patches}, C, {self.patch_size}, {self.patch_size}) "
                f"patches, got {tuple(patches.shape)}"
            )
        s, dev = self.stride, patches.device
        ys, xs = torch.arange(self.height, device=dev), torch.arange(self.width, device=dev)
        i = (ys // s).clamp(max=self.rows - 1)  # last cell row covering each pixel row
        j = (xs // s).clamp(max=self.cols - 1)
        dy, dx = ys - i * s, xs - j * s  # offsets inside that cell
        cells = patches.reshape(b, self.rows, self.cols, c, p, p).permute(0, 3, 1, 2, 4, 5)
        return cells[:, :, i[:, None], j[None, :], dy[:, None], dx[None, :]]  # (B, C, H, W)

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[-2:]) != (self.height, self.width):
            raise ValueError(
                f"expected images (B, C, {self.height}, {self.width}), got {tuple(images.shape)}"
            )

