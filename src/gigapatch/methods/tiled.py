"""Tiled detection: how practitioners detect on images too large for the detector today.

**Training.** Each step samples k = round(s·N) tiles of ``p × p`` (``method.patch_size``,
``s = method.sample_fraction``) per image from the grid of non-overlapping tiles (with
``data.skip_background``, tiles with content first), reads only those, and trains the FCOS
detector (:mod:`gigapatch.models.detection`) on them with each image's boxes *clipped* to the
tile: a box is kept for a tile when at least :data:`MIN_VISIBLE` of its area lies inside
(the clipped part is then the target, in tile pixels), so an object cut by a border is still
learnt from the tile that holds most of it, and a sliver is not taught as a whole object.

**Prediction.** Tiles slide over the image with half overlap (stride ``p/2``, or
``method.stride``), ``fill_chunk`` at a time; each tile's detections are shifted to image
pixels and clipped to the image, and all of an image's detections are merged with
torchvision's ``batched_nms`` (per class, IoU :data:`MERGE_IOU`), the best
:data:`MAX_DETECTIONS` kept. No context beyond the tile: an object larger than a tile is only
seen in parts.

Memory: the detector on B·k tiles; independent of the image size.
"""

from __future__ import annotations

from typing import Any

import torch
from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.grid import PatchGrid
from gigapatch.core.sampling import sample_cells
from gigapatch.data.batch import Images
from gigapatch.methods.base import METHODS, Context, Method, StepProxy, grid_proxy, repeated
from gigapatch.models.detection import create_detector, merge_detections
from gigapatch.tasks import Task

__all__ = ["MAX_DETECTIONS", "MERGE_IOU", "MIN_VISIBLE", "Tiled", "clip_to_tiles"]

#: Share of a box's area that must lie in a tile for the tile to be trained on it.
MIN_VISIBLE = 0.5
#: IoU above which overlapping tiles' detections of one class are merged.
MERGE_IOU = 0.5
#: Detections kept per image after merging (COCO evaluates the best 100).
MAX_DETECTIONS = 100


def clip_to_tiles(boxes: torch.Tensor, labels: torch.Tensor, tiles: torch.Tensor
                  ) -> list[dict[str, torch.Tensor]]:
    """Targets of ``T`` tiles ``(y, x, h, w)`` ``(T, 4)`` from one image's boxes ``(n, 4)``
    xyxy and labels ``(n,)``: each box clipped to the tile, kept if ≥ :data:`MIN_VISIBLE` of
    its area is inside, in tile pixels."""
    out = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for y, x, h, w in tiles.tolist():
        lo = torch.tensor([x, y, x, y], dtype=boxes.dtype)
        hi = torch.tensor([x + w, y + h, x + w, y + h], dtype=boxes.dtype)
        clipped = torch.max(torch.min(boxes, hi), lo)
        inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = inside >= MIN_VISIBLE * area
        out.append({"boxes": clipped[keep] - lo, "labels": labels[keep]})
    return out


@METHODS.register("tiled")
class Tiled(Method):
    """FCOS on sampled tiles with clipped boxes; sliding-window prediction merged by NMS."""

    budget_knobs = ("k", "fill_chunk")
    k_means = "tiles per image per step"
    encoder_attr = "net"
    detects = True
    trains_stride_free = True

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__(cfg, task)
        if not task.detects:
            raise ConfigError(f"method tiled is for task.kind = detect (not {cfg.task.kind!r});"
                              " use patchwise for classification and segmentation.")
        mc = cfg.model
        self.net = create_detector(mc.encoder, self.num_classes, self.in_chans, mc.pretrained,
                                   mc.weights)

    @classmethod
    def step_proxy(cls, cfg: Config, image_shape: tuple[int, int, int]) -> StepProxy | None:
        """Training encodes k tiles of the stride-free grid: the memory does not grow with the
        image (:func:`~gigapatch.methods.base.grid_proxy`)."""
        return grid_proxy(cfg, image_shape)

    def grid(self, images: Images, stride: int | None = None) -> PatchGrid:
        h, w = images.shape[-2:]
        return PatchGrid(h, w, self.cfg.method.patch_size, stride)

    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        m = self.cfg.method
        return {"patch_size": m.patch_size,
                "predict_stride": m.stride or max(1, m.patch_size // 2)}

    def train_step(self, images: Images, targets: Any, ctx: Context) -> float:
        grid = self.grid(images)
        take = grid.taker(images)
        b, p = images.shape[0], grid.patch_size
        k = max(1, min(grid.num_patches, round(self.cfg.method.sample_fraction
                                               * grid.num_patches)))
        cells = sample_cells(b, grid.num_patches, k, mask=self.foreground(images, grid))
        boxes = grid.boxes()
        tile_targets = []
        for i, t in enumerate(targets):
            tile_targets += clip_to_tiles(t["boxes"].float(), t["labels"], boxes[cells[i]])
        tile_targets = [{k_: v.to(self.device) for k_, v in t.items()} for t in tile_targets]
        ctx.zero_grad()

        def learn() -> torch.Tensor:
            tiles = grid.gather_with(take, cells).flatten(0, 1)  # (B·k, C, p, p)
            maps = self.net.features(self.prepare(tiles))
            return self.task.loss(self.net.losses(maps, tile_targets, [(p, p)] * len(tiles)),
                                  targets)

        loss = ctx.run(learn)
        ctx.backward(loss)
        ctx.step()
        return float(loss.detach())

    def predict(self, images: Images) -> list[dict[str, torch.Tensor]]:
        m = self.cfg.method
        grid = self.grid(images, m.stride or max(1, m.patch_size // 2))
        take = grid.taker(images)
        b, n, p = images.shape[0], grid.num_patches, grid.patch_size
        h, w = images.shape[-2:]
        origins = grid.boxes()[:, [1, 0, 1, 0]].float()  # (N, 4): x, y, x, y of each tile
        found: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(b)]
        for start in repeated(range(0, b * n, m.fill_chunk)):
            flat = torch.arange(start, min(start + m.fill_chunk, b * n))
            tiles = take(flat // n, flat % n)
            dets = self.net.detect(self.net.features(self.prepare(tiles)), [(p, p)] * len(flat))
            for f, d in zip(flat.tolist(), dets):
                shift = origins[f % n].to(d["boxes"].device)
                box = d["boxes"] + shift
                box[:, 0::2] = box[:, 0::2].clamp(0, w)
                box[:, 1::2] = box[:, 1::2].clamp(0, h)
                found[f // n].append({**d, "boxes": box})
        return [merge_detections(parts, MERGE_IOU, MAX_DETECTIONS, self.device)
                for parts in found]

