"""How far bf16 weights drift from float32 master weights over many small ADOPT updates.

Every configuration takes the same 10**4 steps of ``ADOPT`` (the for-loop path) from the same
bf16 start with the same bf16 gradients: a fixed per-element drift plus unit noise, at a
learning rate whose updates are far below half a bf16 ulp of the weights (about 1e-4 of a
weight near 1, where half an ulp is 2**-9 to 2**-8). The reference is the same run with
float32 parameters. Printed: the stored weight's error against it (master weight where there
is one), as a fraction of how far the float32 weights moved, and the fraction of elements
that never moved.

    PYTHONPATH=src python scripts/master_weights.py [--steps 10000] [--numel 16384]

Rows: plain bf16 (round to nearest: stalls), bf16 with stochastic rounding, 24-bit master
weights (this library's default: stochastic on the 24-bit grid; and, for comparison, the
same rounded to nearest), 32-bit master weights (float32 exactly).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from adoptim import ADOPT
from adoptim.formats import master as M


def run(cfg: dict, steps: int, numel: int, lr: float, nearest24: bool = False):
    gen = torch.Generator().manual_seed(0)
    start = (1 + torch.rand(numel, generator=gen)).to(torch.bfloat16)  # weights in [1, 2)
    drift = 0.5 * torch.randn(numel, generator=gen)
    dtype = cfg.pop("dtype", torch.bfloat16)
    p = torch.nn.Parameter(start.to(dtype))
    opt = ADOPT([p], lr=lr, foreach=False, fused=False, **cfg)
    saved = M.step_dither
    if nearest24:  # the 24-bit master rounded to nearest even instead of stochastically
        M.step_dither = lambda *a: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.UpdateStallWarning)
            for _ in range(steps):
                g = drift + torch.randn(numel, generator=gen)
                p.grad = g.to(torch.bfloat16).to(dtype)
                opt.step()
    finally:
        M.step_dither = saved
    return M.stored_value(p, opt.state[p].get(M.STATE_KEY)), start.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--numel", type=int, default=16_384)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-6])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {args.steps} steps, {args.numel} elements in [1, 2)")
    for lr in args.lr:
        t0 = time.perf_counter()
        ref, start = run({"dtype": torch.float32}, args.steps, args.numel, lr)
        moved = (ref - start).abs()
        rows = {
            "plain bf16 (nearest)": ({}, False),
            "bf16 + stochastic rounding": ({"stochastic_rounding": True}, False),
            "bf16 + 24-bit correction (stochastic, default)": ({"master_weight_bits": 24}, False),
            "bf16 + 24-bit correction, nearest (not used)": ({"master_weight_bits": 24}, True),
            "bf16 + 32-bit correction": ({"master_weight_bits": 32}, False),
        }
        print(f"\nlr = {lr:g}: float32 weights moved by {moved.mean():.3g} on average")
        print("| configuration | mean abs error | max abs error | error / movement | never moved |")
        print("|---|---|---|---|---|")
        for name, (cfg, nearest) in rows.items():
            got, _ = run(dict(cfg), args.steps, args.numel, lr, nearest24=nearest)
            err = (got - ref).abs()
            still = (got == start).float().mean().item()
            print(
                f"| {name} | {err.mean():.3g} | {err.max():.3g} | "
                f"{(err.mean() / moved.mean()).item():.2%} | {still:.1%} |"
            )
        print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
