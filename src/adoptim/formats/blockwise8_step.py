"""The step for parameters with 8-bit moments (``state_dtype="8bit"``; format in
:mod:`adoptim.formats.blockwise8`).

The for-loop and foreach paths are defined by the float32 ones: each tensor's moments are
dequantized to float32, the unchanged float32 update (:func:`adoptim.paths.forloop.
single_tensor_adopt`, or the foreach path) runs on them, and they are requantized. Only a
bounded chunk of tensors is dequantized at a time (one tensor for the for-loop path), so the
float32 copies never hold the whole model's state. The fused kernel
(``csrc/fused_adopt_8bit.cpp``) does the same per block of 256 elements with the codes and
scales in registers.

Rounding is stochastic (see :mod:`adoptim.formats.blockwise8`): each tensor's seed for a step is a hash of
its call count and size (:func:`adoptim.formats.blockwise8.state_seed`; stored nowhere, no generator
drawn from), and every path derives the same random numbers from it, so the for-loop path and
the kernel agree to float32 rounding (a code may differ by one where the two round an
intermediate differently).

DTensor parameters (FSDP2): every path steps each rank's local shard and its local codes and
scales (:mod:`adoptim.distributed.sharded`), except that with ``caution`` the float32 update sees
DTensors, so that the mask's mean is over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adoptim import rng as _rng
from adoptim._utils import view_as_real_if_complex
from adoptim.distributed import sharded as _sharded
from adoptim.formats import blockwise8 as _quant
from adoptim.formats.blockwise8 import stochastic_round_bf16

__all__ = ["adopt_8bit", "run_dequantized", "stochastic_round_bf16"]

#: at most this many elements are dequantized at once on the foreach path
_CHUNK_ELEMENTS = 1 << 22


def _real_flat(t: Tensor) -> Tensor:
    """The tensor's real coordinates as one flat tensor (a view when it can be one)."""
    (real,) = view_as_real_if_complex(t)
    return real.reshape(-1)


def _chunks(params: list[Tensor], index: list[int], budget: int) -> list[list[int]]:
    chunks: list[list[int]] = []
    size = 0
    for i in index:
        n = params[i].numel()
        if chunks and size + n <= budget:
            chunks[-1].append(i)
            size += n
        else:
            chunks.append([i])
            size = n
    return chunks


