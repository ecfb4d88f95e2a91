"""The command line: every user error is one clear message (exit code 2), never a traceback."""

import json
import shutil
from pathlib import Path

import pytest

from gigapatch.cli import main
from gigapatch.config import Config, save_config


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _config_file(cfg, tmp_path, **changes):
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    return path


@pytest.mark.parametrize("sub", [[], ["data", "ultramnist"], ["train"], ["eval"], ["predict"],
                                 ["demo"], ["encoders"], ["memory"], ["data", "megapixel-mnist"],
                                 ["data", "gigapixel"], ["data", "segmentation"]])
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([*sub, "--help"])
    assert e.value.code == 0
    assert "usage: gigapatch" in capsys.readouterr().out


def test_train_eval_predict_end_to_end(tiny_config, tmp_path, capsys):
    tiny_config.train.epochs = 1
    path = _config_file(tiny_config, tmp_path)
    code, out, _ = _run(capsys, "train", "--config", str(path), "--set", "name=cli")
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    assert summary["method"] == "patchgd"
    ckpt = tmp_path / "runs/cli/best.pt"

    code, out, _ = _run(capsys, "eval", "--checkpoint", str(ckpt), "--data",
                        tiny_config.data.val_csv, "--quiet")
    assert code == 0
    result = json.loads(out)
    assert result["accuracy"] == pytest.approx(summary["val_accuracy"])

    image = str(tmp_path.parent / "x.png")
    shutil.copy(tiny_config.data.val_csv.replace("test.csv", "test/000000.png"), image)
    code, out, _ = _run(capsys, "predict", image, "--checkpoint", str(ckpt))
    assert code == 0
    pred = json.loads(out)
    assert 0 <= pred["prediction"] < 4 and len(pred["probabilities"]) == 4
    assert sum(pred["probabilities"]) == pytest.approx(1.0, abs=1e-3)


def _csv_with(tmp_path, src_dir, rows):
    (tmp_path / "bad").mkdir(exist_ok=True)
    csv = tmp_path / "bad" / "train.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{lbl}\n" for p, lbl in rows))
    return csv


def test_missing_image_is_named(tiny_config, tmp_path, capsys):
    csv = _csv_with(tmp_path, None, [("nowhere.png", 1)])
    path = _config_file(tiny_config, tmp_path, data__train_csv=str(csv))
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "nowhere.png" in err and "Traceback" not in err


def test_corrupt_image_is_named(tiny_config, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    csv = _csv_with(tmp_path, None, [("broken.png", 1)])
    path = _config_file(tiny_config, tmp_path, data__train_csv=str(csv))
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "broken.png" in err


def test_label_out_of_range(tiny_config, tmp_path, capsys):
    src = tiny_config.data.train_csv.replace("train.csv", "train/000000.png")
    csv = _csv_with(tmp_path, None, [(src, 7)])
    path = _config_file(tiny_config, tmp_path, data__train_csv=str(csv))
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "7" in err and "range" in err


def test_patch_larger_than_image(tiny_config, tmp_path, capsys):
    path = _config_file(tiny_config, tmp_path, method__patch_size=128)
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "patch_size 128 is larger than the image" in err


def test_unknown_encoder(tiny_config, tmp_path, capsys):
    path = _config_file(tiny_config, tmp_path, model__encoder="resnet81")
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "resnet81" in err and "resnet18" in err


def test_config_typo_and_bad_budget(tiny_config, tmp_path, capsys):
    path = _config_file(tiny_config, tmp_path)
    code, _, err = _run(capsys, "train", "--config", str(path), "--set", "train.epocs=3")
    assert code == 2 and "train.epochs" in err
    code, _, err = _run(capsys, "train", "--config", str(path), "--set",
                        "train.memory_budget=lots")
    assert code == 2 and "lots" in err


def test_budget_too_small_is_refused(tiny_config, tmp_path, capsys):
    path = _config_file(tiny_config, tmp_path, train__memory_budget="10kB")
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "memory budget" in err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = _run(capsys, "predict", "x.png", "--checkpoint", str(tmp_path / "no.pt"))
    assert code == 2 and "no.pt" in err


@pytest.fixture(scope="module")
def tiny_megapixel(tmp_path_factory):
    from gigapatch.synth.megapixel_mnist import generate_megapixel_mnist

    root = tmp_path_factory.mktemp("megapixel")
    generate_megapixel_mnist(root, n_train=16, n_test=8, side=200, n_noise=5, seed=1,
                             progress=False)
    return root


def test_ips_multi_task_train_eval_predict_explain(tiny_megapixel, tmp_path, capsys):
    from gigapatch.synth.megapixel_mnist import load_megapixel_mnist, render_image
    from gigapatch.io.image import write_png

    cfg = Config(name="ips_tiny")
    cfg.data.kind, cfg.data.root = "megapixel_mnist", str(tiny_megapixel)
    cfg.data.tasks, cfg.data.multilabel = ["majority", "max", "top", "multi"], ["multi"]
    cfg.model.encoder, cfg.model.latent_dim, cfg.model.attn_heads = "tiny_cnn_small", 16, 2
    cfg.method.name, cfg.method.patch_size = "ips", 40
    cfg.method.memory_size, cfg.method.iter_size = 4, 8
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = 1, 4, False
    cfg.train.out_dir = str(tmp_path / "runs")
    path = _config_file(cfg, tmp_path)
    code, out, _ = _run(capsys, "train", "--config", str(path))
    assert code == 0
    summary = json.loads(out)
    assert summary["tasks"] == cfg.data.tasks
    assert set(summary["best_epoch_task_accuracy"]) == set(cfg.data.tasks)
    run = tmp_path / "runs" / "ips_tiny"
    lines = (run / "metrics.csv").read_text().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    assert "val_accuracy_multi" in header and "val_accuracy_top" in header
    for task, acc in summary["final_task_accuracy"].items():  # the last epoch's row
        assert acc == pytest.approx(float(last[header.index(f"val_accuracy_{task}")]))

    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run / "best.pt"), "--quiet")
    assert code == 0
    result = json.loads(out)
    assert result["images"] == 8 and 0 <= result["accuracy_majority"] <= 1

    image = tmp_path / "canvas.png"
    write_png(image, render_image(load_megapixel_mnist(tiny_megapixel, "test")[0]))
    code, out, _ = _run(capsys, "predict", str(image), "--checkpoint", str(run / "best.pt"),
                        "--explain", str(tmp_path / "why.png"))
    assert code == 0
    pred = json.loads(out)
    assert set(pred["tasks"]) == set(cfg.data.tasks)
    assert isinstance(pred["tasks"]["multi"]["present"], list)
    assert (tmp_path / "why.png").read_bytes()[:4] == b"\x89PNG"


