"""Choose the 8-bit moment format by measurement: ADOPT's moment dynamics with quantized m or v
against a float32 run on the same gradients.

    python scripts/lowbit_format.py --steps 20000 --out docs/lowbit

For each candidate code/rounding, 16 blocks x 256 elements run ADOPT's m and v updates
(``n = clip(g / max(sqrt(v_prev), eps), t**0.25)``, ``m = beta1*m + (1-beta1)*n``,
``v = beta2*v + (1-beta2)*g*g``), dequantizing before and requantizing after every step;
a float32 run on the same gradients is the reference. Candidates for v run with float32 m
and candidates for m with the chosen v, so each error is its own. Gradients:
``g = sigma_i * (xi + 0.1)``, with per-element scales ``sigma_i = exp(1.5 * N(0,1))``
(``--spread``, default 1: sqrt(v) inside a block spans ~300x), in two scenarios:

* ``stationary``: the same distribution throughout;
* ``large-first``: the first gradient is 100x larger, so v starts 10^4x too large and must
  decay by ~0.01 %/step at beta2 = 0.9999 (the case that freezes v under nearest rounding).

Reported at the end (and every ``--every`` steps in the JSON): v's median and 99th-percentile
elementwise relative error, m's relative RMS error ``||m_q - m||/||m||``, and the fraction of
nonzero v stored as 0.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from adoptim.formats import blockwise8 as _quant

BLOCK = _quant.BLOCK


# ------------------------------------------------------------------------------------------
# Candidate codes. Each is (quantize(x, seed) -> state, dequantize(state) -> x).


def _blocks(x):
    return x.view(-1, BLOCK)


def _dither(seed, n, gen):
    return torch.rand(n, generator=gen)


def linear_unsigned(levels, power, rounding):
    """x stored as code q with x = X * (q/levels)**power per block (X = block max of x).
    power 1 on v: linear v; power 0.5: linear sqrt(v) (x = v, q ~ sqrt(v)); rounding
    'nearest', 'code' (stochastic in the code) or 'value' (stochastic, unbiased in x)."""

    def quant(x, gen):
        xb = _blocks(x)
        xmax = xb.amax(dim=1, keepdim=True)
        safe = torch.where(xmax > 0, xmax, torch.ones_like(xmax))
        y = levels * (xb / safe) ** (1 / power) if power != 1 else levels * xb / safe
        if rounding == "nearest":
            q = torch.round(y)
        elif rounding == "code":
            q = torch.floor(y + torch.rand(y.shape, generator=gen))
        else:
            lo = torch.floor(y).clamp(0, levels - 1)
            x_lo = safe * (lo / levels) ** power
            x_hi = safe * ((lo + 1) / levels) ** power
            up = torch.rand(y.shape, generator=gen) * (x_hi - x_lo) < xb - x_lo
            q = lo + up.float()
        q = q.clamp(0, levels)
        return q, xmax

    def deq(state):
        q, xmax = state
        return (xmax * (q / levels) ** power).reshape(-1)

    return quant, deq


def dynamic_map(signed: bool) -> torch.Tensor:
    """A dynamic-tree-style map (Dettmers et al. 2021, sec. 2): after the sign bit, the count
    of leading zero bits is a decimal exponent, the first 1 bit an indicator, and the
    remaining bits a linear fraction in (0.1, 1]. Written from the paper's description."""
    bits = 7 if signed else 8
    values = [0.0, 1.0]
    for e in range(bits):
        frac_bits = bits - 1 - e
        n = 2**frac_bits
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        values += ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (-e)).tolist()
    pos = torch.tensor(sorted(set(values)), dtype=torch.float64)
    if signed:
        pos = torch.cat([-pos.flip(0)[:-1], pos])
    return pos.float()


