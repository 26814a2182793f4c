"""A gradient spike without global gradient clipping: why gradient release is safe for ADOPT.

Gradient release (:func:`adoptim.enable_gradient_release`) steps each parameter while
backward is still running, so no moment sees all gradients and a global gradient-norm clip
(``torch.nn.utils.clip_grad_norm_``) cannot be applied. What protects a run from one bad
batch then? ADOPT clips each element of the normalised gradient at ``c_t = t**0.25``, so
``|m| <= c_t`` and no element moves by more than ``lr * c_t`` on any step, whatever the
gradient. This script measures it.

Problem: a noisy quadratic in ``DIM`` dimensions, ``f(theta) = 0.5 * sum(a * (theta - 1)**2)``
with per-element curvatures ``a`` log-uniform in [0.1, 10] and Gaussian gradient noise. After
``t0`` ordinary steps one gradient is multiplied by ``SPIKE`` (a corrupt batch), then
``AFTER`` ordinary steps follow. Each optimizer runs twice on the same gradients, with and
without the spike; the table gives, in units of ``lr``:

* ``spike step``: the largest move of one element on the spike step;
* ``later steps``: the largest move of one element on any of the ``AFTER`` steps after it
  (the spike is in ``m`` for ~10 of them);
* the loss ratio spiked/control ``AFTER`` steps later: without a global clip the spike
  also enters ``v``, which then shrinks the following updates (Adam and ADOPT alike).

    python -m adoptim.experiments.release_spike            # t0 = 100, 1000, 10000
    python -m adoptim.experiments.release_spike --t0 100   # one t0, quick
"""

from __future__ import annotations

import argparse
import math

import torch

import adoptim

DIM = 1024
SPIKE = 1e6
AFTER = 50
LR = 1e-3
BETAS = (0.9, 0.9999)


def _run(kind: str, t0: int, spike: bool, seed: int = 0) -> tuple[list[torch.Tensor], float]:
    gen = torch.Generator().manual_seed(seed)
    curv = torch.exp(torch.empty(DIM).uniform_(math.log(0.1), math.log(10.0), generator=gen))
    theta = torch.nn.Parameter(torch.zeros(DIM))
    handle = None
    if kind.startswith("ADOPT"):
        clip = None if kind == "ADOPT, no clip" else 0.25
        opt = adoptim.ADOPT(
            [theta], lr=LR, betas=BETAS, clip_lambda=clip, foreach=False, fused=False
        )
        handle = adoptim.enable_gradient_release([theta], opt)  # no global clip possible
    else:
        opt = torch.optim.Adam([theta], lr=LR, betas=BETAS, foreach=False)
    last_norm = None
    trace = []
    for t in range(t0 + 1 + AFTER):
        noise = torch.randn(DIM, generator=gen)
        scale = SPIKE if (spike and t == t0) else 1.0
        loss = 0.5 * (curv * (theta - 1.0) ** 2).sum() + (noise * theta).sum()
        (scale * loss).backward()
        if kind == "Adam + global clip":
            # the usual remedy: clip the global norm at twice the previous step's norm
            norm = theta.grad.norm().item()
            if last_norm is not None:
                torch.nn.utils.clip_grad_norm_([theta], 2.0 * last_norm)
            last_norm = min(norm, 2.0 * last_norm) if last_norm is not None else norm
        opt.step()
        opt.zero_grad()
        if t >= t0 - 1:
            trace.append(theta.detach().clone())
    if handle is not None:
        handle.remove()
    final_loss = 0.5 * (curv * (theta.detach() - 1.0) ** 2).sum().item()
    return trace, final_loss


KINDS = ("ADOPT (release)", "ADOPT, no clip", "Adam", "Adam + global clip")


def measure(t0: int) -> list[dict]:
    rows = []
    for kind in KINDS:
        spiked, loss_s = _run(kind, t0, spike=True)
        _, loss_c = _run(kind, t0, spike=False)
        step = (spiked[1] - spiked[0]).abs().max().item() / LR
        later = max((b - a).abs().max().item() for a, b in zip(spiked[1:], spiked[2:])) / LR
        rows.append(
            {"t0": t0, "optimizer": kind, "c_t": t0**0.25, "spike step": step,
             "later steps": later, "loss ratio": loss_s / loss_c}
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t0", type=int, nargs="*", default=[100, 1000, 10000])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"dim {DIM}, spike x{SPIKE:g} at step t0, lr {LR}, betas {BETAS}, {AFTER} steps after")
    print(
        "| t0 | optimizer | c_t = t0^0.25 | spike step / lr | largest later step / lr | loss ratio |"
    )
    print("|---|---|---|---|---|---|")
    for t0 in args.t0:
        for r in measure(t0):
            print(
                f"| {r['t0']} | {r['optimizer']} | {r['c_t']:.2f} | {r['spike step']:.3g} | "
                f"{r['later steps']:.3g} | {r['loss ratio']:.3g} |"
            )


if __name__ == "__main__":
    main()
