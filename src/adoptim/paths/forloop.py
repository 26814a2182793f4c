"""The for-loop path: one tensor at a time through :func:`adoptim.update.adopt_update`.

Each tensor is updated completely (every operation of the step) before the next is touched,
so it stays in cache; this is also the path autograd can follow (``differentiable=True``).
It takes tensors that hold the compute dtype already: :func:`adoptim.functional.adopt` loads
other formats (low-precision parameters, 8-bit moments) into float32 work tensors around it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adoptim._utils import view_as_real_if_complex
from adoptim.schedule import call_scalars
from adoptim.update import TENSOR_OPS, adopt_update, call_hyper

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
    grad_scale: Tensor | None = None,
) -> None:
    h = call_hyper(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decouple=decouple, maximize=maximize, nesterov=nesterov, caution=caution,
        grad_scale=grad_scale,
    )  # fmt: skip
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
    tracking = torch.is_grad_enabled()  # autograd records the update (differentiable=True)
    for i, step_t in enumerate(state_steps):
        if scalars_as_tensors:
            (bound,), (sq_weight,), (decay,) = call_scalars([step_t], **scalar_kw)
        else:
            bound, sq_weight, decay = bounds[i], sq_weights[i], decays[i]
        param, grad, exp_avg, exp_avg_sq = view_as_real_if_complex(
            params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        )
        adopt_update(
            TENSOR_OPS, [param], [grad], [exp_avg], [exp_avg_sq],
            bounds=bound, sq_weights=sq_weight, decays=decay, h=h, tracking=tracking,
        )  # fmt: skip
        step_t += 1
