"""Patchwise training: the naive tiling baseline (seeds 001/002).

Classification with one label per image: every patch is a training sample that carries its
image's label(s), and the patch predictions are pooled per image at inference. No patch sees
anything beyond itself, which is what PatchGD's latent grid and IPS's attention add.

For a batch of B images cut into N patches (``method.patch_size``/``stride``):

1. **Sample** k = round(s·N) patches per image (s = ``method.sample_fraction``; ``1`` = all of
   them; with ``data.skip_background`` only foreground patches, k at most the fewest
   foreground patches of the batch's images).
2. **Weight** (``method.patch_weighting``): ``mean`` trains on all B·k patches, the loss is
   their mean; ``top_k_loss`` (hard-patch mining) scores the k patches' losses without
   gradients (eval mode, ``fill_chunk`` at a time) and trains on the
   round(``hard_fraction``·k) highest of each image.
3. **Step**: one forward/backward of the trained patches through θ (the encoder with
   ``num_classes`` outputs per label head), one optimizer step.
4. **Predict**: every patch (foreground ones with ``skip_background``), ``fill_chunk`` at a
   time, then the patch logits ``(B, N, K)`` are pooled over the patches
   (``method.pool``): ``mean``, ``max`` (per class), or ``logsumexp`` minus log N (a smooth
   maximum between the two, equal to ``mean`` for equal logits and to ``max`` for one
   dominant patch).

Memory: parameters, gradients and optimizer state + activations of the B·k trained patches
(``top_k_loss``: of the kept ones, plus a no-grad chunk): set by k and p, not by the image.
With one patch covering the whole image this is exactly ``full`` (same network, same loss).

**Segmentation** (dense tasks). θ is the dense network ``model.encoder``
(:mod:`gigapatch.models.dense`); each sampled patch is trained against its crop of the mask
(the task's loss over the patch windows, ``mean`` weighting). Prediction slides the patch over
the image with ``method.stride`` (default p/2: half overlap) and blends overlapping logits with
a pyramid weight (1 at the patch centre, falling linearly to ~0 at its border), so no seam
shows where patches meet; no patch sees beyond itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.grid import PatchGrid, Take
from gigapatch.core.sampling import sample_cells
from gigapatch.data.batch import Images, first_image, one_image, read_chunks
from gigapatch.explain import draw_saliency
import gigapatch.methods.base as base
from gigapatch.methods.base import METHODS, Context, Method, band_blocks, repeated
from gigapatch.models.dense import create_dense_net
from gigapatch.models.encoders import create_encoder
from gigapatch.tasks import Logits, Targets, Task

__all__ = ["Patchwise", "blend_weight", "pool_patches", "repeat_targets"]


def repeat_targets(targets: Targets, repeats: int) -> Targets:
    """Each image's target ``repeats`` times, image by image: ``(B, …)`` → ``(B·repeats, …)``
    (dicts per head alike), matching patches ``(B, k, …)`` flattened to ``(B·k, …)``."""
    if isinstance(targets, dict):
        return {h: repeat_targets(t, repeats) for h, t in targets.items()}
    if not isinstance(targets, torch.Tensor):
        raise TypeError("patchwise training needs image-level targets (tensors or dicts of them)")
    return targets.repeat_interleave(repeats, dim=0)


def pool_patches(logits: torch.Tensor, mode: str, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Pool patch logits ``(B, N, K)`` over the patches → ``(B, K)``.

    ``mode``: ``mean``; ``max`` (per class); ``logsumexp`` (minus log of the patch count, so
    that equal logits pool to themselves). ``mask`` ``(B, N)`` bool: only these patches count
    (an image without any counts all its patches).
    """
    b, n, _ = logits.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=logits.device)
    mask = mask.to(logits.device)
    mask = mask | ~mask.any(dim=1, keepdim=True)  # an empty image counts every patch
    count = mask.sum(dim=1, keepdim=True).to(logits.dtype)  # (B, 1)
    keep = mask[:, :, None]
    if mode == "mean":
        return (logits * keep).sum(dim=1) / count
    masked = logits.masked_fill(~keep, float("-inf"))
    if mode == "max":
        return masked.amax(dim=1)
    if mode == "logsumexp":
        return masked.logsumexp(dim=1) - count.log()
    raise ConfigError(f"method.pool = {mode!r} is invalid; choose mean, max or logsumexp.")


