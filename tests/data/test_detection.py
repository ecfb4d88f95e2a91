"""Detection data: the generator's COCO JSON and CSV, round trips, and clear errors."""

import copy
import json

import numpy as np
import pytest
from PIL import Image

from gigapatch.cli import main
from gigapatch.core.errors import DataError
from gigapatch.data.detection import DetectionDataset, read_box_csv, read_coco, write_coco
from gigapatch.io.readers import open_image
from gigapatch.synth.detection import generate_detection


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    out = tmp_path_factory.mktemp("det")
    generate_detection(out, n_train=3, n_test=2, side=256, scale_range=(14, 64),
                       digits_per_image=(3, 5), progress=False)
    return out


def test_generator_boxes_are_tight_around_the_strokes_and_csv_agrees(det):
    rec = read_coco(det / "train.json")
    assert rec.category_ids == list(range(1, 11)) and rec.names[0] == "0"
    assert len(rec.paths) == 3 and all(3 <= len(b) <= 5 for b in rec.boxes)
    heights = []
    for path, boxes in zip(rec.paths, rec.boxes):
        image = np.asarray(Image.open(path))
        for x0, y0, x1, y1 in boxes.astype(int).tolist():
            heights.append(y1 - y0)
            for row in (image[y0, x0:x1], image[y1 - 1, x0:x1],
                        image[y0:y1, x0], image[y0:y1, x1 - 1]):
                assert row.max() >= 128  # each side of the box touches a stroke
    assert min(heights) < 40 < max(heights)  # strongly varying scales
    csv = read_box_csv(det / "train.csv")
    for a, b in zip(rec.boxes, csv.boxes):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(rec.labels, csv.labels):
        np.testing.assert_array_equal(a, b)


def test_coco_round_trip(det, tmp_path):
    rec = read_coco(det / "test.json")
    again = read_coco(write_coco(rec, tmp_path / "copy.json", image_root=det), image_root=det)
    assert again.paths == rec.paths and again.image_ids == rec.image_ids
    assert again.category_ids == rec.category_ids and again.sizes == rec.sizes
    for a, b in zip(rec.boxes, again.boxes):
        np.testing.assert_array_equal(a, b)
    ds = DetectionDataset(rec, lazy=True)
    reader, target = ds[0]
    assert reader.shape == (256, 256, 1) and target["boxes"].shape[1] == 4
    image, same = DetectionDataset(rec, lazy=False)[0]
    assert image.shape == (1, 256, 256) and same["labels"].tolist() == target["labels"].tolist()


def test_large_sides_are_tiled_pyramids(tmp_path):
    generate_detection(tmp_path, n_train=1, n_test=0, side=512, png_max_side=256, tile=128,
                       scale_range=(14, 60), progress=False)
    rec = read_coco(tmp_path / "train.json")
    reader = open_image(rec.paths[0])
    assert rec.paths[0].suffix == ".tiff" and reader.shape == (512, 512, 1)
    assert len(reader.levels) == 1  # ≤ 1,024 px: no reduced level needed


def _broken(det, tmp_path, change):
    coco = json.loads((det / "train.json").read_text())
    change(coco)
    path = det / f"bad_{tmp_path.name}.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c["annotations"][0].update(bbox=[250, 10, 20, 20]), r"reaches outside its 256×256"),
    (lambda c: c["annotations"][0].update(category_id=42), r"category_id 42 is not in"),
    (lambda c: c["annotations"][0].update(bbox=[10, 10, -5, 20]), r"width -5 and height 20"),
    (lambda c: c["images"].append(copy.deepcopy(c["images"][0])), r"listed twice"),
    (lambda c: c["annotations"][0].update(image_id=99), r"image_id 99 is not in 'images'"),
    (lambda c: c["images"][0].update(file_name="train/images/nope.png"), r"nope\.png does not exist"),
    (lambda c: c.pop("categories"), r"lacks \['categories'\]"),
])
def test_bad_coco_files_are_named_with_the_value(det, tmp_path, change, message):
    with pytest.raises(DataError, match=message) as err:
        read_coco(_broken(det, tmp_path, change))
    assert "bad_" in str(err.value) or "nope" in str(err.value)


def test_bad_csv_rows_are_named(det, tmp_path):
    (tmp_path / "b.csv").write_text(f"path,x0,y0,x1,y1,label\n{det}/train/images/000000.png,"
                                    "10,10,300,20,1\n")
    with pytest.raises(DataError, match=r"b\.csv, line 2 .*reaches outside"):
        read_box_csv(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("path,x0,y0\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['x1', 'y1', 'label'\]"):
        read_box_csv(tmp_path / "c.csv")


def test_cli_generates_detection_data(tmp_path, capsys):
    assert main(["data", "detection", "--out", str(tmp_path), "--n-train", "1", "--n-test",
                 "1", "--side", "128", "--scale-max", "48", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["boxes"] > 0 and (tmp_path / "test.json").is_file()