def test_occlusion_explain_gives_the_same_prediction(tiny_config, tmp_path, capsys):
    tiny_config.train.epochs = 1
    path = _config_file(tiny_config, tmp_path)
    assert _run(capsys, "train", "--config", str(path))[0] == 0
    ckpt = tmp_path / "runs" / "tiny" / "best.pt"
    image = sorted((Path(tiny_config.data.val_csv).parent / "test").glob("*.png"))[0]
    code, out, _ = _run(capsys, "predict", str(image), "--checkpoint", str(ckpt),
                        "--explain", str(tmp_path / "sal.png"))
    explained = json.loads(out)
    assert code == 0 and explained["explanation"].endswith("sal.png")
    assert (tmp_path / "sal.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = _run(capsys, "predict", str(image), "--checkpoint", str(ckpt))
    plain = json.loads(out)
    assert plain["prediction"] == explained["prediction"]
    assert plain["probabilities"] == pytest.approx(explained["probabilities"], abs=1e-4)


@pytest.mark.parametrize("method", ["full", "patchwise"])
def test_segmentation_train_eval_predict_mask_and_overlay(method, tmp_path, capsys):
    code, _, _ = _run(capsys, "data", "segmentation", "--out", str(tmp_path / "seg"),
                      "--n-train", "4", "--n-test", "2", "--side", "64", "--scale-min", "16",
                      "--scale-max", "24", "--quiet")
    assert code == 0
    cfg = Config(name="seg")
    cfg.task.kind = "segment"
    cfg.task.metrics, cfg.task.monitor = ["dice", "iou", "pixel_accuracy"], "dice"
    cfg.data.kind = "lazy_csv" if method == "patchwise" else "csv"
    cfg.data.train_csv = str(tmp_path / "seg/train_majority.csv")
    cfg.data.val_csv = str(tmp_path / "seg/test_majority.csv")
    cfg.data.num_classes, cfg.data.in_chans = 2, 1
    cfg.data.augment = ["hflip", "vflip", "rot90"]  # masks turn with their images
    cfg.model.encoder = "tiny_unet"
    cfg.method.name, cfg.method.patch_size = method, 32
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = 1, 2, False
    cfg.train.out_dir = str(tmp_path / "runs")
    path = tmp_path / "seg.yaml"
    save_config(cfg, path)
    code, out, _ = _run(capsys, "train", "--config", str(path))
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    assert summary["monitor"] == "dice" and 0 <= summary["val_dice"] <= 1
    ckpt = tmp_path / "runs/seg/best.pt"
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(ckpt), "--quiet")
    assert code == 0 and json.loads(out)["dice"] == pytest.approx(summary["val_dice"])
    image = tmp_path / "seg/test/images/000000.png"
    code, out, _ = _run(capsys, "predict", str(image), "--checkpoint", str(ckpt), "--mask",
                        str(tmp_path / "m.png"), "--overlay", str(tmp_path / "o.png"))
    assert code == 0
    result = json.loads(out)
    assert sum(result["class_fractions"].values()) == pytest.approx(1.0, abs=1e-5)
    from PIL import Image
    assert Image.open(tmp_path / "m.png").size == (64, 64)
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
