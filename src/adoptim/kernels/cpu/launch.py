"""The fused CPU path: the whole step in one pass over memory, by the C++ kernels.

This module hands a step to the kernels (``csrc/fused_adopt.cpp``, one library built and
cached by :mod:`adoptim.kernels.cpu.build`): :func:`fused_adopt` for float moments
(``adoptim::fused_adopt_``) and :func:`fused_adopt_8bit` for 8-bit ones
(``adoptim::fused_adopt_8bit_``). Both bucket the tensors by dtype, compute the per-tensor
scalars with the same code as the other paths (:func:`adoptim.schedule.call_scalars`) into
one float64 table (:func:`_scalar_table`, with each tensor's key for the random numbers of
:mod:`adoptim.rng`), and say which tensors the kernel cannot take, so that the caller runs
those (or all of them, while the kernel is being built) on the for-loop path.

Master-weight corrections (``corrections``, aligned with the parameters, None where a tensor
has none; :mod:`adoptim.formats.master`) are taken for contiguous bfloat16 parameters: the
kernel joins parameter and correction into the float32 master weight in registers and splits
the result back. float16 parameters with a correction (whose correction counts fractions of
an fp16 ulp, not bits) and non-contiguous ones are left to the for-loop path.
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

__all__ = [
    "KERNEL_DTYPES_8BIT",
    "SUPPORTED_DTYPES",
    "default_to_fused",
    "fused_adopt",
    "fused_adopt_8bit",
    "unsupported_reason",
]

#: parameter dtypes the 8-bit kernel takes (complex64 as its float32 real view)
KERNEL_DTYPES_8BIT = (torch.float32, torch.bfloat16, torch.float16)


def _disabled() -> bool:
    return os.environ.get("ADOPTIM_DISABLE_FUSED", "") not in ("", "0")


def _takes(p: Tensor) -> bool:
    """Plain tensors, and DTensors (FSDP2, tensor parallelism) through their local shards."""
    return type(p) in (Tensor, torch.nn.Parameter) or callable(getattr(p, "to_local", None))


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (it shares the storage): the update is elementwise, so each
    rank runs the kernel on its own shards."""
    return t if type(t) in (Tensor, torch.nn.Parameter) else t.to_local()


def _takes_correction(p: Tensor, corr: Tensor) -> bool:
    """Whether the kernels take this parameter with its master-weight correction: a plain
    contiguous bfloat16 tensor (float16's correction is not a bit field: the for-loop path)."""
    return (
        p.dtype == torch.bfloat16
        and type(p) in (Tensor, torch.nn.Parameter)
        and p.is_contiguous()
        and corr.is_contiguous()
        and corr.shape == p.shape
        and corr.dtype in (torch.int8, torch.int16)
    )


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


def _op(strict: bool):
    """The kernel library's ops namespace, or None while it is being built and under
    torch.compile (the ops have no tracing rules); ``strict`` (fused=True): a failed build
    raises instead."""
    if is_compiling():
        # Under torch.compile the for-loop path runs, which Inductor fuses into one loop per
        # tensor. Nothing here is traced (no cache lookups).
        return None
    op = load_kernel(build=True)
    if op is None and strict:  # fused=True: a failed build is an error, not a slow path
        failure = failure_message()
        if failure is not None:
            raise RuntimeError(failure)
    return None if op is None else torch.ops.adoptim


def _scalar_table(steps: list[Tensor], keys: list[int], offsets: list[int] | None,
                  **kwargs: Any) -> Tensor:  # fmt: skip
    """float64 rows of per-tensor scalars: bound, sq_weight, decay (call_scalars), key, and
    with ``offsets`` the index of each tensor's element 0 in its whole tensor."""
    weight_decay = kwargs["weight_decay"] if kwargs["decouple"] else 0.0
    bounds, sq_weights, decays = call_scalars(
        steps, as_tensors=False, lr=kwargs["lr"], beta2=float(kwargs["beta2"]),
        weight_decay=weight_decay, clip_exp=kwargs["clip_exp"], clip_fn=kwargs["clip_fn"],
    )  # fmt: skip
    rows = [bounds, sq_weights, decays, keys]
    if offsets is not None:
        rows.append(offsets)
    return torch.tensor(rows, dtype=torch.float64)


