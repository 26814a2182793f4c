"""AdaShift (Zhou et al., ICLR 2019), the baseline in the ADOPT paper's MNIST experiment.

Reference: Z. Zhou, Q. Zhang, G. Lu, H. Wang, W. Zhang, Y. Yu. "AdaShift: Decorrelation and
Convergence of Adaptive Learning Rate Methods." ICLR 2019. https://arxiv.org/abs/1810.00143

Variant implemented: the paper's Algorithm 3 (temporal shift with block-wise spatial
operation), with the moving-window first moment, one block per parameter tensor, and the bias
correction of v that the authors' public code applies. Per parameter tensor, with gradient
g_t on call t = 1, 2, ...::

    t <= n:   store g_t; no update (the first n calls only fill the window)
    t >  n:   m_t = sum_{i=0}^{n-1} beta1^i g_{t-i} / sum_{i=0}^{n-1} beta1^i   (last n gradients)
              v_t = beta2 v_{t-1} + (1 - beta2) phi(g_{t-n}^2)    (v_n = 0; the shifted gradient,
                                                                  which m_t does not contain)
              theta -= lr * m_t / (sqrt(v_t / (1 - beta2^(t-n))) + eps)

``phi`` is the spatial operation: ``"max"`` (the paper's choice: the maximum of g^2 over the
block, a scalar per tensor) or ``None`` (element-wise, no spatial operation). Defaults are the
paper's: n = 10, betas = (0.9, 0.999), phi = max, eps = 1e-10. Decorrelation: v_t uses
g_{t-n}, which is independent of g_t for i.i.d. sampling, and m_t never includes g_{t-n}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["AdaShift"]


class AdaShift(Optimizer):
    """AdaShift: Adam with the second moment built from the gradient ``n`` steps back.

    Args:
        params: parameters or param-group dicts.
        lr: step size (default 1e-3).
        betas: (beta1 for the window weights, beta2 for v), each in [0, 1) (default (0.9, 0.999)).
        n: temporal shift = window length of the first moment, >= 1 (default 10).
        phi: spatial operation on g^2 per tensor: ``"max"`` (default), ``"mean"`` or ``None``
            (element-wise).
        eps: added to the denominator (default 1e-10).
        weight_decay: L2 penalty added to the gradient (default 0).

    State per parameter: ``step`` (calls so far), ``grads`` (the last n gradients, oldest
    first, a (n, *shape) ring buffer with ``head`` pointing at the oldest), ``exp_avg_sq`` (v).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 n: int = 10, phi: str | None = "max", eps: float = 1e-10,
                 weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if int(n) != n or n < 1:
            raise ValueError(f"Invalid shift n: {n} (an integer >= 1)")
        if phi not in ("max", "mean", None):
            raise ValueError(f"Invalid phi: {phi!r} (use 'max', 'mean' or None)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"Invalid eps ({eps}) or weight_decay ({weight_decay})")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "n": int(n), "phi": phi,
                                  "eps": eps, "weight_decay": weight_decay})

    @staticmethod
    def _phi(x: torch.Tensor, phi: str | None) -> torch.Tensor:
        if phi == "max":
            return x.max()
        if phi == "mean":
            return x.mean()
        return x

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            n = group["n"]
            # window weights beta1^i for g_{t-i}, i = 0..n-1, normalised to sum to 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaShift does not support sparse gradients")
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["grads"] = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
                    state["head"] = 0  # index of the oldest stored gradient
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, grads, head = state["step"], state["grads"], state["head"]
                if t <= n:  # fill the window: slot t-1 holds g_t
                    grads[t - 1].copy_(g)
                    continue
                shifted = grads[head].clone()  # g_{t-n}, leaving the window
                grads[head].copy_(g)  # g_t takes its slot; the oldest is now at head + 1
                state["head"] = (head + 1) % n
                # m_t: slot s holds g_{t-i} with i = (head - s) mod n, weighted beta1^i / sum
                w = [beta1 ** ((head - s) % n) for s in range(n)]
                w = torch.tensor(w, dtype=p.dtype, device=p.device) / sum(w)
                m = torch.tensordot(w, grads, dims=1)
                v = state["exp_avg_sq"]
                v.mul_(beta2).add_(self._phi(shifted * shifted, group["phi"]), alpha=1 - beta2)
                bias_correction = 1 - beta2 ** (t - n)
                denom = (v / bias_correction).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"])
        return loss
