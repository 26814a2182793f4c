"""``adoptim bench``: step time of every ADOPT path against torch.optim.Adam and other ADOPTs.

Example (the figures in docs/performance.md)::

    adoptim bench --suites a,b,c --out runs/bench
    adoptim bench --startup            # fresh-process time to the first fused step, cold/warm
    adoptim bench --memory             # bytes/param and peak memory of real training runs

Suites (all float32, one parameter list each):
  a: 20 tensors of 1M elements;
  b: the parameter shapes of GPT-2 small (148 tensors, 124.4M elements);
  c: 2,000 tensors of 1,000 elements.

Every optimizer in a suite steps the same parameters and gradients in one process, in
``--rounds`` interleaved rounds (each round builds every optimizer afresh and times
``--repeats`` steps of it, then drops it; each round starts one optimizer later), so that a
slow minute on a shared machine, or running right after a given neighbour, hits all of them
alike. The table reports ratios of medians (over all rounds' steps) to
``torch.optim.Adam(fused=True)`` measured in the same run, because absolute times on a shared
machine move by 2x between runs. Effective GB/s counts
28 bytes per parameter (read theta, g, m, v; write theta, m, v), the traffic of a single pass,
and 16 for the 8-bit rows (one byte each for m and v; their scales add 1/32). "state B/param"
is the optimizer's state (every tensor it holds) over the number of parameters; "all-in
B/param" adds the parameters and their gradients: weights + gradients + state + master-weight
correction (which lives in the state), what a step holds per parameter (float32 ADOPT: 16).
The ``adopt-bf16-*`` rows step the suite's values rounded to bf16 (bf16 gradients), with 8-bit
state, without and with the 24-bit master-weight correction (``master_weight_bits=24``; 10 and
12 bytes of traffic per parameter), on the fused C++ kernel (which joins and splits the master
weight in registers) and on the unfused foreach/for-loop paths, as their names say.
Peak memory is the largest rise of the process's resident memory above what it was before the
optimizer existed, sampled every millisecond: state plus the step's temporaries.

``--device cuda`` times the same suites on a GPU (each step synchronised; ``adopt-fused`` and
``adopt-8bit-fused`` are the Triton kernels there, peak memory is the device's), with GB/s also as a percentage of the
card's peak bandwidth where it is known (or given with ``--peak-gbps``).

Peers are timed when installed (never required): ``torch-adopt`` (imports as ``adopt``), timm's
``Adopt`` (loaded from ``timm/optim/adopt.py``, because ``import timm`` needs torchvision), and
``pytorch_optimizer.ADOPT``. ``pip install "adoptim[bench]"`` installs torch-adopt and
pytorch_optimizer (and the 8-bit optimizers of torchao and bitsandbytes); timm goes in with
``pip install --no-deps timm``, since its torchvision requirement would replace a CPU torch
with another build. A peer that is missing is skipped with the command that installs it.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adoptim._extras import install_command, missing
from adoptim.tools.sizes import state_bytes, tensor_bytes

__all__ = ["OPTIMIZERS", "SUITES", "add_arguments", "figure", "run", "suite_shapes", "suite_title"]

BYTES_PER_PARAM = 28  # 4 float32 reads + 3 writes
BYTES_PER_PARAM_8BIT = 16  # theta and g as float32, one byte each for m and v, read and written
# bf16 theta (r+w 4), bf16 g (2), 8-bit m and v (r+w 4), and the 24-bit correction (int8, r+w 2)
BYTES_PER_PARAM_BF16_8BIT = 10
BYTES_PER_PARAM_BF16_ECC24_8BIT = 12


# --------------------------------------------------------------------------------------------
# Suites


def _gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M) as nanoGPT builds it: tied embedding, 12 blocks, final LayerNorm."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),  # ln_1
            (d, 3 * d),
            (3 * d,),  # attn.c_attn
            (d, d),
            (d,),  # attn.c_proj
            (d,),
            (d,),  # ln_2
            (d, 4 * d),
            (4 * d,),  # mlp.c_fc
            (4 * d, d),
            (d,),  # mlp.c_proj
        ]
    return shapes + [(d,), (d,)]  # ln_f


SUITES: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "a": ("20 x 1M", lambda: [(1_000_000,)] * 20),
    "b": ("GPT-2 small", _gpt2_small_shapes),
    "c": ("2000 x 1k", lambda: [(1_000,)] * 2000),
}


def _count(n: int) -> str:
    """124.4M, 20.0k, 999."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def suite_title(suite: str, scale: float, tensors: int, params: int) -> str:
    """``"20 x 1M"``, or with ``--scale``: ``"20 x 1M at scale 0.001: 20 tensors, 20.0k
    params"`` (the name alone would misstate what was timed)."""
    name = SUITES[suite][0]
    if scale == 1.0:
        return name
    return f"{name} at scale {scale:g}: {tensors:,} tensors, {_count(params)} params"


