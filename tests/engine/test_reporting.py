"""The run's plots and metric files (:mod:`gigapatch.engine.reporting`)."""

import gigapatch.engine.reporting as reporting
from gigapatch.engine.reporting import Z_CACHE_FIELDS, plot_curves


def _rows(cache: bool):
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_accuracy": 0.1 * e}
            for e in (1, 2, 3)]
    if cache:  # epoch 1 finds nothing cached: no figure
        rows[1].update(z_staleness=0.30, z_refreshed=1.0, z_share=0.5, z_corrected=0.0,
                       z_residual=0.04)
        rows[2].update(z_staleness=0.05, z_refreshed=0.5, z_share=0.25, z_corrected=0.5,
                       z_residual=0.01)
    return rows


def test_a_z_cache_adds_a_panel_of_its_figures_per_epoch(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(reporting, "save_figure", lambda fig, path: figures.append(fig))
    plot_curves(_rows(cache=False), tmp_path / "a.png", "plain", "accuracy")
    plot_curves(_rows(cache=True), tmp_path / "b.png", "cached", "accuracy")
    plain, cached = figures
    assert len(plain.axes) == 2 and len(cached.axes) == 3
    lines = {line.get_label(): line for line in cached.axes[2].get_lines()}
    assert set(lines) == set(Z_CACHE_FIELDS.values())
    staleness = lines[Z_CACHE_FIELDS["z_staleness"]]
    assert list(staleness.get_xdata()) == [2, 3] and list(staleness.get_ydata()) == [0.30, 0.05]
