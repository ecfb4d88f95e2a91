"""Object detection: boxes and their classes (task ``detect``).

Targets are one dict per image (:class:`~gigapatch.data.detection.DetectionDataset`):
``boxes`` ``float32 (n, 4)`` as ``(x0, y0, x1, y1)`` in level-0 pixels, ``labels`` ``int64
(n,)`` in ``1..K`` (``data.num_classes = K`` object classes). A method's training output is
FCOS's loss dict (focal classification, GIoU box regression, centerness BCE:
:mod:`gigapatch.models.detection`), whose sum is the loss; its prediction is one dict per
image (``boxes``, ``scores``, ``labels``) in level-0 pixels. A held-out *loss* is not defined
for detections (torchvision's references do not compute one either): ``val_loss`` is NaN.

**Metrics** (torchmetrics ``MeanAveragePrecision``, COCO's definitions, over the whole held-out
set): ``map`` (IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small`` (objects < 32² px),
``map_medium``, ``map_large`` and ``mar_100``; ``best.pt`` by ``map``. The COCO evaluation runs
on the ``faster-coco-eval`` backend (extra ``gigapatch[det]``) or else ``pycocotools``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torchmetrics import MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.tasks.base import TASKS, DelegatingMetric, Task

__all__ = ["Detect", "METRICS", "coco_results"]

#: Metrics a detection task reports (``task.metrics`` chooses among them).
METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")

Boxes = list[dict[str, torch.Tensor]]


def _backend() -> str:
    for name, module in (("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        if importlib.util.find_spec(module) is not None:
            return name
    raise ConfigError("task.kind detect computes COCO mAP with faster-coco-eval or pycocotools: "
                      "pip install 'gigapatch[det]'.")


class _MAP(DelegatingMetric):
    """``update(detections, targets)`` on the metric's device; ``compute`` → the wanted
    scalars (``-1`` where COCO has no object of that size, as pycocotools reports)."""

    def __init__(self, wanted: list[str]) -> None:
        super().__init__(MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                              backend=_backend()))
        self.wanted = wanted

    def update(self, preds: Boxes, targets: Boxes) -> None:
        dev = self.metric.device
        self.metric.update(
            [{k: v.to(dev) for k, v in p.items() if k in ("boxes", "scores", "labels")}
             for p in preds],
            [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets])

    def compute(self) -> dict[str, torch.Tensor]:
        values = self.metric.compute()
        return {k: values[k].float() for k in self.wanted}


def coco_results(det: dict[str, torch.Tensor], image_id: int = 1,
                 category_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One image's detections in COCO's result format (what ``loadRes`` reads):
    ``[{image_id, category_id, bbox: [x, y, w, h], score}]``, best first. ``category_id`` is
    ``category_ids[label - 1]`` (the training JSON's ids, ``data.category_ids``), or the
    label itself without them."""
    order = det["scores"].argsort(descending=True).tolist()
    out = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in det["boxes"][i])
        label = int(det["labels"][i])
        category = int(category_ids[label - 1]) if category_ids else label
        out.append({"image_id": int(image_id), "category_id": category,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(det["scores"][i]), 5)})
    return out


@TASKS.register("detect")
class Detect(Task):
    """Boxes of ``data.num_classes`` object classes (labels 1..K)."""

    kind = "detect"
    detects: ClassVar[bool] = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.num_classes: int = cfg.data.num_classes
        t = cfg.task
        if list(t.metrics) == ["accuracy"] and t.monitor == "accuracy":  # classify defaults
            self.wanted, self.monitor = ["map", "map_50", "map_75", "map_small"], "map"
        else:
            self.wanted = list(t.metrics)
        for name in self.wanted:
            if name not in METRICS:
                raise ConfigError(f"task.metrics: {name!r} is not a metric of task detect; "
                                  f"choose from {list(METRICS)}.")
        if self.monitor == "loss":
            raise ConfigError("task.monitor = loss: detection has no held-out loss; monitor "
                              "map (or another of task.metrics).")
        if self.monitor not in self.wanted:
            raise ConfigError(f"task.monitor = {self.monitor!r} is not among task.metrics "
                              f"{self.wanted}; e.g. task.monitor: map.")
        if cfg.data.tasks:
            raise ConfigError("data.tasks names label columns of classification; detection "
                              "reads boxes (COCO JSON or a box CSV).")
        _backend()

    def collate(self, targets: list[Any]) -> Boxes:
        return list(targets)

    def loss(self, output: Any, targets: Boxes, window: Any = None) -> torch.Tensor:
        """The sum of FCOS's losses (a dict); NaN for detections (no held-out loss)."""
        if isinstance(output, dict):
            return sum(output.values())  # type: ignore[return-value]
        return torch.tensor(float("nan"))

    def metrics(self) -> MetricCollection:
        return MetricCollection({"det": _MAP(self.wanted)}, compute_groups=False)

    def random_targets(self, batch: int, image_hw: tuple[int, int] | None = None) -> Boxes:
        h, w = image_hw or (256, 256)
        out = []
        for _ in range(batch):
            xy = torch.rand(4, 2) * torch.tensor([w * 0.7, h * 0.7])
            wh = 8 + torch.rand(4, 2) * torch.tensor([w * 0.25, h * 0.25])
            out.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, self.num_classes + 1, (4,))})
        return out

    def prediction(self, output: Boxes, index: int = 0) -> dict[str, Any]:
        """Image ``index``'s detections, best first: ``[{box: [x0, y0, x1, y1], score,
        label}]`` (level-0 pixels, rounded to 0.1 px)."""
        det = output[index]
        order = det["scores"].argsort(descending=True)
        return {"detections": [
            {"box": [round(float(v), 1) for v in det["boxes"][i]],
             "score": round(float(det["scores"][i]), 4), "label": int(det["labels"][i])}
            for i in order.tolist()]}
