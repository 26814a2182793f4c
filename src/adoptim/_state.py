"""State formats: the dtype of each parameter's moments, and how the update paths handle
moments wider than their parameter (float32 state for bfloat16/float16 parameters).

With float32 state every path computes the update in float32 and rounds the parameter once
(to nearest even, or stochastically for bfloat16), as the kernel does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION",
    "STATE_DTYPES",
    "resolve_state_dtype",
    "restore_state_dtypes",
    "run_unfused",
    "state_dtype_for",
    "write_back",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_DTYPES = ("auto", "float32", "param")


def resolve_state_dtype(value: Any) -> str:
    """Normalise the ``state_dtype`` option to plain data (kept in param groups)."""
    if value in (torch.float32, "float32", "fp32"):
        return "float32"
    if value is None or value == "param":
        return "param"
    if value == "auto":
        return "auto"
    raise ValueError(
        f"Invalid state_dtype: {value!r} (accepted: 'auto' = float32 state for bfloat16/"
        "float16 parameters and the parameter's dtype otherwise; 'float32' (or "
        "torch.float32); 'param' (or None) = the parameter's dtype)"
    )


def state_dtype_for(param: Tensor, state_dtype: str) -> torch.dtype:
    """The dtype of ``exp_avg``/``exp_avg_sq`` for ``param`` under the ``state_dtype`` option.

    ``auto`` and ``float32`` both keep float32 moments for bfloat16 and float16 parameters (in
    bfloat16, ``(1 - beta2) * g*g`` is below v's resolution at beta2 = 0.9999, so v would
    never move); wider parameters keep their own dtype either way.
    """
    if state_dtype != "param" and param.dtype in LOW_PRECISION:
        return torch.float32
    return param.dtype


def restore_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo torch's cast of the moments to the parameter's dtype on ``load_state_dict``.

    ``Optimizer.load_state_dict`` casts every floating-point state tensor to its parameter's
    dtype, which would turn float32 moments of a bfloat16 parameter into bfloat16 ones; they
    are taken again from the saved tensors, at the dtype the ``state_dtype`` option asks for.
    """
    saved = state_dict.get("state", {})
    saved_ids = iter([i for group in state_dict.get("param_groups", []) for i in group["params"]])
    for group in optimizer.param_groups:
        for p in group["params"]:
            want = state_dtype_for(p, group.get("state_dtype", "auto"))
            pid = next(saved_ids, None)
            if want == p.dtype or pid not in saved:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                value = saved[pid].get(key)
                if isinstance(value, Tensor) and value.is_floating_point():
                    optimizer.state[p][key] = value.to(device=p.device, dtype=want, copy=True)



def run_unfused(
    func: Callable,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None = None,
    stochastic_rounding: bool = False,
    **kwargs: Any,
) -> None:
    """Run the for-loop or foreach path ``func`` with the kernel's extras.

    * ``grad_scale`` (from a GradScaler): gradients are divided by it first;
    * parameters whose moments are wider than they are (float32 state for bfloat16/float16):
      the step runs on float32 copies of the parameter and gradient, and the result is
      rounded back once, as the kernel does. No master copy is kept between steps.
    """
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    widen = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if m.dtype != p.dtype]
    if not widen:
        func(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        return
    work_params, work_grads = list(params), list(grads)
    for i in widen:
        work_params[i] = params[i].to(exp_avgs[i].dtype)
        work_grads[i] = grads[i].to(exp_avgs[i].dtype)
    func(work_params, work_grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
    for i in widen:
        write_back(params[i], work_params[i], stochastic_rounding)


def write_back(param: Tensor, value: Tensor, stochastic: bool) -> None:
    """Store the float32 ``value`` into the low-precision ``param``.

    Round to nearest even, or for bfloat16 with ``stochastic``, round up with probability
    equal to the discarded fraction, so that E[param] = value and updates far below half an
    ulp still move the parameter on average.
    """
    if not (stochastic and param.dtype == torch.bfloat16 and value.dtype == torch.float32):
        param.copy_(value)
        return
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # low 16 bits cleared: exact in bf16
    truncated = (bits & -65536).view(torch.float32)
    # Values next to the largest finite bf16 could round up to inf: truncate those instead.
    result = torch.where(torch.isinf(rounded) & torch.isfinite(value), truncated, rounded)
    param.copy_(torch.where(torch.isnan(value), value, result))
