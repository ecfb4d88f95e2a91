"""Detection task: COCO mAP through torchmetrics, FCOS losses, full-image (downsampled) FCOS."""

import json
from pathlib import Path

import pytest
import torch

from gigapatch.cli import main
from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.engine.loop import train
from gigapatch.methods import create_method
from gigapatch.synth.detection import generate_detection
from gigapatch.tasks import create_task


def _cfg(**task) -> Config:
    cfg = Config()
    cfg.task.kind, cfg.data.num_classes, cfg.data.in_chans = "detect", 3, 1
    cfg.model.encoder = "fcos_tiny"
    for k, v in task.items():
        setattr(cfg.task, k, v)
    return cfg


def test_map_is_one_for_perfect_boxes_and_lower_for_shifted_ones():
    task = create_task(_cfg())
    assert task.monitor == "map" and task.wanted == ["map", "map_50", "map_75", "map_small"]
    truth = [{"boxes": torch.tensor([[10.0, 10, 30, 30], [50, 50, 150, 150]]),
              "labels": torch.tensor([1, 2])}]
    perfect = [{"boxes": truth[0]["boxes"], "scores": torch.tensor([0.9, 0.8]),
                "labels": truth[0]["labels"]}]
    m = task.metrics()
    m.update(perfect, truth)
    got = m.compute()
    assert got["map"] == pytest.approx(1.0) and got["map_small"] == pytest.approx(1.0)
    shifted = [{**perfect[0], "boxes": perfect[0]["boxes"] + 6}]
    m = task.metrics()
    m.update(shifted, truth)
    got = m.compute()
    assert got["map"] < 0.6 and got["map_small"] < got["map_50"]  # 6 px hurt the small box most


def test_losses_sum_and_bad_settings_are_refused():
    task = create_task(_cfg())
    parts = {"classification": torch.tensor(1.0), "bbox_regression": torch.tensor(0.5)}
    assert float(task.loss(parts, [])) == 1.5
    assert torch.isnan(task.loss([{"boxes": torch.zeros(0, 4)}], []))
    with pytest.raises(ConfigError, match="no held-out loss"):
        create_task(_cfg(metrics=["map"], monitor="loss"))
    with pytest.raises(ConfigError, match="'dice' is not a metric of task detect"):
        create_task(_cfg(metrics=["dice"], monitor="dice"))
    cfg = _cfg()
    cfg.method.name = "ips"
    with pytest.raises(ConfigError, match="method ips does not support task.kind = detect"):
        create_method(cfg)
    cfg.method.name, cfg.model.encoder = "full", "tiny_cnn"
    with pytest.raises(ConfigError, match="needs an FCOS model.encoder"):
        create_method(cfg)


def test_downsampled_full_trains_on_scaled_boxes_and_predicts_in_image_pixels(monkeypatch,
                                                                              no_step):
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.method.name, cfg.method.downsample_to = "full", 64
    method = create_method(cfg.validate())
    images = torch.randint(0, 255, (2, 1, 128, 128), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[20.0, 40, 60, 100]]), "labels": torch.tensor([2])}] * 2
    seen = {}
    real = method.net.losses
    monkeypatch.setattr(method.net, "losses",
                        lambda maps, t, sizes: seen.update(t=t, sizes=sizes) or real(maps, t, sizes))
    x = method.host_transform(images)
    assert x.shape[-2:] == (64, 64)
    method.train_step(x, targets, no_step)
    torch.testing.assert_close(seen["t"][0]["boxes"], torch.tensor([[10.0, 20, 30, 50]]))
    assert seen["sizes"] == [(64, 64), (64, 64)]
    method.eval()
    with torch.no_grad():
        small = method.net.detect(method.net.features(method.prepare(x)), [(64, 64)] * 2)
        full = method.predict(images)
    torch.testing.assert_close(full[0]["boxes"], small[0]["boxes"] * 2)
    torch.testing.assert_close(full[0]["scores"], small[0]["scores"])