def suite_shapes(suite: str, scale: float = 1.0) -> list[tuple[int, ...]]:
    """The suite's shapes, each dimension's product scaled by ``scale`` (for quick runs)."""
    shapes = SUITES[suite][1]()
    if scale == 1.0:
        return shapes
    return [(max(1, round(torch.Size(s).numel() * scale)),) for s in shapes]


# --------------------------------------------------------------------------------------------
# Optimizers


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    available: Callable[[], str | None] = lambda: None  # reason it cannot run, or None
    traffic: int = BYTES_PER_PARAM  # bytes per parameter per step, for GB/s
    dtype: torch.dtype = torch.float32  # the parameters' (and gradients') dtype


BENCH_EXTRA = 'pip install "adoptim[bench]"'
# timm requires torchvision, whose wheel pins its own torch build; the bench needs neither
TIMM_INSTALL = "pip install --no-deps timm"


def _module_missing(module: str, package: str | None = None,
                    install: str = BENCH_EXTRA) -> Callable[[], str | None]:
    """A check saying that ``package`` (the name pip knows; default ``module``, the name it
    imports as) is missing and how to install it."""

    def check() -> str | None:
        if importlib.util.find_spec(module):
            return None
        return f"{package or module} is not installed ({install})"

    return check


def _timm_adopt() -> type:
    """timm's Adopt without ``import timm`` (which needs torchvision): load timm/optim as a
    bare package so that only adopt.py and its two helper modules run."""
    name = "_adoptim_bench_timm_optim"
    if name not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.origin is None:
            raise ImportError("timm is not installed")
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(os.path.dirname(spec.origin), "optim")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.adopt").Adopt


def _fused_unavailable() -> str | None:
    from adoptim.kernels.cpu import launch as _cpu_kernel

    return _cpu_kernel.unsupported_reason()


def _adopt(**kw: Any) -> Callable:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        from adoptim import ADOPT

        return ADOPT(params, **kw)

    return make


def _master_unavailable() -> str | None:
    """Why ``ADOPT(master_weight_bits=...)`` cannot run here (an older adoptim), or None."""
    import inspect

    from adoptim import ADOPT

    if "master_weight_bits" not in inspect.signature(ADOPT).parameters:
        return "this adoptim has no ADOPT(master_weight_bits=...)"
    return None


def _fused_master_unavailable() -> str | None:
    """Why the fused kernel cannot take master-weight corrections here, or None."""
    return _master_unavailable() or _fused_unavailable()


def _torch_adopt(foreach: bool) -> Callable:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        import adopt

        return adopt.ADOPT(params, foreach=foreach)

    return make


def _timm(foreach: bool) -> Callable:
    # clip_exp=0.25: the paper's schedule (timm defaults to 1/3; the cost is the same).
    return lambda params: _timm_adopt()(params, clip_exp=0.25, foreach=foreach)