@METHODS.register("patchwise")
class Patchwise(Method):
    """θ = encoder with ``num_classes`` outputs per label head, applied patch by patch."""

    budget_knobs = ("k", "fill_chunk")
    encoder_attr = "net"
    k_means = "patches per image per step"

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        mc = cfg.model
        self.heads = len(self.tasks) or 1
        if task.dense:
            if cfg.method.patch_weighting != "mean":
                raise ConfigError("method.patch_weighting = top_k_loss is for image labels; "
                                  "segmentation patches use mean.")
            self.net = create_dense_net(mc.encoder, self.num_classes, self.in_chans,
                                        mc.pretrained, mc.weights)
            return
        if not hasattr(task, "sample_losses"):
            raise ConfigError(
                f"method patchwise does not support task.kind = {cfg.task.kind!r}; use "
                "classify, multilabel or segment."
            )
        self.net = create_encoder(mc.encoder, self.num_classes * self.heads, self.in_chans,
                                  mc.pretrained, weights=mc.weights,
                                  checkpoint_activations=mc.checkpoint_activations)

    # ------------------------------------------------------------------ pieces
    def grid(self, images: Images) -> PatchGrid:
        """The patch grid of a ``(B, C, H, W)`` batch."""
        h, w = images.shape[-2:]
        return PatchGrid(h, w, self.cfg.method.patch_size, self.cfg.method.stride)

    def plan(self, grid: PatchGrid, mask: torch.Tensor | None = None) -> tuple[int, int]:
        """``(k, kept)``: patches sampled per image and, of those, trained on."""
        m = self.cfg.method
        k = max(1, min(grid.num_patches, round(m.sample_fraction * grid.num_patches)))
        if mask is not None:  # never pad a sample with background patches
            k = min(k, max(1, int(mask.sum(dim=1).min())))
        kept = k if m.patch_weighting == "mean" else max(1, round(m.hard_fraction * k))
        return k, kept

    def split(self, out: torch.Tensor) -> Logits:
        """``(…, heads·K)`` network outputs → ``(…, K)``, or ``{head: (…, K)}`` with heads."""
        if not self.tasks:
            return out
        parts = out.unflatten(-1, (self.heads, self.num_classes))
        return {t: parts[..., i, :] for i, t in enumerate(self.tasks)}

    def patch_outputs(self, patches: torch.Tensor) -> torch.Tensor:
        """θ on host patches: ``(P, C_in, p, p)`` → ``(P, heads·K)`` on the device."""
        return self.net(self.prepare(patches))

    def all_patch_outputs(self, images: Images, grid: PatchGrid) -> torch.Tensor:
        """Every patch's outputs ``(B, N, heads·K)``, ``fill_chunk`` patches at a time (call
        under ``no_grad``)."""
        b, n = images.shape[0], grid.num_patches
        take = grid.taker(images)
        chunk = self.cfg.method.fill_chunk
        dtype = torch.promote_types(self.dtype, torch.float32)  # pooled in float32 (or 64)
        out = torch.empty(b * n, self.num_classes * self.heads, device=self.device, dtype=dtype)
        for start in range(0, b * n, chunk):
            flat = torch.arange(start, min(start + chunk, b * n))
            out[start : start + len(flat)] = self.patch_outputs(take(flat // n, flat % n))
        return out.view(b, n, -1)

    def _scores(self, take: Take, grid: PatchGrid, cells: torch.Tensor, targets: Targets
                ) -> torch.Tensor:
        """Losses ``(B, k)`` of the patches ``cells`` ``(B, k)``, without gradients."""
        b, k = cells.shape
        flat_targets = repeat_targets(targets, k)
        losses = torch.empty(b * k, device=self.device)
        chunk = self.cfg.method.fill_chunk
        for start in repeated(range(0, b * k, chunk)):
            flat = torch.arange(start, min(start + chunk, b * k))
            patches = take(flat // k, cells.flatten()[flat])
            part = _index(flat_targets, flat)
            out = self.split(self.patch_outputs(patches))
            losses[start : start + len(flat)] = self.task.sample_losses(out, part).float()
        return losses.view(b, k)

    # ------------------------------------------------------------------ interface
    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        m = self.cfg.method
        if self.task.dense:
            return {"patch_size": m.patch_size,
                    "predict_stride": m.stride or max(1, m.patch_size // 2)}
        return {"patch_size": m.patch_size, "pool": m.pool, "patch_weighting": m.patch_weighting}

    def train_step(self, images: Images, targets: Targets, ctx: Context) -> float:
        grid = self.grid(images)
        take = grid.taker(images)
        b = images.shape[0]
        mask = self.foreground(images, grid)
        k, kept = self.plan(grid, mask)
        cells = sample_cells(b, grid.num_patches, k, mask=mask)  # (B, k), host
        if kept < k:  # hard-patch mining: the highest losses of each image
            with torch.no_grad(), ctx.autocast(), self.evaluating():
                losses = self._scores(take, grid, cells, targets)
            cells = cells.gather(1, losses.topk(kept, dim=1).indices.cpu())
        ctx.zero_grad()

        def learn() -> torch.Tensor:
            patches = grid.gather_with(take, cells).flatten(0, 1)  # (B·k, C, p, p)
            if self.task.dense:  # each patch against its window of the mask
                return self.task.loss(self.patch_outputs(patches), targets,
                                      _windows(grid, cells))
            out = self.split(self.patch_outputs(patches))
            return self.task.loss(out, repeat_targets(targets, cells.shape[1]))

        loss = ctx.run(learn)
        ctx.backward(loss)
        ctx.step()
        return float(loss.detach())

    def predict(self, images: Images) -> Logits:
        if self.task.dense:
            return self.slide(images)
        grid = self.grid(images)
        out = self.all_patch_outputs(images, grid)
        return self.split(pool_patches(out, self.cfg.method.pool, self.foreground(images, grid)))

    def slide(self, images: Images) -> torch.Tensor:
        """Dense logits ``(B, K, H, W)``: the patch slid with ``method.stride`` (default
        p/2), overlapping outputs blended by :func:`blend_weight` (call under ``no_grad``).
        Assembled from :meth:`bands`; for images too large for whole logits,
        :meth:`mask_blocks` streams them."""
        b, _, h, w = images.shape
        dtype = torch.promote_types(self.dtype, torch.float32)
        out = torch.empty(b, self.num_classes, h, w, device=self.device, dtype=dtype)
        for i in range(b):
            for top, band in self.bands(one_image(images, i), base.MASK_BLOCK):
                out[i, :, top : top + band.shape[1]] = band
        return out

    def bands(self, image: Images, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """One image ``(1, C, H, W)``'s blended logits band by band: ``(top, (K, rows, W))``
        for ``top`` = 0, ``block``, 2·``block``, … (``rows`` = ``block``, fewer at the
        bottom). Only ``block`` + p rows of logits exist at a time: a band is final once the
        patches starting in it are added, since later patches start below it."""
        _, _, h, w = image.shape
        p, k = self.cfg.method.patch_size, self.num_classes
        grid = PatchGrid(h, w, p, self.cfg.method.stride or max(1, p // 2))
        take = grid.taker(image)
        pw, chunk = grid.padded_size[1], self.cfg.method.fill_chunk
        dtype = torch.promote_types(self.dtype, torch.float32)
        kernel = blend_weight(p, self.device, dtype)
        acc = torch.zeros(k, block + p, pw, device=self.device, dtype=dtype)
        weight = torch.zeros(block + p, pw, device=self.device, dtype=dtype)
        row = 0
        read = lambda c: take(torch.zeros_like(c), c)  # noqa: E731
        for top in range(0, h, block):
            first = row
            while row < grid.rows and row * grid.stride < top + block:
                row += 1
            cells = torch.arange(first * grid.cols, row * grid.cols)
            chunks = [cells[i : i + chunk] for i in range(0, len(cells), chunk)]
            for flat, patches in read_chunks(image, read, chunks, self.device):
                logits = self.patch_outputs(patches).to(dtype)  # (P, K, p, p)
                for cell, lg in zip(flat.tolist(), logits):
                    y, x, _, _ = grid.box(cell)
                    acc[:, y - top : y - top + p, x : x + p] += lg * kernel
                    weight[y - top : y - top + p, x : x + p] += kernel
            rows = min(block, h - top)
            yield top, acc[:, :rows, :w] / weight[:rows, :w]
            acc = torch.cat([acc[:, block:], torch.zeros_like(acc[:, :block])], dim=1)
            weight = torch.cat([weight[block:], torch.zeros_like(weight[:block])])

    def mask_blocks(self, images: Images) -> tuple[int, Iterator[tuple[int, int, torch.Tensor]]]:
        """Dense: the first image's class ids in blocks of :data:`~.base.MASK_BLOCK`, from
        :meth:`bands` (``MASK_BLOCK`` + p rows of logits at a time, never the whole image)."""
        if not self.task.dense:
            return super().mask_blocks(images)
        first = one_image(images)
        return base.MASK_BLOCK, band_blocks(self.bands(first, base.MASK_BLOCK), first.shape[-1])

    def explain(self, images: Images, out: str) -> tuple[Logits, str]:
        """Each patch's probability of the image's predicted class (main head), as a heat
        map over the first image, drawn to ``out``."""
        if self.task.dense:
            raise ConfigError("--explain draws image-level evidence; for segmentation use "
                              "predict's mask output.")
        grid = self.grid(images)
        patch = self.all_patch_outputs(images, grid)  # (B, N, heads·K)
        logits = self.split(pool_patches(patch, self.cfg.method.pool,
                                         self.foreground(images, grid)))
        main = self.tasks[0] if self.tasks else None
        pooled = logits[main] if main else logits
        per_patch = self.split(patch)
        per_patch = per_patch[main] if main else per_patch  # (B, N, K)
        top = int(pooled[0].argmax())
        if main in getattr(self.task, "multilabel", ()):
            probs = per_patch[0, :, top].sigmoid()
        else:
            probs = per_patch[0].softmax(dim=-1)[:, top]
        title = (f"patchwise: each patch's probability of class {top} "
                 f"({self.cfg.method.pool}-pooled prediction)")
        path = draw_saliency(first_image(images), grid, probs.view(grid.rows, grid.cols), out,
                             title, label=f"patch probability of class {top}")
        return logits, str(path)


def blend_weight(p: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(p, p)`` weight of a patch's logits when overlapping patches are blended: the
    outer product of a triangle that is 1 at the centre and ``1/ceil(p/2)`` at the border."""
    half = -(-p // 2)
    i = torch.arange(p, device=device, dtype=dtype)
    tri = torch.minimum(i + 1, p - i) / half
    return tri[:, None] * tri[None, :]


def _windows(grid: PatchGrid, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image (B·k,), boxes (B·k, 4))`` of the patches ``cells`` ``(B, k)``, image-major."""
    b, k = cells.shape
    image = torch.arange(b).repeat_interleave(k)
    boxes = grid.boxes()[cells.flatten().cpu()]
    return image, boxes


def _index(targets: Targets, index: torch.Tensor) -> Targets:
    """Rows ``index`` of targets (a tensor or a dict of tensors)."""
    if isinstance(targets, dict):
        return {h: t[index] for h, t in targets.items()}
    return targets[index]