def test_a_detection_run_from_coco_json_reports_map(tmp_path, detection_config):
    generate_detection(tmp_path / "det", n_train=8, n_test=4, side=128, scale_range=(14, 48),
                       digits_per_image=(2, 4), progress=False)
    cfg = detection_config(tmp_path / "det", tmp_path / "runs", "full")
    summary = train(cfg.validate())
    assert 0 <= summary["val_map"] <= 1 and "final_val_map_small" in summary
    saved = load_checkpoint(Path(summary["run_dir"]) / "last.pt")["config"]["data"]
    assert saved["category_ids"] == list(range(1, 11))  # recorded from train.json
    assert cfg.data.category_ids == []  # the caller's config is left as it was
    cfg.data.num_classes = 5
    with pytest.raises(Exception, match="10 categories but data.num_classes = 5"):
        train(cfg, overwrite=True)


def test_predict_writes_coco_results_and_an_overlay_one_image_or_many(tmp_path, capsys,
                                                                       detection_config):
    import json

    from gigapatch.cli import main

    generate_detection(tmp_path / "det", n_train=4, n_test=2, side=128, scale_range=(14, 48),
                       digits_per_image=(2, 4), progress=False)
    cfg = detection_config(tmp_path / "det", tmp_path / "runs", "full")
    ckpt = train(cfg.validate())["run_dir"] + "/best.pt"
    capsys.readouterr()
    image = tmp_path / "det/test/images/000000.png"
    assert main(["predict", str(image), "--checkpoint", ckpt, "--boxes", str(tmp_path / "b.json"),
                 "--overlay", str(tmp_path / "o.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    coco = json.loads((tmp_path / "b.json").read_text())
    assert len(coco) == len(result["detections"]) > 0
    first, best = coco[0], result["detections"][0]
    x, y, w, h = first["bbox"]
    assert [x, y, x + w, y + h] == pytest.approx(best["box"], abs=0.1)
    assert first["score"] == pytest.approx(best["score"], abs=1e-4)
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "preds.csv"
    assert main(["predict", "--folder", str(tmp_path / "det/test/images"), "--checkpoint", ckpt,
                 "--out", str(out), "--boxes", str(tmp_path / "boxes"), "--quiet"]) == 0
    rows = (out.read_text().splitlines())
    assert rows[0] == "path,detections,boxes,error" and len(rows) == 3
    assert (tmp_path / "boxes/000000.json").is_file()


def _renumber(json_path, factor: int) -> None:
    """Give a COCO file's categories the ids ``factor · id`` (not 1..K any more)."""
    import json

    coco = json.loads(json_path.read_text())
    for c in coco["categories"]:
        c["id"] *= factor
    for a in coco["annotations"]:
        a["category_id"] *= factor
    json_path.write_text(json.dumps(coco))


def test_predictions_carry_the_data_sets_own_category_ids(tmp_path, capsys, detection_config):
    data = tmp_path / "det"
    generate_detection(data, n_train=4, n_test=2, side=128, scale_range=(14, 48),
                       digits_per_image=(2, 4), progress=False)
    for split in ("train", "test"):
        _renumber(data / f"{split}.json", 10)
    cfg = detection_config(data, tmp_path / "runs", "full")
    ckpt = train(cfg.validate())["run_dir"] + "/best.pt"
    ids = list(range(10, 101, 10))
    assert load_checkpoint(ckpt)["config"]["data"]["category_ids"] == ids
    capsys.readouterr()
    image = data / "test/images/000000.png"
    assert main(["predict", str(image), "--checkpoint", ckpt,
                 "--boxes", str(tmp_path / "b.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    coco = json.loads((tmp_path / "b.json").read_text())
    assert coco and {d["category_id"] for d in coco} <= set(ids)
    by_score = sorted(result["detections"], key=lambda d: -d["score"])
    assert [d["category_id"] for d in coco] == [ids[d["label"] - 1] for d in by_score]

    _renumber(data / "test.json", 2)  # the held-out file now means other categories
    with pytest.raises(Exception, match=r"category ids \[20, 40.*data.category_ids"):
        train(detection_config(data, tmp_path / "runs", "full", name="again").validate())


def test_category_ids_must_be_one_distinct_id_per_label():
    for bad in ([1, 1, 2], [1, 2], [0, 1, 2]):
        cfg = _cfg()
        cfg.data.category_ids = bad
        with pytest.raises(ConfigError, match="data.category_ids"):
            cfg.validate()
    cfg = _cfg()
    cfg.data.category_ids = [3, 7, 9]
    assert cfg.validate().data.category_ids == [3, 7, 9]
