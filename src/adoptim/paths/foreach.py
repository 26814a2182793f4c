"""The multi-tensor (foreach) path: :func:`adoptim.update.adopt_update` on whole buckets of
tensors (same device and dtype), one ``torch._foreach_*`` call per operation.

Fewer kernel launches on a GPU; on a CPU each operation makes one pass over every tensor, so
the for-loop path is usually faster there. Like the for-loop path it takes tensors of the
compute dtype; :func:`adoptim.functional.adopt` loads other formats around it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adoptim._utils import group_by_device_and_dtype, view_as_real_if_complex
from adoptim.schedule import call_scalars
from adoptim.update import FOREACH_OPS, adopt_update, call_hyper

__all__ = ["multi_tensor_adopt"]


def multi_tensor_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    scalars_as_tensors: bool,
    has_complex: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Callable | None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
    nesterov: bool = False,
    caution: bool = False,
    grad_scale: Tensor | None = None,
) -> None:
    h = call_hyper(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decouple=decouple, maximize=maximize, nesterov=nesterov, caution=caution,
        grad_scale=grad_scale,
    )  # fmt: skip
    buckets = group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, b_steps in buckets.values():
        # Each tensor gets its own scalars from its own step count: tensors that started
        # late, or were frozen for a while, share a bucket with the others.
        bounds, sq_weights, decays = call_scalars(
            b_steps,
            as_tensors=scalars_as_tensors,
            lr=lr,
            beta2=beta2,
            weight_decay=weight_decay if decouple else 0.0,
            clip_exp=clip_exp,
            clip_fn=clip_fn,
        )
        if has_complex:
            b_params, b_grads, b_exp_avgs, b_exp_avg_sqs = (
                [view_as_real_if_complex(t)[0] for t in tensors]
                for tensors in (b_params, b_grads, b_exp_avgs, b_exp_avg_sqs)
            )
        adopt_update(
            FOREACH_OPS, b_params, b_grads, b_exp_avgs, b_exp_avg_sqs,
            bounds=bounds, sq_weights=sq_weights, decays=decays, h=h,
        )  # fmt: skip
        torch._foreach_add_(b_steps, 1)
