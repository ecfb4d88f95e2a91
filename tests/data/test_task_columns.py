"""Several tasks from CSV columns: exact targets, clear errors, and training on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gigapatch.config import Config
from gigapatch.data.datasets import open_dataset
from gigapatch.data.task_columns import parse_task_column
from gigapatch.core.errors import ConfigError, DataError

TASKS = ["majority", "max", "top", "multi"]


def test_parse_single_and_multi_label_columns() -> None:
    src = Path("t.csv")
    single = parse_task_column(["3", "0", " 9"], "top", 10, False, src)
    assert single.dtype == torch.int64 and single.tolist() == [3, 0, 9]
    multi = parse_task_column(["2 5 7", "", "1;4", "0"], "multi", 8, True, src)
    expected = torch.zeros(4, 8)
    expected[0, [2, 5, 7]] = expected[2, [1, 4]] = expected[3, 0] = 1
    assert multi.dtype == torch.float32 and torch.equal(multi, expected)


@pytest.mark.parametrize(("values", "multilabel", "bad"), [
    (["1", "x"], False, "'x'"), (["1", "10"], False, "'10'"), (["1", "2 3"], False, "'2 3'"),
    (["1", ""], False, "''"), (["1", "²"], False, "'²'"), (["1 2", "3 -1"], True, "'3 -1'"),
    (["1", "4 12"], True, "'4 12'"),
])
def test_bad_values_name_the_file_column_row_and_value(values, multilabel, bad) -> None:
    with pytest.raises(DataError) as err:
        parse_task_column(values, "max", 10, multilabel, Path("/d/train.csv"))
    message = str(err.value)
    assert "/d/train.csv" in message and "'max'" in message and "data row 2" in message
    assert bad in message


@pytest.fixture(scope="module")
def giga(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gigapatch.synth.gigapixel import generate_gigapixel

    root = tmp_path_factory.mktemp("giga")
    generate_gigapixel(root, n_train=4, n_test=2, side=256, tile=128, n_noise=3, seed=5,
                       progress=False)
    return root


def _cfg(root: Path, kind: str, tasks: list[str]) -> Config:
    cfg = Config(name="tasks")
    cfg.data.kind, cfg.data.tasks, cfg.data.multilabel = kind, tasks, ["multi"]
    cfg.data.train_csv, cfg.data.val_csv = str(root / "train.csv"), str(root / "test.csv")
    cfg.data.in_chans, cfg.data.num_classes = 1, 10
    return cfg


def test_csv_task_columns_equal_the_megapixel_labels(giga: Path, tmp_path: Path) -> None:
    """Image i of the gigapixel set is record i of the same Megapixel MNIST split."""
    from gigapatch.synth.megapixel_mnist import (
        MegapixelMNISTDataset,
        generate_megapixel_mnist,
    )

    ref_root = tmp_path / "ref"
    generate_megapixel_mnist(ref_root, n_train=4, n_test=2, side=256, n_noise=3, seed=5,
                             progress=False)
    ref = MegapixelMNISTDataset(ref_root, "train")
    ds = open_dataset(_cfg(giga, "lazy_csv", [*TASKS, "label"]).validate(), "train")
    assert len(ds) == 4
    for i in range(4):
        _, targets = ds[i]
        expected = ref.targets(i)
        assert set(targets) == {*TASKS, "label"}
        for task in TASKS:
            assert torch.equal(targets[task], expected[task]), (i, task)
        assert targets["label"] == expected["majority"]  # the CSV's label column


def test_in_memory_csv_reads_task_columns(tmp_path: Path) -> None:
    import numpy as np

    from gigapatch.io.image import write_png

    for i in range(2):
        write_png(tmp_path / f"{i}.png", np.full((8, 8), 40 * i, np.uint8))
    (tmp_path / "train.csv").write_text("path,label,colour,multi\n0.png,1,2,0 3\n1.png,0,4,\n")
    cfg = _cfg(tmp_path, "csv", ["colour", "multi"])
    cfg.data.val_csv = cfg.data.train_csv
    ds = open_dataset(cfg.validate(), "train")
    image, targets = ds[0]
    assert image.shape == (1, 8, 8) and targets["colour"].item() == 2
    assert targets["multi"].nonzero().flatten().tolist() == [0, 3]
    assert not ds[1][1]["multi"].any() and ds.num_classes == 10
    cfg.data.tasks, cfg.data.multilabel = ["shape"], []
    with pytest.raises(DataError, match="shape"):  # a task that is not a column
        open_dataset(cfg.validate(), "train")


def test_folder_data_refuses_tasks(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "folder", ["majority"])
    cfg.data.root, cfg.data.multilabel = str(tmp_path), []
    with pytest.raises(ConfigError, match="folder"):
        open_dataset(cfg.validate(), "train")


def test_ips_trains_on_csv_task_columns(giga: Path, tmp_path: Path) -> None:
    from gigapatch.engine.loop import train

    cfg = _cfg(giga, "lazy_csv", TASKS)
    cfg.model.encoder, cfg.model.latent_dim, cfg.model.attn_heads = "tiny_cnn_small", 16, 2
    cfg.method.name, cfg.method.patch_size = "ips", 64
    cfg.method.memory_size, cfg.method.iter_size = 3, 4
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = 1, 2, False
    cfg.train.out_dir = str(tmp_path / "runs")
    summary = train(cfg)
    assert set(summary["final_task_accuracy"]) == set(TASKS)
    assert all(0 <= v <= 1 for v in summary["final_task_accuracy"].values())
