"""The PANDA recipe end to end on tiny synthetic slides written in the PANDA layout:
split the CSV, train with configs/panda_{patchgd,ips}.yaml (small overrides for a CPU test),
predict the held-out slides into preds.csv."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigapatch.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"


def _slide(path: Path, grade: int, rng: np.random.Generator, side: int = 256) -> None:
    """A 3-level pyramid (1, 4, 16× down as PANDA's) of white glass with a pink tissue blob
    holding ``grade`` dark nuclei-like dots; level-0 resolution 0.5 µm/px."""
    img = np.full((side, side, 3), 245, np.uint8)
    yy, xx = np.mgrid[:side, :side]
    cy, cx = rng.integers(side // 3, 2 * side // 3, 2)
    tissue = (yy - cy) ** 2 + (xx - cx) ** 2 < (side // 4) ** 2
    img[tissue] = (200, 120, 170)
    for _ in range(grade * 3):
        y, x = rng.integers(cy - side // 6, cy + side // 6, 2)
        img[max(0, y - 4) : y + 4, max(0, x - 4) : x + 4] = (60, 20, 90)
    levels = [img, img[::4, ::4], img[::16, ::16]]
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(64, 64), subifds=2, photometric="rgb",
                  resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        for level in levels[1:]:
            tif.write(np.ascontiguousarray(level), tile=(16, 16), subfiletype=1,
                      photometric="rgb")


@pytest.fixture(scope="module")
def panda(tmp_path_factory):
    root = tmp_path_factory.mktemp("panda")
    (root / "train_images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        image_id, grade = f"{i:032x}", i % 6
        _slide(root / "train_images" / f"{image_id}.tiff", grade, rng)
        rows.append(f"{image_id},karolinska,{grade},{grade}+{grade}")
    (root / "train.csv").write_text("image_id,data_provider,isup_grade,gleason_score\n"
                                    + "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("method", ["patchgd", "ips"])
def test_panda_from_slides_to_best_pt_and_preds_csv(panda, tmp_path, method, capsys):
    assert main(["data", "split", "--csv", str(panda / "train.csv"), "--val", "0.5",
                 "--stratify", "isup_grade", "--out", str(tmp_path)]) == 0
    split = json.loads(capsys.readouterr().out)
    val_rows = list(csv.DictReader(open(split["val_csv"])))
    assert sorted(int(r["isup_grade"]) for r in val_rows) == [0, 1, 2, 3, 4, 5]  # stratified
    overrides = [
        f"data.train_csv={split['train_csv']}", f"data.val_csv={split['val_csv']}",
        f"data.image_root={panda / 'train_images'}", "data.num_workers=0",
        "model.encoder=tiny_cnn", "model.pretrained=false", "model.latent_dim=16",
        "model.head_width=16", "method.patch_size=16", "method.fill_chunk=16",
        "train.epochs=1", "train.batch_size=2", "train.precision=32",
        "train.memory_budget=null", f"train.out_dir={tmp_path / 'runs'}", "train.progress=false",
    ]
    if method == "ips":
        overrides += ["method.memory_size=4", "method.iter_size=8"]
    config = CONFIGS / f"panda_{method}.yaml"
    assert main(["train", "--config", str(config), *[a for o in overrides for a in ("--set", o)]]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / f"panda_{method}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["image_size"] == 64  # data.level 1 of the 256-px slides
    assert "val_kappa" in summary and (run / "best.pt").is_file()
    assert (run / "tensorboard").is_dir()  # the recipe's logger
    (panda / "train_images" / "broken.tiff").write_bytes(b"II*\0 truncated")
    with open(split["val_csv"], "a") as handle:
        handle.write("broken,karolinska,0,0+0\n")
    preds = tmp_path / "preds.csv"
    args = ["predict", "--csv", split["val_csv"], "--path-column", "image_id", "--suffix",
            ".tiff", "--root", str(panda / "train_images"), "--checkpoint", str(run / "best.pt"),
            "--out", str(preds), "--quiet"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == {
        "predictions": str(preds), "images": 7, "done": 6, "skipped": 0, "errors": 1}
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == 7
    for row in rows[:6]:
        probs = [float(row[f"prob_{c}"]) for c in range(6)]
        assert abs(sum(probs) - 1) < 1e-3 and int(row["prediction"]) == int(np.argmax(probs))
    assert "broken.tiff" in rows[6]["path"] and rows[6]["error"]
    assert main(args) == 0  # a rerun: everything already there
    assert json.loads(capsys.readouterr().out)["skipped"] == 7
