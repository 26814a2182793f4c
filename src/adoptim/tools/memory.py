"""``adoptim bench --memory``: what a training run holds per parameter, measured.

Each configuration trains the byte-level GPT of :mod:`adoptim.experiments.gpt`, scaled up to
50.5M parameters (16 blocks, width 512), for a few real steps (forward, backward, optimizer
step) in a **fresh process**, and reports:

* **persistent bytes, exact**: the storage of the parameters and of every tensor in
  ``optimizer.state`` (moments, 8-bit codes and scales, step counters, the master-weight
  correction), each storage counted once;
* **gradient peak, exact**: the largest number of bytes held by ``.grad`` tensors at once,
  sampled in a post-accumulate-grad hook on every parameter (registered before gradient
  release's own hooks, so it sees each gradient before release frees it) and right before
  ``opt.step()``; without release that is every gradient, with release a tensor or two;
* **all-in bytes/param** = (weights + optimizer state + correction + gradient peak) / number
  of parameters: the issue-19 figure (float32 ADOPT 16; the targets: bf16 + 24-bit correction
  + 8-bit state <= 7.1, and with gradient release <= 5.1);
* **peak RSS** (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of the whole process minus
  that of a bare process (the same imports and data, no model), and minus that of a process
  that builds the model in the same dtype but does not train; with the ratio to float32
  ADOPT. The forward and backward use 16 tokens (batch 1), so activations are a few MB and
  the difference between configurations is the weights, gradients and state.

torch has no CPU allocator statistics (``torch.cuda.max_memory_allocated`` has no CPU twin),
hence exact tensor bytes for what is kept and the process's peak for everything else. The
bf16 configurations run the forward/backward in bfloat16 (real bf16 matrix products); on a
CPU without AVX512-BF16 they are about 20x slower than float32, which is why a step here is
short. Configurations that need a feature this adoptim lacks (``master_weight_bits``,
``enable_gradient_release``) or a package that is missing (torchao) are skipped with the
reason.

    adoptim bench --memory                 # every configuration, about 5 min on 2 cores
    adoptim bench --memory --memory-configs adopt-fp32,adopt-bf16-ecc24-8bit-release
    python -m adoptim.tools.memory --child adopt-fp32 --steps 3   # one, JSON on stdout
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CONFIGS", "MODEL", "MemoryConfig", "format_table", "measure", "run_all",
           "unavailable"]

#: the model measured: the byte-level GPT at 50.5M parameters (a 64-byte context; each step
#: uses 16 of it, batch 1)
MODEL = {"n_layer": 16, "n_head": 8, "n_embd": 512, "block_size": 64}
TOKENS = 16
TARGETS = {"adopt-bf16-ecc24-8bit": 7.1, "adopt-bf16-ecc24-8bit-release": 5.1}


@dataclass(frozen=True)
class MemoryConfig:
    name: str
    label: str
    dtype: str = "float32"  # the parameters' dtype
    kwargs: dict[str, Any] = field(default_factory=dict)  # ADOPT(...) keywords
    autocast: bool = False  # forward under torch.autocast("cpu", bfloat16)
    release: bool = False  # adoptim.enable_gradient_release
    optimizer: str = "adopt"  # adopt, or torchao-adamw8bit (a peer)


CONFIGS: list[MemoryConfig] = [
    MemoryConfig("adopt-fp32", "float32 ADOPT"),
    MemoryConfig("adopt-amp", "float32 master weights + bf16 autocast (mixed precision)",
                 autocast=True),
    MemoryConfig("adopt-bf16", "bf16 params, float32 state (state_dtype auto)", "bfloat16"),
    MemoryConfig("adopt-fp32-8bit", "float32 params, 8-bit state", "float32",
                 {"state_dtype": "8bit"}),
    MemoryConfig("adopt-bf16-sr-8bit", "bf16 params + stochastic rounding, 8-bit state",
                 "bfloat16", {"state_dtype": "8bit", "stochastic_rounding": True}),
    MemoryConfig("adopt-bf16-ecc24-8bit", "bf16 params + 24-bit correction, 8-bit state",
                 "bfloat16", {"state_dtype": "8bit", "master_weight_bits": 24}),
    MemoryConfig("adopt-bf16-ecc24-8bit-release",
                 "bf16 + 24-bit correction, 8-bit state, gradient release", "bfloat16",
                 {"state_dtype": "8bit", "master_weight_bits": 24}, release=True),
    MemoryConfig("torchao-adamw8bit", "torchao AdamW8bit (peer), float32 params",
                 optimizer="torchao-adamw8bit"),
]
BY_NAME = {c.name: c for c in CONFIGS}


def unavailable(cfg: MemoryConfig) -> str | None:
    """Why ``cfg`` cannot run with this adoptim/install, or None."""
    import importlib.util

    import adoptim

    if "master_weight_bits" in cfg.kwargs and \
            "master_weight_bits" not in inspect.signature(adoptim.ADOPT).parameters:
        return "this adoptim has no ADOPT(master_weight_bits=...) yet"
    if cfg.release and not hasattr(adoptim, "enable_gradient_release"):
        return "this adoptim has no adoptim.enable_gradient_release yet"
    if cfg.optimizer == "torchao-adamw8bit" and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    return None


# ----------------------------------------------------------------------------- in the child
def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _storage_bytes(tensors, seen: set) -> int:
    from adoptim.tools.sizes import tensor_bytes

    return sum(tensor_bytes(t, seen) for t in tensors)


def measure(name: str, steps: int = 3, seed: int = 0) -> dict[str, Any]:
    """Run configuration ``name`` in this process (meant to be a fresh one) and return its
    figures. ``name`` may also be ``bare`` (imports and data only) or ``model-float32`` /
    ``model-bfloat16`` (build the model, no training): the baselines."""
    import torch

    from adoptim.experiments.gpt import GPT, Args

    torch.set_num_threads(1)  # one thread: per-thread scratch buffers are the same everywhere
    torch.manual_seed(seed)
    data = torch.randint(0, 256, (steps, 1, TOKENS + 1))  # the same bytes for every config
    out: dict[str, Any] = {"name": name, "steps": steps, "tokens": TOKENS}
    if name == "bare":
        out["peak_rss_bytes"] = _maxrss_bytes()
        return out
    if name.startswith("model-"):
        dtype = getattr(torch, name.split("-", 1)[1])
        cfg = None
    else:
        cfg = BY_NAME[name]
        dtype = getattr(torch, cfg.dtype)
        why = unavailable(cfg)
        if why:
            return {**out, "skipped": why}
    # Build the model directly in its dtype: a float32 build cast to bf16 would leave a
    # float32 copy's worth in the process's peak.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = GPT(Args(**MODEL))
    finally:
        torch.set_default_dtype(previous)
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    out.update(params=numel, dtype=str(dtype).replace("torch.", ""))
    if cfg is None:
        out["peak_rss_bytes"] = _maxrss_bytes()
        return out

    if cfg.optimizer == "torchao-adamw8bit":
        from torchao.optim import AdamW8bit

        opt = AdamW8bit(params, lr=1e-4)
    else:
        from adoptim import ADOPT

        opt = ADOPT(params, lr=1e-4, **cfg.kwargs)

    grad_peak = [0]

    def sample(_=None, *args, **kwargs) -> None:
        live = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
        grad_peak[0] = max(grad_peak[0], live)

    # registered before release's hooks, so that each gradient is seen before it is freed
    handles = [p.register_post_accumulate_grad_hook(sample) for p in params]
    handles.append(opt.register_step_pre_hook(lambda o, a, k: sample()))
    release = None
    if cfg.release:
        import adoptim

        release = adoptim.enable_gradient_release(params, opt)
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.autocast
           else torch.autocast("cpu", enabled=False))
    step_times = []
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = data[i, :, :-1], data[i, :, 1:]
        opt.zero_grad(set_to_none=True)
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
    sample()
    seen: set = set()
    weights = _storage_bytes(params, seen)
    correction = _storage_bytes(
        [s["master_correction"] for s in opt.state.values() if "master_correction" in s], seen)
    from adoptim.tools.sizes import state_bytes

    state_all = state_bytes(opt)  # includes the correction, which lives in the state
    out.update(
        weights_bytes=weights,
        state_bytes=state_all - correction,
        correction_bytes=correction,
        grad_peak_bytes=grad_peak[0],
        persistent_bytes=weights + state_all,
        all_in_bytes=weights + state_all + grad_peak[0],
        peak_rss_bytes=_maxrss_bytes(),
        step_seconds=step_times,
        loss=float(loss.detach()),
    )
    if release is not None:
        release.remove()
    for h in handles:
        h.remove()
    return out


# ----------------------------------------------------------------------------- the parent
def _child(name: str, steps: int) -> dict[str, Any]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the adoptim this process imported
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "adoptim.tools.memory", "--child", name,
                           "--steps", str(steps)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"name": name, "skipped": "failed: " + proc.stderr.strip()[-400:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.time() - t0
    return res


def run_all(names: list[str] | None = None, steps: int = 3, progress: bool = True
            ) -> dict[str, Any]:
    """Every configuration (or ``names``) in its own fresh process, plus the baselines."""
    names = names or [c.name for c in CONFIGS]
    results: dict[str, Any] = {}
    for name in ["bare", "model-float32", "model-bfloat16", *names]:
        if progress:
            print(f"[memory] {name} ...", flush=True)
        results[name] = _child(name, steps)
    bare = results["bare"].get("peak_rss_bytes", 0)
    base = results.get("adopt-fp32", {})
    for name in names:
        r = results[name]
        if "skipped" in r:
            continue
        n = r["params"]
        built = results[f"model-{r['dtype']}"].get("peak_rss_bytes", 0)
        r["rss_over_bare_bytes"] = r["peak_rss_bytes"] - bare
        r["rss_over_model_bytes"] = r["peak_rss_bytes"] - built
        for key in ("weights", "state", "correction", "grad_peak", "persistent", "all_in"):
            r[f"{key}_per_param"] = r[f"{key}_bytes"] / n
        if "rss_over_bare_bytes" in base:
            r["rss_ratio_to_fp32"] = r["rss_over_bare_bytes"] / base["rss_over_bare_bytes"]
        if name in TARGETS:
            r["target_all_in_per_param"] = TARGETS[name]
            r["meets_target"] = r["all_in_per_param"] <= TARGETS[name]
    return {"model": dict(MODEL, tokens_per_step=TOKENS, batch=1), "steps": steps,
            "results": results}


def format_table(report: dict[str, Any], markdown: bool = True) -> str:
    res = report["results"]
    first = next((r for r in res.values() if "params" in r), {})
    lines = [f"GPT {report['model']['n_layer']} x {report['model']['n_embd']}, "
             f"{first.get('params', 0) / 1e6:.1f}M parameters, {report['steps']} steps of "
             f"{report['model']['tokens_per_step']} tokens, each configuration in a fresh "
             "process.", "",
             "| configuration | weights | grads (peak live) | state | correction | "
             "**all-in B/param** | target | peak RSS over bare process (MB) | over built "
             "model (MB) | RSS ratio to float32 ADOPT | s/step |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for c in CONFIGS:
        r = res.get(c.name)
        if r is None:
            continue
        if "skipped" in r:
            lines.append(f"| {c.label} | skipped: {r['skipped']} |||||||||")
            continue
        target = r.get("target_all_in_per_param")
        tgt = "" if target is None else (
            f"<= {target}: {'met' if r['meets_target'] else '**missed**'}")
        ratio = r.get("rss_ratio_to_fp32")
        secs = sorted(r["step_seconds"])[len(r["step_seconds"]) // 2]
        lines.append(
            f"| {c.label} | {r['weights_per_param']:.2f} | {r['grad_peak_per_param']:.3f} | "
            f"{r['state_per_param']:.3f} | {r['correction_per_param']:.2f} | "
            f"**{r['all_in_per_param']:.2f}** | {tgt} | {r['rss_over_bare_bytes'] / 2**20:.0f} | "
            f"{r['rss_over_model_bytes'] / 2**20:.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {secs:.1f} |")
    return "\n".join(lines)


def figure(report: dict[str, Any]):
    """Stacked bars of the all-in bytes per parameter, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(c, report["results"][c.name]) for c in CONFIGS
            if c.name in report["results"] and "all_in_per_param" in report["results"][c.name]]
    fig, ax = plt.subplots(figsize=(9.5, 0.55 * len(rows) + 2.4))
    parts = [("weights_per_param", "weights", "tab:blue"),
             ("grad_peak_per_param", "gradients (peak live)", "tab:orange"),
             ("state_per_param", "optimizer state", "tab:green"),
             ("correction_per_param", "master-weight correction", "tab:purple")]
    for y, (_, r) in enumerate(rows):
        left = 0.0
        for key, label, color in parts:
            ax.barh(y, r[key], left=left, color=color, label=label if y == 0 else None)
            left += r[key]
        end = left
        if "target_all_in_per_param" in r:
            t = r["target_all_in_per_param"]
            ax.plot([t, t], [y - 0.4, y + 0.4], color="k", lw=2)
            end = max(end, t)
        ax.text(end + 0.15, y, f"{left:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [c.label for c, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes per parameter, all in (black ticks: the issue-19 targets)")
    ax.set_xlim(0, max([18.0] + [sum(r[k] for k, _, _ in parts) + 2 for _, r in rows]))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    ax.grid(alpha=0.3, axis="x")
    n = next((r["params"] for _, r in rows), 0)
    ax.set_title(f"Training memory per parameter, measured\n(byte-level GPT, {n / 1e6:.1f}M "
                 "params, CPU, each configuration in a fresh process)", fontsize=10)
    fig.tight_layout()
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``adoptim bench`` adds for ``--memory``."""
    parser.add_argument("--memory", action="store_true",
                        help="instead of step times: bytes per parameter and peak memory of "
                             "a training run, each configuration in a fresh process "
                             "(default: off)")
    parser.add_argument("--memory-configs", default="*",
                        help="with --memory, comma-separated configurations; known: "
                             f"{', '.join(c.name for c in CONFIGS)} (default: %(default)s, all)")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="with --memory, training steps per process (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import fnmatch

    wanted = [w.strip() for w in args.memory_configs.split(",") if w.strip()]
    names = [c.name for c in CONFIGS if any(fnmatch.fnmatch(c.name, w) for w in wanted)]
    unknown = [w for w in wanted if not any(fnmatch.fnmatch(c.name, w) for c in CONFIGS)]
    if unknown or not names:
        raise SystemExit(f"unknown memory configuration(s): {', '.join(unknown) or wanted}")
    if args.memory_steps < 1:
        raise SystemExit("--memory-steps must be >= 1")
    report = run_all(names, args.memory_steps, progress=not args.no_progress)
    report["command"] = "adoptim bench " + " ".join(sys.argv[2:]) \
        if sys.argv[1:2] == ["bench"] else "adoptim bench --memory"
    table = format_table(report)
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "memory.md").write_text(table + "\n")
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {out / 'memory.json'}, {out / 'memory.md'} and {out / 'memory.png'}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one memory configuration (a child process)")
    p.add_argument("--child", required=True)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(measure(a.child, a.steps)))
