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

**Detection** (``task.kind: detect``, :mod:`.latent_levels`): θ1 = the FCOS detector's backbone
+ FPN (``model.encoder: fcos_*``) on each patch, giving one map per FPN level; Z is one host map
per level ``(B, F, H/s_l, W/s_l)``, the patches' maps placed side by side; the global patch's
FPN maps are upsampled and added per level (``global_context: add``); θ2 = the FCOS head
(window-local: :class:`~gigapatch.models.detection.PixelGroupNorm`) on the windows of every
level around the k re-encoded patches, and FCOS's own loss over those windows' anchors,
matched against each image's boxes in image pixels (boxes are not clipped to patches: see
:mod:`.latent_levels`). ``method.patch_size`` must be a multiple of the coarsest stride.
Prediction applies the head window by window and merges the windows' detections by NMS.

Memory: parameters, gradients and optimizer state + activations of B·k patches (+ B global
patches) + Z and θ2's activations over the grid. Only the sampled patches are copied out of
the host image; the image itself never moves to the device.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.grid import PatchGrid, Take
from gigapatch.core.hostmaps import host_maps
from gigapatch.core.units import format_bytes, parse_bytes
from gigapatch.core.sampling import sample_cells
from gigapatch.data.batch import Images, LazyBatch, first_image, one_image, read_chunks
from gigapatch.explain import draw_saliency, occlusion_explain
from gigapatch.methods.base import (METHODS, Context, Method, StepProxy, Totals, grid_proxy,
                                    repeated)
from gigapatch.methods.frozen_cache import ZCache, image_keys
from gigapatch.methods.latent_levels import block_anchors, crop_blocks, level_geometries, per_image
from gigapatch.methods.latent_map import (
    MapGeometry,
    global_windows,
    paste,
    pixel_logits,
    valid,
    windows_of,
)
from gigapatch.methods.latent_pool import MapPool, PoolSums
from gigapatch.methods.z_staleness import (AdaptiveShare, BucketMaps, Staleness, apply_affine,
                                           relative_change)
from gigapatch.models.dense import create_dense_net
from gigapatch.models.detection import create_detector, merge_detections
from gigapatch.models.encoders import create_encoder
from gigapatch.models.heads import DenseHead, create_head
from gigapatch.tasks import Task

log = logging.getLogger("gigapatch")


def _map_storage(shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool) -> torch.Tensor:
    """An uninitialised host tensor for Z; ``on_disk``: backed by a memory-mapped temporary
    file (deleted at once: the mapping keeps it until Z is freed), so the OS pages it."""
    with host_maps():  # counted apart by the CPU memory tracker: not device memory on CUDA
        if not on_disk:
            return torch.empty(shape, dtype=dtype)
        with tempfile.NamedTemporaryFile(prefix="gigapatch-z-", suffix=".bin") as f:
            return torch.from_file(f.name, shared=True, size=math.prod(shape),
                                   dtype=dtype).view(shape)


def _write_blocks(z: torch.Tensor, geo: MapGeometry, image: list[int], cells: list[int],
                  blocks: torch.Tensor) -> None:
    """Write ``blocks`` ``(P, C, q, q)`` (any device) into host map ``z`` ``(B, C, Hz, Wz)``
    at the blocks of ``cells`` of images ``image``."""
    q = geo.q
    for bi, cell, block in zip(image, cells, blocks.to("cpu", z.dtype)):
        y, x = geo.origin(cell)
        z[bi, :, y : y + q, x : x + q] = block


def _block_changes(zs: list[torch.Tensor], geos: list[MapGeometry], image: list[int],
                   cells: list[int], maps: list[torch.Tensor], seen: torch.Tensor
                   ) -> torch.Tensor:
    """The change ``(S,)`` of the chunk's cells (``cells`` of ``image``, ``P`` of them) marked
    in ``seen`` ``(P,)`` bool, from their blocks in the host maps ``zs``
    ``[(B, C_l, Hz_l, Wz_l)]`` to their new blocks ``maps`` ``[(P, C_l, q_l, q_l)]``: one
    :func:`relative_change` over all levels."""
    pick = seen.nonzero().flatten().tolist()
    if not pick:
        return torch.zeros(0)
    olds, news = [], []
    for z, geo, blocks in zip(zs, geos, maps):
        q = geo.q
        with host_maps():  # a copy of the cached blocks: booked with the maps they came from
            olds.append(torch.stack([z[image[i], :, y : y + q, x : x + q].flatten()
                                     for i, (y, x) in ((i, geo.origin(cells[i])) for i in pick)]))
        news.append(blocks[pick].flatten(1))
    return relative_change(torch.cat(news, 1), torch.cat(olds, 1)).cpu()