def _torchao_adamw8bit(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(params)


def _bnb_adam8bit(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    import bitsandbytes

    return bitsandbytes.optim.Adam8bit(params)


def _timm_missing() -> str | None:
    return _module_missing("timm", install=TIMM_INSTALL)()


OPTIMIZERS: list[Entry] = [
    Entry("adam-fused", lambda p: torch.optim.Adam(p, fused=True)),
    Entry("adam-foreach", lambda p: torch.optim.Adam(p, foreach=True)),
    Entry("adam-forloop", lambda p: torch.optim.Adam(p, foreach=False)),
    Entry("adam-default", lambda p: torch.optim.Adam(p)),
    Entry("adopt-fused", _adopt(fused=True), _fused_unavailable),
    Entry("adopt-foreach", _adopt(foreach=True, fused=False)),
    Entry("adopt-forloop", _adopt(foreach=False, fused=False)),
    Entry("adopt-default", _adopt()),
    Entry("torch-adopt-forloop", _torch_adopt(False), _module_missing("adopt", "torch-adopt")),
    Entry("torch-adopt-foreach", _torch_adopt(True), _module_missing("adopt", "torch-adopt")),
    # 8-bit state (tensors under 4,096 elements keep float32 state in all three)
    Entry("adopt-8bit-fused", _adopt(fused=True, state_dtype="8bit"), _fused_unavailable,
          traffic=BYTES_PER_PARAM_8BIT),
    Entry("adopt-8bit-forloop", _adopt(foreach=False, fused=False, state_dtype="8bit"),
          traffic=BYTES_PER_PARAM_8BIT),
    Entry("adopt-8bit-foreach", _adopt(foreach=True, fused=False, state_dtype="8bit"),
          traffic=BYTES_PER_PARAM_8BIT),  # the default for 8-bit state on CUDA
    Entry("torchao-adamw8bit", _torchao_adamw8bit, _module_missing("torchao"),
          traffic=BYTES_PER_PARAM_8BIT),
    # bf16 parameters and gradients (the suite's values rounded to bf16), 8-bit state, without
    # and with the 24-bit master-weight correction, fused (the C++ kernel takes the
    # correction; on CUDA the Triton kernel does not yet: that row is skipped there) and on
    # the unfused Python paths (named in the row).
    Entry("adopt-bf16-8bit-fused", _adopt(fused=True, state_dtype="8bit"), _fused_unavailable,
          traffic=BYTES_PER_PARAM_BF16_8BIT, dtype=torch.bfloat16),  # no correction: kernel
    Entry("adopt-bf16-8bit-foreach", _adopt(foreach=True, fused=False, state_dtype="8bit"),
          traffic=BYTES_PER_PARAM_BF16_8BIT, dtype=torch.bfloat16),
    Entry("adopt-bf16-ecc24-8bit-fused",
          _adopt(fused=True, state_dtype="8bit", master_weight_bits=24),
          _fused_master_unavailable, traffic=BYTES_PER_PARAM_BF16_ECC24_8BIT,
          dtype=torch.bfloat16),
    Entry("adopt-bf16-ecc24-8bit-foreach",
          _adopt(foreach=True, fused=False, state_dtype="8bit", master_weight_bits=24),
          _master_unavailable, traffic=BYTES_PER_PARAM_BF16_ECC24_8BIT, dtype=torch.bfloat16),
    Entry("adopt-bf16-ecc24-8bit-forloop",
          _adopt(foreach=False, fused=False, state_dtype="8bit", master_weight_bits=24),
          _master_unavailable, traffic=BYTES_PER_PARAM_BF16_ECC24_8BIT, dtype=torch.bfloat16),
    Entry("bnb-adam8bit", _bnb_adam8bit, _module_missing("bitsandbytes"),
          traffic=BYTES_PER_PARAM_8BIT),
    Entry("timm-forloop", _timm(False), _timm_missing),
    Entry("timm-foreach", _timm(True), _timm_missing),
    Entry(
        "pytorch_optimizer",
        lambda p: importlib.import_module("pytorch_optimizer").ADOPT(p),
        _module_missing("pytorch_optimizer"),
    ),
]


# --------------------------------------------------------------------------------------------
# Measuring


class _PeakRSS:
    """Largest resident set size seen while active, sampled every millisecond (Linux)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _time_one(
    entry: Entry, params: list[torch.Tensor], warmup: int, repeats: int
) -> dict[str, Any]:
    """One round for one optimizer: build it, take the first step, ``warmup`` untimed steps
    and ``repeats`` timed ones; its step times, first-step time and peak memory."""
    gc.collect()
    cuda = bool(params) and params[0].device.type == "cuda"
    # On CUDA a step only queues kernels: wait for them, and count device memory.
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        device_base = torch.cuda.memory_allocated()
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        opt = entry.make(params)
        opt.step()  # creates the state
        sync()
        first = time.perf_counter() - t0
        if entry.name.startswith("adopt-") and not cuda:
            from adoptim.kernels.cpu import build as _kernel_cache

            # Time the kernel, not the for-loop stand-in that runs while it builds.
            kernel = ("adopt-fused", "adopt-default", "adopt-8bit-fused",
                      "adopt-bf16-8bit-fused", "adopt-bf16-ecc24-8bit-fused")
            if entry.name in kernel and _fused_unavailable() is None:
                _kernel_cache.load_kernel(wait=True)
        for _ in range(warmup):
            opt.step()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - t)
    if cuda:
        mem.peak, mem.base = torch.cuda.max_memory_allocated(), device_base
    numel = sum(p.numel() for p in params)
    n_state = state_bytes(opt)  # the master-weight correction lives in the state
    seen: set = set()
    held = sum(tensor_bytes(p, seen) for p in params) + sum(
        tensor_bytes(p.grad, seen) for p in params if p.grad is not None)
    del opt
    gc.collect()
    peak = (mem.peak - mem.base) / 2**20 if mem.peak else None
    return {
        "times_s": times,
        "peak_mb": peak,
        "first_step_s": first,
        "state_bytes_per_param": n_state / numel if numel else None,
        # weights + gradients + state (+ correction): what the step holds per parameter
        "all_in_bytes_per_param": (held + n_state) / numel if numel else None,
    }


def _summarise(
    rounds: list[dict[str, Any]], numel: int, traffic: int = BYTES_PER_PARAM
) -> dict[str, Any]:
    """One optimizer's rounds as one result: the median over every timed step of every
    round, the first step of the first round (the only one that may load or build code), and
    the largest peak memory."""
    times = [t for r in rounds for t in r["times_s"]]
    median = statistics.median(times)
    peaks = [r["peak_mb"] for r in rounds if r["peak_mb"] is not None]
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "round_medians_s": [statistics.median(r["times_s"]) for r in rounds],
        "gb_per_s": traffic * numel / median / 1e9,
        "bytes_per_param": traffic,
        "state_bytes_per_param": rounds[0].get("state_bytes_per_param"),
        "all_in_bytes_per_param": rounds[0].get("all_in_bytes_per_param"),
        "peak_mb": max(peaks) if peaks else None,
        "first_step_s": rounds[0]["first_step_s"],
    }


def _make_params(
    shapes: list[tuple[int, ...]], seed: int, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def _cast_params(params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``params`` (and their gradients) as new leaf tensors of ``dtype``."""
    out = []
    for p in params:
        q = p.detach().to(dtype).requires_grad_()
        q.grad = p.grad.to(dtype)
        out.append(q)
    return out


def _unavailable(entry: Entry, device: torch.device) -> str | None:
    """Why ``entry`` cannot run on ``device``, or None (on CUDA, adopt-fused and
    adopt-8bit-fused are the Triton kernels)."""
    if device.type == "cuda" and entry.name in ("adopt-fused", "adopt-8bit-fused",
                                                "adopt-bf16-ecc24-8bit-fused"):
        from adoptim.kernels.triton import launch as _triton_kernel

        return _triton_kernel.unsupported_reason([torch.empty(0, device=device)])
    return entry.available()


# Peak memory bandwidth (GB/s) of cards the GB/s column is compared with (vendor figures);
# --peak-gbps gives it for others.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "A100-SXM4-80GB": 2039.0,
             "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "MI300X": 5300.0}  # fmt: skip


def device_peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_GBPS.items():
        if key.lower() in name.lower() or key.replace(" ", "").lower() in name.lower():
            return value
    return None


def run_suite(
    suite: str,
    entries: list[Entry],
    *,
    warmup: int,
    repeats: int,
    rounds: int = 1,
    scale: float = 1.0,
    seed: int = 0,
    progress: Any = None,
    device: str | torch.device = "cpu",
    peak_gbps: float | None = None,
) -> dict[str, Any]:
    device = torch.device(device)
    shapes = suite_shapes(suite, scale)
    params = _make_params(shapes, seed, device)
    numel = sum(p.numel() for p in params)
    by_dtype = {torch.float32: params}  # other dtypes: the same values, rounded, made once
    skipped = {e.name: {"skipped": reason} for e in entries if (reason := _unavailable(e, device))}
    timed: dict[str, list[dict[str, Any]]] = {e.name: [] for e in entries if e.name not in skipped}
    for round_index in range(rounds):
        # Each round starts one entry later, so that no optimizer always runs right after
        # the same neighbour (caches, memory reuse) or first in the suite.
        shift = round_index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            if progress is not None:
                progress.set_description(f"{suite}: {entry.name} ({round_index + 1}/{rounds})")
            if entry.name in timed:
                if entry.dtype not in by_dtype:
                    by_dtype[entry.dtype] = _cast_params(params, entry.dtype)
                try:
                    timed[entry.name].append(
                        _time_one(entry, by_dtype[entry.dtype], warmup, repeats))
                except Exception as exc:  # noqa: BLE001 - a peer failing should not end the run
                    skipped[entry.name] = {"skipped": f"failed: {exc!r}"[:300]}
                    del timed[entry.name]
            if progress is not None:
                progress.update(1)
    results = {
        e.name: skipped[e.name]
        if e.name in skipped
        else _summarise(timed[e.name], numel, e.traffic)
        for e in entries
    }
    base = results.get("adam-fused", {}).get("median_s")
    for res in results.values():
        if "median_s" in res:
            res["ratio_to_adam_fused"] = res["median_s"] / base if base else None
            if peak_gbps:
                res["pct_of_peak_bandwidth"] = 100.0 * res["gb_per_s"] / peak_gbps
    return {
        "suite": suite,
        "device": str(device),
        "peak_gbps": peak_gbps,
        "title": suite_title(suite, scale, len(shapes), numel),
        "scale": scale,
        "tensors": len(shapes),
        "params": numel,
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for s in report["suites"]:
        lines.append(
            f"\n({s['suite']}) {SUITES[s['suite']][0]}"
            + (f" at scale {s['scale']:g}" if s.get("scale", 1.0) != 1.0 else "")
            + f": {s['tensors']} tensors, {_count(s['params'])} params (float32; the "
              "adopt-bf16-* rows: the same values in bf16)"
            + (f" on {s['device']}" if s.get("device", "cpu") != "cpu" else "")
            + (f" (peak bandwidth {s['peak_gbps']:.0f} GB/s)" if s.get("peak_gbps") else "")
        )
        pct = bool(s.get("peak_gbps"))  # GB/s as a percentage of the card's peak
        lines.append(
            f"| {'optimizer':<20} | {'median ms':>9} | {'x adam-fused':>12} | {'GB/s':>6} "
            f"| {'peak MB':>8} | {'state B/param':>13} | {'all-in B/param':>14} "
            f"| {'first step s':>12} |"
            + (" % peak |" if pct else "")
        )
        lines.append(f"|{'-' * 22}|{'-' * 11}:|{'-' * 13}:|{'-' * 7}:|{'-' * 9}:|{'-' * 14}:"
                     f"|{'-' * 15}:|{'-' * 13}:|" + ("-------:|" if pct else ""))  # fmt: skip
        for name, r in s["results"].items():
            if "skipped" in r:
                lines.append(f"| {name:<20} | skipped: {r['skipped']}")
                continue
            ratio = r.get("ratio_to_adam_fused")
            peak = r.get("peak_mb")
            ms = r["median_s"] * 1e3
            lines.append(
                f"| {name:<20} | {(f'{ms:.1f}' if ms >= 10 else f'{ms:.3f}'):>9} | "
                f"{(f'{ratio:.2f}x' if ratio else '-'):>12} | {r['gb_per_s']:>6.1f} | "
                f"{(f'{peak:.0f}' if peak is not None else '-'):>8} | "
                f"{(f'{sb:.2f}' if (sb := r.get('state_bytes_per_param')) else '-'):>13} | "
                f"{(f'{ab:.2f}' if (ab := r.get('all_in_bytes_per_param')) else '-'):>14} | "
                f"{r['first_step_s']:>12.2f} |"
                + (f" {r.get('pct_of_peak_bandwidth', 0):>5.1f}% |" if pct else "")
            )
    return "\n".join(lines)


def figure(report: dict[str, Any]):
    """The bench plot: one panel per suite, step time / fused Adam per optimizer."""
    import textwrap

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = report["suites"]
    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4.5), squeeze=False)
    for ax, s in zip(axes[0], suites):
        rows = [
            (n, r["ratio_to_adam_fused"])
            for n, r in s["results"].items()
            if r.get("ratio_to_adam_fused")
        ]
        names = [n for n, _ in rows]
        ratios = [v for _, v in rows]
        colors = ["tab:orange" if n.startswith("adopt-") else "tab:gray" for n in names]
        # Each bar runs from fused Adam (1x) to the optimizer's ratio, and says the ratio: on
        # a log axis a bar from the left edge would make a 10% gap look like a factor of 5.
        ax.barh(names, [v - 1 for v in ratios], left=1, color=colors)
        for y, v in enumerate(ratios):
            # past the bar's end for slower ones; right of the 1x line for faster ones (left
            # of their bar the label would run into the optimizer names on a wide axis)
            ax.text(max(v, 1.0), y, f" {v:.2f}x", va="center", ha="left", fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        lo, hi = min([*ratios, 1.0]) / 1.6, max([*ratios, 1.0]) * 1.6  # room for the labels
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if lo <= t <= hi]
        if len(ticks) > 6:  # a wide range (the unfused bf16 rows): every other power of 4
            ticks = [t for t in ticks if t in (0.25, 1, 4, 16, 64, 256)]
        if len(ticks) < 3:  # a narrow range: finer ticks
            ticks = [t for t in (0.5, 0.67, 0.8, 1, 1.25, 1.5, 2) if lo <= t <= hi]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_yaxis()
        # the suite as timed (scaled or not), wrapped to the panel's width
        ax.set_title(textwrap.fill(f"({s['suite']}) {s['title']}", 45), fontsize=10)
        ax.set_xlabel("median step time / fused Adam (log)")
    # wrapped to the figure's width: one 5-inch panel holds about 60 characters
    head = "TOO SMALL TO MEAN ANYTHING (see warnings in bench.json): " if report.get(
        "warnings") else ""
    fig.suptitle(textwrap.fill(f"{head}adoptim bench, {report['machine']}", 60 * len(suites)),
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Start-up: a fresh process to its first fused step, with a cold and a warm kernel cache


def _startup_child(suite: str, scale: float, which: str, spawned_at: float) -> None:
    """Run in a fresh process: step ADOPT(fused=True) until the kernel has run once (or take
    one torch.optim.Adam(fused=True) step, for comparison); print the times as JSON."""
    t_start = time.perf_counter()
    from adoptim import ADOPT
    from adoptim.kernels.cpu import build as _kernel_cache

    params = _make_params(suite_shapes(suite, scale), 0)
    t_params = time.perf_counter()
    if which == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, fused=True)
    else:
        opt = ADOPT(params, fused=True)
    opt.step()
    first = time.perf_counter()
    first_wall = time.time()
    steps = 1
    if which != "adam":
        while not _kernel_cache.is_loaded() and time.perf_counter() - first < 600:
            opt.step()
            steps += 1
        if not _kernel_cache.is_loaded():
            raise RuntimeError("the fused kernel was not ready after 600 s")
        # A step loads a newly built kernel as it starts, so the step that left it loaded
        # ran it (and with a warm cache the constructor loaded it: the first step ran it).
    done = time.perf_counter()
    result = {
        "from_spawn_to_first_step_s": first_wall - spawned_at,
        "from_spawn_to_kernel_step_s": first_wall - spawned_at + (done - first),
        "imports_and_params_s": t_params - t_start,
        "first_step_s": first - t_params,
        "steps_until_kernel_ran": steps,
    }
    print(json.dumps(result))


def measure_startup(suite: str = "b", scale: float = 1.0) -> dict[str, Any]:
    """Fresh processes: ADOPT(fused=True) with a cold extension cache (the kernel is built
    meanwhile), then a warm one, then torch.optim.Adam(fused=True) for comparison."""
    out: dict[str, Any] = {"suite": suite}
    with tempfile.TemporaryDirectory(prefix="adoptim-bench-cache-") as cache:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache)
        for label, which in (("adopt cold", "adopt"), ("adopt warm", "adopt"), ("adam", "adam")):
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "adoptim.tools.bench",
                    "--startup-child",
                    suite,
                    str(scale),
                    which,
                    repr(time.time()),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["process_s"] = time.perf_counter() - t0
            out[label] = res
            if label == "adopt cold":
                from adoptim.kernels.cpu import build as _kernel_cache

                # The detached builder may still be copying; wait for the published library.
                key_dir = Path(cache) / "adoptim_fused" / _kernel_cache._cache_key()
                for _ in range(6000):
                    if (key_dir / "adoptim_fused.so").exists() and not (
                        key_dir / "building.pid"
                    ).exists():
                        break
                    time.sleep(0.1)
    return out


