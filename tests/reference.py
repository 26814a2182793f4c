"""A float64 reference for ADOPT, written to be read side by side with the algorithm.

It follows /shared/notes/algorithm.md (and the README) line by line, one tensor at a time,
with Python branches and no in-place tricks, so that it can be checked by eye. Every path of
the library is compared with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Hyper:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.9999
    eps: float = 1e-6
    clip: Callable[[int], float] | None = field(default=lambda t: t**0.25)
    weight_decay: float = 0.0
    decouple: bool = False
    maximize: bool = False
    nesterov: bool = False
    caution: bool = False


@dataclass
class _TensorState:
    s: int = 0  # number of earlier calls on which this tensor had a gradient
    m: Tensor | None = None
    v: Tensor | None = None


def as_real(t: Tensor) -> Tensor:
    """Real and imaginary parts as separate real coordinates."""
    return torch.view_as_real(t) if torch.is_complex(t) else t


class ReferenceADOPT:
    """ADOPT on float64 copies of some tensors; ``step`` takes one gradient (or None) each."""

    def __init__(self, tensors: list[Tensor], hypers: list[Hyper]) -> None:
        self.theta = [as_real(t.detach()).to(torch.float64).clone() for t in tensors]
        self.hypers = hypers
        self.state = [_TensorState() for _ in tensors]

    def step(self, grads: list[Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is None:  # no gradient: nothing happens to this tensor, its count included
                continue
            h, st, theta = self.hypers[i], self.state[i], self.theta[i]
            g = as_real(g).to(torch.float64)
            if h.maximize:
                g = -g
            if h.weight_decay != 0 and not h.decouple:
                g = g + h.weight_decay * theta
            if st.s == 0:
                st.v = g * g
                st.m = torch.zeros_like(g)
                st.s = 1
                continue
            t = st.s
            if h.weight_decay != 0 and h.decouple:
                theta = theta * (1 - h.lr * h.weight_decay)
            n = g / torch.clamp(torch.sqrt(st.v), min=h.eps)
            if h.clip is not None:
                c = h.clip(t)
                n = torch.clamp(n, -c, c)
            st.m = h.beta1 * st.m + (1 - h.beta1) * n
            u = st.m
            if h.nesterov:  # look one momentum step ahead (optax's ADOPT, nesterov=True)
                u = h.beta1 * st.m + (1 - h.beta1) * n
            if h.caution:  # Liang et al. 2024: drop coordinates whose sign disagrees with g
                mask = (u * g > 0).to(u.dtype)
                u = u * mask / max(mask.mean().item(), 1e-3)
            theta = theta - h.lr * u
            st.v = h.beta2 * st.v + (1 - h.beta2) * g * g
            st.s = t + 1
            self.theta[i] = theta
