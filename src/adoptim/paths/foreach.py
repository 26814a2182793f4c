"""The multi-tensor (foreach) path: the for-loop path's operations, each applied to a whole
bucket of tensors (same device and dtype) with one ``torch._foreach_*`` call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adoptim._utils import group_by_device_and_dtype, view_as_real_if_complex
from adoptim.schedule import call_scalars

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
) -> None:
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
        if maximize:
            b_grads = torch._foreach_neg(b_grads)
        if weight_decay != 0 and not decouple:
            b_grads = torch._foreach_add(b_grads, b_params, alpha=weight_decay)
        if has_complex:
            b_params, b_grads, b_exp_avgs, b_exp_avg_sqs = (
                [view_as_real_if_complex(t)[0] for t in tensors]
                for tensors in (b_params, b_grads, b_exp_avgs, b_exp_avg_sqs)
            )

        if weight_decay != 0 and decouple:
            torch._foreach_mul_(b_params, decays)
        denom = torch._foreach_sqrt(b_exp_avg_sqs)
        torch._foreach_clamp_min_(denom, eps)
        normed = torch._foreach_div(b_grads, denom)  # n = g / max(sqrt(v), eps)
        del denom
        torch._foreach_clamp_min_(normed, [-b for b in bounds])  # n = clip(n, c_t)
        torch._foreach_clamp_max_(normed, bounds)
        torch._foreach_lerp_(b_exp_avgs, normed, 1 - beta1)  # m = beta1*m + (1-beta1)*n
        updates = b_exp_avgs  # u = m
        if nesterov:  # u = beta1*m + (1-beta1)*n
            updates = torch._foreach_lerp(b_exp_avgs, normed, 1 - beta1)
        del normed
        if caution:  # u = u * mask / mean(mask), mask = [u*g > 0]; a per-tensor mean
            masks = [(u * g > 0).to(u.dtype) for u, g in zip(updates, b_grads)]
            updates = [
                (u * mask).div_(mask.mean().clamp(min=1e-3)) for u, mask in zip(updates, masks)
            ]
            del masks
        if isinstance(lr, Tensor):  # theta = theta - lr*u
            torch._foreach_sub_(b_params, torch._foreach_mul(updates, lr))
        else:
            torch._foreach_add_(b_params, updates, alpha=-lr)
        # v = beta2*v + (1-beta2)*g*g; on the first call v is 0 and the weight is 1
        torch._foreach_mul_(b_exp_avg_sqs, beta2)
        if scalars_as_tensors:  # addcmul's per-tensor scalars must be numbers
            torch._foreach_addcmul_(b_exp_avg_sqs, torch._foreach_mul(b_grads, sq_weights), b_grads)
        else:
            torch._foreach_addcmul_(b_exp_avg_sqs, b_grads, b_grads, sq_weights)
        torch._foreach_add_(b_steps, 1)
