"""The for-loop path: one tensor at a time, the readable definition of the update.

Its lines follow the algorithm in the :class:`~adoptim.ADOPT` docstring in order; the foreach
path and the kernels perform the same operations in the same order and are tested against a
float64 reference together with this one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adoptim._utils import view_as_real_if_complex
from adoptim.schedule import call_scalars

__all__ = ["single_tensor_adopt"]


def single_tensor_adopt(
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
    scalar_kw = dict(
        as_tensors=scalars_as_tensors,
        lr=lr,
        beta2=beta2,
        weight_decay=weight_decay if decouple else 0.0,
        clip_exp=clip_exp,
        clip_fn=clip_fn,
    )
    if not scalars_as_tensors:  # one host-side computation for the whole group
        bounds, sq_weights, decays = call_scalars(state_steps, **scalar_kw)

    # A tensor weight_decay (differentiable mode) is always applied: no branch on its value.
    has_decay = isinstance(weight_decay, Tensor) or weight_decay != 0
    tracking = torch.is_grad_enabled()  # autograd records the update (differentiable=True)
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step_t = grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        if scalars_as_tensors:
            (bound,), (sq_weight,), (decay,) = call_scalars([step_t], **scalar_kw)
        else:
            bound, sq_weight, decay = bounds[i], sq_weights[i], decays[i]

        if maximize:
            grad = -grad
        if has_decay and not decouple:  # coupled (L2): enters v too
            if isinstance(weight_decay, Tensor):  # alpha must be a number
                grad = grad.addcmul(param.clone() if tracking else param, weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        param, grad, exp_avg, exp_avg_sq = view_as_real_if_complex(
            param, grad, exp_avg, exp_avg_sq
        )

        if has_decay and decouple:
            param.mul_(decay)
        denom = exp_avg_sq.sqrt()
        # Under autograd, sqrt's backward needs its output and addcmul's needs m as they are
        # now: update copies instead of the tensors autograd saved.
        denom = denom.clamp(min=eps) if tracking else denom.clamp_(min=eps)
        normed = grad / denom  # n = g / max(sqrt(v), eps)
        normed.clamp_(-bound, bound)  # n = clip(n, c_t)
        exp_avg.lerp_(normed, 1 - beta1)  # m = beta1*m + (1-beta1)*n
        update = exp_avg  # u = m
        if nesterov:  # u = beta1*m + (1-beta1)*n: one momentum step ahead
            update = exp_avg.lerp(normed, 1 - beta1)
        if caution:  # u = u * mask / mean(mask), mask = [u*g > 0]
            # clamp out of place: a DTensor's mean is Partial until reduced, which clamp_ refuses
            mask = (update * grad > 0).to(update.dtype)
            update = (update * mask).div_(mask.mean().clamp(min=1e-3))
        if isinstance(lr, Tensor):
            update = update.clone() if tracking and update is exp_avg else update
            param.addcmul_(update, lr, value=-1)
        else:  # theta = theta - lr*u
            param.add_(update, alpha=-lr)
        # v = beta2*v + (1-beta2)*g*g; on the first call v is 0 and the weight is 1
        if isinstance(sq_weight, Tensor):  # addcmul's value must be a number
            exp_avg_sq.mul_(beta2).addcmul_(grad * sq_weight, grad)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=sq_weight)
        step_t += 1
