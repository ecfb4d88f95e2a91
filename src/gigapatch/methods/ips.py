"""Iterative Patch Selection (IPS): keep the M most salient patches, learn from those only.

For a batch of B images cut into N patches (``method.patch_size``/``stride``):

1. **Select** (no gradients, eval mode; :meth:`IPS.select`). Shuffle each image's patch order
   (so ties and the chunking fall at random). Encode the first M patches into a buffer; then
   repeatedly encode the next I patches, score all M + I with the aggregator's attention
   (weights of the task queries, averaged over heads and tasks) and keep the top M. Patches
   stay on the host and go to the device I at a time: memory O(M + I), never O(N).
2. **Learn** (:meth:`IPS.train_step`). Re-encode the M selected patches with gradients, add
   2-D sinusoidal encodings of their grid positions, pool them with
   :class:`~gigapatch.models.attention.CrossAttentionPool` (one learned query per task), and
   apply one linear classifier per task; the loss is the sum of the tasks' losses.
3. **Predict**: the same selection, then the aggregation without gradients.

**Chunked vs global top-M.** An attention weight is a softmax over the set it is computed on.
With one head and one task, the softmax keeps the order of the raw scores ``q·k``, which do not
depend on the set, so the iterative selection returns exactly the global top-M. With several
heads (or tasks) the averaged weights mix softmaxes normalised over different sets, so a patch's
rank can change with the set it is scored in: the selection is then the top-M of each (M + I)
set as the algorithm defines it (and as the IPS paper does), not necessarily the global top-M.
Positional encodings are added before scoring as well as before pooling, so both see the same
inputs. With M ≥ N nothing is dropped and the output is plain attention pooling over all patches.

**Selection reuse** (``method.selection_refresh = r``, training only). The top-M of an image
changes slowly from one visit to the next, so a training step may scan only the image's
previous top-M (re-encoded and re-scored with the current weights) plus a random share ``r``
of its other cells, instead of all N: ``M + ⌈r·N⌉`` encoder passes. With one head and task
the result is the top-M of that set; with ``r = 1`` every cell is scanned and the selection
is the exact one (tested). An image seen the first time (or in a batch with one) gets the
full selection. Prediction always scans every cell. The previous selections are kept per
image (by file or content, as PatchGD's Z cache) and saved with ``last.pt``.

**Background.** With ``data.skip_background`` (images read from disk) only foreground cells
are shuffled, read and scored; in a batch of several images, an image with fewer foreground
cells than the fullest one fills its order with background cells (batch size 1, usual for
gigapixel images, never scores background).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gigapatch.config import Config
from gigapatch.core.grid import PatchGrid, Take
from gigapatch.core.sampling import shuffled_cells
from gigapatch.data.batch import Images, first_image, read_chunks
from gigapatch.explain import draw_patch_weights
from gigapatch.core.errors import ConfigError
from gigapatch.methods.base import METHODS, Context, Method, repeated
from gigapatch.methods.frozen_cache import image_keys
from gigapatch.models.attention import CrossAttentionPool, sinusoidal_2d
from gigapatch.models.encoders import create_encoder
from gigapatch.tasks import Logits, Task


@METHODS.register("ips")
class IPS(Method):
    """θ1 = encoder (patch → D), aggregator = cross-attention pool, one classifier per task."""

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        if task.dense:
            raise ConfigError(
                "method ips does not support task.kind = segment yet; use full or patchwise."
            )
        mc = cfg.model
        self.dim = mc.latent_dim
        if self.dim % mc.attn_heads or (cfg.method.pos_encoding and self.dim % 4):
            raise ConfigError(
                f"model.latent_dim = {self.dim} must be divisible by model.attn_heads = "
                f"{mc.attn_heads}" + (" and by 4 (2-D positional encodings)"
                                      if cfg.method.pos_encoding else "")
                + "; e.g. 64 or 128."
            )
        self.encoder = create_encoder(mc.encoder, self.dim, self.in_chans, mc.pretrained,
                                      weights=mc.weights, checkpoint_activations=mc.checkpoint_activations)
        names = self.tasks or ["label"]
        self.pool = CrossAttentionPool(self.dim, mc.attn_heads, len(names), dropout=mc.attn_dropout)
        self.classifiers = nn.ModuleDict({t: nn.Linear(self.dim, self.num_classes) for t in names})
        #: Each image's last selection ``(M,)`` (``method.selection_refresh``).
        self.selections: dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------ pieces
    def grid(self, images: torch.Tensor) -> PatchGrid:
        """The patch grid of a ``(B, C, H, W)`` batch."""
        h, w = images.shape[-2:]
        return PatchGrid(h, w, self.cfg.method.patch_size, self.cfg.method.stride)

    def embed(self, take: Take, grid: PatchGrid, cells: torch.Tensor) -> torch.Tensor:
        """Encode the patches ``cells`` ``(B, n)`` (host, long) read by ``take`` (from
        ``grid.taker(images)``), plus the positional encodings of their grid positions (unless
        ``method.pos_encoding`` is off) → ``(B, n, D)`` on the device."""
        return self.embed_patches(grid.gather_with(take, cells), grid, cells)

    def embed_patches(self, patches: torch.Tensor, grid: PatchGrid, cells: torch.Tensor
                      ) -> torch.Tensor:
        """:meth:`embed` of patches already read: ``(B, n, C_in, p, p)`` at ``cells``
        ``(B, n)`` → ``(B, n, D)`` on the device."""
        b, n = cells.shape
        x = self.encoder(self.prepare(patches.flatten(0, 1))).view(b, n, -1)
        if not self.cfg.method.pos_encoding:
            return x
        cells = cells.to(x.device)
        pos = sinusoidal_2d(cells // grid.cols, cells % grid.cols, self.dim)
        return x + pos.to(x.dtype)

    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        """Selection scores ``(B, n)`` of embeddings ``(B, n, D)``: attention weights of the
        task queries, averaged over heads and tasks."""
        return self.pool.attention(emb).mean(dim=1)

    def select(
        self, images: Images, grid: PatchGrid | None = None, take: Take | None = None,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The M selected cells ``(B, min(M, N))`` (host, long) of host images ``(B, C, H, W)``
        (or a :class:`~gigapatch.data.batch.LazyBatch`, read I patches at a time).

        ``previous`` ``(B, M)``: each image's last selection; then only those cells and a
        random share ``method.selection_refresh`` of the others are scanned.
        Runs without gradients in eval mode (the method's mode is restored). Uses the global
        torch RNG for the shuffled order.
        """
        grid = grid or self.grid(images)
        take = take or grid.taker(images)
        b, n = images.shape[0], grid.num_patches
        mask = self.foreground(images, grid)
        order = shuffled_cells(b, n, mask, first=previous)  # (B, N) host: foreground first
        if mask is not None:  # only the foreground cells take part (of the fullest image)
            n = max(1, int(mask.sum(dim=1).max()))
        if previous is not None:
            refresh = self.cfg.method.selection_refresh or 1.0
            n = min(n, previous.shape[1] + math.ceil(refresh * n))
        m = min(self.cfg.method.memory_size, n)
        step = self.cfg.method.iter_size
        # the scan's chunks of cells are known now: from disk the next one is read while
        # the current one is encoded
        chunks = [order[:, :m]] + [order[:, start : min(start + step, n)]  # (B, ≤I)
                                   for start in repeated(range(m, n, step))]
        read = lambda c: grid.gather_with(take, c)  # noqa: E731
        scan = read_chunks(images, read, chunks, self.device)
        with torch.no_grad(), self.evaluating():
            cells, patches = next(scan)
            memory = self.embed_patches(patches, grid, cells)  # (B, M, D), compute dtype
            for new, patches in scan:
                cand_cells = torch.cat([cells, new], dim=1)
                fresh = self.embed_patches(patches, grid, new).to(memory.dtype)
                cand = torch.cat([memory, fresh], dim=1)  # (B, M+I, D)
                top = self.scores(cand).topk(m, dim=1).indices  # (B, M) on the device
                memory = cand.gather(1, top[:, :, None].expand(-1, -1, self.dim))
                cells = cand_cells.gather(1, top.cpu())
        return cells

    def aggregate(self, emb: torch.Tensor) -> tuple[Logits, torch.Tensor]:
        """Embeddings ``(B, M, D)`` → logits (``(B, K)``, or ``{task: (B, K)}`` with tasks
        configured) and attention weights ``(B, T, M)``."""
        pooled, weights = self.pool(emb)  # (B, T, D), (B, T, M)
        logits = {t: head(pooled[:, i]) for i, (t, head) in enumerate(self.classifiers.items())}
        return (logits if self.tasks else logits["label"]), weights

    def evidence(self, images: Images) -> tuple[Logits, torch.Tensor, torch.Tensor]:
        """Prediction with its evidence: logits, selected cells ``(B, M)`` (host) and their
        attention weights ``(B, T, M)``. Call in eval mode under ``no_grad``."""
        grid = self.grid(images)
        take = grid.taker(images)
        cells = self.select(images, grid, take)
        logits, weights = self.aggregate(self.embed(take, grid, cells))
        return logits, cells, weights

    # ------------------------------------------------------------------ interface
    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        return {"patch_size": self.cfg.method.patch_size,
                "memory_size": self.cfg.method.memory_size}

    def train_step(self, images: Images, targets: Any, ctx: Context) -> float:
        grid = self.grid(images)
        take = grid.taker(images)
        reuse = self.cfg.method.selection_refresh is not None
        keys = image_keys(images) if reuse else []
        found = [None if k is None else self.selections.get(k) for k in keys]
        known = [f for f in found if f is not None]
        previous = torch.stack(known) if known and len(known) == len(keys) \
            and len({f.shape for f in known}) == 1 else None
        with ctx.autocast():  # the selection calls the unwrapped module: no graph, O(M + I)
            cells = self.select(images, grid, take, previous)
        for key, row in zip(keys, cells):
            if key is not None:
                self.selections[key] = row.clone()
        ctx.zero_grad()

        def learn() -> torch.Tensor:
            logits, _ = self.aggregate(self.embed(take, grid, cells))
            return self.task.loss(logits, targets)

        loss = ctx.run(learn)  # one forward/backward through DDP per step
        ctx.backward(loss)
        ctx.step()
        return float(loss.detach())

    def predict(self, images: Images) -> Logits:
        return self.evidence(images)[0]

    def training_state(self) -> dict[str, Any]:
        """The previous selections (``method.selection_refresh``), for an exact resume."""
        if self.cfg.method.selection_refresh is None:
            return {}
        return {"selections": list(self.selections.items())}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.selections = dict(state.get("selections", []))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; forgets the previous selections (new weights)."""
        self.selections = {}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def explain(self, images: Images, out: str) -> tuple[Logits, str]:
        """The selected patches of the first image, coloured by attention, drawn to ``out``."""
        logits, cells, weights = self.evidence(images)
        main = self.tasks[0] if self.tasks else None
        top = int((logits[main] if main else logits)[0].argmax())
        title = (f"IPS: {cells.shape[1]} selected patches, coloured by attention "
                 f"({main or 'label'} = {top})")
        path = draw_patch_weights(first_image(images), self.grid(images), cells[0],
                                  weights[0, 0].float(), out, title)
        return logits, str(path)
