"""Tiled detection: boxes clipped to tiles, detections merged across overlapping tiles."""

import torch

from gigapatch.engine.loop import train
from gigapatch.methods import create_method
from gigapatch.methods.tiled import MIN_VISIBLE, clip_to_tiles
from gigapatch.synth.detection import generate_detection


def test_boxes_crossing_tile_borders_go_to_the_tiles_holding_most_of_them():
    assert MIN_VISIBLE == 0.5
    tiles = torch.tensor([[0, 0, 64, 64], [0, 64, 64, 64]])  # (y, x, h, w): left, right
    boxes = torch.tensor([[10.0, 10, 30, 30],    # inside the left tile
                          [54.0, 0, 74, 20],     # 10 px left, 10 px right: 50 % each → both
                          [40.0, 30, 70, 50],    # 24 of 30 px left (80 %) → left only
                          [60.0, 40, 100, 60]])  # 4 of 40 px left (10 %) → right only
    labels = torch.tensor([1, 2, 3, 4])
    left, right = clip_to_tiles(boxes, labels, tiles)
    assert left["labels"].tolist() == [1, 2, 3]
    torch.testing.assert_close(left["boxes"], torch.tensor([[10.0, 10, 30, 30], [54, 0, 64, 20],
                                                            [40, 30, 64, 50]]))
    assert right["labels"].tolist() == [2, 4]  # in the right tile's pixels
    torch.testing.assert_close(right["boxes"], torch.tensor([[0.0, 0, 10, 20], [0, 40, 36, 60]]))


def _cfg(tmp_path, data, detection_config):
    cfg = detection_config(data, tmp_path / "runs", "tiled", name="tiled")
    cfg.method.patch_size, cfg.method.sample_fraction, cfg.method.fill_chunk = 64, 0.5, 8
    return cfg.validate()


def test_one_object_seen_by_overlapping_tiles_is_detected_once(tmp_path, monkeypatch,
                                                              detection_config):
    cfg = _cfg(tmp_path, tmp_path, detection_config)
    method = create_method(cfg).eval()
    target = torch.tensor([40.0, 40, 56, 56])  # image pixels; inside 4 overlapping tiles
    grid = method.grid(torch.zeros(1, 1, 128, 128), 32)
    origins = grid.boxes()[:, [1, 0, 1, 0]].float()
    calls = []

    def detect(maps, sizes):  # every tile that contains the object finds it (in its pixels)
        out = []
        for _ in sizes:
            cell = len(calls)
            calls.append(cell)
            o = origins[cell]
            local = target - o
            inside = bool((local[:2] >= 0).all() and (local[2:] <= 64).all())
            out.append({"boxes": local[None] if inside else torch.zeros(0, 4),
                        "scores": torch.tensor([0.5 + 0.01 * cell]) if inside else torch.zeros(0),
                        "labels": torch.tensor([3]) if inside else torch.zeros(0, dtype=torch.long)})
        return out

    monkeypatch.setattr(method.net, "detect", detect)
    with torch.no_grad():
        got = method.predict(torch.zeros(1, 1, 128, 128, dtype=torch.uint8))[0]
    assert len(calls) == grid.num_patches == 9
    torch.testing.assert_close(got["boxes"], target[None])  # four sightings, one detection
    assert got["labels"].tolist() == [3]


def test_a_tiled_run_trains_and_reports_map(tmp_path, detection_config):
    generate_detection(tmp_path / "det", n_train=4, n_test=2, side=128, scale_range=(14, 40),
                       digits_per_image=(2, 3), progress=False)
    summary = train(_cfg(tmp_path, tmp_path / "det", detection_config))
    assert 0 <= summary["val_map"] <= 1 and summary["predict_stride"] == 32
