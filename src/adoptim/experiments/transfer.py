"""Switching from Adam(W) to ADOPT(W): learning rate, warmup and beta2, measured on four tasks.

The practical questions before trying ADOPT are whether the Adam learning rate carries over,
whether a warmup is needed, which beta2 to use, and whether it is worse on a given task. This
experiment answers them with runs. For each task it sweeps the learning rate for Adam(W) and
ADOPT(W) at their default betas (Adam(W) (0.9, 0.999), ADOPT(W) (0.9, 0.9999)), then repeats
some cells:

* **stage 1**, the lr sweep: every lr in the task's grid x {Adam(W), ADOPT(W)} x seeds, no warmup;
* **stage 2**, derived from stage 1's *pilot seed* (the first seed of the sweep) once it has
  finished for the task: each optimizer's two best lrs again with a linear warmup over the
  first 5 % of steps (at least MIN_WARMUP_STEPS = 3: ADOPT's first step does not move the
  parameters, so a shorter warmup would leave its runs unchanged); ADOPT(W) at its best lr with beta2 0.999 (0.9999 is stage 1's default);
  and 8-bit ADOPT(W) at its best lr, only if ``ADOPT(..., state_dtype="8bit")`` constructs on
  this install (checked at run time; otherwise the report says it was not run, and why).
  Every stage-2 cell runs for every seed. Choosing on the pilot seed fixes stage 2 as soon as
  one pass over the grid has finished, so a partial run already covers every question.

The tasks reuse the other experiments' training code unchanged (the task's own schedule,
data order and evaluation):

* ``mlp-mnist5k``, ``mlp-fashion``: :func:`adoptim.experiments.mlp.train` (constant lr),
  final test accuracy; ``mlp-fashion`` only where the Debian ``dataset-fashion-mnist``
  package is installed;
* ``resnet``: :func:`adoptim.experiments.resnet.train`, ResNet-20 on a Fashion-MNIST subset
  for several epochs (cosine decay), final test accuracy;
* ``gpt-b4``, ``gpt-b16``: :func:`adoptim.experiments.gpt.train`, the 0.36M-parameter byte
  GPT of the gpt experiment's full profile, batch 4 and 16, AdamW vs ADOPTW with weight
  decay 0.1 on matrices (cosine decay to lr/10), final validation loss;
* ``vae``: :func:`adoptim.experiments.vae.train` on MNIST-5k (constant lr), held-out
  importance-weighted NLL.

Warmup is applied the same way on every task, by :func:`linear_warmup`: a global optimizer
step hook that multiplies the lr the task's loop has set by ``min(1, (t + 1) / W)`` on the
optimizer's t-th step (the no-warmup runs of ``resnet`` and ``gpt`` run the task's cosine
decay from step 0). "Early instability" is the largest training loss in the first 5 % of
steps (recorded per step through :meth:`RunContext.step_loss`).

Runs go to ``OUT/<task>/runs/``, each task's report to ``OUT/<task>/report.md`` (+ PNG), the
summary over tasks to ``OUT/report.md``. ``ADOPTIM_JOBS=2`` runs two runs at a time (one
process each, one thread each); the default is one.

    adoptim reproduce transfer --quick         # seconds: a smoke test of the whole path
    ADOPTIM_JOBS=2 adoptim reproduce transfer --full    # about 3 h on 2 cores; resumable
    adoptim reproduce transfer --full --report-only --publish docs/results
    python -m adoptim.experiments.transfer --task gpt-b4 --optimizer adoptw --lr 3e-3
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adoptim.experiments.data import DataUnavailableError
from adoptim.experiments.runner import (
    Experiment,
    Report,
    RunContext,
    config_dict,
    load_results,
    new_figure,
    progress_bars,
    run_id,
    run_sweep,
    set_threads,
    summarize,
)

__all__ = [
    "EXPERIMENT",
    "TASKS",
    "Config",
    "Task",
    "analyse",
    "eight_bit_status",
    "full_sweep",
    "linear_warmup",
    "lr_range",
    "plan",
    "quick_sweep",
    "stage2",
    "train",
]

EARLY_FRACTION = 0.05  # "early training": the first 5 % of optimizer steps
WARMUP_FRACTION = 0.05  # stage-2 warmup length, as a fraction of the run's steps
TOLERANCE = 0.01  # the "flat" lr range: within 1 % of the best (or one seed-spread)
STAGE2_BETA2 = 0.999  # ADOPT's stage-2 beta2 (stage 1 runs its default, 0.9999)
# The shortest stage-2 warmup. ADOPT's first step only stores v (theta does not move), and a
# warmup of W steps scales steps 0 .. W-2 by 1/W .. (W-1)/W: with W = 1 nothing is scaled and
# with W = 2 only the first step, so ADOPT's runs "with warmup" would be its runs without.
# W >= 3 scales at least one ADOPT update. (Full profiles: W = 23 or more, unaffected; the
# quick profile's runs are short enough for 5 % to round to 1 or 2.)
MIN_WARMUP_STEPS = 3


@dataclass
class Config:
    task: str = "mlp-mnist5k"
    """mlp-mnist5k, mlp-fashion, resnet, gpt-b4, gpt-b16 or vae (TASKS)"""
    optimizer: str = "adopt"
    """adam, adamw, adopt, adoptw, adopt-8bit or adoptw-8bit"""
    lr: float = 1e-3
    """peak learning rate"""
    seed: int = 0
    """seed of the run (passed to the task)"""
    beta2: float = 0.0
    """beta2 (0: the optimizer's default, Adam(W) 0.999, ADOPT(W) 0.9999); beta1 is 0.9"""
    warmup_steps: int = 0
    """linear warmup over this many optimizer steps (0: none), see linear_warmup"""
    size: str = "full"
    """task size preset, quick or full (SIZES)"""


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    family: str  # mlp, resnet, gpt, vae: which module trains it
    adam: str  # the Adam-family optimizer it is compared with (adam or adamw)
    adopt: str  # adopt or adoptw
    metric: str  # what the final metric is, with its unit
    higher_is_better: bool
    read: Callable[[dict], float]  # the final metric from the task's result dict
    digits: int  # decimals in tables


_DATASET_NAMES = {"mnist5k": "MNIST-5k", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def task_title(task: Task, size: str) -> str:
    """The task's title at a size preset, from the settings that preset runs (the quick
    profile's ResNet is a ResNet-8 on MNIST-5k digits, not the full profile's ResNet-20 on
    Fashion-MNIST; the other tasks' titles hold at both sizes)."""
    if task.family == "resnet":
        from adoptim.experiments import resnet

        kw = SIZES[size][task.name]
        depth = kw.get("depth", resnet.Args.depth)
        dataset = kw.get("dataset", resnet.Args.dataset)
        return f"ResNet-{depth} on a {_DATASET_NAMES.get(dataset, dataset)} subset"
    return task.title


def _acc_mlp(r: dict) -> float:
    return 100 * r["final"]["test/acc"]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mlp-mnist5k", "MLP on MNIST-5k", "mlp", "adam", "adopt", "test accuracy (%)", True,
         _acc_mlp, 2),
    Task("mlp-fashion", "MLP on Fashion-MNIST", "mlp", "adam", "adopt", "test accuracy (%)",
         True, _acc_mlp, 2),
    Task("resnet", "ResNet-20 on a Fashion-MNIST subset", "resnet", "adam", "adopt",
         "test accuracy (%)", True, lambda r: 100 * r["test/final_acc"], 2),
    Task("gpt-b4", "byte-level GPT, batch 4", "gpt", "adamw", "adoptw",
         "validation loss (nats/byte)", False, lambda r: r["val/final_loss"], 4),
    Task("gpt-b16", "byte-level GPT, batch 16", "gpt", "adamw", "adoptw",
         "validation loss (nats/byte)", False, lambda r: r["val/final_loss"], 4),
    Task("vae", "convolutional VAE on MNIST-5k", "vae", "adam", "adopt",
         "held-out IW-NLL (nats/image)", False, lambda r: r["test/iw_nll"], 2),
)}

