"""The paper's convex counterexample: Adam fails at small beta2, ADOPT converges for any beta2.

Problem (Taniguchi et al. 2024, Sec. 3; after Reddi et al. 2018): minimise
f(theta) = theta over the interval [-1, 1] (minimiser theta* = -1) from stochastic gradients

    g_t = k**2   with probability 1/k
    g_t = -k     otherwise                     E[g_t] = k - (k - 1) = 1 > 0,

with theta projected back onto [-1, 1] after every step, theta_0 = 0, and the step size
alpha_t = alpha / sqrt(t) on update t = 1, 2, ... (``ToyConfig.alpha``). Rare large positive
gradients pull theta towards -1; frequent small negative ones push it towards +1. With a small
beta2, Adam's second moment follows the current gradient, so the rare large gradient is
normalised away and Adam drifts to +1. ADOPT normalises g_t by v_{t-1}, which does not contain
g_t, and so follows the sign of E[g] = 1 for any beta2.

Every seed is one element of a parameter tensor of shape (len(ks), n_seeds): the real
``torch.optim.Adam`` (``amsgrad=True`` for AMSGrad) and ``adoptim.ADOPT`` update each element
independently, so one tensor holds all seeds of all k values, one param group per beta2. All
optimizers see the same gradient samples (common random numbers, one generator per run with
the same seed). The paper's ablation of ADOPT's two changes is written out below as small
update functions (``ablation_step``), since those variants are not ADOPT.

    adoptim toy                         # table of the final theta for Adam/AMSGrad/ADOPT
    adoptim reproduce toy --quick       # the full experiment with report and plots
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from adoptim.experiments.optimizers import make_optimizer
from adoptim.experiments.runner import (
    Experiment,
    Report,
    RunContext,
    load_metrics,
    load_results,
    new_figure,
    progress_bars,
    run_sweep,
    set_threads,
)

__all__ = [
    "ABLATIONS",
    "EXPERIMENT",
    "OPTIMIZERS",
    "ToyConfig",
    "ablation_step",
    "add_arguments",
    "run",
    "simulate",
    "toy_gradient",
]

OPTIMIZERS = ("adam", "amsgrad", "adopt", "adopt-noclip")  # real optimizers, by registry name
# ADOPT's two changes to Adam, on and off (written out in ablation_step):
#   prev_v: normalise g_t by v_{t-1} (v updated after use) instead of by v_t
#   norm_first: normalise first, then average (m = EMA of g/sqrt(v)) instead of m/sqrt(v)
ABLATIONS = {
    "abl-neither": (False, False),  # Adam without bias correction (control)
    "abl-prev-v-only": (True, False),  # change (i) alone
    "abl-momentum-after-norm-only": (False, True),  # change (ii) alone
    "abl-both": (True, True),  # both = unclipped ADOPT
}
LABELS = {
    "adam": "Adam",
    "amsgrad": "AMSGrad",
    "adopt": "ADOPT (clipped)",
    "adopt-noclip": "ADOPT (no clip)",
    "abl-neither": "ablation: neither change",
    "abl-prev-v-only": "ablation: previous v only",
    "abl-momentum-after-norm-only": "ablation: momentum after norm only",
    "abl-both": "ablation: both changes",
}


@dataclass
class ToyConfig:
    """One run: one optimizer (or ablation variant), all k, beta2 and seeds in one tensor."""

    optimizer: str = "adopt"
    """a name in OPTIMIZERS (real optimizer) or ABLATIONS (written-out variant)"""
    ks: tuple[int, ...] = (10, 50)
    """the problem parameter k: g = k^2 w.p. 1/k, else -k"""
    beta2s: tuple[float, ...] = (0.1, 0.5, 0.999)
    """second-moment decay rates (one param group each)"""
    beta1: float = 0.9
    """first-moment decay rate (the paper's 0.9)"""
    eps: float = 1e-8
    """Adam's eps / ADOPT's floor on sqrt(v) (tiny: v is never near 0 here)"""
    alpha: float = 0.5
    """base step size: alpha_t = alpha / sqrt(t)"""
    steps: int = 10_000
    """horizon (number of gradient samples)"""
    n_seeds: int = 128
    """independent runs, as elements of one tensor"""
    seed: int = 0
    """seed of the gradient noise (the same for every optimizer: common random numbers)"""
    n_records: int = 120
    """how many (log-spaced) steps to record quantiles of theta at"""
    theta0: float = 0.0
    """starting point"""


def toy_gradient(ks: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g = k^2 where u < 1/k, else -k.  ks: (K, 1), u: (K, S) uniform in [0, 1)."""
    return torch.where(u < 1.0 / ks, ks * ks, -ks)


def ablation_step(theta, m, v, g, t, lr, beta1, beta2, eps, prev_v: bool, norm_first: bool):
    """One step of an Adam/ADOPT hybrid, in place; ``t`` counts calls from 0.

    All variants share ADOPT's start (call 0 only sets v = g^2) and have no bias correction,
    so they differ from each other only in ADOPT's two changes:

    prev_v=False, norm_first=False:  v = b2 v + (1-b2) g^2;  m = b1 m + (1-b1) g;  theta -= lr m / sqrt(v)
    prev_v=True,  norm_first=False:  m = b1 m + (1-b1) g;  theta -= lr m / sqrt(v);  then update v
    prev_v=False, norm_first=True:   update v;  m = b1 m + (1-b1) g / sqrt(v);  theta -= lr m
    prev_v=True,  norm_first=True:   m = b1 m + (1-b1) g / sqrt(v);  theta -= lr m;  then update v
                                     (= unclipped ADOPT)
    ``beta2`` may be a tensor that broadcasts against theta (one value per row).
    """
    if t == 0:
        v.copy_(g * g)
        return
    if not prev_v:
        v.mul_(beta2).add_((1 - beta2) * g * g)
    denom = v.sqrt().clamp_(min=eps)
    if norm_first:
        m.mul_(beta1).add_((1 - beta1) * g / denom)
        theta.sub_(lr * m)
    else:
        m.mul_(beta1).add_((1 - beta1) * g)
        theta.sub_(lr * m / denom)
    if prev_v:
        v.mul_(beta2).add_((1 - beta2) * g * g)


def record_steps(steps: int, n: int) -> list[int]:
    """About n log-spaced steps in [1, steps], always including 1 and steps."""
    pts = np.unique(np.round(np.logspace(0, math.log10(steps), n)).astype(int))
    return sorted(set(pts.tolist()) | {1, steps})


def simulate(cfg: ToyConfig, bar=None, on_record=None) -> torch.Tensor:
    """Run the toy problem; return the final theta, shape (len(beta2s), len(ks), n_seeds).

    ``on_record(step, theta)`` is called at the recorded steps with the same shape.
    """
    K, B, S = len(cfg.ks), len(cfg.beta2s), cfg.n_seeds
    ks = torch.tensor(cfg.ks, dtype=torch.float32).view(K, 1)
    gen = torch.Generator().manual_seed(cfg.seed)  # the gradient noise, shared by all optimizers
    thetas = [torch.full((K, S), cfg.theta0, requires_grad=True) for _ in range(B)]
    if cfg.optimizer in ABLATIONS:
        prev_v, norm_first = ABLATIONS[cfg.optimizer]
        theta = torch.full((B, K, S), cfg.theta0)
        m, v = torch.zeros_like(theta), torch.zeros_like(theta)
        beta2 = torch.tensor(cfg.beta2s, dtype=torch.float32).view(B, 1, 1)
        opt = None
    else:
        groups = [{"params": [p], "betas": (cfg.beta1, b2)} for p, b2 in zip(thetas, cfg.beta2s)]
        opt = make_optimizer(cfg.optimizer, groups, lr=cfg.alpha, eps=cfg.eps)
    records = set(record_steps(cfg.steps, cfg.n_records))

    for step in range(1, cfg.steps + 1):
        g = toy_gradient(ks, torch.rand(K, S, generator=gen))  # (K, S), same for every beta2
        lr = cfg.alpha / math.sqrt(step)  # alpha_t = alpha / sqrt(t)
        if opt is None:
            ablation_step(theta, m, v, g, step - 1, lr, cfg.beta1, beta2, cfg.eps, prev_v,
                          norm_first)
            theta.clamp_(-1.0, 1.0)  # projection onto [-1, 1]
        else:
            for p, group in zip(thetas, opt.param_groups):
                p.grad = g  # the optimizers read the gradient and never write to it
                group["lr"] = lr
            opt.step()
            with torch.no_grad():
                for p in thetas:
                    p.clamp_(-1.0, 1.0)  # projection onto [-1, 1]
        if step in records and on_record is not None:
            if opt is not None:
                theta = torch.stack([p.detach() for p in thetas])
            on_record(step, theta)
        if bar is not None and step % 1000 == 0:
            bar.update(1000)
    if opt is not None:
        theta = torch.stack([p.detach() for p in thetas])
    return theta.detach().clone()


# ----------------------------------------------------------------------------- runner glue
def _train(cfg: ToyConfig, ctx: RunContext) -> dict:
    bar = ctx.bar(total=cfg.steps, desc=cfg.optimizer)

    def on_record(step: int, theta: torch.Tensor) -> None:
        q = torch.quantile(theta, torch.tensor([0.25, 0.5, 0.75]), dim=-1)  # (3, B, K)
        mean = theta.mean(-1)
        for bi, b2 in enumerate(cfg.beta2s):
            for ki, k in enumerate(cfg.ks):
                ctx.log(step=step, beta2=b2, k=k, q25=q[0, bi, ki].item(),
                        median=q[1, bi, ki].item(), q75=q[2, bi, ki].item(),
                        mean=mean[bi, ki].item())

    t0 = time.time()
    theta = simulate(cfg, bar=bar, on_record=on_record)
    bar.close()
    final = {}
    for bi, b2 in enumerate(cfg.beta2s):
        for ki, k in enumerate(cfg.ks):
            x = theta[bi, ki]
            q25, med, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75])).tolist()
            final[f"k={k},beta2={b2}"] = {"median": med, "q25": q25, "q75": q75,
                                          "mean": x.mean().item(), "frac_below_0": (x < 0).float().mean().item()}
    return {"final": final, "steps_per_second": cfg.steps / (time.time() - t0)}


def sweep_configs(steps: int, n_seeds: int, variants=None, ablation_steps: int | None = None,
                  **kw) -> list[ToyConfig]:
    """One config per variant; the ablation variants run ``ablation_steps`` (default: steps)."""
    variants = variants or (*OPTIMIZERS, *ABLATIONS)
    return [ToyConfig(optimizer=o, n_seeds=n_seeds, **kw,
                      steps=ablation_steps if ablation_steps and o in ABLATIONS else steps)
            for o in variants]


def run_experiment(sweep: list[ToyConfig], out: Path, progress: bool = True) -> None:
    set_threads()
    run_sweep(sweep, out, _train, name="toy", keys=["optimizer", "steps"], progress=progress)


def _final_table(results: list[dict], names) -> list[list[str]]:
    rows = []
    by_opt = {r["config"]["optimizer"]: r for r in results}
    for name in names:
        if name not in by_opt:
            continue
        r = by_opt[name]
        cells = []
        for k in r["config"]["ks"]:
            for b2 in r["config"]["beta2s"]:
                f = r["final"][f"k={k},beta2={b2}"]
                cells.append(f"{f['median']:+.2f} [{f['q25']:+.2f}, {f['q75']:+.2f}]")
        rows.append([LABELS.get(name, name), f"{r['config']['steps']:,}", *cells])
    return rows


def _headers(cfg: dict) -> list[str]:
    return ["optimizer", "steps"] + [f"k={k}, β2={b2}" for k in cfg["ks"] for b2 in cfg["beta2s"]]


def report(sweep: list[ToyConfig], out: Path) -> Path:
    out = Path(out)
    results = load_results(out, sweep)  # only this sweep's runs (other horizons may be there)
    c0 = sweep[0]
    rep = Report(out, "Toy problem: Adam vs ADOPT on the paper's convex counterexample")
    rep.text(f"""
Minimise f(θ) = θ on [-1, 1] (minimiser **θ\\* = -1**) from stochastic gradients g = k² with
probability 1/k and g = -k otherwise (E[g] = 1), projecting θ onto [-1, 1] after each step,
θ₀ = {c0.theta0}. Step size α_t = α/√t with α = {c0.alpha}, t = 1 … T, where the horizon T is
the "steps" column ({", ".join(sorted({f"{c.steps:,}" for c in sweep}))} in this profile).
β1 = {c0.beta1}, eps = {c0.eps}, {c0.n_seeds} seeds per cell (elements of one tensor; all
optimizers see the same gradient samples). ADOPT is `adoptim.ADOPT` (clipped: c_t = t^0.25;
no clip: `clip_lambda=None`); Adam/AMSGrad are `torch.optim.Adam` (bias-corrected).
Cells: final θ, median [25%, 75%] over seeds. **Near -1 = converged; near +1 = failed.**
""")
    rep.table(_headers(config_dict_of(c0)), _final_table(results, OPTIMIZERS),
              "**Final θ, main comparison**")
    rep.table(_headers(config_dict_of(c0)), _final_table(results, ABLATIONS),
              "**Final θ, ablation of ADOPT's two changes** (all share ADOPT's start and no "
              "bias correction; 'both changes' is unclipped ADOPT written out by hand)")
    for group, fname, title in ((OPTIMIZERS, "toy_theta.png", "Adam, AMSGrad and ADOPT"),
                                (tuple(ABLATIONS), "toy_ablation.png", "ablation")):
        fig = _curves_figure(results, group, c0)
        rep.figure(fig, fname, f"θ against steps ({title}): median and interquartile band "
                               f"over {c0.n_seeds} seeds; rows k, columns β2; log-scale steps.")
    rep.text(_findings(results, c0))
    return rep.write()


def config_dict_of(cfg: ToyConfig) -> dict:
    return {"ks": list(cfg.ks), "beta2s": list(cfg.beta2s)}


def _curves_figure(results, names, c0: ToyConfig):
    fig, axes = new_figure(len(c0.ks), len(c0.beta2s), width=4.2, height=3.0, sharey=True,
                           layout="constrained")  # room for the legend below the panels
    colors = dict(zip(names, ["tab:red", "tab:orange", "tab:blue", "tab:green"]))
    # several variants coincide in some panels (Adam and AMSGrad at β2 = 0.999, all four
    # ablation variants at k = 10, β2 = 0.999): distinct dashes keep each line visible
    styles = dict(zip(names, ["-", "--", "-.", ":"]))
    by_opt = {r["config"]["optimizer"]: r for r in results}
    for name in names:
        if name not in by_opt:
            continue
        rows = load_metrics(by_opt[name]["dir"])
        for ki, k in enumerate(c0.ks):
            for bi, b2 in enumerate(c0.beta2s):
                sel = [r for r in rows if r["k"] == k and r["beta2"] == b2]
                ax = axes[ki][bi]
                x = [r["step"] for r in sel]
                ax.plot(x, [r["median"] for r in sel], color=colors[name], ls=styles[name],
                        label=LABELS[name])
                ax.fill_between(x, [r["q25"] for r in sel], [r["q75"] for r in sel],
                                color=colors[name], alpha=0.2, linewidth=0)
                ax.set_xscale("log")
                ax.set_title(f"k = {k}, β2 = {b2}", fontsize=10)
                ax.axhline(-1, color="k", lw=0.5, ls=":")
                ax.set_ylim(-1.05, 1.05)
                if ki == len(c0.ks) - 1:
                    ax.set_xlabel("step")
                if bi == 0:
                    ax.set_ylabel("θ")
    # one legend for all panels, outside them: inside, it would hide some panel's curves
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center",
               ncol=len(names), fontsize=8, frameon=False)
    return fig


def _findings(results, c0: ToyConfig) -> str:
    """Plain-language findings computed from the numbers (so the text matches the run)."""
    by_opt = {r["config"]["optimizer"]: r for r in results}
    lines = ["## What this run shows\n"]

    def med(name, k, b2):
        return by_opt[name]["final"][f"k={k},beta2={b2}"]["median"] if name in by_opt else None

    for name in (*OPTIMIZERS, *ABLATIONS):
        if name not in by_opt:
            continue
        steps = by_opt[name]["config"]["steps"]
        ok = [f"k={k}, β2={b2}" for k in c0.ks for b2 in c0.beta2s if med(name, k, b2) < -0.5]
        bad = [f"k={k}, β2={b2} ({med(name, k, b2):+.2f})" for k in c0.ks for b2 in c0.beta2s
               if med(name, k, b2) >= -0.5]
        lines.append(f"- **{LABELS[name]}** ({steps:,} steps): median final θ < -0.5 at "
                     f"{len(ok)}/{len(ok) + len(bad)} settings"
                     + (f"; not at {', '.join(bad)}." if bad else "."))
    clip = ", ".join(f"k = {k}: t > {k**4:.3g}" for k in c0.ks)
    lines.append(f"""
**Why clipped ADOPT lags at small β2 and large k.** With β2 small, v_(t-1) is close to the
last squared gradient, usually k², so the rare large gradient normalises to about k²/k = k, and
clipping cuts it to c_t = t^(1/4). While t^(1/4) < k - 1 the expected clipped, normalised
gradient, about t^(1/4)/k - (1 - 1/k), is negative, so clipped ADOPT drifts to +1 exactly like
Adam; it only sees the full spike once t^(1/4) > k ({clip}). At β2 = 0.999, v ≈ E[g²] ≈ k³ and the
spike normalises to about √k, which the clip passes after a few thousand steps. Unclipped ADOPT
has no such threshold.
""")
    return "\n".join(lines) + "\n"


EXPERIMENT = Experiment(
    name="toy",
    description="the paper's convex counterexample (Adam vs AMSGrad vs ADOPT, plus ablation)",
    quick=lambda: sweep_configs(steps=20_000, n_seeds=128),
    # 10^6 steps for every variant: ~35 min on 2 busy cores (8 runs, 1 thread each)
    full=lambda: sweep_configs(steps=1_000_000, n_seeds=256),
    run=run_experiment,
    report=report,
)


# ----------------------------------------------------------------------------- `adoptim toy`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20_000, help="horizon (default 20000)")
    parser.add_argument("--seeds", type=int, default=256, help="seeds per setting (default 256)")
    parser.add_argument("--alpha", type=float, default=ToyConfig.alpha,
                        help=f"base step size, alpha_t = alpha/sqrt(t) (default {ToyConfig.alpha})")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50], help="k values")
    parser.add_argument("--beta2", type=float, nargs="+", default=[0.1, 0.5, 0.999],
                        help="beta2 values")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=[*OPTIMIZERS, *ABLATIONS], help="variants to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gradient noise")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    set_threads()
    base = ToyConfig(ks=tuple(args.k), beta2s=tuple(args.beta2), alpha=args.alpha,
                     steps=args.steps, n_seeds=args.seeds, seed=args.seed)
    print(f"toy problem: g = k^2 w.p. 1/k else -k on [-1, 1] (minimiser -1), theta0 = 0, "
          f"alpha_t = {base.alpha}/sqrt(t), {base.steps:,} steps, {base.n_seeds} seeds")
    finals = {}
    bars = progress_bars(not args.no_progress)  # none when stderr is not a terminal
    for name in tqdm(args.optimizers, desc="optimizers", disable=not bars):
        cfg = replace(base, optimizer=name)
        with tqdm(total=cfg.steps, desc=name, leave=False, disable=not bars) as bar:
            finals[name] = simulate(cfg, bar=bar)
    headers = ["optimizer", "k", *[f"beta2={b}" for b in base.beta2s]]
    rows, table = [], {}
    for name, theta in finals.items():
        for ki, k in enumerate(base.ks):
            cells = []
            for bi, b2 in enumerate(base.beta2s):
                q25, med, q75 = torch.quantile(theta[bi, ki], torch.tensor([.25, .5, .75])).tolist()
                cells.append(f"{med:+.2f} [{q25:+.2f},{q75:+.2f}]")
                table[f"{name},k={k},beta2={b2}"] = {"median": med, "q25": q25, "q75": q75}
            rows.append([name, k, *cells])
    from adoptim.experiments.runner import markdown_table

    print("final theta: median [25%, 75%] over seeds (-1 = optimum, +1 = worst point)")
    print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0
