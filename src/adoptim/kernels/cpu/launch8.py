"""The fused CPU path for 8-bit moments: hands a step to ``adoptim::fused_adopt_8bit_``
(``csrc/fused_adopt_8bit.cpp``, built into the same library as the float kernel by
:mod:`adoptim.kernels.cpu.build`).

Per-tensor scalars come from :func:`adoptim.schedule.call_scalars`, as on the other paths;
the kernel derives each tensor's rounding seed from its state, as
:func:`adoptim.formats.blockwise8.state_seed` does. The kernel implements
``nesterov`` but not ``caution``, whose rescaling needs the mean of a mask over the whole
tensor before any element can be written: with ``caution=True`` the 8-bit tensors take the
for-loop path (the same maths, about 3x slower).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adoptim._utils import is_compiling, view_as_real_if_complex
from adoptim.kernels.cpu.build import failure_message, load_kernel
from adoptim.schedule import call_scalars

__all__ = ["KERNEL_DTYPES", "fused_adopt_8bit"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_adopt_8bit(
    index: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    m_codes: list[Tensor],
    m_scales: list[Tensor],
    v_codes: list[Tensor],
    v_scales: list[Tensor],
    state_steps: list[Tensor],
    *,
    strict: bool,
    grad_scale: Tensor | None,
    stochastic_rounding: bool,
    **kwargs: Any,
) -> list[int]:
    """Step the tensors ``index`` with the kernel; return those it left to the for-loop path
    (all of them while it is being built, under torch.compile, or with ``caution``)."""
    if kwargs.get("caution"):
        return index
    op = None if is_compiling() else load_kernel(build=True)
    if op is None and strict:
        failure = failure_message()
        if failure is not None:
            raise RuntimeError(failure)
    if op is None:
        return index
    op = torch.ops.adoptim.fused_adopt_8bit_

    lr = kwargs["lr"]
    lr = lr.item() if isinstance(lr, Tensor) else float(lr)
    weight_decay, decouple = kwargs["weight_decay"], kwargs["decouple"]
    scale = 1.0 if grad_scale is None else float(grad_scale.item())
    buckets: dict[torch.dtype, list[int]] = {}
    aside: list[int] = []
    for i in index:
        (p,) = view_as_real_if_complex(params[i])
        if p.device.type != "cpu":  # the op has a CPU implementation only
            if strict:
                raise RuntimeError(
                    f"the C++ 8-bit kernel runs on CPU tensors, and a parameter is on "
                    f"{p.device} (CUDA/ROCm parameters take the Triton kernel); use "
                    "foreach=True or leave fused unset"
                )
            aside.append(i)
        elif p.is_contiguous() and p.dtype in KERNEL_DTYPES and grads[i].shape == params[i].shape:
            buckets.setdefault(p.dtype, []).append(i)
        else:
            aside.append(i)
    for dtype, idx in buckets.items():
        bounds, sq_weights, decays = call_scalars(
            [state_steps[i] for i in idx],
            as_tensors=False,
            lr=lr,
            beta2=kwargs["beta2"],
            weight_decay=weight_decay if decouple else 0.0,
            clip_exp=kwargs["clip_exp"],
            clip_fn=kwargs["clip_fn"],
        )
        scalars = torch.tensor([bounds, sq_weights, decays], dtype=torch.float64)
        b_params, b_grads = [], []
        for i in idx:
            (p,) = view_as_real_if_complex(params[i])
            (g,) = view_as_real_if_complex(grads[i])
            b_params.append(p)
            b_grads.append(g if g.is_contiguous() else g.contiguous())
        op(
            b_params,
            b_grads,
            [m_codes[i] for i in idx],
            [m_scales[i] for i in idx],
            [v_codes[i] for i in idx],
            [v_scales[i] for i in idx],
            [state_steps[i] for i in idx],  # the kernel adds 1 to each
            scalars,
            lr,
            kwargs["beta1"],
            kwargs["beta2"],
            kwargs["eps"],
            weight_decay,
            weight_decay != 0 and not decouple,
            kwargs["maximize"],
            scale,
            stochastic_rounding and dtype == torch.bfloat16,
            bool(kwargs.get("nesterov", False)),
        )
    return aside