# task -> keyword arguments of the task module's config, per size preset. Full sizes were
# chosen from one timed run of each (see docs/switching-from-adam.md): about 3 h in all on
# 2 cores with ADOPTIM_JOBS=2.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "mlp-mnist5k": {"dataset": "mnist5k", "hidden": 32, "epochs": 1, "batch_size": 128,
                        "train_eval_max": 500},
        "mlp-fashion": {"dataset": "fashion-mnist", "hidden": 32, "epochs": 1},
        "resnet": {"dataset": "mnist5k", "depth": 8, "width": 4, "train_subset": 256,
                   "test_subset": 200, "steps": 16, "batch_size": 16, "eval_every": 16},
        "gpt-b4": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32,
                   "batch_size": 4, "max_iters": 30, "eval_interval": 30, "eval_iters": 2,
                   "max_bytes": 100_000, "spike_window": 10},
        "gpt-b16": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32,
                    "batch_size": 16, "max_iters": 30, "eval_interval": 30, "eval_iters": 2,
                    "max_bytes": 100_000, "spike_window": 10},
        "vae": {"train_subset": 256, "test_subset": 100, "epochs": 1, "channels": 4,
                "latent": 4, "iw_samples": 2, "eval_every": 1},
    },
    "full": {
        # 30 epochs of 32 steps (the mlp experiment's MNIST-5k profile)
        "mlp-mnist5k": {"dataset": "mnist5k", "hidden": 784, "epochs": 30},
        # 5 epochs of 469 steps on the full 60k training set
        "mlp-fashion": {"dataset": "fashion-mnist", "hidden": 784, "epochs": 5},
        # 6 epochs of a 5,000-image subset (468 steps of 64), 2,000 test images
        "resnet": {"dataset": "fashion-mnist", "train_subset": 5_000, "test_subset": 2_000,
                   "steps": 468, "batch_size": 64, "eval_every": 156},
        # the gpt experiment's full profile: 0.36M parameters, 3,000 steps
        "gpt-b4": {"batch_size": 4, "max_iters": 3000, "eval_interval": 500,
                   "eval_iters": 20},
        "gpt-b16": {"batch_size": 16, "max_iters": 3000, "eval_interval": 500,
                    "eval_iters": 20},
        # the vae experiment's full profile (15 epochs of 62 steps), K = 32
        "vae": {"epochs": 15, "iw_samples": 32, "eval_every": 5},
    },
}