def format_startup(s: dict[str, Any]) -> str:
    lines = [
        f"\nFresh process (suite {s['suite']}): seconds from spawning the process to the end of",
        "its first step, and to the end of the first step that ran the fused kernel:",
        (
            f"| {'run':<10} | {'to 1st step':>11} | {'to 1st kernel step':>18} | "
            f"{'making params':>14} | {'1st step alone':>14} | {'steps':>5} |"
        ),
        f"|{'-' * 12}|{'-' * 12}:|{'-' * 19}:|{'-' * 15}:|{'-' * 15}:|{'-' * 6}:|",
    ]
    for label in ("adopt cold", "adopt warm", "adam"):
        r = s[label]
        lines.append(
            f"| {label:<10} | {r['from_spawn_to_first_step_s']:>11.2f} | "
            f"{r['from_spawn_to_kernel_step_s']:>18.2f} | {r['imports_and_params_s']:>14.2f} | "
            f"{r['first_step_s']:>14.2f} | {r['steps_until_kernel_ran']:>5} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, refused unless > 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # every help text ends with its default, as `adoptim bench --help` shows it
    parser.add_argument(
        "--suites", default="a,b,c",
        help="comma-separated: a (20 x 1M), b (GPT-2 small), c (2000 x 1k); '' for none "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--optimizers",
        default="*",
        help="comma-separated names or patterns (adam-*, adopt-fused, ...); adam-fused is always "
        f"added as the baseline. Known: {', '.join(e.name for e in OPTIMIZERS)} "
        "(default: %(default)s, all)",
    )
    parser.add_argument("--repeats", type=_positive(int), default=5,
                        help="timed steps per optimizer in each round (default: %(default)s)")
    parser.add_argument("--warmup", type=_non_negative_int, default=2,
                        help="untimed steps after the first, in each round (default: %(default)s)")
    parser.add_argument("--rounds", type=_positive(int), default=3,
                        help="interleaved rounds: each builds every optimizer afresh and times "
                             "it; medians are over all rounds' steps (default: %(default)s)")
    parser.add_argument(
        "--scale", type=_positive(float), default=1.0,
        help="multiply every tensor's size by this, > 0 (e.g. 0.01 to try; the plot and table "
        "say so) (default: %(default)s)",
    )
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu",
                        help="where the parameters live: cpu, cuda, cuda:1; on CUDA each step "
                             "is synchronised and adopt-fused is the Triton kernel "
                             "(default: %(default)s)")
    parser.add_argument("--peak-gbps", type=_positive(float), default=None,
                        help="the device's peak memory bandwidth, to report GB/s as a "
                             "percentage of it (default: known for H100/H200/A100/MI300X)")
    parser.add_argument("--out", default="runs/bench",
                        help="folder for bench.json and bench.png (default: %(default)s)")
    parser.add_argument(
        "--startup",
        action="store_true",
        help="also time a fresh process to its first fused step on suite b, cold and warm cache "
        "(default: off)",
    )
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a "
                             "terminal)")
    from adoptim.tools import memory

    memory.add_arguments(parser)