def _flat_reader(take: Take, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patches by flat index ``b·N + cell``: ``(P,)`` → ``(P, C_in, p, p)`` (host)."""
    return lambda flat: take(flat // n, flat % n)


def _bucket_groups(cells: torch.Tensor, bucket: torch.Tensor
                   ) -> tuple[torch.Tensor, list[tuple[int, slice]]]:
    """The flat indices ``(P,)`` of the ``cells`` ``(B, N)`` bool, ordered by their
    ``bucket`` ``(B, N)`` (stable: in flat order within a bucket), and each bucket, ascending,
    with its slice of them: one sort instead of a mask per bucket."""
    flat = cells.flatten().nonzero().flatten()
    keys = bucket.flatten()[flat]
    order = torch.sort(keys, stable=True).indices
    flat = flat[order]
    values, counts = torch.unique_consecutive(keys[order], return_counts=True)
    ends = counts.cumsum(0).tolist()
    return flat, [(b, slice(end - n, end)) for b, n, end in zip(values.tolist(),
                                                                counts.tolist(), ends)]


def optimizer_steps(cfg: Config, batches: int) -> int:
    """The optimizer steps PatchGD takes over ``batches`` batches: one per batch with
    ``method.accumulate`` (the default), else one per inner step (J per batch). The unit of
    ``method.z_max_age`` and ``method.z_cache_warmup``."""
    return batches * (1 if cfg.method.accumulate else cfg.method.inner_steps)


@METHODS.register("patchgd")
class PatchGD(Method):
    """PatchGD over a latent grid Z with θ1 = encoder, θ2 = head."""

    budget_knobs = ("k", "fill_chunk")
    k_means = "patches per inner step"
    has_inner_steps = True
    detects = True

    @classmethod
    def step_proxy(cls, cfg: Config, image_shape: tuple[int, int, int]) -> StepProxy | None:
        """Segmentation and detection: the device holds the k windows of Z around the
        re-encoded patches, never Z (host memory), so a small canvas with the same k holds
        the same device memory (:func:`~gigapatch.methods.base.grid_proxy`). Classification:
        θ2 runs on the whole Z on the device; ``None``."""
        return grid_proxy(cfg, image_shape) if cfg.task.kind in ("segment", "detect") else None

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        m, mc = cfg.method, cfg.model
        self.latent_dim = mc.latent_dim
        #: Z per image when θ1 is frozen (classification; :mod:`.frozen_cache`).
        self.z_cache = ZCache(parse_bytes(m.z_cache_budget))
        self._cache_skip_logged = False
        #: Optimizer steps taken (the cells' ages of ``method.z_cache`` count in these).
        self.z_clock = 0
        #: The re-encoded cached cells' changes this epoch (``z_staleness`` in the history).
        self.staleness = Staleness()
        #: ``method.z_tolerance``: the share re-encoded per visit, steered by those changes.
        self.z_share = (AdaptiveShare(m.z_refresh, m.z_tolerance)
                        if m.z_tolerance is not None and m.z_refresh is not None else None)
        #: ``method.z_correct``: cells encoded within this many optimizer steps of each
        #: other share one affine map (a quarter epoch, once the loop tells the epoch length).
        self.z_bucket_steps = 1
        #: ``method.z_correct``: each bucket's map, from the recent fills' pairs.
        self.z_maps = BucketMaps()
        #: ``method.z_correct``'s random picks of the cells to re-encode, apart from the global
        #: generator, so a cached run samples the same inner-step cells as an exact one.
        self.z_gen = torch.Generator().manual_seed(cfg.seed)
        if m.z_correct and (task.dense or task.detects):
            raise ConfigError(f"method.z_correct maps cached latent vectors (classification); "
                              f"task.kind = {cfg.task.kind} caches dense maps, which it does "
                              "not correct yet. Leave method.z_correct: false.")
        if task.detects:
            self._init_detect(cfg)
            return
        if task.dense:
            self._init_dense(cfg)
            return
        self.encoder = create_encoder(mc.encoder, mc.latent_dim, self.in_chans, mc.pretrained,
                                      weights=mc.weights, checkpoint_activations=mc.checkpoint_activations)
        head_in = 2 * mc.latent_dim if m.global_context == "concat" else mc.latent_dim
        self.head = create_head(mc.head, head_in, self.num_classes, mc.head_width, mc.head_pool)

    def _init_dense(self, cfg: Config) -> None:
        m, mc = cfg.method, cfg.model
        if m.patch_size % m.z_stride:
            raise ConfigError(f"method.patch_size = {m.patch_size} must be a multiple of "
                              f"method.z_stride = {m.z_stride} (map pixels per patch).")
        if m.stride not in (None, m.patch_size):
            raise ConfigError("dense PatchGD lays patches side by side in Z: leave "
                              f"method.stride unset (it is {m.stride}).")
        self.encoder = create_dense_net(mc.encoder, mc.latent_dim, self.in_chans, mc.pretrained,
                                        mc.weights)
        c = mc.latent_dim
        self.z_pool = MapPool(c, m.z_pool)  # the summary P of Z (part of θ2)
        width = (2 * c if m.global_context == "concat" else c) + c  # [Z, (G,) pooled Z]
        width += self.z_pool.pixel_channels  # share: each pixel's agreement with P
        self.head = DenseHead(width, self.num_classes, mc.head_width, mc.head_layers,
                              cond_chans=c if mc.head_film else 0)  # FiLM by the summary P

    def _init_detect(self, cfg: Config) -> None:
        m, mc = cfg.method, cfg.model
        if m.global_context == "concat":
            raise ConfigError("detection PatchGD fuses the global patch's FPN maps by "
                              "method.global_context: add (or none), not concat.")
        if m.stride not in (None, m.patch_size):
            raise ConfigError("detection PatchGD lays patches side by side in its maps: leave "
                              f"method.stride unset (it is {m.stride}).")
        self.net = create_detector(mc.encoder, self.num_classes, self.in_chans, mc.pretrained,
                                   mc.weights, window_local=True)
        top = max(self.net.strides)
        if m.patch_size % top:
            raise ConfigError(f"method.patch_size = {m.patch_size} must be a multiple of the "
                              f"coarsest FPN stride of {mc.encoder} ({top}; strides "
                              f"{self.net.strides}).")
        self.latent_dim = self.net.channels

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        """θ1: the encoder; for detection the detector's backbone + FPN."""
        if self.task.detects:
            return list(self.net.backbone.parameters())
        return super().encoder_parameters()

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
        flats = [torch.arange(start, min(start + chunk, total))
                 for start in repeated(range(0, total, chunk))]
        if todo is not None:
            flats = [todo[f] for f in flats]
        encode = self._fill_encoder()
        read = _flat_reader(take, n)
        for flat, patches in read_chunks(images, read, flats, self.device):  # (P, C_in, p, p)
            bi, cell = flat // n, flat % n
            z[bi.to(self.device), cell.to(self.device)] = encode(self.prepare(patches)).to(dtype)
        return z

    def _fill_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """θ1 for the fill: the encoder, or with ``model.compile`` its ``torch.compile``d
        twin (made once, kept outside the module tree so state dicts do not change)."""
        if not self.cfg.model.compile:
            return self.encoder
        compiled = self.__dict__.get("_compiled_encoder")
        if compiled is None:
            compiled = torch.compile(self.encoder)
            self.__dict__["_compiled_encoder"] = compiled
        return compiled

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
        encoder = self.net.backbone if self.task.detects else self.encoder
        was_training = encoder.training
        encoder.train(mode == "train" and not self.encoder_frozen)
        try:
            yield
        finally:
            encoder.train(was_training)

    # ------------------------------------------------------------------ dense (segmentation)
    def geometry(self, images: Images) -> MapGeometry:
        """Where the patches of a ``(B, C, H, W)`` batch sit in the dense map Z."""
        h, w = images.shape[-2:]
        m = self.cfg.method
        return MapGeometry(PatchGrid(h, w, m.patch_size), m.z_stride, self.head.halo)

    def encode_map(self, patches: torch.Tensor) -> torch.Tensor:
        """θ1 on host patches: ``(P, C_in, p, p)`` → ``(P, C, q, q)`` (mean over each
        ``s × s`` block of the dense output) on the device."""
        out = self.encoder(self.prepare(patches))
        s = self.cfg.method.z_stride
        return F.avg_pool2d(out, s) if s > 1 else out

    def fill_map(self, images: Images, geo: MapGeometry, take: Take | None = None
                 ) -> torch.Tensor:
        """Z ``(B, C, Hz, Wz)`` on the host, in the compute dtype (with
        ``method.z_on_disk``, in a memory-mapped temporary file): every patch encoded,
        ``fill_chunk`` at a time (call under ``no_grad``)."""
        return self._fill_maps(images, [geo], lambda x: [self.encode_map(x)], take)[0]

    def _fill_maps(self, images: Images, geos: list[MapGeometry],
                   encode: Callable[[torch.Tensor], list[torch.Tensor]],
                   take: Take | None = None, todo: torch.Tensor | None = None,
                   into: list[torch.Tensor] | None = None, seen: torch.Tensor | None = None,
                   changes: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Host maps ``[(B, C_l, Hz_l, Wz_l)]``, one per geometry, from ``encode(patches)`` →
        one block per patch and geometry ``[(P, C_l, q_l, q_l)]`` (dense map; FPN levels).

        ``todo`` ``(B, N)`` bool: encode only those cells, into the maps ``into`` (whose
        other blocks are kept; ``method.z_cache``); default every cell, into new maps.
        ``seen`` ``(B, N)`` bool: the cells whose blocks in ``into`` are cached values; each
        one's change (:func:`relative_change`, over all levels) is appended to ``changes``
        chunk by chunk before its new blocks overwrite the old."""
        b, grid = images.shape[0], geos[0].grid
        take = take or grid.taker(images)
        n, chunk = grid.num_patches, self.cfg.method.fill_chunk
        zs: list[torch.Tensor] = list(into or [])
        wanted = torch.arange(b * n) if todo is None else todo.flatten().nonzero().flatten()
        flats = [wanted[start : start + chunk]
                 for start in repeated(range(0, len(wanted), chunk))]
        for flat, patches in read_chunks(images, _flat_reader(take, n), flats, self.device):
            maps = encode(patches)
            if not zs:  # channels known now
                zs = [_map_storage((b, m.shape[1], *geo.size), self.compute_dtype(),
                                   self.cfg.method.z_on_disk) for m, geo in zip(maps, geos)]
            flat_list = flat.tolist()
            image, cells = [f // n for f in flat_list], [f % n for f in flat_list]
            if seen is not None and changes is not None:
                changes.append(_block_changes(zs, geos, image, cells, maps,
                                              seen.flatten()[flat]))
            for z, geo, blocks in zip(zs, geos, maps):
                _write_blocks(z, geo, image, cells, blocks)
        return zs

    def _step_maps(self, images: Images, geos: list[MapGeometry],
                   encode: Callable[[torch.Tensor], list[torch.Tensor]], take: Take
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[Any]]:
        """A training step's host maps ``[(B, C, Hz_l, Wz_l)]``: every cell encoded
        (``method.z_cache: none``, or images without a key), or from the cache with only the
        stale cells re-encoded (:meth:`_stale`; every cell of an image not cached, or cached
        for other maps or another dtype). Also the cells' ages ``(B, N)`` and the images'
        cache keys (``None`` and ``[]`` without a cache). Call under ``no_grad``."""
        keys = image_keys(images) if self.cfg.method.z_cache != "none" else []
        if not keys or None in keys:  # (the fake tensors of estimates: exact fill)
            return self._fill_maps(images, geos, encode, take), None, []
        b, n = images.shape[0], geos[0].grid.num_patches
        dtype = self.compute_dtype()
        shapes = [(self.latent_dim, *geo.size) for geo in geos]
        sizes = [math.prod(shape) for shape in shapes]
        zs = [_map_storage((b, *shape), dtype, self.cfg.method.z_on_disk) for shape in shapes]
        ages = torch.full((b, n), -1, dtype=torch.int64)
        todo = torch.ones(b, n, dtype=torch.bool)
        for i, key in enumerate(keys):
            found = self.z_cache.get(key)
            if found is None or found[0].shape != (sum(sizes),) or found[0].dtype != dtype \
                    or found[1] is None or found[1].shape != (n,):
                continue  # encode every cell
            for z, part, shape in zip(zs, found[0].split(sizes), shapes):
                z[i] = part.view(shape)
            ages[i] = found[1]
            todo[i] = self._stale(ages[i], todo[i])
        changes: list[torch.Tensor] = []
        self._fill_maps(images, geos, encode, take, todo=todo, into=zs,
                        seen=todo & (ages >= 0), changes=changes)
        self._observe(torch.cat(changes) if changes else torch.zeros(0), int((ages >= 0).sum()))
        ages[todo] = self.z_clock
        return zs, ages, keys

    def _observe(self, change: torch.Tensor, cached: int, corrected: int = 0,
                 residual: torch.Tensor | None = None) -> None:
        """Count a fill's re-encoded cached cells' changes ``(P,)`` (of ``cached`` cached
        cells, ``corrected`` of them mapped; ``residual`` ``(R,)``: ``z_correct``'s check) in
        :attr:`staleness`, and steer :attr:`z_share` by their mean: the residual's where
        there is one (the error the kept cells carry once mapped), else the change's."""
        self.staleness.add(change, cached, corrected, residual)
        signal = residual if residual is not None and residual.numel() else change
        if self.z_share is not None and signal.numel():
            self.z_share.update(float(signal.mean()))

    def _age_sampled(self, ages: torch.Tensor, order: torch.Tensor, k: int, steps: int,
                     clock: int) -> None:
        """Stamp the cells re-encoded by the inner steps (``order`` ``(B, k·J)``) in ``ages``
        ``(B, N)`` with the optimizer step they were encoded at (``clock`` before the step)."""
        for j in range(steps):
            ages.scatter_(1, order[:, j * k : (j + 1) * k],
                          clock + (0 if self.cfg.method.accumulate else j))

    def _cache_maps(self, keys: list[Any], zs: list[torch.Tensor], ages: torch.Tensor) -> None:
        """Each image's maps (flattened level after level) and ages back to the cache (host
        memory, on CUDA too)."""
        with host_maps():
            for i, key in enumerate(keys):
                self.z_cache.put(key, torch.cat([z[i].flatten() for z in zs]), ages[i].clone())

    def window_logits(self, zwin: torch.Tensor, g: torch.Tensor | None, pool: torch.Tensor,
                      image: list[int], cells: list[int], geo: MapGeometry) -> torch.Tensor:
        """θ2 on windows of Z ``(P, C, side, side)`` with the global map ``g`` ``(B, C, q, q)``
        (or ``None``) and the pooled map ``pool`` ``(B, C)`` → pixel logits ``(P, K, p, p)``."""
        inside = valid(image, cells, geo, zwin.device, zwin.dtype)
        parts = [zwin]
        mode = self.cfg.method.global_context
        if g is not None:
            gwin = global_windows(g.to(zwin.dtype), image, cells, geo)
            if mode == "add":
                parts[0] = zwin + gwin
            else:
                parts.append(gwin)
        per_window = torch.stack([pool[i] for i in image]).to(zwin.dtype)  # (P, C)
        parts.append(per_window[:, :, None, None] * inside)
        agreement = self.z_pool.pixel_features(zwin, per_window)
        if agreement is not None:  # zero outside the map, as the whole map's zero padding
            parts.append(agreement * inside)
        return pixel_logits(self.head(torch.cat(parts, dim=1), per_window), image, cells, geo)

    def _dense_step(self, images: Images, targets: Any, ctx: Context) -> float:
        geo = self.geometry(images)
        grid = geo.grid
        b = images.shape[0]
        k, steps = self.plan(grid)
        use_global = self.cfg.method.global_context != "none"
        gpatch = self.global_patch(images) if use_global else None
        take = grid.taker(images)
        clock = self.z_clock
        with torch.no_grad(), ctx.autocast(), self._fill_mode(self.cfg.method.fill_mode):
            (z,), ages, keys = self._step_maps(images, [geo], lambda x: [self.encode_map(x)],
                                               take)  # (B, C, Hz, Wz) on the host
        sums = self.z_pool.map_sums(z)  # (B,), (B, C) float64: the summary P's running sums
        mask = self.foreground(images, grid)  # data.skip_background: content cells first
        order = sample_cells(b, grid.num_patches, k * steps, mask=mask)  # (B, k·J), host
        image = [i for i in range(b) for _ in range(k)]  # the image of each window

        def inner(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, PoolSums]:
            cells = idx.flatten().tolist()
            new = self.encode_map(grid.gather_with(take, idx).flatten(0, 1))  # (B·k, C, q, q)
            zwin = paste(windows_of(z, image, cells, geo, new.device, new.dtype),
                         image, cells, new, image, cells, geo)
            old = self.z_pool.block_sums(z, geo, image, cells)
            pool = self.z_pool.summary((sums[0] - old[0], sums[1] - old[1]), new, b, k)  # (B, C)
            g = self.encode_map(gpatch) if use_global else None
            logits = self.window_logits(zwin, g, pool, image, cells, geo)
            window = (image, grid.boxes()[idx.flatten()])
            return self.task.loss(logits, targets, window), new, old

        def keep(idx: torch.Tensor, new: torch.Tensor, old: PoolSums) -> None:
            with torch.no_grad():  # the re-encoded blocks stay in Z for the later steps
                cells = idx.flatten().tolist()
                _write_blocks(z, geo, image, cells, new.detach())
                now = self.z_pool.block_sums(z, geo, image, cells)
                for total, before, after in zip(sums, old, now):
                    total.sub_(before).add_(after)

        loss = self._inner_steps(ctx, order, k, steps, inner, keep)
        if keys:
            self._age_sampled(ages, order, k, steps, clock)
            self._cache_maps(keys, [z], ages)
        return loss

    def _dense_predict(self, images: Images) -> torch.Tensor:
        geo = self.geometry(images)
        grid, p = geo.grid, self.cfg.method.patch_size
        b, n = images.shape[0], grid.num_patches
        z = self.fill_map(images, geo)
        pool = self.z_pool.whole(z, self.device)
        g = self.encode_map(self.global_patch(images)) \
            if self.cfg.method.global_context != "none" else None
        ph, pw = grid.padded_size
        dtype = torch.promote_types(self.dtype, torch.float32)
        out = torch.empty(b, self.num_classes, ph, pw, device=self.device, dtype=dtype)
        chunk = self.cfg.method.fill_chunk
        for start in range(0, b * n, chunk):
            flat = torch.arange(start, min(start + chunk, b * n))
            image, cells = (flat // n).tolist(), (flat % n).tolist()
            zwin = windows_of(z, image, cells, geo, self.device, self.dtype)
            logits = self.window_logits(zwin, g, pool, image, cells, geo)
            for bi, cell, lg in zip(image, cells, logits):
                y, x, _, _ = grid.box(cell)
                out[bi, :, y : y + p, x : x + p] = lg
        return out[..., : images.shape[-2], : images.shape[-1]]

    def mask_blocks(self, images: Images) -> tuple[int, Iterator[tuple[int, int, torch.Tensor]]]:
        """Dense: the first image's class ids patch by patch (block = the patch size), θ2
        applied window by window over Z: the logits never exist for the whole image."""
        if not self.task.dense:
            return super().mask_blocks(images)
        first = one_image(images)
        geo = self.geometry(first)
        grid, p = geo.grid, self.cfg.method.patch_size
        h, w = first.shape[-2:]
        z = self.fill_map(first, geo)
        pool = self.z_pool.whole(z, self.device)
        g = self.encode_map(self.global_patch(first)) \
            if self.cfg.method.global_context != "none" else None

        def blocks() -> Iterator[tuple[int, int, torch.Tensor]]:
            chunk = self.cfg.method.fill_chunk
            for start in range(0, grid.num_patches, chunk):
                cells = list(range(start, min(start + chunk, grid.num_patches)))
                image = [0] * len(cells)
                zwin = windows_of(z, image, cells, geo, self.device, self.dtype)
                ids = self.window_logits(zwin, g, pool, image, cells, geo).argmax(dim=1)
                for cell, block in zip(cells, ids.to(torch.uint8).cpu()):
                    y, x, _, _ = grid.box(cell)
                    yield y, x, block[: min(p, h - y), : min(p, w - x)]

        return p, blocks()

    # ------------------------------------------------------------------ detection
    def level_geometry(self, images: Images) -> list[MapGeometry]:
        """Where the patches of a ``(B, C, H, W)`` batch sit in each FPN level's map."""
        h, w = images.shape[-2:]
        grid = PatchGrid(h, w, self.cfg.method.patch_size)
        return level_geometries(grid, self.net.strides, self.net.halo)

    def fill_levels(self, images: Images, geos: list[MapGeometry], take: Take | None = None
                    ) -> list[torch.Tensor]:
        """Z per FPN level ``[(B, F, Hz_l, Wz_l)]`` on the host in the compute dtype (with
        ``method.z_on_disk``, memory-mapped): θ1 (backbone + FPN) on every patch, its maps
        placed at the patch's blocks (call under ``no_grad``)."""
        return self._fill_maps(images, geos, self.encode_levels, take)

    def encode_levels(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """θ1 (backbone + FPN) on host patches ``(P, C_in, p, p)`` → per FPN level
        ``[(P, F, p / s_l, p / s_l)]`` on the device."""
        return self.net.features(self.prepare(patches))

    def level_windows(self, zs: list[torch.Tensor], geos: list[MapGeometry], image: list[int],
                      cells: list[int], new: list[torch.Tensor] | None = None,
                      g: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per level, the windows of Z around the blocks of ``cells`` (of images ``image``)
        ``(P, F, side_l, side_l)`` on the device, with the re-encoded blocks ``new[l]``
        ``(P, F, q_l, q_l)`` pasted in (also into neighbours' margins) and the global maps
        ``g[l]`` ``(B, F, q_l, q_l)`` added, upsampled. Differentiable in ``new`` and ``g``."""
        dtype = new[0].dtype if new is not None else self.compute_dtype()
        out = []
        for level, (z, geo) in enumerate(zip(zs, geos)):
            win = windows_of(z, image, cells, geo, self.device, dtype)
            if new is not None:
                win = paste(win, image, cells, new[level], image, cells, geo)
            if g is not None:
                win = win + global_windows(g[level].to(dtype), image, cells, geo)
            out.append(win)
        return out

    def window_head(self, windows: list[torch.Tensor], geos: list[MapGeometry],
                    cells: list[int]) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """θ2 (the FCOS head) on each level's windows, cut to the blocks: per level the head
        dict (``(P, q_l², ·)`` each) and the blocks' anchors ``(P, q_l², 4)`` (image pixels)."""
        head = [crop_blocks(self.net.window_head(w, valid([0] * len(cells), cells, geo,
                                                          w.device, w.dtype)), geo)
                for w, geo in zip(windows, geos)]
        anchors = block_anchors(self.net.base_anchors(windows[0].dtype, windows[0].device),
                                cells, geos)
        return head, anchors

    def window_losses(self, windows: list[torch.Tensor], geos: list[MapGeometry],
                      cells: list[int], targets: list[dict[str, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
        """FCOS's losses (``compute_loss``) over the anchors of the windows' blocks, ``k`` per
        image in image-major order, matched against each image's boxes (image pixels)."""
        b = len(targets)
        head, anchors = self.window_head(windows, geos, cells)
        outputs = {key: per_image([h[key] for h in head], b) for key in head[0]}
        per_level = [len(cells) // b * geo.q * geo.q for geo in geos]
        return self.net.fcos.compute_loss(targets, outputs, list(per_image(anchors, b)),
                                          per_level)

    def _box_targets(self, targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        dtype = torch.promote_types(self.dtype, torch.float32)
        return [{"boxes": t["boxes"].to(self.device, dtype), "labels": t["labels"].to(self.device)}
                for t in targets]

    def _detect_step(self, images: Images, targets: Any, ctx: Context) -> float:
        geos = self.level_geometry(images)
        grid, b = geos[0].grid, images.shape[0]
        k, steps = self.plan(grid)
        use_global = self.cfg.method.global_context != "none"
        gpatch = self.global_patch(images) if use_global else None
        take = grid.taker(images)
        clock = self.z_clock
        with torch.no_grad(), ctx.autocast(), self._fill_mode(self.cfg.method.fill_mode):
            zs, ages, keys = self._step_maps(images, geos, self.encode_levels, take)
        order = sample_cells(b, grid.num_patches, k * steps, mask=self.foreground(images, grid))
        image = [i for i in range(b) for _ in range(k)]
        boxes = self._box_targets(targets)

        def inner(idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            cells = idx.flatten().tolist()
            new = self.encode_levels(grid.gather_with(take, idx).flatten(0, 1))
            g = self.encode_levels(gpatch) if use_global else None
            windows = self.level_windows(zs, geos, image, cells, new, g)
            return self.task.loss(self.window_losses(windows, geos, cells, boxes), targets), new

        def keep(idx: torch.Tensor, new: list[torch.Tensor]) -> None:
            with torch.no_grad():  # the re-encoded blocks stay in Z for the later steps
                for z, geo, blocks in zip(zs, geos, new):
                    _write_blocks(z, geo, image, idx.flatten().tolist(), blocks.detach())

        loss = self._inner_steps(ctx, order, k, steps, inner, keep)
        if keys:
            self._age_sampled(ages, order, k, steps, clock)
            self._cache_maps(keys, zs, ages)
        return loss

    def _detect_predict(self, images: Images) -> list[dict[str, torch.Tensor]]:
        """Detections per image: Z per level filled, θ2 window by window (``fill_chunk``
        windows at a time), each window's detections decoded (FCOS's post-processing), then
        merged per image by NMS at FCOS's IoU, its best ``detections_per_img`` kept."""
        geos = self.level_geometry(images)
        grid, b, h, w = geos[0].grid, images.shape[0], *images.shape[-2:]
        n = grid.num_patches
        zs = self.fill_levels(images, geos)
        g = None
        if self.cfg.method.global_context != "none":
            g = self.encode_levels(self.global_patch(images))
        found: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(b)]
        chunk = self.cfg.method.fill_chunk
        for start in repeated(range(0, b * n, chunk)):
            flat = range(start, min(start + chunk, b * n))
            image, cells = [f // n for f in flat], [f % n for f in flat]
            head, anchors = self.window_head(self.level_windows(zs, geos, image, cells, g=g),
                                             geos, cells)
            for i, det in zip(image, self.net.decode(head, anchors, (h, w))):
                found[i].append(det)
        fcos = self.net.fcos
        return [merge_detections(parts, fcos.nms_thresh, fcos.detections_per_img, self.device)
                for parts in found]

    # ------------------------------------------------------------------ interface
    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        out = {"patch_size": self.cfg.method.patch_size,
               "global_context": self.cfg.method.global_context}
        if self.task.detects:
            out.update(strides=self.net.strides, head_halo=self.net.halo)
        elif self.task.dense:
            out.update(z_stride=self.cfg.method.z_stride, head_halo=self.head.halo)
        return out

    def train_step(self, images: Images, targets: Any, ctx: Context) -> float:
        if self.task.detects:
            return self._detect_step(images, targets, ctx)
        if self.task.dense:
            return self._dense_step(images, targets, ctx)
        grid = self.grid(images)
        b = images.shape[0]
        k, steps = self.plan(grid)
        use_global = self.cfg.method.global_context != "none"
        gpatch = self.global_patch(images) if use_global else None

        take = grid.taker(images)
        mask = self.foreground(images, grid)  # (B, N) or None
        if self.encoder_frozen:
            return self._frozen_step(images, targets, ctx, grid, mask, k, steps)
        keys = image_keys(images) if self.cfg.method.z_cache != "none" else []
        cached = bool(keys) and None not in keys  # (fake tensors of estimates: exact fill)
        with torch.no_grad(), ctx.autocast(), self._fill_mode(self.cfg.method.fill_mode):
            if cached:
                z, ages, corrected, found = self._cached_fill(images, grid, take, mask, keys)
            else:
                z = self.fill(images, grid, take, mask)  # (B, N, C) in the compute dtype
        order = sample_cells(b, grid.num_patches, k * steps, mask=mask)  # (B, k·J), host
        clock = self.z_clock

        def inner(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            emb = self.encode(grid.gather_with(take, idx).flatten(0, 1)).view(b, k, -1)
            emb = emb.to(z.dtype)
            where = idx.to(self.device)[:, :, None].expand(-1, -1, self.latent_dim)
            z_j = z.scatter(1, where, emb)  # differentiable w.r.t. emb only
            g = self.encode(gpatch) if use_global else None
            return self.task.loss(self.logits(z_j, grid, g), targets), emb, where

        loss = self._inner_steps(ctx, order, k, steps, inner,
                                 lambda idx, emb, where: z.scatter_(1, where, emb.detach()))
        if cached:  # Z, with the re-encoded cells, back to the cache with their ages
            self._age_sampled(ages, order, k, steps, clock)
            with host_maps():  # the cache is host memory, on CUDA too
                host = z.cpu()
                if corrected is not None:  # the cache keeps what θ1 gave, not the mapped view
                    corrected[torch.arange(b)[:, None], order] = False  # (re-encoded since)
                    host[corrected] = found[corrected]
                for i, key in enumerate(keys):
                    self.z_cache.put(key, host[i].clone(), ages[i].clone())
        return loss

    def _stale(self, ages: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the cached cells to re-encode now, among ``candidates`` ``(N,)``
        (``method.z_cache``: none for ``epoch``; older than ``z_max_age`` optimizer steps, or
        the oldest share ``z_refresh``, ties by cell index, for ``refresh``; with
        ``z_tolerance``, the share :attr:`z_share` steers); every candidate during the first
        ``method.z_cache_warmup`` optimizer steps, while θ1 moves fastest. With ``z_correct``
        half of the share is the oldest (ties at random), half a random sample of the other
        candidates, of every age: pairs for every bucket's map (:meth:`_correct`), drawn from
        :attr:`z_gen`, not the global generator."""
        m = self.cfg.method
        if self.z_clock < m.z_cache_warmup:
            return candidates.clone()
        if m.z_cache == "epoch":
            return torch.zeros_like(candidates)
        if m.z_max_age is not None:
            return candidates & (self.z_clock - ages > m.z_max_age)
        pool = candidates.nonzero().flatten()
        share = m.z_refresh if self.z_share is None else self.z_share.share
        count = math.ceil(share * len(pool))
        if m.z_correct:  # ties at random: the re-encoded cells are a fair sample to fit on
            pool = pool[torch.randperm(len(pool), generator=self.z_gen)]
        by_age = pool[torch.sort(ages[pool], stable=True).indices]
        out = torch.zeros_like(candidates)
        if m.z_correct:
            first = math.ceil(count / 2)
            younger = by_age[first:]
            out[by_age[:first]] = True
            picks = torch.randperm(len(younger), generator=self.z_gen)[: count - first]
            out[younger[picks]] = True
        else:
            out[by_age[:count]] = True
        return out

    def _cached_fill(self, images: Images, grid: PatchGrid, take: Take,
                     mask: torch.Tensor | None, keys: list[Any]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Z ``(B, N, C)`` on the device from the cache (``method.z_cache``), the stale cells
        (:meth:`_stale`; all of an image not cached, or cached for another shape or dtype)
        re-encoded; the cells' ages ``(B, N)`` (optimizer step of their encoding; -1: never
        encoded, background); with ``method.z_correct`` the cells mapped (:meth:`_correct`)
        ``(B, N)`` bool (else ``None``), and the cached values as found ``(B, N, C)`` (host)."""
        b, n, c = images.shape[0], grid.num_patches, self.latent_dim
        dtype = self.compute_dtype()
        with host_maps():  # the cached Z is host memory, on CUDA too
            old = torch.zeros(b, n, c, dtype=dtype)
        ages = torch.full((b, n), -1, dtype=torch.int64)
        todo = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.clone()
        for i, key in enumerate(keys):
            found = self.z_cache.get(key)
            if found is None or found[0].shape != (n, c) or found[0].dtype != dtype \
                    or found[1] is None or found[1].shape != (n,) \
                    or found[1].dtype != torch.int64:
                continue  # encode every candidate cell
            old[i], ages[i] = found[0], found[1]
            todo[i] = self._stale(ages[i], todo[i])
        fresh = self.fill(images, grid, take, todo)  # only the todo cells are encoded
        seen = todo & (ages >= 0)  # re-encoded cells with a cached value: their change
        z = torch.where(todo.to(self.device)[:, :, None], fresh, old.to(self.device))
        corrected, residual = self._correct(z, old, ages, seen, ~todo & (ages >= 0)) \
            if self.cfg.method.z_correct else (None, None)
        self._observe(relative_change(fresh[seen.to(self.device)], old[seen]).cpu(),
                      int((ages >= 0).sum()), 0 if corrected is None else int(corrected.sum()),
                      residual)
        ages[todo] = self.z_clock
        return z, ages, corrected, old

    def _correct(self, z: torch.Tensor, old: torch.Tensor, ages: torch.Tensor,
                 seen: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``method.z_correct``: in ``z`` ``(B, N, C)`` (device), map the cached cells
        ``rest`` ``(B, N)`` kept as found by their bucket's affine map (:attr:`z_maps`: cells
        encoded within the same :attr:`z_bucket_steps` optimizer steps), fitted on the old →
        new pairs of the re-encoded cells ``seen`` ``(B, N)`` of this fill and the recent
        ones (decayed; a bucket whose pairs weigh less than C + 1 borrows its neighbours',
        :class:`~gigapatch.methods.z_staleness.BucketMaps`, and keeps its cells as they are
        if even those weigh too little). ``old`` ``(B, N, C)`` host, ``ages`` the cells'
        encoding steps. Returns the cells mapped ``(B, N)`` bool and the residual change
        ``(R,)`` of this fill's pairs under their bucket's map from the fills before (held
        out: the error the mapped cells keep)."""
        bucket = torch.div(ages, self.z_bucket_steps, rounding_mode="floor")
        c = z.shape[-1]
        dev_z, host_old = z.view(-1, c), old.reshape(-1, c)
        self.z_maps.step()
        flat, groups = _bucket_groups(seen, bucket)
        was, now = host_old[flat], dev_z[flat.to(z.device)]  # (P, C) host, device
        before = self.z_maps.maps([b for b, _ in groups], c + 1, z.device)
        residual = []
        for b, part in groups:
            if b in before:
                residual.append(relative_change(now[part], apply_affine(was[part], before[b])))
            self.z_maps.add(b, was[part], now[part])
        flat, groups = _bucket_groups(rest, bucket)
        kept = host_old[flat]  # (R, C) host
        maps = self.z_maps.maps([b for b, _ in groups], c + 1, z.device)
        done = torch.zeros_like(rest)
        for b, part in groups:
            if b in maps:
                dev_z[flat[part].to(z.device)] = apply_affine(kept[part], maps[b])
                done.view(-1)[flat[part]] = True
        return done, (torch.cat(residual).cpu() if residual else torch.zeros(0))

    def training_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: the Z cache (``method.z_cache``) and
        its clock; empty without a cache. A cache larger than ``method.z_cache_checkpoint``
        is left out (rewriting it with every ``last.pt`` would cost more than a rebuild): a
        resumed run then re-encodes each image on its first visit, so it is not bit-identical
        to an uninterrupted one."""
        if self.cfg.method.z_cache == "none":
            return {}
        share = {"z_share": self.z_share.state_dict()} if self.z_share is not None else {}
        if self.cfg.method.z_correct:
            share["z_maps"] = self.z_maps.state_dict()
            share["z_gen"] = self.z_gen.get_state()
        entries = self.z_cache.entries()
        size = sum(ZCache.entry_bytes(entry) for _, entry in entries)
        cap = parse_bytes(self.cfg.method.z_cache_checkpoint)
        if size > cap:
            if not self._cache_skip_logged:
                log.info("the Z cache (%s) is larger than method.z_cache_checkpoint (%s): "
                         "last.pt leaves it out, and a resumed run re-encodes it",
                         format_bytes(size), format_bytes(cap))
                self._cache_skip_logged = True
            return {"z_clock": self.z_clock, **share}
        return {"z_clock": self.z_clock, **share,
                "z_cache": [(key, z, extra) for key, (z, extra) in entries]}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.z_clock = int(state.get("z_clock", 0))
        if self.z_share is not None:
            self.z_share.load_state_dict(state.get("z_share", {}))
        self.z_maps.load_state_dict(state.get("z_maps", {}))
        if "z_gen" in state:
            self.z_gen.set_state(state["z_gen"])
        for key, z, extra in state.get("z_cache", []):
            self.z_cache.put(key, z, extra)

    def epoch_stats(self, total: Totals = list) -> dict[str, float]:
        """With ``method.z_cache``: the epoch's ``z_staleness`` and ``z_refreshed``
        (:class:`~gigapatch.methods.z_staleness.Staleness`; the fills of all processes, by
        ``total``), with ``z_correct`` ``z_corrected`` and ``z_residual``, and with
        ``z_tolerance`` the share ``z_share`` reached (its mean over the processes, each of
        which steers its own)."""
        out = self.staleness.epoch_stats(self.cfg.method.z_correct, total)
        if self.z_share is not None:
            share, processes = total([self.z_share.share, 1.0])
            out["z_share"] = share / processes
        return out

    def set_run_dir(self, run_dir: Path) -> None:
        """Cached Z beyond ``method.z_cache_budget`` go to memory-mapped files in
        ``<run_dir>/z_cache``."""
        if self.cfg.method.z_cache != "none":
            self.z_cache.spill_dir = Path(run_dir) / "z_cache"

    def set_epoch_length(self, batches: int) -> None:
        """Warn about Z-cache settings an epoch of ``batches`` batches makes moot: each image
        comes back about an epoch of optimizer steps later, so a ``z_max_age`` below that
        re-encodes all of its cells on nearly every visit (the exact fill's cost), and a
        ``z_cache_warmup`` as long as the run never lets the cache take over. Under torchrun
        only the first process warns (the settings are the same in all). Also sets
        ``z_correct``'s buckets to a quarter of the epoch's steps."""
        m = self.cfg.method
        steps = optimizer_steps(self.cfg, batches)
        self.z_bucket_steps = max(1, steps // 4)
        if m.z_cache == "none" or self.encoder_frozen or (dist.is_initialized()
                                                           and dist.get_rank() > 0):
            return
        if m.z_cache == "refresh" and m.z_max_age is not None and m.z_max_age < steps:
            log.warning("method.z_max_age = %d optimizer steps is below the %d steps of an "
                        "epoch: an image comes back about an epoch later, so nearly every "
                        "visit re-encodes all of its cells (the cost of z_cache: none). Raise "
                        "z_max_age above %d, or set method.z_refresh (a share of the oldest "
                        "cells per visit) instead.", m.z_max_age, steps, steps)
        total = steps * self.cfg.train.epochs
        if m.z_cache_warmup >= total:
            log.warning("method.z_cache_warmup = %d covers all %d optimizer steps of the run "
                        "(%d epochs of %d): every step fills Z exactly and the cache never "
                        "takes over. Lower it (e.g. %d for one epoch).", m.z_cache_warmup,
                        total, self.cfg.train.epochs, steps, steps)

    def _frozen_z(self, images: Images, grid: PatchGrid, mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frozen θ1: Z ``(B, N, C)`` and g ``(B, C)`` (or ``None``) on the device, from the
        cache where an image was seen before, else filled (eval mode) and cached."""
        use_global = self.cfg.method.global_context != "none"
        keys = image_keys(images)
        found = [self.z_cache.get(key) for key in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            sub = LazyBatch([images.readers[i] for i in todo]) if isinstance(images, LazyBatch) \
                else images[todo]
            with torch.no_grad():
                z = self.fill(sub, grid, mask=None if mask is None else mask[todo])
                g = self.encode(self.global_patch(sub)).to(z.dtype) if use_global else None
            for n, i in enumerate(todo):
                found[i] = (z[n].cpu(), None if g is None else g[n].cpu())
                self.z_cache.put(keys[i], *found[i])
        z = torch.stack([f[0] for f in found]).to(self.device)  # type: ignore[index]
        g = torch.stack([f[1] for f in found]).to(self.device) if use_global else None  # type: ignore[index,misc]
        return z, g

    def _frozen_step(self, images: Images, targets: Any, ctx: Context, grid: PatchGrid,
                     mask: torch.Tensor | None, k: int, steps: int) -> float:
        """A step with θ1 frozen: re-encoding a cell gives the cell Z already holds, so every
        inner step sees the same Z; with accumulation the J steps' mean gradient is the
        gradient of one step, which is what runs (without it, J optimizer steps)."""
        z, g = self._frozen_z(images, grid, mask)
        b = images.shape[0]
        order = sample_cells(b, grid.num_patches, k * steps, mask=mask)
        steps = 1 if self.cfg.method.accumulate else steps

        def inner(idx: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.task.loss(self.logits(z, grid, g), targets),)

        return self._inner_steps(ctx, order, k, steps, inner, lambda idx: None)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; empties the frozen-encoder Z cache (new weights)."""
        self.z_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _inner_steps(self, ctx: Context, order: torch.Tensor, k: int, steps: int,
                     inner: Callable[[torch.Tensor], tuple[Any, ...]],
                     keep: Callable[..., Any]) -> float:
        """The J inner steps: ``inner(idx)`` on cells ``idx`` ``(B, k)`` returns ``(loss,
        *new)``; ``keep(idx, *new)`` writes the re-encoded cells into Z for the later steps.
        With accumulation one optimizer step follows the J backward passes (all but the last
        without gradient synchronisation), else one per inner step. Returns the mean loss."""
        accumulate = self.cfg.method.accumulate
        ctx.zero_grad()
        total = 0.0
        loop = repeated(range(steps))
        for n_done, j in enumerate(loop):
            idx = order[:, j * k : (j + 1) * k]  # (B, k)
            local = accumulate and n_done < len(loop) - 1
            with ctx.no_sync() if local else nullcontext():
                loss, *new = ctx.run(inner, idx)
                ctx.backward(loss / steps if accumulate else loss)
            keep(idx, *new)
            total += float(loss.detach())
            if not accumulate:
                ctx.step()
                self.z_clock += 1
        if accumulate:
            ctx.step()
            self.z_clock += 1
        return total / steps

    def predict(self, images: torch.Tensor) -> Any:
        if self.task.detects:
            return self._detect_predict(images)
        if self.task.dense:
            return self._dense_predict(images)
        grid = self.grid(images)
        if self.encoder_frozen:
            z, g = self._frozen_z(images, grid, self.foreground(images, grid))
            return self.logits(z, grid, g)
        z = self.fill(images, grid, mask=self.foreground(images, grid))
        g = None
        if self.cfg.method.global_context != "none":
            g = self.encode(self.global_patch(images))
        return self.logits(z, grid, g)

    def explain(self, images: Images, out: str) -> tuple[torch.Tensor, str]:
        """Occlusion saliency of the first image's Z cells as a heat map drawn to ``out``."""
        if self.task.dense or self.task.detects:
            raise ConfigError("--explain draws image-level evidence; for segmentation use "
                              "predict's --masks/--overlay, for detection --boxes/--overlay.")
        logits, saliency = occlusion_explain(self, images)
        path = draw_saliency(first_image(images), self.grid(images), saliency, out,
                             "PatchGD: occlusion saliency of the Z cells")
        return logits, str(path)
