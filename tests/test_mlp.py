"""The MLP experiment and the lr x beta2 sweep at tiny size, on generated IDX data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adoptim.experiments import lr_sweep, mlp
from adoptim.experiments.data import write_idx
from adoptim.experiments.mlp import MLPConfig, train
from adoptim.experiments.runner import load_metrics


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    """A learnable 10-class MNIST-format dataset: class c lights up row band c, plus noise."""
    folder = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 100)):
        y = np.arange(n) % 10
        x = rng.integers(0, 80, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c + 4 : 2 * c + 6, :] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x.astype(np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return folder


def _cfg(blobs, **kw) -> MLPConfig:
    base = dict(dataset="idx", data_path=str(blobs), hidden=16, epochs=3, batch_size=32)
    return MLPConfig(**{**base, **kw})


@pytest.mark.parametrize("optimizer", ["adam", "amsgrad", "adashift", "adopt"])
def test_each_optimizer_learns(blobs, optimizer):
    lr = 1e-2 if optimizer != "adashift" else 3e-2
    out = train(_cfg(blobs, optimizer=optimizer, lr=lr))
    assert out["final"]["train/acc"] > 0.5 and out["final"]["test/acc"] > 0.5  # chance: 0.1
    assert out["beta2_used"] == (0.9999 if optimizer == "adopt" else 0.999)


def test_same_seed_same_run(blobs):
    a, b = train(_cfg(blobs, seed=1)), train(_cfg(blobs, seed=1))
    c = train(_cfg(blobs, seed=2))
    assert a["final"]["train/loss"] == b["final"]["train/loss"]
    assert a["final"]["train/loss"] != c["final"]["train/loss"]


def test_mlp_experiment_tiny(blobs, tmp_path):
    sweep = [_cfg(blobs, optimizer=o, seed=s, epochs=2) for o in mlp.COMPARED for s in range(2)]
    mlp.EXPERIMENT.run(sweep, tmp_path, progress=False)
    text = mlp.EXPERIMENT.report(sweep, tmp_path).read_text()
    for o in mlp.COMPARED:
        assert f"| {mlp.LABELS[o]} |" in text
    assert text.count("| 2 |") == 4  # two seeds per optimizer
    assert (tmp_path / "mlp_idx.png").exists()
    rows = load_metrics(next(tmp_path.glob("runs/*")))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train/acc", "test/acc", "train/loss", "test/loss"} <= set(rows[0])


def test_lr_sweep_tiny(blobs, tmp_path):
    sweep = lr_sweep.grid(_cfg(blobs, epochs=1), lrs=(1e-3, 1e-1), beta2s=(0.1, 0.999), seeds=1)
    assert len(sweep) == 2 * 2 * 2
    lr_sweep.EXPERIMENT.run(sweep, tmp_path, progress=False)
    text = lr_sweep.EXPERIMENT.report(sweep, tmp_path).read_text()
    assert "**Adam: final train loss**" in text and "**ADOPT: final test accuracy**" in text
    assert "| 0.1 |" in text and "| 0.999 |" in text
    assert (tmp_path / "lr_beta2_heatmap.png").exists()


def test_command_line_run_on_a_user_idx_folder(blobs, tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "adoptim.experiments.mlp", "--dataset", "idx", "--data-path",
         str(blobs), "--hidden", "8", "--epochs", "1", "--optimizer", "adopt",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, check=True)
    assert "'epoch': 1" in out.stdout and "metrics.csv" in out.stdout
    assert len(list(tmp_path.glob("runs/*/result.json"))) == 1


@pytest.fixture
def figures(monkeypatch):
    """The figures the reports save, by file name (still inspectable after saving)."""
    from adoptim.experiments.runner import Report

    kept = {}
    original = Report.figure

    def keep(self, fig, filename, caption=""):
        kept[filename] = fig
        return original(self, fig, filename, caption)

    monkeypatch.setattr(Report, "figure", keep)
    return kept


def test_mlp_plot_is_labelled_and_shows_lines_that_coincide(blobs, tmp_path, figures):
    sweep = [_cfg(blobs, optimizer=o, epochs=2) for o in ("adam", "amsgrad")]
    mlp.EXPERIMENT.run(sweep, tmp_path, progress=False)
    text = mlp.EXPERIMENT.report(sweep, tmp_path).read_text()
    assert "(1 seed)" in text and "± 0.00" not in text
    assert "Data: all 300 training and 100 test examples" in text
    acc, _, loss = figures["mlp_idx.png"].axes[:3]
    assert loss.get_ylabel() == "train loss (cross-entropy, log scale)"  # not the key
    # Adam and AMSGrad are nearly the same run: one dashed over the other, not hidden
    styles = {line.get_label(): line.get_linestyle() for line in acc.get_lines()}
    assert styles["Adam"] != styles["AMSGrad"]


def test_lr_sweep_heatmap_colours_are_log_loss_and_percent(tmp_path, figures):
    import json

    from matplotlib.colors import LogNorm

    from adoptim.experiments.runner import RESULT_FILE, config_dict

    sweep = lr_sweep.grid(MLPConfig(hidden=8, epochs=1), lrs=(1e-3, 1e-2), beta2s=(0.1, 0.999),
                          seeds=1)
    losses = {("adam", 0.1, 1e-3): 3e3, ("adam", 0.1, 1e-2): 1.6e14}  # Adam blows up
    for i, c in enumerate(sweep):  # finished runs, written by hand
        d = tmp_path / "runs" / f"run{i}"
        d.mkdir(parents=True)
        loss = losses.get((c.optimizer, c.beta2, c.lr), 0.05)
        (d / RESULT_FILE).write_text(json.dumps({
            "config": config_dict(c), "seconds": 1.0, "diverged": False,
            "final": {"train/loss": loss, "test/acc": 0.3 if loss > 1 else 0.9}}))
    lr_sweep.EXPERIMENT.report(sweep, tmp_path)
    fig = figures["lr_beta2_heatmap.png"]
    adam_loss = fig.axes[0].get_images()[0]
    # one log colour scale over every cell: 3e3 and 1.6e14 do not look the same
    assert isinstance(adam_loss.norm, LogNorm)
    assert adam_loss.norm.vmax >= 1.6e14 and adam_loss.norm.vmin <= 0.05
    assert adam_loss.norm(3e3) < adam_loss.norm(1.6e14) - 0.3
    # accuracy in percent, as the cells are written, with a colour bar that says so
    acc = [ax for ax in fig.axes if ax.get_title() == "Adam: final test accuracy"][0]
    assert acc.get_images()[0].get_array().max() == pytest.approx(90.0)
    assert any(ax.get_ylabel() == "test accuracy (%)" for ax in fig.axes)
