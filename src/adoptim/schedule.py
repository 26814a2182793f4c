"""The per-tensor schedule: the clip bound c_t and the other scalars that depend on how many
calls each tensor has seen.

Every path (for-loop, foreach, the kernels) takes its per-tensor scalars from
:func:`call_scalars`, so the schedule (and ADOPT's special first call) is written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_CLIP", "ClipSpec", "PowerClip", "call_scalars", "split_clip"]

ClipSpec = float | Callable[[Any], Any] | None


class PowerClip:
    """The clip schedule ``c_t = t ** exponent`` (the paper's is ``t ** 0.25``).

    A callable, so it can be passed where ``torch-adopt`` takes ``clip_lambda``; unlike a
    lambda it is stored in ``state_dict()`` (as the group's ``clip_exp``) and pickles.
    """

    def __init__(self, exponent: float = 0.25) -> None:
        self.exponent = float(exponent)

    def __call__(self, step: Any) -> Any:
        return step**self.exponent

    def __repr__(self) -> str:
        return f"PowerClip({self.exponent})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerClip) and other.exponent == self.exponent

    def __hash__(self) -> int:
        return hash(("PowerClip", self.exponent))


DEFAULT_CLIP = PowerClip(0.25)  # the paper's c_t = t ** 0.25


def split_clip(clip_lambda: ClipSpec) -> tuple[float | None, Callable | None]:
    """``clip_lambda`` as (power-law exponent kept in param groups, custom callable or None)."""
    if clip_lambda is None:
        return None, None
    if isinstance(clip_lambda, PowerClip):
        exponent = clip_lambda.exponent
    elif isinstance(clip_lambda, (int, float)) and not isinstance(clip_lambda, bool):
        exponent = float(clip_lambda)
    elif callable(clip_lambda):
        return None, clip_lambda
    else:
        raise TypeError(
            "clip_lambda must be a number p (clip at t ** p), a PowerClip, a callable "
            f"step -> bound, or None (no clipping); got {clip_lambda!r}"
        )
    if not (math.isfinite(exponent) and exponent >= 0.0):
        raise ValueError(f"Invalid clip exponent: {exponent} (must be finite and >= 0)")
    return exponent, None



def call_scalars(
    steps: list[Tensor],
    *,
    as_tensors: bool,
    lr: float | Tensor,
    beta2: float,
    weight_decay: float,
    clip_exp: float | None,
    clip_fn: Callable | None,
) -> tuple[list, list, list]:
    """Per-tensor scalars for this call from each tensor's count of earlier calls ``s``.

    Returns three lists (Python floats, or 0-dim tensors when ``as_tensors``):
      * the clip bound: ``s ** clip_exp`` (or ``clip_fn(s)``, or inf without clipping) for
        s >= 1, and 0 on the first call, which zeroes n so neither m nor theta moves;
      * the weight w of ``g*g`` in ``v = beta2*v + w*g*g``: ``1 - beta2``, or 1 on the first
        call, where v is still 0 and becomes ``g*g``;
      * the decoupled-decay factor ``1 - lr * weight_decay``, or 1 on the first call.

    They are computed in float64 (float32 on MPS, which has no float64) and rounded once
    where an op meets the tensor: ``1 - beta2`` formed in float32 would be 1.7e-4 off.
    """
    dtype = torch.float32 if steps[0].device.type == "mps" else torch.float64
    s = torch.stack(steps) if as_tensors else torch.tensor([t.item() for t in steps])
    s = s.to(dtype)
    first = s == 0
    started = (~first).to(dtype)
    if clip_exp is not None:
        bound = torch.where(first, 0.0, s.pow(clip_exp))
    elif clip_fn is not None and as_tensors:
        bound = torch.where(first, 0.0, clip_fn(s.clamp(min=1)))
    elif clip_fn is not None:  # a user's callable may expect a Python number, as in torch-adopt
        bound = torch.tensor([clip_fn(t) if t > 0 else 0.0 for t in s.tolist()], dtype=dtype)
    else:
        bound = torch.where(first, 0.0, math.inf)
    sq_weight = 1 - started * beta2
    decay = 1 - (started * lr) * weight_decay  # dynamo specialises lr * 0.0 (a recompile per lr)
    if as_tensors:
        return list(bound.unbind()), list(sq_weight.unbind()), list(decay.unbind())
    if clip_exp is not None:
        # Python's pow, one count at a time: torch's vectorised float64 pow on CPU differs
        # from its scalar loop (and from libm) in the last bit for ~2 % of counts, so a
        # tensor's bound would depend on its place in the list (measured on 1..1e7, p=0.25).
        bound = [0.0 if t == 0 else math.pow(t, clip_exp) for t in s.tolist()]
        return bound, sq_weight.tolist(), decay.tolist()
    return bound.tolist(), sq_weight.tolist(), decay.tolist()
