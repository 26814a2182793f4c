"""The fused CPU path: the whole step in one pass over memory, by the C++ kernel.

This module hands a step to the kernel (``csrc/fused_adopt.cpp``; built and cached by
:mod:`adoptim.kernels.cpu.build`): it buckets the tensors by dtype, computes the per-tensor
scalars with the same code as the other paths (:func:`adoptim.schedule.call_scalars`), and
says which tensors the kernel cannot take, so that the caller runs those (or all of them,
while the kernel is being built) on the for-loop path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from adoptim._utils import KERNEL_DTYPES as SUPPORTED_DTYPES
from adoptim._utils import is_compiling, view_as_real_if_complex
from adoptim.kernels.cpu.build import (
    build_unavailable_reason,
    buildable,
    failure_message,
    is_loaded,
    load_kernel,
)
from adoptim.schedule import call_scalars

__all__ = ["SUPPORTED_DTYPES", "default_to_fused", "fused_adopt", "unsupported_reason"]



def _disabled() -> bool:
    return os.environ.get("ADOPTIM_DISABLE_FUSED", "") not in ("", "0")


def _takes(p: Tensor) -> bool:
    """Plain tensors, and DTensors (FSDP2, tensor parallelism) through their local shards."""
    return type(p) in (Tensor, torch.nn.Parameter) or callable(getattr(p, "to_local", None))


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (it shares the storage): the update is elementwise, so each
    rank runs the kernel on its own shards."""
    return t if type(t) in (Tensor, torch.nn.Parameter) else t.to_local()


def unsupported_reason(params: list[Tensor] | None = None) -> str | None:
    """Why the fused kernel cannot run on these parameters here, or None if it can.

    Checked at construction for ``fused=True`` (which then raises with this text) and by the
    default choice for ``fused=None`` (which then quietly takes another path).
    """
    if _disabled():
        return "the fused kernel is disabled by the environment variable ADOPTIM_DISABLE_FUSED"
    for p in params or ():
        if not _takes(p):
            return (
                "the fused kernel takes plain tensors and DTensors, and a parameter is a "
                f"{type(p).__name__}; use foreach=True or leave fused unset"
            )
        if p.device.type != "cpu":
            return (
                f"the C++ fused kernel runs on CPU tensors only and a parameter is on "
                f"{p.device} (CUDA/ROCm parameters take the Triton kernel); use foreach=True "
                "or leave fused unset"
            )
        if p.dtype not in SUPPORTED_DTYPES:
            return (
                f"the fused kernel does not support parameters of dtype {p.dtype} (supported: "
                "float32, float64, bfloat16, float16, complex64, complex128); leave fused unset"
            )
    return build_unavailable_reason()


def default_to_fused(params: list[Tensor], differentiable: bool) -> bool:
    """The rule for ``fused=None`` (with ``foreach=None``): the fused kernel for CPU
    parameters when it can be built here, except when differentiating through the step or
    under torch.compile."""
    if differentiable or is_compiling() or _disabled():
        return False
    if not all(p.device.type == "cpu" and p.dtype in SUPPORTED_DTYPES for p in params):
        return False
    if not all(_takes(p) for p in params):
        return False  # other tensor subclasses take the unfused paths
    return is_loaded() or buildable()


def fused_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None = None,
    stochastic_rounding: bool = False,
    strict: bool = False,
    **kwargs: Any,
) -> list[int]:
    """The fused path: one pass over memory per tensor, all tensors in one kernel call.

    Returns the indices of the tensors it left alone, for the caller to run on the for-loop
    path: all of them while the kernel is being built and under torch.compile (the op has no
    tracing rules), and those whose layout the kernel cannot walk as one flat array (rare:
    non-dense parameters).
    """
    if is_compiling():
        # The op has no tracing rules: under torch.compile the for-loop path runs, which
        # Inductor fuses into one loop per tensor. Nothing here is traced (no cache lookups).
        return list(range(len(params)))
    op = load_kernel(build=True)
    if op is None and strict:  # fused=True: a failed build is an error, not a slow path
        failure = failure_message()
        if failure is not None:
            raise RuntimeError(failure)
    if op is None:
        return list(range(len(params)))

    lr = float(kwargs["lr"])  # one-element tensors (compile, capturable) are read here
    weight_decay, decouple = kwargs["weight_decay"], kwargs["decouple"]
    bounds, sq_weights, decays = call_scalars(
        state_steps,
        as_tensors=False,
        lr=lr,
        beta2=float(kwargs["beta2"]),
        weight_decay=weight_decay if decouple else 0.0,
        clip_exp=kwargs["clip_exp"],
        clip_fn=kwargs["clip_fn"],
    )
    scale = 1.0 if grad_scale is None else float(grad_scale.item())

    # One kernel call per (parameter dtype, state dtype); tensors it cannot walk go aside.
    # This loop is the per-step Python cost of many small tensors: cheap checks first.
    buckets: dict[tuple, list[int]] = {}
    aside: list[int] = []
    if not all(type(p) in (Tensor, torch.nn.Parameter) for p in params):  # DTensors
        if kwargs["caution"]:
            # caution rescales by the mask's mean over the whole tensor, which a shard does
            # not see: DTensors take the for-loop path (its mean is a DTensor reduction)
            aside = [i for i, p in enumerate(params) if type(p) not in (Tensor, torch.nn.Parameter)]
        params, grads, exp_avgs, exp_avg_sqs = (
            [_local(t) for t in seq] for seq in (params, grads, exp_avgs, exp_avg_sqs)
        )
    skip = set(aside)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if i in skip:
            continue
        if p.is_contiguous() and m.is_contiguous() and v.is_contiguous():
            walkable = g.shape == p.shape
        else:  # e.g. channels_last: any dense layout works when the moments share it
            dense = p.is_contiguous(memory_format=torch.channels_last)
            walkable = dense and p.stride() == m.stride() == v.stride() and g.shape == p.shape
        if walkable:
            buckets.setdefault((p.dtype, m.dtype), []).append(i)
        else:
            aside.append(i)
    has_complex = kwargs["has_complex"]
    for (p_dtype, _), index in buckets.items():
        b_params, b_grads, b_m, b_v = [], [], [], []
        for i in index:
            p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
            if has_complex:
                p, g, m, v = view_as_real_if_complex(p, g, m, v)
            if not (g.is_contiguous() and p.is_contiguous()) and g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)  # same layout as the parameter
            b_params.append(p)
            b_grads.append(g)
            b_m.append(m)
            b_v.append(v)
        scalars = torch.tensor(
            [
                [bounds[i] for i in index],
                [sq_weights[i] for i in index],
                [decays[i] for i in index],
            ],
            dtype=torch.float64,
        )
        stochastic = stochastic_rounding and p_dtype == torch.bfloat16
        # Drawn from torch's generator so that torch.manual_seed makes runs repeatable.
        seed = int(torch.randint(0, 2**62, ())) if stochastic else 0
        op(
            b_params,
            b_grads,
            b_m,
            b_v,
            [state_steps[i] for i in index],  # the kernel adds 1 to each
            scalars,
            lr,
            float(kwargs["beta1"]),
            float(kwargs["beta2"]),
            kwargs["eps"],
            weight_decay,
            weight_decay != 0 and not decouple,
            kwargs["maximize"],
            scale,
            stochastic,
            seed,
            kwargs["nesterov"],
            kwargs["caution"],
        )
    return aside