def _hyper(kwargs: dict[str, Any], grad_scale: Tensor | None) -> tuple:
    """The ops' trailing host scalars: lr, beta1, beta2, eps, weight_decay, coupled,
    maximize, grad_scale."""
    weight_decay = kwargs["weight_decay"]
    return (
        kwargs["lr"],
        float(kwargs["beta1"]),
        float(kwargs["beta2"]),
        float(kwargs["eps"]),
        float(weight_decay),
        weight_decay != 0 and not kwargs["decouple"],
        bool(kwargs["maximize"]),
        1.0 if grad_scale is None else float(grad_scale.item()),
    )


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
    seed: int = 0,
    keys: list[int] | None = None,
    corrections: list[Tensor | None] | None = None,
    **kwargs: Any,
) -> list[int]:
    """The fused path for float moments: one pass over memory per tensor, all tensors in one
    kernel call per dtype pair (and correction dtype).

    Returns the indices of the tensors it left alone, for the caller to run on the for-loop
    path: all of them while the kernel is being built and under torch.compile, and those
    whose layout the kernel cannot walk as one flat array (rare: non-dense parameters).
    """
    ops = _op(strict)
    if ops is None:
        return list(range(len(params)))
    keys = list(range(len(params))) if keys is None else keys
    kwargs["lr"] = float(kwargs["lr"])  # one-element tensors (compile, capturable) are read here

    # One kernel call per (parameter dtype, state dtype); tensors it cannot walk go aside.
    # This loop is the per-step Python cost of many small tensors: cheap checks first.
    buckets: dict[tuple, list[int]] = {}
    aside: list[int] = []
    if not all(type(p) in (Tensor, torch.nn.Parameter) for p in params):  # DTensors
        if kwargs["caution"]:
            # caution rescales by the mask's mean over the whole tensor, which a shard does
            # not see: DTensors take the for-loop path (its mean is a DTensor reduction)
            aside = [i for i, p in enumerate(params) if type(p) not in (Tensor, torch.nn.Parameter)]
        if corrections is not None:  # a shard's dither would need its place in the tensor
            aside += [i for i, (p, c) in enumerate(zip(params, corrections))
                      if c is not None and type(p) not in (Tensor, torch.nn.Parameter)]  # fmt: skip
        params, grads, exp_avgs, exp_avg_sqs = (
            [_local(t) for t in seq] for seq in (params, grads, exp_avgs, exp_avg_sqs)
        )
    skip = set(aside)
    aside = sorted(skip)
    corrections = [None] * len(params) if corrections is None else corrections
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if i in skip:
            continue
        corr = corrections[i]
        if corr is not None:  # bfloat16 + correction: contiguous tensors only
            dense = m.is_contiguous() and v.is_contiguous() and g.shape == p.shape
            if dense and _takes_correction(p, corr):
                buckets.setdefault((p.dtype, m.dtype, corr.dtype), []).append(i)
            else:
                aside.append(i)
            continue
        if p.is_contiguous() and m.is_contiguous() and v.is_contiguous():
            walkable = g.shape == p.shape
        else:  # e.g. channels_last: any dense layout works when the moments share it
            dense = p.is_contiguous(memory_format=torch.channels_last)
            walkable = dense and p.stride() == m.stride() == v.stride() and g.shape == p.shape
        if walkable:
            buckets.setdefault((p.dtype, m.dtype, None), []).append(i)
        else:
            aside.append(i)
    has_complex = kwargs["has_complex"]
    hyper = _hyper(kwargs, grad_scale)
    for (p_dtype, _, c_dtype), index in buckets.items():
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
        steps = [state_steps[i] for i in index]
        stochastic = stochastic_rounding and p_dtype == torch.bfloat16
        # (a DTensor shard's offset in its whole tensor is not used: see adoptim.rng)
        scalars = _scalar_table(steps, [keys[i] for i in index], [0] * len(index), **kwargs)
        b_corr = [] if c_dtype is None else [corrections[i] for i in index]
        ops.fused_adopt_(
            b_params, b_grads, b_m, b_v,
            steps,  # the kernel adds 1 to each
            b_corr, scalars, *hyper, stochastic, seed, bool(kwargs["nesterov"]), bool(kwargs["caution"]),
        )  # fmt: skip
    return aside


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
    seed: int = 0,
    keys: list[int] | None = None,
    corrections: list[Tensor | None] | None = None,
    **kwargs: Any,
) -> list[int]:
    """The fused path for 8-bit moments: step the tensors ``index`` with the kernel; return
    those it left to the for-loop path (all of them while it is being built, under
    torch.compile, or with ``caution``, whose rescaling needs the mean of a mask over the
    whole tensor before any element can be written: the same maths, about 3x slower)."""
    if kwargs.get("caution"):
        return index
    ops = _op(strict)
    if ops is None:
        return index
    keys = list(range(len(params))) if keys is None else keys
    lr = kwargs["lr"]
    kwargs["lr"] = lr.item() if isinstance(lr, Tensor) else float(lr)
    buckets: dict[tuple, list[int]] = {}
    aside: list[int] = []
    corrections = [None] * len(params) if corrections is None else corrections
    for i in index:
        (p,) = view_as_real_if_complex(params[i])
        corr = corrections[i]
        if p.device.type != "cpu":  # the op has a CPU implementation only
            if strict:
                raise RuntimeError(
                    f"the C++ 8-bit kernel runs on CPU tensors, and a parameter is on "
                    f"{p.device} (CUDA/ROCm parameters take the Triton kernel); use "
                    "foreach=True or leave fused unset"
                )
            aside.append(i)
        elif corr is not None:
            if _takes_correction(p, corr) and grads[i].shape == p.shape:
                buckets.setdefault((p.dtype, corr.dtype), []).append(i)
            else:
                aside.append(i)
        elif p.is_contiguous() and p.dtype in KERNEL_DTYPES_8BIT and grads[i].shape == params[i].shape:
            buckets.setdefault((p.dtype, None), []).append(i)
        else:
            aside.append(i)
    hyper = _hyper(kwargs, grad_scale)
    for (dtype, c_dtype), idx in buckets.items():
        steps = [state_steps[i] for i in idx]
        scalars = _scalar_table(steps, [keys[i] for i in idx], None, **kwargs)
        b_params, b_grads = [], []
        for i in idx:
            (p,) = view_as_real_if_complex(params[i])
            (g,) = view_as_real_if_complex(grads[i])
            b_params.append(p)
            b_grads.append(g if g.is_contiguous() else g.contiguous())
        ops.fused_adopt_8bit_(
            b_params, b_grads,
            [m_codes[i] for i in idx], [m_scales[i] for i in idx],
            [v_codes[i] for i in idx], [v_scales[i] for i in idx],
            steps,  # the kernel adds 1 to each
            [] if c_dtype is None else [corrections[i] for i in idx],
            scalars, *hyper, stochastic_rounding and dtype == torch.bfloat16, seed,
            bool(kwargs.get("nesterov", False)),
        )  # fmt: skip
    return aside