def _select(patterns: str) -> list[Entry]:
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unknown = [w for w in wanted if not any(fnmatch.fnmatch(e.name, w) for e in OPTIMIZERS)]
    if unknown:
        raise SystemExit(f"unknown optimizer(s): {', '.join(unknown)}")
    chosen = [e for e in OPTIMIZERS if any(fnmatch.fnmatch(e.name, w) for w in wanted)]
    if not any(e.name == "adam-fused" for e in chosen):
        chosen.insert(0, OPTIMIZERS[0])
    return chosen


# Below these a bench's ratios say nothing (it still runs: tiny runs are how the tests, and a
# first try with --scale 0.01, check that the command works; it says so, loudly, instead).
MIN_TIMED_STEPS = 10  # per optimizer, --repeats x --rounds: the defaults give 15
# fused Adam's median step: below this, per-call overhead (Python, dispatch, the timer), not
# memory traffic, sets the step time, and ratios of such times do not carry over to the
# suites' sizes (at scale 1 the smallest suite's step takes tens of ms here)
MIN_BASELINE_STEP_S = 2e-3


def settings_warnings(repeats: int, rounds: int, scale: float) -> list[str]:
    """What makes a run too small to mean anything, known before it starts."""
    out = []
    if repeats * rounds < MIN_TIMED_STEPS:
        out.append(f"each median is over only {repeats * rounds} timed step(s) per optimizer "
                   f"(--repeats {repeats} x --rounds {rounds}); on a shared machine single "
                   f"steps move by 2x: use at least {MIN_TIMED_STEPS} (the defaults give 15)")
    if scale < 1.0:
        out.append(f"--scale {scale:g}: the suites are shrunk, so the ratios are not the "
                   "suites' (small tensors weigh per-call overhead, not memory traffic)")
    return out


