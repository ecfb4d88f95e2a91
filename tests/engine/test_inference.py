"""Batch inference: one row per slide, resume after a crash, error rows, the CLI form."""

import csv
import json
import shutil

import pytest
import torch

from gigapatch.cli import main
from gigapatch.core.errors import DataError
from gigapatch.engine import inference
from gigapatch.engine.checkpoint import load_method
from gigapatch.engine.inference import list_images, load_for_predict, predict_many
from gigapatch.engine.loop import train


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def trained(tiny_config):
    tiny_config.train.epochs = 1
    train(tiny_config)
    return f"{tiny_config.train.out_dir}/tiny/best.pt"


@pytest.fixture
def slides(tiny_ultramnist, tmp_path):
    """Three readable test images, one corrupt file and one missing one, in a CSV."""
    folder = tmp_path / "slides"
    folder.mkdir()
    names = []
    for i in range(3):
        shutil.copy(tiny_ultramnist / f"test/{i:06d}.png", folder / f"s{i}.png")
        names.append(f"s{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    names += ["broken.png", "gone.png"]
    table = tmp_path / "slides.csv"
    table.write_text("slide\n" + "\n".join(n.removesuffix(".png") for n in names) + "\n")
    return folder, table


def test_one_row_per_slide_equal_to_single_predictions_and_errors_named(trained, slides,
                                                                        tmp_path):
    folder, table = slides
    method, task, cfg = load_method(trained)
    paths = list_images(table, path_column="slide", suffix=".png", root=folder)
    out = tmp_path / "preds.csv"
    counts = predict_many(method, task, cfg, paths, out, progress=False)
    assert counts == {"done": 3, "skipped": 0, "errors": 2}
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, path in zip(rows[:3], paths[:3]):
        with torch.inference_mode():
            probs = method.predict(load_for_predict(path, 1)).softmax(-1)[0]
        assert int(row["prediction"]) == int(probs.argmax())
        got = torch.tensor([float(row[f"prob_{c}"]) for c in range(4)])
        torch.testing.assert_close(got, probs, atol=1e-4, rtol=0)
        assert row["error"] == ""
    assert "broken.png" in rows[3]["path"] and rows[3]["error"] and rows[3]["prediction"] == ""
    assert "gone.png" in rows[4]["path"] and "gone.png" in rows[4]["error"]


def test_a_rerun_skips_what_is_done_and_retries_errors_on_request(trained, slides, tmp_path,
                                                                  tiny_ultramnist, monkeypatch):
    folder, table = slides
    method, task, cfg = load_method(trained)
    paths = list_images(table, path_column="slide", suffix=".png", root=folder)
    out = tmp_path / "preds.csv"
    predict_many(method, task, cfg, paths[:2], out, progress=False)  # "crashed" after two
    seen = []
    real = inference._predict_one
    monkeypatch.setattr(inference, "_predict_one",
                        lambda m, t, image, path, *a: seen.append(path.name) or real(m, t, image,
                                                                                      path, *a))
    counts = predict_many(method, task, cfg, paths, out, progress=False)
    assert counts == {"done": 1, "skipped": 2, "errors": 2} and seen == ["s2.png"]
    assert len(_rows(out)) == 5
    shutil.copy(tiny_ultramnist / "test/000003.png", folder / "broken.png")  # fixed
    counts = predict_many(method, task, cfg, paths, out, retry_errors=True, progress=False)
    assert counts == {"done": 1, "skipped": 3, "errors": 1}
    rows = {r["path"]: r for r in _rows(out)}
    assert len(rows) == 5 and rows[str(folder / "broken.png")]["error"] == ""


def test_folder_form_and_cli_with_heatmaps(trained, slides, tmp_path, capsys):
    folder, _ = slides
    (folder / "broken.png").unlink()
    out, maps = tmp_path / "p.csv", tmp_path / "maps"
    assert main(["predict", "--folder", str(folder), "--checkpoint", trained, "--out", str(out),
                 "--heatmaps", str(maps), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["done"] == 3
    rows = _rows(out)
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["s0.png", "s1.png", "s2.png"]
    assert all((maps / f"s{i}.png").is_file() for i in range(3))
    assert main(["predict", "--csv", str(tmp_path / "none.csv"), "--checkpoint", trained,
                 "--out", str(out)]) == 2  # a clear error, exit code 2
    assert "none.csv" in capsys.readouterr().err


def test_list_images_names_what_is_wrong(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("image_id,isup_grade\na,1\n")
    with pytest.raises(DataError, match="no column 'path'.*--path-column"):
        list_images(table)
    with pytest.raises(DataError, match="holds no images"):
        list_images(folder=tmp_path)