def run_dequantized(
    func: Callable,
    index: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    m_codes: list[Tensor],
    m_scales: list[Tensor],
    v_codes: list[Tensor],
    v_scales: list[Tensor],
    state_steps: list[Tensor],
    seeds: list[int],
    *,
    budget: int,
    grad_scale: Tensor | None,
    stochastic_rounding: bool,
    sharded: dict[int, Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Dequantize → ``func`` (a float32 update path) → requantize, chunk by chunk.

    ``sharded``: the DTensor parameters (by index) whose local shards these lists hold. With
    ``caution`` their float32 copies are handed to ``func`` as DTensors, so that the mean of
    the caution mask is over the whole tensor (DTensor reduces it across ranks), as on the
    float-state paths and in one process; the rest of the update is elementwise."""
    kwargs = {**kwargs, "has_complex": False}  # the flat copies are real
    wrap = sharded if sharded and kwargs.get("caution") else {}
    for chunk in _chunks(params, index, budget):
        work_p, work_g, work_m, work_v, inplace = [], [], [], [], []
        for i in chunk:
            (real,) = view_as_real_if_complex(params[i])
            direct = real.dtype == torch.float32 and real.is_contiguous()  # a flat view
            flat = real.reshape(-1)
            work_p.append(flat if direct else flat.to(torch.float32, copy=True))
            inplace.append(direct)
            g = _real_flat(grads[i]).to(torch.float32)
            if grad_scale is not None:
                g = g / grad_scale.to(g.device)
            work_g.append(g)
            work_m.append(_quant.dequantize_m(m_codes[i], m_scales[i]))
            work_v.append(_quant.dequantize_v(v_codes[i], v_scales[i]))
        lists = (work_p, work_g, work_m, work_v)
        if any(i in wrap for i in chunk):  # in place on DTensors over the same storage
            lists = tuple(
                [_sharded.as_sharded(t, wrap[i]) if i in wrap else t for t, i in zip(seq, chunk)]
                for seq in lists
            )
        func(*lists, [state_steps[i] for i in chunk], **kwargs)
        for k, i in enumerate(chunk):
            _quant.quantize_m(work_m[k], seeds[i], m_codes[i], m_scales[i])
            _quant.quantize_v(work_v[k], seeds[i], v_codes[i], v_scales[i])
            if not inplace[k]:
                _write_param(params[i], work_p[k], seeds[i], stochastic_rounding)


def _write_param(param: Tensor, value: Tensor, seed: int, stochastic: bool) -> None:
    (real,) = view_as_real_if_complex(param)
    if stochastic and real.dtype == torch.bfloat16:
        value = stochastic_round_bf16(value, seed)
    real.copy_(value.view(real.shape))


def adopt_8bit(
    index: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    m_codes: list[Tensor],
    m_scales: list[Tensor],
    v_codes: list[Tensor],
    v_scales: list[Tensor],
    state_steps: list[Tensor],
    *,
    path: str,
    strict: bool,
    grad_scale: Tensor | None,
    stochastic_rounding: bool,
    seed: int = 0,
    keys: list[int] | None = None,
    **kwargs: Any,
) -> None:
    """One step for the tensors ``index`` of these lists, whose moments are 8-bit.

    ``path``: ``"fused"`` (the C++ kernel; tensors it cannot take, or all of them while it
    is being built, run the for-loop path), ``"triton"`` (the Triton kernel,
    :mod:`adoptim.kernels.triton.launch8`; what it leaves runs the foreach path on CUDA, the
    for-loop path elsewhere), ``"foreach"`` or ``"forloop"``.
    """
    from adoptim.paths import foreach as _foreach
    from adoptim.paths import forloop as _forloop  # the float32 paths this one is defined by

    sharded = {i: params[i] for i in index if _sharded.is_dtensor(params[i])}
    if sharded:  # FSDP2: each rank steps its local shard
        params, grads, m_codes, m_scales, v_codes, v_scales = (
            list(seq) for seq in (params, grads, m_codes, m_scales, v_codes, v_scales)
        )
        for i in sharded:
            state = (m_codes[i], m_scales[i], v_codes[i], v_scales[i])
            params[i], grads[i], state = _sharded.local_views(params[i], grads[i], state)
            m_codes[i], m_scales[i], v_codes[i], v_scales[i] = state
    lists = (params, grads, m_codes, m_scales, v_codes, v_scales, state_steps)
    if path == "fused":
        from adoptim.kernels.cpu import launch as _cpu_kernel

        index = _cpu_kernel.fused_adopt_8bit(
            index, *lists, strict=strict, grad_scale=grad_scale,
            stochastic_rounding=stochastic_rounding, seed=seed, keys=keys, **kwargs,
        )  # fmt: skip
        if not index:
            return
    elif path == "triton":  # CUDA/ROCm (CPU tensors under Triton's interpreter)
        from adoptim.kernels.triton import launch8 as _triton_lowbit

        index = _triton_lowbit.triton_adopt_8bit(
            index, *lists, strict=strict, grad_scale=grad_scale,
            stochastic_rounding=stochastic_rounding, seed=seed, keys=keys, **kwargs,
        )  # fmt: skip
        if not index:
            return
        # what it leaves (caution, layouts it cannot walk): the default unfused path there
        path = "foreach" if all(params[i].device.type == "cuda" for i in index) else "forloop"
    seeds = [0] * len(params)
    for i in index:  # from the call count before the step (the kernels compute the same)
        key = i if keys is None else keys[i]
        seeds[i] = _quant.state_seed(float(state_steps[i]), _rng.tensor_seed(seed, key))
    func = _foreach.multi_tensor_adopt if path == "foreach" else _forloop.single_tensor_adopt
    run_dequantized(
        func, index, *lists, seeds,
        budget=_CHUNK_ELEMENTS if path == "foreach" else 0,
        grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, sharded=sharded,
        **kwargs,
    )  # fmt: skip
