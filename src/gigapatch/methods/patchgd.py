"""Patch Gradient Descent (PatchGD), with optional global context.

For a batch of B images cut into an m×n grid of p×p patches (N = m·n):

1. **Fill Z** ``(B, C, m, n)`` without gradients: encode every patch with θ1 in chunks of
   ``method.fill_chunk`` patches.
2. **J inner steps.** Each samples k = round(s·N) cells per image (s = ``sample_fraction``;
   without replacement across the J steps while k·J ≤ N), re-encodes those patches *with*
   gradients, scatters them differentiably into a copy of ``Z.detach()``, applies θ2, and
   back-propagates; then writes the new (detached) embeddings into Z for the later steps.
3. **Update.** With ``accumulate`` (default) the loss is divided by J and the optimizer steps
   once after the J inner steps; otherwise it steps after every inner step.
4. **Predict.** Eval mode, fill Z with every patch, apply θ2 once.

Global context (``method.global_context``): the whole image resized to p×p (antialiased,
on the host) is encoded by θ1 *with* gradients at every inner step into g ``(B, C)`` and fused
with Z: ``add`` (Z + g broadcast over the grid) or ``concat`` (channel concatenation, θ2 takes
2C channels).

**Train/eval policy of the fill.** ``fill_mode: train`` (default) fills Z with θ1 in train
mode, the same function the inner steps use, so filled and re-encoded cells are comparable
(BatchNorm layers then use chunk statistics and update their running statistics; dropout is
active). ``fill_mode: eval`` fills in eval mode (running statistics, no dropout), which is
steadier for BatchNorm encoders fine-tuned with small k. Encoders with GroupNorm/LayerNorm and
no dropout (e.g. ``tiny_cnn``) give identical fills in both modes. Prediction always fills in
eval mode.

Memory: parameters, gradients and optimizer state + activations of B·k patches (+ B global
patches) + Z and θ2's activations over the grid. Only the sampled patches are copied out of
the host image; the image itself never moves to the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.grid import PatchGrid, Take
from gigapatch.core.sampling import sample_cells
from gigapatch.data.batch import Images, LazyBatch, first_image
from gigapatch.explain import draw_saliency, occlusion_explain
from gigapatch.methods.base import METHODS, Context, Method, repeated
from gigapatch.models.encoders import create_encoder
from gigapatch.models.heads import create_head
from gigapatch.tasks import Task


@METHODS.register("patchgd")
class PatchGD(Method):
    """PatchGD over a latent grid Z with θ1 = encoder, θ2 = head."""

    budget_knobs = ("k", "fill_chunk")
    k_means = "patches per inner step"
    has_inner_steps = True

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        if task.dense:
            raise ConfigError(
                "method patchgd does not support task.kind = segment yet; use full or patchwise."
            )
        m, mc = cfg.method, cfg.model
        self.latent_dim = mc.latent_dim
        self.encoder = create_encoder(mc.encoder, mc.latent_dim, self.in_chans, mc.pretrained,
                                      checkpoint_activations=mc.checkpoint_activations)
        head_in = 2 * mc.latent_dim if m.global_context == "concat" else mc.latent_dim
        self.head = create_head(mc.head, head_in, self.num_classes, mc.head_width, mc.head_pool)

    # ------------------------------------------------------------------ pieces
    def grid(self, images: torch.Tensor) -> PatchGrid:
        """The patch grid of a ``(B, C, H, W)`` batch."""
        h, w = images.shape[-2:]
        return PatchGrid(h, w, self.cfg.method.patch_size, self.cfg.method.stride)

    def plan(self, grid: PatchGrid) -> tuple[int, int]:
        """``(k, J)``: patches per inner step and number of inner steps for this grid."""
        m = self.cfg.method
        k = max(1, min(grid.num_patches, round(m.sample_fraction * grid.num_patches)))
        j = m.inner_steps if m.inner_steps is not None else math.ceil(1 / m.sample_fraction)
        return k, j

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """θ1 on host patches: ``(P, C_in, p, p)`` → ``(P, C)`` on the device."""
        return self.encoder(self.prepare(patches))

    def fill(self, images: Images, grid: PatchGrid, take: Take | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode every patch in chunks (call under ``no_grad``/``inference_mode``).

        ``(B, C_in, H, W)`` host images (or a :class:`~gigapatch.data.batch.LazyBatch`, read
        chunk by chunk) → Z as ``(B, N, C)`` on the device (row-major cells). With a
        foreground ``mask`` ``(B, N)`` only the foreground patches are read and encoded; the
        background cells get the fixed embedding 0.
        """
        b, n = images.shape[0], grid.num_patches
        take = take or grid.taker(images)
        chunk = self.cfg.method.fill_chunk
        dtype = self.compute_dtype()  # Z in the compute dtype (bfloat16 under bf16 autocast)
        if mask is None:
            z = torch.empty(b, n, self.latent_dim, device=self.device, dtype=dtype)
            todo = None
        else:
            z = torch.zeros(b, n, self.latent_dim, device=self.device, dtype=dtype)
            todo = mask.reshape(-1).nonzero().flatten()  # flat indices of foreground cells
        total = b * n if todo is None else len(todo)
        for start in repeated(range(0, total, chunk)):
            flat = torch.arange(start, min(start + chunk, total))
            if todo is not None:
                flat = todo[flat]
            bi, cell = flat // n, flat % n
            patches = take(bi, cell)  # (P, C_in, p, p) copy
            z[bi.to(self.device), cell.to(self.device)] = self.encode(patches).to(dtype)
        return z

    def global_patch(self, images: Images) -> torch.Tensor:
        """The whole image resized to p×p on the host: ``(B, C_in, p, p)`` float in [0, 1].

        A :class:`~gigapatch.data.batch.LazyBatch` is resized from its closest pyramid level.
        """
        p = self.cfg.method.patch_size
        if isinstance(images, LazyBatch):
            return images.resized((p, p)).float() / 255.0
        # Resize first (uint8 in, uint8 out): never a float copy of the whole image.
        x = F.interpolate(images, size=(p, p), mode="bilinear", antialias=True, align_corners=False)
        return x.float() / 255.0 if not images.is_floating_point() else x.float()

    def logits(self, z: torch.Tensor, grid: PatchGrid, g: torch.Tensor | None) -> torch.Tensor:
        """θ2 over Z ``(B, N, C)`` fused with global embedding g ``(B, C)`` → ``(B, K)``."""
        b = z.shape[0]
        zg = z.transpose(1, 2).reshape(b, self.latent_dim, grid.rows, grid.cols)
        mode = self.cfg.method.global_context
        if mode == "add":
            zg = zg + g[:, :, None, None]
        elif mode == "concat":
            zg = torch.cat([zg, g[:, :, None, None].expand_as(zg)], dim=1)
        return self.head(zg)

    @contextmanager
    def _fill_mode(self, mode: str) -> Iterator[None]:
        was_training = self.encoder.training
        self.encoder.train(mode == "train")
        try:
            yield
        finally:
            self.encoder.train(was_training)

    # ------------------------------------------------------------------ interface
    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        return {"patch_size": self.cfg.method.patch_size,
                "global_context": self.cfg.method.global_context}

    def train_step(self, images: Images, targets: Any, ctx: Context) -> float:
        grid = self.grid(images)
        b = images.shape[0]
        k, steps = self.plan(grid)
        accumulate = self.cfg.method.accumulate
        use_global = self.cfg.method.global_context != "none"
        gpatch = self.global_patch(images) if use_global else None

        take = grid.taker(images)
        mask = self.foreground(images, grid)  # (B, N) or None
        with torch.no_grad(), ctx.autocast(), self._fill_mode(self.cfg.method.fill_mode):
            z = self.fill(images, grid, take, mask)  # (B, N, C) in the compute dtype
        order = sample_cells(b, grid.num_patches, k * steps, mask=mask)  # (B, k·J), host

        def inner(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            emb = self.encode(grid.gather_with(take, idx).flatten(0, 1)).view(b, k, -1)
            emb = emb.to(z.dtype)
            where = idx.to(self.device)[:, :, None].expand(-1, -1, self.latent_dim)
            z_j = z.scatter(1, where, emb)  # differentiable w.r.t. emb only
            g = self.encode(gpatch) if use_global else None
            return self.task.loss(self.logits(z_j, grid, g), targets), emb, where

        ctx.zero_grad()
        total = 0.0
        loop = repeated(range(steps))
        for n_done, j in enumerate(loop):
            idx = order[:, j * k : (j + 1) * k]  # (B, k)
            # One gradient synchronisation per update: all but the last backward of an
            # accumulated update stay local.
            local = accumulate and n_done < len(loop) - 1
            with ctx.no_sync() if local else nullcontext():
                loss, emb, where = ctx.run(inner, idx)
                ctx.backward(loss / steps if accumulate else loss)
            z.scatter_(1, where, emb.detach())
            total += float(loss.detach())
            if not accumulate:
                ctx.step()
        if accumulate:
            ctx.step()
        return total / steps

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.grid(images)
        z = self.fill(images, grid, mask=self.foreground(images, grid))
        g = None
        if self.cfg.method.global_context != "none":
            g = self.encode(self.global_patch(images))
        return self.logits(z, grid, g)

    def explain(self, images: Images, out: str) -> tuple[torch.Tensor, str]:
        """Occlusion saliency of the first image's Z cells as a heat map drawn to ``out``."""
        logits, saliency = occlusion_explain(self, images)
        path = draw_saliency(first_image(images), self.grid(images), saliency, out,
                             "PatchGD: occlusion saliency of the Z cells")
        return logits, str(path)