# the lr grid of each task's full profile (half-decade steps; chosen to bracket both optima)
FULL_LRS: dict[str, tuple[float, ...]] = {
    "mlp-mnist5k": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "mlp-fashion": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "resnet": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "gpt-b4": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "gpt-b16": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "vae": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
FULL_SEEDS = (0, 1, 2)
# the order runs go in within a seed: cheapest first (seconds per run, measured: about 7,
# 20, 40, 55, 80, 125), so that more tasks have a finished grid early
RUN_ORDER = ("mlp-mnist5k", "mlp-fashion", "vae", "gpt-b4", "resnet", "gpt-b16")
QUICK_TASKS = ("mlp-mnist5k", "resnet", "gpt-b4", "gpt-b16", "vae")
QUICK_LRS = (3e-4, 1e-3, 3e-3)

_KEYS = ["optimizer", "lr", "seed", "beta2", "warmup_steps"]


def default_beta2(optimizer: str) -> float:
    return 0.9999 if optimizer.lower().startswith("adopt") else 0.999


# ----------------------------------------------------------------------------- 8-bit, warmup
def eight_bit_status() -> tuple[bool, str]:
    """(available, reason): whether ``ADOPT(..., state_dtype="8bit")`` constructs here."""
    from adoptim import ADOPT

    try:
        ADOPT([torch.zeros(8, requires_grad=True)], state_dtype="8bit")
    except Exception as e:  # noqa: BLE001 (any failure means: not available on this install)
        return False, f"`ADOPT(params, state_dtype=\"8bit\")` raises {type(e).__name__}: {e}"
    return True, ""


def _register_8bit() -> None:
    """Make ``adopt-8bit``/``adoptw-8bit`` known to make_optimizer (only once 8-bit works)."""
    from adoptim import ADOPT, ADOPTW
    from adoptim.experiments.optimizers import OPTIMIZERS

    OPTIMIZERS.setdefault("adopt-8bit", (ADOPT, {"state_dtype": "8bit"},
                                         "adoptim.ADOPT with 8-bit moments"))
    OPTIMIZERS.setdefault("adoptw-8bit", (ADOPTW, {"state_dtype": "8bit"},
                                          "adoptim.ADOPTW with 8-bit moments"))


@contextlib.contextmanager
def linear_warmup(steps: int):
    """While active, every optimizer's t-th ``step()`` (t = 0, 1, ...) runs with each group's
    lr multiplied by ``min(1, (t + 1) / steps)``; the group's lr is restored right after the
    step, so whatever schedule the training loop sets composes with it. ``steps <= 0``: no-op.
    Yields ``{id(optimizer): steps taken}``."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    counts: dict[int, int] = {}
    if steps <= 0:
        yield counts
        return
    saved: dict[int, list] = {}

    def pre(opt, args, kwargs):
        factor = min(1.0, (counts.get(id(opt), 0) + 1) / steps)
        saved[id(opt)] = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["lr"] * factor

    def post(opt, args, kwargs):
        counts[id(opt)] = counts.get(id(opt), 0) + 1
        for g, lr in zip(opt.param_groups, saved.pop(id(opt), [])):
            g["lr"] = lr

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- one run
def task_args(cfg: Config) -> tuple[Callable, Any]:
    """The task module's ``train`` and its config for ``cfg``."""
    task = TASKS[cfg.task]
    kw = dict(SIZES[cfg.size][cfg.task])
    beta2 = cfg.beta2 or default_beta2(cfg.optimizer)
    if task.family == "mlp":
        from adoptim.experiments import mlp

        return mlp.train, mlp.MLPConfig(optimizer=cfg.optimizer, lr=cfg.lr, beta2=beta2,
                                        seed=cfg.seed, **kw)
    if task.family == "resnet":
        from adoptim.experiments import resnet

        return resnet.train, resnet.Args(optimizer=cfg.optimizer, lr=cfg.lr, beta2=beta2,
                                         seed=cfg.seed, warmup_steps=0, **kw)
    if task.family == "gpt":
        from adoptim.experiments import gpt

        return gpt.train, gpt.Args(optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.lr / 10,
                                   warmup_iters=0, weight_decay=0.1, adam_beta2=beta2,
                                   adopt_beta2=beta2, seed=cfg.seed, **kw)
    if task.family == "vae":
        from adoptim.experiments import vae

        return vae.train, vae.Args(optimizer=cfg.optimizer, lr=cfg.lr, beta2=beta2,
                                   seed=cfg.seed, **kw)
    raise ValueError(f"unknown task family {task.family!r}")


def early_window(n_steps: int) -> int:
    """How many of ``n_steps`` steps count as early training (at least 1)."""
    return max(1, math.ceil(EARLY_FRACTION * n_steps))


def train(cfg: Config, ctx: RunContext) -> dict:
    """One run of the task with ``cfg``'s optimizer, lr, seed, beta2 and warmup."""
    if cfg.optimizer.endswith("-8bit"):
        _register_8bit()
    fn, args = task_args(cfg)
    with linear_warmup(cfg.warmup_steps):
        result = fn(args, ctx)
    losses = np.asarray(ctx.step_losses, dtype=float)
    k = early_window(len(losses))
    metric = float(TASKS[cfg.task].read(result))
    return {
        "metric": metric,
        "finite": bool(np.all(np.isfinite(losses)) and math.isfinite(metric)),
        "steps": len(losses),
        "early/steps": k,
        "early/max_loss": float(np.max(losses[:k])) if len(losses) else math.nan,
        "early/first_loss": float(losses[0]) if len(losses) else math.nan,
        "beta2": cfg.beta2 or default_beta2(cfg.optimizer),
        "task_args": config_dict(args),
        "task_result": result,
    }


# ----------------------------------------------------------------------------- the sweep
def _stage1(tasks: Sequence[str], lrs: dict[str, Sequence[float]], seeds: Sequence[int],
            size: str) -> list[Config]:
    """Seeds outermost (the pilot seed's whole grid first), then tasks, lrs, optimizers."""
    return [Config(task=t, optimizer=o, lr=lr, seed=s, size=size)
            for s in seeds for t in tasks for lr in lrs[t]
            for o in (TASKS[t].adam, TASKS[t].adopt)]


def quick_sweep() -> list[Config]:
    """Seconds: 3 lrs x 2 optimizers x 1 seed on tiny versions of five tasks (MLP, ResNet-8,
    GPT at batch 4 and 16, VAE; MNIST-5k only, no Debian package), + stage 2."""
    return _stage1(QUICK_TASKS, {t: QUICK_LRS for t in QUICK_TASKS}, (0,), "quick")


def full_sweep() -> list[Config]:
    """Stage 1 of the full profile: 5-6 lrs x 2 optimizers x 3 seeds on six tasks (192
    runs); stage 2 adds 15 runs per task (18 where 8-bit ADOPT constructs)."""
    return _stage1(list(FULL_LRS), FULL_LRS, FULL_SEEDS, "full")


def is_stage1(c: Config) -> bool:
    return c.warmup_steps == 0 and c.beta2 == 0 and not c.optimizer.endswith("-8bit")


def _results(out: Path, task: str, configs: Sequence[Config]) -> list[dict]:
    configs = [c for c in configs if c.task == task]
    return load_results(Path(out) / task, configs) if configs else []


def _ranked_lrs(results: list[dict], optimizer: str, higher: bool) -> list[float]:
    """The lrs of ``optimizer``'s runs, best mean metric first (non-finite cells last)."""
    by_lr: dict[float, list[float]] = {}
    for r in results:
        if r["config"]["optimizer"] == optimizer:
            by_lr.setdefault(r["config"]["lr"], []).append(_value(r))
    def key(lr):
        m = float(np.mean(by_lr[lr]))
        return (not math.isfinite(m), -m if higher else m, lr)
    return sorted(by_lr, key=key)


def stage2(stage1: Sequence[Config], results: dict[str, list[dict]],
           eight_bit: bool) -> list[Config]:
    """The stage-2 configs that stage 1's pilot seed determines, for every task whose pilot
    grid has finished (``results``: task -> finished stage-1 runs). Ordered seed, task."""
    out: list[Config] = []
    tasks = list(dict.fromkeys(c.task for c in stage1))
    for task in tasks:
        t = TASKS[task]
        grid = [c for c in stage1 if c.task == task]
        seeds = list(dict.fromkeys(c.seed for c in grid))
        pilot = seeds[0]
        want = {json_key(c) for c in grid if c.seed == pilot}
        done = [r for r in results.get(task, []) if r["config"]["seed"] == pilot
                and json_key(r["config"]) in want]
        if len({json_key(r["config"]) for r in done}) < len(want):
            continue  # the pilot grid is not finished: stage 2 is not known yet
        steps = int(np.median([r["steps"] for r in done]))
        warmup = max(MIN_WARMUP_STEPS, round(WARMUP_FRACTION * steps))
        size = grid[0].size
        top = {o: _ranked_lrs(done, o, t.higher_is_better)[:2] for o in (t.adam, t.adopt)}
        best_adopt = top[t.adopt][0]
        for s in seeds:
            for o in (t.adam, t.adopt):
                out += [Config(task=task, optimizer=o, lr=lr, seed=s, warmup_steps=warmup,
                               size=size) for lr in top[o]]
            out.append(Config(task=task, optimizer=t.adopt, lr=best_adopt, seed=s,
                              beta2=STAGE2_BETA2, size=size))
            if eight_bit:
                out.append(Config(task=task, optimizer=f"{t.adopt}-8bit", lr=best_adopt,
                                  seed=s, size=size))
    seed_order = list(dict.fromkeys(c.seed for c in stage1))
    return sorted(out, key=lambda c: (seed_order.index(c.seed), tasks.index(c.task)))


def json_key(c: Config | dict) -> str:
    import json

    return json.dumps(config_dict(c), sort_keys=True)


def plan(sweep: list[Config], out: Path, eight_bit: bool | None = None) -> list[Config]:
    """Extend ``sweep`` in place with the stage-2 configs the finished stage-1 runs under
    ``out`` determine (so that ``reproduce``'s report and publish see them), and return it."""
    if eight_bit is None:
        eight_bit = eight_bit_status()[0]
    s1 = [c for c in sweep if is_stage1(c)]
    tasks = list(dict.fromkeys(c.task for c in s1))
    results = {t: _results(out, t, s1) for t in tasks}
    have = {json_key(c) for c in sweep}
    sweep.extend(c for c in stage2(s1, results, eight_bit) if json_key(c) not in have)
    return sweep


def _missing_data(tasks: Sequence[str], size: str) -> dict[str, str]:
    """task -> why its data is not here (only Fashion-MNIST can be missing)."""
    from adoptim.experiments.data import FASHION_MNIST_DIR, find_idx_files

    missing = {}
    for t in tasks:
        if SIZES[size][t].get("dataset") == "fashion-mnist":
            folder = os.environ.get("ADOPTIM_FASHION_MNIST", FASHION_MNIST_DIR)
            try:
                find_idx_files(folder)
            except DataUnavailableError:
                missing[t] = ("Fashion-MNIST not installed (`apt-get install "
                              f"dataset-fashion-mnist`, or set ADOPTIM_FASHION_MNIST); "
                              f"looked in {folder}")
    return missing


def _run_one(cfg: Config, task_dir: str, progress: bool = False) -> str | None:
    """One run (in this process, or in a worker when ADOPTIM_JOBS > 1); returns None, or the
    error as text: a failed run is reported and left without a result (a rerun retries it),
    and the rest of the profile goes on."""
    import traceback

    set_threads()
    try:
        run_sweep([cfg], task_dir, train, name=cfg.task, keys=_KEYS, progress=progress)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()
    return None


class _Inline:
    """An executor that runs each call at once in this process (ADOPTIM_JOBS=1)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self) -> None:
        pass


def _done(out: Path, c: Config) -> bool:
    from adoptim.experiments.runner import RESULT_FILE

    return (out / c.task / "runs" / run_id(c, _KEYS) / RESULT_FILE).exists()


def run(sweep: list[Config], out: Path, progress: bool = True) -> None:
    """Run the sweep one seed at a time, cheapest task first (RUN_ORDER): each task's lr
    grid for that seed and, as soon as a task's pilot-seed grid has finished, the stage-2
    cells it determines (ahead of the remaining lr-sweep runs). Resumes; extends ``sweep``
    in place with stage 2. ``ADOPTIM_JOBS`` runs that many at once (default 1)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from tqdm.auto import tqdm

    sweep = sweep if isinstance(sweep, list) else [sweep]
    out = Path(out)
    set_threads()
    s1 = [c for c in sweep if is_stage1(c)]
    missing = _missing_data(list(dict.fromkeys(c.task for c in s1)), s1[0].size) if s1 else {}
    for task, why in missing.items():
        print(f"[transfer] {task}: skipped, {why}", flush=True)
    s1 = [c for c in s1 if c.task not in missing]
    eight_bit, why = eight_bit_status()
    if not eight_bit:
        print(f"[transfer] 8-bit ADOPT arm not run: {why}", flush=True)
    jobs = max(1, int(os.environ.get("ADOPTIM_JOBS", "1")))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = _Inline()
    order = {t: i for i, t in enumerate(RUN_ORDER)}
    # stage 2 as far as the finished runs determine it, so the count covers those runs too
    reused = sum(_done(out, c) for c in plan(list(sweep), out, eight_bit))
    if reused:  # as the shared runner says it
        print(f"[transfer] reused {reused} finished runs (delete {out} to rerun)", flush=True)
    try:
        for seed in dict.fromkeys(c.seed for c in s1):
            grid = sorted((c for c in s1 if c.seed == seed), key=lambda c: order[c.task])
            queue = [c for c in grid if not _done(out, c)]
            ready: list[Config] = []  # stage-2 runs whose task grid is done: go first
            queued2: set[str] = set()
            running: dict = {}
            failed: list[Config] = []

            # Called within this iteration only; the defaults bind this seed's containers.
            def add_stage2(running=running, queue=queue, seed=seed, queued2=queued2,
                           ready=ready):
                plan(sweep, out, eight_bit)
                busy = {q.task for q in [*running.values(), *queue] if is_stage1(q)}
                for c in sweep:
                    if (not is_stage1(c) and c.seed == seed and c.task not in missing
                            and c.task not in busy and json_key(c) not in queued2
                            and not _done(out, c)):
                        ready.append(c)
                        queued2.add(json_key(c))

            add_stage2()
            with tqdm(total=len(grid) + len(ready), initial=len(grid) - len(queue),
                      position=0, desc=f"transfer seed {seed}",
                      disable=not progress_bars(progress),
                      dynamic_ncols=True) as bar:
                while queue or ready or running:
                    while len(running) < jobs and (ready or queue):
                        c = ready.pop(0) if ready else queue.pop(0)
                        running[pool.submit(_run_one, c, str(out / c.task),
                                            progress and jobs == 1)] = c
                    finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for f in finished:
                        c = running.pop(f)
                        if f.result() is not None:
                            failed.append(c)
                            print(f"[transfer] run failed: {c}\n{f.result()}", flush=True)
                        bar.update(1)
                    n_ready = len(ready)
                    add_stage2()
                    if len(ready) > n_ready:
                        bar.total += len(ready) - n_ready
                        bar.refresh()
            if failed:
                print(f"[transfer] seed {seed}: {len(failed)} run(s) failed; rerun to retry",
                      flush=True)
    finally:
        pool.shutdown()


# ----------------------------------------------------------------------------- analysis
def _value(r: dict) -> float:
    """A run's final metric, NaN when the run diverged."""
    v = r.get("metric", math.nan)
    return v if (r.get("finite", True) and v is not None and math.isfinite(v)) else math.nan


def _cell(results: list[dict], optimizer: str, lr: float | None = None, beta2: float = 0.0,
          warmup: bool = False) -> list[dict]:
    return [r for r in results if r["config"]["optimizer"] == optimizer
            and (lr is None or r["config"]["lr"] == lr) and r["config"]["beta2"] == beta2
            and (r["config"]["warmup_steps"] > 0) == warmup]


def _stats(runs: list[dict], key: Callable[[dict], float] = _value) -> dict[str, float]:
    """summarize() of the runs' values; mean is NaN when any run diverged."""
    s = summarize(key(r) for r in runs)
    s["diverged"] = sum(not math.isfinite(key(r)) for r in runs)
    return s


def lr_range(lrs: Sequence[float], means: Sequence[float], best: int, tol: float,
             higher: bool) -> tuple[int, int]:
    """The contiguous index range around ``best`` whose means are within ``tol`` of
    ``means[best]`` (lrs sorted ascending; NaN breaks the range)."""
    def ok(i):
        m = means[i]
        return math.isfinite(m) and ((means[best] - m) if higher else (m - means[best])) <= tol
    lo = hi = best
    while lo > 0 and ok(lo - 1):
        lo -= 1
    while hi < len(lrs) - 1 and ok(hi + 1):
        hi += 1
    return lo, hi


def analyse(task: Task, results: list[dict], lrs: Sequence[float]) -> dict[str, Any]:
    """Per optimizer: the stage-1 cells, best lr, flat range; and the drop-in comparison
    (ADOPT at Adam's best lr). ``results``: one task's finished runs; ``lrs``: its grid."""
    lrs = sorted(lrs)
    sign = 1 if task.higher_is_better else -1
    out: dict[str, Any] = {"lrs": lrs}
    for o in (task.adam, task.adopt):
        cells = [_stats(_cell(results, o, lr)) for lr in lrs]
        means = [c["mean"] if c["n"] and not c["diverged"] else math.nan for c in cells]
        finite = [i for i, m in enumerate(means) if math.isfinite(m)]
        info: dict[str, Any] = {"cells": cells, "means": means, "best": None, "ties": []}
        if finite:
            b = max(finite, key=lambda i: sign * means[i])
            # cells equal to the best as the report prints them: a tie, not a best lr (the
            # quick profile's ResNet is at chance, 10.00 %, at every lr)
            ties = [i for i in finite
                    if round(means[i], task.digits) == round(means[b], task.digits)]
            info["ties"] = ties if len(ties) > 1 else []
            tol = max(TOLERANCE * abs(means[b]), cells[b]["std"])
            lo, hi = lr_range(lrs, means, b, tol, task.higher_is_better)
            info.update(best=b, best_lr=lrs[b], best_stats=cells[b], tol=tol, range=(lo, hi),
                        width=lrs[hi] / lrs[lo], edge=(b == 0 or b == len(lrs) - 1),
                        range_at_edge=(lo == 0, hi == len(lrs) - 1))
        out[o] = info
    a, d = out[task.adam], out[task.adopt]
    if a["best"] is not None and not a["ties"]:
        at = _stats(_cell(results, task.adopt, a["best_lr"]))
        out["dropin"] = at
        out["dropin_delta"] = (at["mean"] - a["best_stats"]["mean"]) if at["n"] else math.nan
    if a["best"] is not None and d["best"] is not None and not a["ties"] and not d["ties"]:
        out["ratio"] = d["best_lr"] / a["best_lr"]
    return out


# ----------------------------------------------------------------------------- report
def _fmt(s: dict, digits: int, spread: bool = True) -> str:
    if not s or s.get("n", 0) == 0:
        return "not run yet"
    if s["diverged"]:
        return f"diverged ({s['diverged']} of {s['n']})"
    txt = f"{s['mean']:.{digits}f}"
    if spread and s["n"] > 1:
        txt += f" ± {s['std']:.{digits}f}"
    return txt + f" (n={s['n']})" if s["n"] < 3 else txt


def _lr(x: float) -> str:
    return f"{x:g}"


def _factor(x: float) -> str:
    """A ratio of lrs on a grid of half-decades: 0.3, 1, 3.3, 10, 33, 100."""
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def _range_txt(info: dict) -> str:
    if info.get("best") is None:
        return "n/a"
    lo, hi = info["range"]
    lrs = [info["lrs_sorted"][lo], info["lrs_sorted"][hi]] if "lrs_sorted" in info else None
    edge_lo, edge_hi = info["range_at_edge"]
    w = f"{'≥ ' if (edge_lo or edge_hi) else ''}x{_factor(info['width'])}"
    return f"{w} ({_lr(lrs[0])}–{_lr(lrs[1])})" if lrs else w


def _early(runs: list[dict]) -> str:
    s = summarize(r["early/max_loss"] for r in runs)
    if s["n"] == 0:
        return "not run yet"
    if not all(math.isfinite(r["early/max_loss"]) for r in runs):
        return "non-finite"
    return f"{s['mean']:.3g}" + (f" (max {s['max']:.3g})" if s["n"] > 1 else "")


def _label(task: Task, o: str) -> str:
    return {"adam": "Adam", "adamw": "AdamW", "adopt": "ADOPT", "adoptw": "ADOPTW"}.get(o, o)


def _plot(task: Task, title: str, results: list[dict], ana: dict, path_dir: Path,
          rep: Report) -> None:
    fig, axes = new_figure(1, 2, width=5.0, height=3.7)
    ax, ax2 = axes[0]
    lrs = ana["lrs"]
    colors = {task.adam: "tab:red", task.adopt: "tab:blue"}
    for o in (task.adam, task.adopt):
        info, c = ana[o], colors[o]
        m = np.array(info["means"], float)
        sd = np.array([s["std"] if s["n"] else np.nan for s in info["cells"]], float)
        ax.errorbar(lrs, m, yerr=sd, color=c, marker="o", ms=4, capsize=3,
                    label=f"{_label(task, o)} (no warmup)")
        for lr in lrs:
            vals = [_value(r) for r in _cell(results, o, lr)]
            ax.scatter([lr] * len(vals), vals, color=c, s=8, alpha=0.35, zorder=3)
        w = _cell(results, o, warmup=True)
        if w:
            wl = sorted({r["config"]["lr"] for r in w})
            ax.scatter(wl, [_stats([r for r in w if r["config"]["lr"] == lr])["mean"]
                            for lr in wl], facecolors="none", edgecolors=c, s=70, lw=1.5,
                       zorder=4, label=f"{_label(task, o)} + warmup")
        early = [summarize(r["early/max_loss"] for r in _cell(results, o, lr))["mean"]
                 for lr in lrs]
        ax2.plot(lrs, early, color=c, marker="o", ms=4, label=f"{_label(task, o)}")
        if w:
            ax2.scatter(wl, [summarize(r["early/max_loss"] for r in w
                                       if r["config"]["lr"] == lr)["mean"] for lr in wl],
                        facecolors="none", edgecolors=c, s=70, lw=1.5, zorder=4,
                        label=f"{_label(task, o)} + warmup")
    for extra, marker, shift, lab in (
            (_cell(results, task.adopt, beta2=STAGE2_BETA2), "^", 0.9,
             f"{_label(task, task.adopt)}, β2 {STAGE2_BETA2}"),
            (_cell(results, f"{task.adopt}-8bit"), "s", 1.1,
             f"{_label(task, task.adopt)} 8-bit state")):
        if extra:  # drawn a little left/right of its lr, so that it does not hide the ring
            lr = extra[0]["config"]["lr"]
            ax.scatter([lr * shift], [_stats(extra)["mean"]], marker=marker, color="tab:green",
                       s=40, zorder=5, label=lab)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xticks(lrs, [_lr(lr) for lr in lrs], fontsize=8)
        a.minorticks_off()
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(task.metric)
    ax.set_title(f"{title}: final {task.metric.split(' (')[0]}", fontsize=9)
    # The y range is matplotlib's autoscaled one, which holds every value drawn above (means,
    # error bars, single seeds, warmup rings, stage-2 markers): a range set from the best
    # cell used to cut off the poor lrs (the MNIST-5k plot lost its points below 53 %). It is
    # then fixed, so that the markers of diverged cells go at its worst edge.
    ax.margins(y=0.06)
    ax.set_ylim(*ax.get_ylim())
    worst = ax.get_ylim()[0 if task.higher_is_better else 1]
    for o in (task.adam, task.adopt):
        div = [lr for lr, c in zip(lrs, ana[o]["cells"]) if c["n"] and c["diverged"]]
        if div:  # a cell with a diverged seed has no mean: marked at the worst edge
            ax.scatter(div, [worst] * len(div), marker="x", color=colors[o], s=50,
                       clip_on=False, zorder=6, label=f"{_label(task, o)}: a seed diverged")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    early_all = [r["early/max_loss"] for r in results if math.isfinite(r["early/max_loss"])]
    if early_all and max(early_all) > 20 * min(early_all):
        ax2.set_yscale("log")
    ax2.set_xlabel("peak learning rate")
    ax2.set_ylabel("largest training loss, first 5 % of steps")
    ax2.set_title("early instability (mean over seeds)", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7)
    rep.figure(fig, f"{task.name}_lr.png",
               f"{title}: left, final {task.metric} against the peak lr (mean ± std "
               "over seeds; dots: single seeds; rings: with warmup; triangle: ADOPT β2 "
               f"{STAGE2_BETA2}; square: 8-bit ADOPT). Right: the largest training loss in "
               "the first 5 % of steps.")


def _task_report(task: Task, sweep: list[Config], out: Path, eight_bit: tuple[bool, str],
                 missing: str | None) -> dict[str, Any]:
    configs = [c for c in sweep if c.task == task.name]
    results = _results(out, task.name, configs)
    lrs = sorted({c.lr for c in configs if is_stage1(c)})
    ana = analyse(task, results, lrs)
    for o in (task.adam, task.adopt):
        ana[o]["lrs_sorted"] = lrs
        ana[o]["higher"] = task.higher_is_better
    s1 = [c for c in configs if is_stage1(c)]
    n_seeds = len({c.seed for c in s1})
    stage2_known = any(not is_stage1(c) for c in configs)
    expected2 = n_seeds * (4 + 1 + (1 if eight_bit[0] else 0))
    n_planned = len(s1) + (len(configs) - len(s1) if stage2_known else expected2)
    ana.update(n_done=len(results), n_planned=n_planned, stage2_known=stage2_known,
               results=results, missing=missing)

    title = task_title(task, configs[0].size if configs else "full")
    rep = Report(out / task.name, f"Switching from Adam: {title}")
    A, D = _label(task, task.adam), _label(task, task.adopt)
    if missing:
        rep.text(f"**Not run: {missing}.**")
    rep.text(f"**Progress: {len(results)} of {n_planned} planned runs finished** "
             f"({sum(is_stage1(_cfg(r)) for r in results)} of {len(s1)} in the lr sweep; "
             + (f"{len(results) - sum(is_stage1(_cfg(r)) for r in results)} of "
                f"{len(configs) - len(s1)} in stage 2" if stage2_known else
                f"stage 2 ({expected2} runs) is planned once the pilot seed's sweep has "
                "finished") + ").")
    if results:
        ta = results[0]["task_args"]
        shown = {k: v for k, v in ta.items() if k not in ("optimizer", "lr", "seed", "beta2",
                                                          "min_lr", "adam_beta2",
                                                          "adopt_beta2", "warmup_steps",
                                                          "warmup_iters", "data_path")}
        rep.text(f"{A} vs {D} at their default betas ((0.9, 0.999) and (0.9, 0.9999)), "
                 f"{results[0]['steps']} optimizer steps per run, metric: final "
                 f"{task.metric} ({'higher' if task.higher_is_better else 'lower'} is "
                 f"better). Task settings: `{shown}`. Tables: mean ± sample std over seeds "
                 "(n shown when below 3); a diverged run makes its cell 'diverged'.")
    rows = []
    for i, lr in enumerate(lrs):
        row = [_lr(lr)]
        for o in (task.adam, task.adopt):
            txt = _fmt(ana[o]["cells"][i], task.digits)
            row.append(f"**{txt}**" if i in (ana[o]["ties"] or [ana[o]["best"]]) else txt)
        row += [_early(_cell(results, o, lr)) for o in (task.adam, task.adopt)]
        rows.append(row)
    rep.text("## Learning-rate sweep (no warmup)")
    rep.table(["lr", f"{A}: {task.metric}", f"{D}: {task.metric}",
               f"{A}: largest loss, first 5 %", f"{D}: largest loss, first 5 %"], rows,
              "Best lr of each optimizer in bold (several in bold: a tie at the printed "
              "precision). Largest loss: mean over seeds (max).")
    rep.text("## Summary")
    rep.table(["", A, D], _summary_rows(task, ana))
    rep.text("## Warmup (each optimizer's two best lrs on the pilot seed)")
    rep.text(f"{D}'s first step only stores v (the parameters do not move), so a warmup "
             f"of W steps scales W - 2 of its updates; W is 5 % of the steps, at least "
             f"{MIN_WARMUP_STEPS}.")
    wrows = []
    for o in (task.adam, task.adopt):
        for lr in sorted({c.lr for c in configs if c.optimizer == o and c.warmup_steps}):
            w = _cell(results, o, lr, warmup=True)
            nw = _cell(results, o, lr)
            ws = sorted({c.warmup_steps for c in configs if c.optimizer == o and c.warmup_steps})
            wrows.append([_label(task, o), _lr(lr), ", ".join(map(str, ws)),
                          _fmt(_stats(nw), task.digits), _fmt(_stats(w), task.digits),
                          _early(nw), _early(w)])
    if wrows:
        rep.table(["optimizer", "lr", "warmup steps", f"{task.metric}, no warmup",
                   "with warmup", "largest loss, first 5 %, no warmup", "with warmup"], wrows)
    else:
        rep.text("Not planned yet: waits for the pilot seed's lr sweep.")
    rep.text(f"## β2 and 8-bit state ({D} at its best lr on the pilot seed)")
    brows = []
    b2 = [c for c in configs if c.beta2 == STAGE2_BETA2]
    if b2:
        lr = b2[0].lr
        brows.append([f"β2 {default_beta2(task.adopt)} (default)", _lr(lr),
                      _fmt(_stats(_cell(results, task.adopt, lr)), task.digits),
                      _early(_cell(results, task.adopt, lr))])
        cell = _cell(results, task.adopt, lr, beta2=STAGE2_BETA2)
        brows.append([f"β2 {STAGE2_BETA2}", _lr(lr), _fmt(_stats(cell), task.digits),
                      _early(cell)])
        eb = [c for c in configs if c.optimizer.endswith("-8bit")]
        if eb:
            cell = _cell(results, eb[0].optimizer, lr)
            brows.append(["8-bit state (β2 default)", _lr(lr), _fmt(_stats(cell), task.digits),
                          _early(cell)])
        else:
            brows.append(["8-bit state", _lr(lr), f"not run: {eight_bit[1] or 'not planned'}",
                          ""])
        rep.table(["variant", "lr", task.metric, "largest loss, first 5 %"], brows)
    else:
        rep.text("Not planned yet: waits for the pilot seed's lr sweep."
                 + ("" if eight_bit[0] else f" The 8-bit arm will not run: {eight_bit[1]}."))
    if results:
        _plot(task, title, results, ana, out / task.name, rep)
    rep.write()
    return ana


def _cfg(r: dict) -> Config:
    return Config(**r["config"])


def _summary_rows(task: Task, ana: dict) -> list[list[str]]:
    a, d = ana[task.adam], ana[task.adopt]

    def best(info):
        if info["best"] is None:
            return "n/a", "n/a"
        if info.get("ties"):  # no best lr: say which lrs tie
            tied = [info["lrs_sorted"][i] for i in info["ties"]]
            every = " (every lr)" if len(tied) == len(info["lrs_sorted"]) else ""
            return (f"tie: {', '.join(map(_lr, tied))}{every}",
                    _fmt(info["best_stats"], task.digits))
        edge = " (edge of the grid)" if info["edge"] else ""
        return _lr(info["best_lr"]) + edge, _fmt(info["best_stats"], task.digits)

    (alr, am), (dlr, dm) = best(a), best(d)
    dropin = "n/a" if not a.get("ties") else f"n/a: {_label(task, task.adam)}'s best lr is a tie"
    if "dropin" in ana:
        dropin = _fmt(ana["dropin"], task.digits)
        if math.isfinite(ana.get("dropin_delta", math.nan)):
            dropin += f" ({ana['dropin_delta']:+.{task.digits}f} vs {_label(task, task.adam)})"
    ratio = _factor(ana["ratio"]) if "ratio" in ana else (
        "n/a: a tie" if a.get("ties") or d.get("ties") else "n/a")
    results = ana.get("results", [])
    early, warm = [], []
    for o, info in ((task.adam, a), (task.adopt, d)):
        lr = _warmup_lr(results, info, o)
        if lr is None:
            early.append("n/a")
            warm.append("n/a")
            continue
        early.append(f"{_early(_cell(results, o, lr))} → {_early(_cell(results, o, lr, warmup=True))}"
                     f" (lr {_lr(lr)})")
        warm.append(f"{_fmt(_stats(_cell(results, o, lr, warmup=True)), task.digits)} "
                    f"(lr {_lr(lr)})")
    return [["best lr", alr, dlr], [f"{task.metric} at its best lr", am, dm],
            [f"at {_label(task, task.adam)}'s best lr", am, dropin],
            [f"best lr / {_label(task, task.adam)}'s best lr", "1", ratio],
            ["lr range within 1 % (or 1 std) of its best", _range_txt(a), _range_txt(d)],
            ["largest loss in the first 5 % of steps: no warmup → warmup", *early],
            [f"{task.metric} with warmup", *warm]]


def _warmup_lr(results: list[dict], info: dict, optimizer: str) -> float | None:
    """The lr to compare warmup at: the optimizer's best lr if it has warmup runs there,
    else its warmup lr with the better no-warmup mean."""
    wl = sorted({r["config"]["lr"] for r in _cell(results, optimizer, warmup=True)})
    if not wl:
        return None
    if info.get("best_lr") in wl:
        return info["best_lr"]
    means = dict(zip(info.get("lrs_sorted", []), info.get("means", [])))
    higher = info.get("higher", True)
    return max(wl, key=lambda lr: (math.isfinite(means.get(lr, math.nan)),
                                   (1 if higher else -1) * means.get(lr, 0.0)))


def report(sweep: list[Config], out: Path) -> Path:
    """Each task's report (OUT/<task>/report.md) and the summary over tasks (OUT/report.md);
    works on partial results. Extends ``sweep`` with the stage-2 configs (see :func:`plan`)."""
    sweep = sweep if isinstance(sweep, list) else [sweep]
    out = Path(out)
    eight = eight_bit_status()
    plan(sweep, out, eight[0])
    tasks = list(dict.fromkeys(c.task for c in sweep))
    size = sweep[0].size if sweep else "full"
    missing = _missing_data(tasks, size)
    anas = {t: _task_report(TASKS[t], sweep, out, eight, missing.get(t)) for t in tasks}
    done = sum(a["n_done"] for a in anas.values())
    planned = sum(a["n_planned"] for a in anas.values() if not a["missing"])
    rep = Report(out, "Switching from Adam(W) to ADOPT(W): learning rate, warmup and β2")
    rep.text(f"**Progress: {done} of {planned} planned runs finished** (profile `{size}`)."
             + (f" Not run for missing data: {', '.join(missing)}." if missing else "")
             + ("" if eight[0] else f" 8-bit ADOPT arm not run: {eight[1]}."))
    rep.text("Each task: an lr sweep of Adam(W) and ADOPT(W) at their default betas without "
             "warmup (stage 1), then each optimizer's two best lrs on the pilot seed with a "
             "linear warmup over the first 5 % of steps, ADOPT(W) with β2 0.999 at its best "
             "lr, and 8-bit ADOPT(W) where available (stage 2). Metric: mean ± sample std "
             "over seeds. \"Drop-in\": ADOPT(W) at Adam(W)'s best lr, with its difference "
             "from Adam(W)'s best (positive = higher). The lr range counts the lrs whose "
             "mean is within 1 % of the optimizer's best (or one seed-std of the best "
             "cell, if larger); ≥ means it reaches the end of the grid.")
    rows = []
    for t, ana in anas.items():
        task = TASKS[t]
        if ana["missing"]:
            rows.append([f"[{t}]({t}/report.md)", task.metric, "not run: data missing", *[""] * 6])
            continue
        s = dict(zip(("best", "metric", "dropin", "ratio", "range", "early", "warm"),
                     [(r[1], r[2]) for r in _summary_rows(task, ana)]))
        rows.append([f"[{t}]({t}/report.md)", task.metric,
                     f"{s['best'][0]} / {s['best'][1]}", s["metric"][0], s["metric"][1],
                     s["dropin"][1], s["ratio"][1], f"{s['range'][0]} / {s['range'][1]}",
                     f"{ana['n_done']} / {ana['n_planned']}"])
    rep.table(["task", "metric", "best lr Adam(W) / ADOPT(W)", "Adam(W) at its best",
               "ADOPT(W) at its best", "ADOPT(W) at Adam(W)'s best lr (drop-in)",
               "best-lr ratio ADOPT/Adam", "lr range within 1 %: Adam(W) / ADOPT(W)",
               "runs done / planned"], rows)
    erows = []
    for t, ana in anas.items():
        task, results = TASKS[t], ana["results"]
        for o in (task.adam, task.adopt):
            info = ana[o]
            lr = _warmup_lr(results, info, o)
            if lr is None:
                continue
            erows.append([t, _label(task, o), _lr(lr), _early(_cell(results, o, lr)),
                          _early(_cell(results, o, lr, warmup=True)),
                          _fmt(_stats(_cell(results, o, lr)), task.digits),
                          _fmt(_stats(_cell(results, o, lr, warmup=True)), task.digits)])
    rep.text("## Early instability and warmup")
    if erows:
        rep.table(["task", "optimizer", "lr", "largest loss, first 5 %, no warmup",
                   "with warmup", "final metric, no warmup", "with warmup"], erows,
                  "At the optimizer's best lr (when it is one of its two warmup lrs).")
    else:
        rep.text("No warmup runs have finished yet.")
    return rep.write()


EXPERIMENT = Experiment(
    name="transfer",
    description="switching from Adam(W): lr sweeps, warmup and β2 for Adam(W) vs ADOPT(W) on "
                "MLP, ResNet, GPT (batch 4/16) and VAE",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
)


def main(argv=None) -> int:
    from adoptim.experiments._part2 import main_single_run

    return main_single_run(Config, train, "transfer", ["task", *_KEYS],
                           __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