def result_warnings(report: dict[str, Any]) -> list[str]:
    """What makes a finished run's ratios meaningless: a baseline step too short to time."""
    out = []
    for s in report["suites"]:
        base = s["results"].get("adam-fused", {}).get("median_s")
        if base is not None and base < MIN_BASELINE_STEP_S:
            out.append(f"({s['suite']}) {s['title']}: fused Adam's step took {base * 1e3:.2f} ms, "
                       f"under {MIN_BASELINE_STEP_S * 1e3:g} ms: overhead, not the step's "
                       "memory traffic, decides these ratios")
    return out


def _print_warnings(warns: list[str]) -> None:
    if warns:
        print("\nWARNING: this run is too small for its ratios to mean anything:", flush=True)
        for w in warns:
            print(f"  - {w}", flush=True)


def run(args: argparse.Namespace) -> int:
    # torch-adopt 0.1.0 calls a deprecated torch helper on every step.
    warnings.filterwarnings("ignore", message=".*torch._utils.is_compiling.*")

    if args.memory:  # a different measurement: fresh training processes (tools/memory.py)
        from adoptim.tools import memory

        return memory.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    entries = _select(args.optimizers)
    machine = (
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA GPU is visible")
        machine += f", {torch.cuda.get_device_name(device)}"
    peak_gbps = args.peak_gbps or device_peak_gbps(device)
    print(f"adoptim bench: {machine}", flush=True)
    report: dict[str, Any] = {
        "machine": machine,
        "command": "adoptim bench " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["bench"]
        else "adoptim bench",
        "args": vars(args),
        "bytes_per_param": BYTES_PER_PARAM,
        "suites": [],
    }
    if min(args.repeats, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("--repeats and --rounds must be >= 1, --warmup >= 0")
    warns = settings_warnings(args.repeats, args.rounds, args.scale) if suites else []
    _print_warnings(warns)  # before the run too, so that it can be stopped
    total = len(suites) * len(entries) * args.rounds
    # a bar only on a terminal (in a log its carriage returns garble the lines), and only with
    # tqdm, which is in the experiments and bench extras, not in the core package
    bar_off = args.no_progress or not sys.stderr.isatty() or bool(missing(["tqdm"]))
    if bar_off:
        progress_bar: Any = contextlib.nullcontext(None)
    else:
        from tqdm import tqdm

        progress_bar = tqdm(total=total, leave=False)
    with progress_bar as bar:
        for suite in suites:
            report["suites"].append(
                run_suite(
                    suite,
                    entries,
                    warmup=args.warmup,
                    repeats=args.repeats,
                    rounds=args.rounds,
                    scale=args.scale,
                    progress=bar,
                    device=device,
                    peak_gbps=peak_gbps,
                )
            )
            gc.collect()
    print(format_table(report), flush=True)
    warns += result_warnings(report)
    report["warnings"] = warns
    _print_warnings(warns)
    if args.startup:
        report["startup"] = measure_startup("b", args.scale)
        print(format_startup(report["startup"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    written = [out / "bench.json"]
    if report["suites"] and missing(["matplotlib"]):
        print("\nno plot: matplotlib is not installed (it comes with the experiments and bench "
              f"extras: {install_command('experiments')})")
    elif report["suites"]:
        plot(report, out / "bench.png")
        written.append(out / "bench.png")
    print(f"\nwrote {' and '.join(str(w) for w in written)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--startup-child":
        _startup_child(sys.argv[2], float(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
    else:
        from adoptim.tools.cli import main

        sys.exit(main(["bench", *sys.argv[1:]]))
