"""gigapatch.memory.report and ``gigapatch memory``: estimated memory vs image side."""

from __future__ import annotations

import csv

import pytest

from gigapatch.memory.budget import measure_method_peak
from gigapatch.cli import main
from gigapatch.config import Config, save_config
from gigapatch.memory.estimates import fraction_for_k
from gigapatch.memory import estimate
from gigapatch.memory.report import format_memory_table, memory_rows, plot_memory


def _cfg() -> Config:
    cfg = Config()
    cfg.data.num_classes = 4
    cfg.model.latent_dim = 8
    cfg.model.head_width = 8
    cfg.method.patch_size = 32
    cfg.method.fill_chunk = 4
    cfg.train.batch_size = 1
    return cfg


def test_memory_estimate_equals_the_measured_step():
    cfg = _cfg()
    cfg.method.sample_fraction = fraction_for_k(128, 32, 2)
    assert estimate(cfg, (1, 128, 128)) == measure_method_peak(cfg, (1, 128, 128))


def test_rows_mark_the_budget_and_the_table_shows_it(tmp_path):
    cfg = _cfg()
    rows = memory_rows(cfg, [64, 256], ["full", "patchgd"], patches_per_step=2)
    full256 = next(r for r in rows if r["method"] == "full" and r["side"] == 256)
    pgd256 = next(r for r in rows if r["method"] == "patchgd" and r["side"] == 256)
    assert full256["estimated_bytes"] > pgd256["estimated_bytes"]
    budget = (full256["estimated_bytes"] + pgd256["estimated_bytes"]) // 2
    rows = memory_rows(cfg, [64, 256], ["full", "patchgd"], patches_per_step=2, budget=budget)
    marks = {(r["method"], r["side"]): r["fits_budget"] for r in rows}
    assert marks[("full", 256)] is False and marks[("patchgd", 256)] is True
    table = format_memory_table(rows, budget)
    lines = table.splitlines()
    assert lines[0].split() == ["side", "full", "patchgd"]
    assert lines[2].startswith("    256²") and "✗" in lines[2] and "✓" in lines[2]
    png = plot_memory(rows, tmp_path / "m.png", budget=budget)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_csv_and_plot(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    save_config(_cfg(), path)
    out = tmp_path / "mem"
    code = main(["memory", "--config", str(path), "--sides", "64", "128", "--k", "2",
                 "--methods", "full", "patchgd", "--budget", "1GiB", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "budget of 1.00 GiB" in printed and "128²" in printed
    with open(out / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["side"]) for r in rows] == [
        ("full", "64"), ("full", "128"), ("patchgd", "64"), ("patchgd", "128")
    ]
    assert all(r["fits_budget"] == "True" for r in rows)
    cfg = _cfg()
    cfg.method.name = "full"
    assert int(rows[1]["estimated_bytes"]) == estimate(cfg, (1, 128, 128))
    assert (out / "memory.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fancy"], "unknown method 'fancy'"),
    (["--sides", "16"], "at least the patch size"),
    (["--budget", "lots"], "invalid memory size"),
])
def test_cli_user_errors(argv, message, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    save_config(_cfg(), path)
    code = main(["memory", "--config", str(path), "--out", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