def with_map(table, rounding, signed):
    """x / block absmax mapped to the nearest table entry, or stochastically (unbiased in x)."""

    def quant(x, gen):
        xb = _blocks(x)
        amax = xb.abs().amax(dim=1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        y = (xb / safe).clamp(table[0], table[-1])
        hi = torch.searchsorted(table, y.contiguous()).clamp(1, len(table) - 1)
        lo = hi - 1
        t_lo, t_hi = table[lo], table[hi]
        if rounding == "nearest":
            idx = torch.where(y - t_lo < t_hi - y, lo, hi)
        else:
            up = torch.rand(y.shape, generator=gen) * (t_hi - t_lo) < y - t_lo
            idx = torch.where(up, hi, lo)
        return idx, amax

    def deq(state):
        idx, amax = state
        return (table[idx] * amax).reshape(-1)

    return quant, deq


def linear_signed(levels, rounding):
    def quant(x, gen):
        xb = _blocks(x)
        amax = xb.abs().amax(dim=1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        y = levels * xb / safe
        if rounding == "nearest":
            q = torch.round(y)
        else:
            q = torch.floor(y + torch.rand(y.shape, generator=gen))
        return q.clamp(-levels, levels), amax

    def deq(state):
        q, amax = state
        return (amax * q / levels).reshape(-1)

    return quant, deq


def chosen_v():
    """The library's format (adoptim.formats.blockwise8): v^(1/4) linear, unbiased in v, no zero code."""
    counter = [0]

    def quant(x, gen):
        counter[0] += 1
        codes = torch.empty(x.numel(), dtype=torch.uint8)
        scale = torch.empty(_quant.num_blocks(x.numel()))
        _quant.quantize_v(x, int(torch.randint(0, 2**31, (), generator=gen)), codes, scale)
        return codes, scale

    return quant, lambda st: _quant.dequantize_v(*st)


def chosen_m():
    def quant(x, gen):
        codes = torch.empty(x.numel(), dtype=torch.int8)
        scale = torch.empty(_quant.num_blocks(x.numel()))
        _quant.quantize_m(x, int(torch.randint(0, 2**31, (), generator=gen)), codes, scale)
        return codes, scale

    return quant, lambda st: _quant.dequantize_m(*st)


CHOSEN_V = "chosen: adoptim.formats.blockwise8 (v^(1/4) linear, unbiased in v, no zero code, Weyl dither)"
V_CANDIDATES = {
    "v linear, nearest": linear_unsigned(255, 1, "nearest"),
    "v linear, stochastic": linear_unsigned(255, 1, "value"),
    "v dynamic map, nearest": with_map(dynamic_map(False), "nearest", False),
    "v dynamic map, stochastic (unbiased in v)": with_map(dynamic_map(False), "value", False),
    "sqrt(v) linear, nearest": linear_unsigned(255, 2, "nearest"),
    "sqrt(v) linear, stochastic unbiased in v": linear_unsigned(255, 2, "value"),
    "v^(1/4) linear, nearest": linear_unsigned(255, 4, "nearest"),
    "v^(1/4) linear, stochastic in the code": linear_unsigned(255, 4, "code"),
    "v^(1/4) linear, stochastic unbiased in v": linear_unsigned(255, 4, "value"),
    CHOSEN_V: chosen_v(),
}
M_CANDIDATES = {
    "m linear, nearest": linear_signed(127, "nearest"),
    "m linear, stochastic": linear_signed(127, "stochastic"),
    "m dynamic map, nearest": with_map(dynamic_map(True), "nearest", True),
    "m dynamic map, stochastic": with_map(dynamic_map(True), "value", True),
    "chosen: adoptim.formats.blockwise8 (m linear, stochastic, Weyl dither)": chosen_m(),
}


# ------------------------------------------------------------------------------------------


def simulate(scenario, beta2, steps, every, blocks=16, spread=1.0, beta1=0.9, eps=1e-6, seed=0):
    n = blocks * BLOCK
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.exp(spread * torch.randn(n, generator=gen)) * 1e-3
    arms = {}
    for name, codec in V_CANDIDATES.items():
        arms[name] = {"kind": "v", "codec": codec}
    for name, codec in M_CANDIDATES.items():
        arms[name] = {"kind": "m", "codec": codec}
    v_chosen = V_CANDIDATES[CHOSEN_V]
    rgen = torch.Generator().manual_seed(seed + 1)  # rounding randomness
    m_ref = torch.zeros(n)
    v_ref = torch.zeros(n)
    for arm in arms.values():
        arm.update(m=None, v=None, history=[])
    for t in range(steps):
        g = sigma * (torch.randn(n, generator=gen) + 0.1)
        if t == 0 and scenario == "large-first":
            g = g * 100
        # float32 reference
        if t == 0:
            v_ref = g * g
        else:
            nrm = (g / v_ref.sqrt().clamp(min=eps)).clamp(-(t**0.25), t**0.25)
            m_ref = beta1 * m_ref + (1 - beta1) * nrm
            v_ref = beta2 * v_ref + (1 - beta2) * g * g
        for arm in arms.values():
            vq, vdq = arm["codec"] if arm["kind"] == "v" else v_chosen
            if arm["kind"] == "m":
                mq, mdq = arm["codec"]
            if t == 0:
                v = g * g
                m = torch.zeros(n)
            else:
                v = vdq(arm["v"])
                m = mdq(arm["m"]) if arm["kind"] == "m" else arm["m"]
                nrm = (g / v.sqrt().clamp(min=eps)).clamp(-(t**0.25), t**0.25)
                m = beta1 * m + (1 - beta1) * nrm
                v = beta2 * v + (1 - beta2) * g * g
            arm["v"] = vq(v, rgen)
            arm["m"] = mq(m, rgen) if arm["kind"] == "m" else m
            if (t + 1) % every == 0 or t + 1 == steps:
                vd = vdq(arm["v"])
                md = mdq(arm["m"]) if arm["kind"] == "m" else arm["m"]
                rel = ((vd - v_ref).abs() / v_ref).float()
                arm["history"].append(
                    {
                        "step": t + 1,
                        "v_median_rel_err": rel.median().item(),
                        "v_p99_rel_err": rel.quantile(0.99).item(),
                        "v_mean_signed_rel_err": ((vd - v_ref) / v_ref).mean().item(),
                        "m_rel_rms_err": ((md - m_ref).norm() / m_ref.norm()).item(),
                        "v_zero_for_nonzero": ((vd == 0) & (v_ref > 0)).float().mean().item(),
                    }
                )
    return {name: arm["history"] for name, arm in arms.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--spread", type=float, default=1.0,
                    help="per-element gradient scales exp(spread * N(0,1))")
    ap.add_argument("--out", default="runs/lowbit_format")
    ap.add_argument("--plot-only", action="store_true", help="replot OUT/format.json")
    args = ap.parse_args()
    if args.plot_only:
        saved = json.loads((Path(args.out) / "format.json").read_text())
        plot(saved["results"], Path(args.out) / "format.png")
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for scenario in ("stationary", "large-first"):
        for beta2 in (0.999, 0.9999):
            t0 = time.time()
            key = f"{scenario}, beta2={beta2}"
            results[key] = simulate(
                scenario, beta2, args.steps, args.every, args.blocks, args.spread
            )
            print(f"{key}: {time.time() - t0:.0f} s", flush=True)
    (out / "format.json").write_text(json.dumps({"args": vars(args), "results": results}))
    lines = []
    for key, arms in results.items():
        lines.append(f"\n{key}, after {args.steps} steps:\n")
        lines.append("| candidate | v median rel err | v p99 rel err | v mean signed err | "
                     "m rel RMS err | nonzero v stored as 0 |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, hist in arms.items():
            h = hist[-1]
            lines.append(
                f"| {name} | {h['v_median_rel_err']:.2%} | {h['v_p99_rel_err']:.2%} | "
                f"{h['v_mean_signed_rel_err']:+.2%} | {h['m_rel_rms_err']:.2%} | "
                f"{h['v_zero_for_nonzero']:.3%} |"
            )
    table = "\n".join(lines)
    (out / "format.md").write_text(table + "\n")
    print(table)
    plot(results, out / "format.png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 7.5), squeeze=False)
    for col, (key, arms) in enumerate(results.items()):
        for name, hist in arms.items():
            steps = [h["step"] for h in hist]
            chosen = name.startswith("chosen")
            style = dict(lw=2.2 if chosen else 1.0, color="k" if chosen else None)
            if name in V_CANDIDATES:
                axes[0][col].plot(steps, [max(h["v_median_rel_err"], 1e-5) for h in hist],
                                  label=name, **style)
            else:
                axes[1][col].plot(steps, [h["m_rel_rms_err"] for h in hist], label=name, **style)
        axes[0][col].set_title(key, fontsize=9)
        axes[0][col].set_yscale("log")
        axes[1][col].set_yscale("log")
        axes[0][col].set_ylabel("v: median |v_q - v| / v")
        axes[1][col].set_ylabel("m: ||m_q - m|| / ||m||")
        axes[1][col].set_xlabel("step")
    axes[0][0].legend(fontsize=6, loc="upper left")
    axes[1][0].legend(fontsize=6, loc="upper left")
    fig.suptitle("8-bit moment formats vs float32 ADOPT (blocks of 256; gradient scales "
                 "exp(spread * N(0,1)))")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
