"""The functional form of ADOPT, :func:`adopt`, and the rule that picks the path a step takes.

Paths, one module each, all with this signature (tensor lists by position, scalars by
keyword):

* :mod:`adoptim.paths.forloop`: one tensor at a time, the readable definition;
* :mod:`adoptim.paths.foreach`: the same operations on whole buckets of tensors;
* :mod:`adoptim.kernels.cpu.launch`: the fused C++ kernel on CPU tensors.

Float32 state for low-precision parameters and GradScaler unscaling are handled around the
unfused paths by :func:`adoptim.formats.state.run_unfused`, and inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adoptim._utils import as_scalar, is_compiling
from adoptim.formats import blockwise8_step as _lowbit
from adoptim.formats import master as _master
from adoptim.formats.state import run_unfused
from adoptim.kernels.cpu import launch as _cpu_kernel
from adoptim.kernels.triton import launch as _triton_kernel
from adoptim.paths import foreach as _foreach
from adoptim.paths import forloop as _forloop

__all__ = ["adopt"]


def _default_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """The multi-tensor path on CUDA (fewer kernel launches), the for-loop path elsewhere.

    On CPU (when the fused kernel cannot be built) the for-loop path is the faster of the two
    on real model shapes (``adoptim bench``, 2 cores: 2.8x vs 5.2x fused Adam's step time on
    20 x 1M, 3.4x vs 5.5x on GPT-2 small's shapes): it walks each tensor while it is in cache,
    where the foreach ops make one full pass over all tensors per operation. Only thousands of
    tiny tensors favour foreach (3.0x vs 3.8x on 2,000 x 1k).
    """
    if differentiable or is_compiling():
        return False
    return all(p.device.type == "cuda" for p in params)


def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Callable | None = None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
    nesterov: bool = False,
    caution: bool = False,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    exp_avg_scales: list[Tensor | None] | None = None,
    exp_avg_sq_scales: list[Tensor | None] | None = None,
    master_corrections: list[Tensor | None] | None = None,
) -> None:
    """Functional ADOPT: update ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps``
    in place. See :class:`ADOPT` for the algorithm and the arguments.

    ``grad_scale``/``found_inf`` are a GradScaler's: gradients are divided by ``grad_scale``,
    and if ``found_inf`` is nonzero nothing changes, step counts included (one host read).
    Moments wider than their parameter (float32 state for bfloat16) make the update run in
    float32 and round the parameter once (``stochastic_rounding`` for bfloat16).
    Tensors with a block scale in ``exp_avg_scales``/``exp_avg_sq_scales`` have 8-bit
    moments (``exp_avgs``/``exp_avg_sqs`` hold their codes; see :mod:`adoptim.formats.blockwise8_step`) and
    take the same path as the others.
    Tensors with a correction in ``master_corrections`` (``master_weight_bits``) are stepped
    on their float32 master weights by :func:`adoptim.formats.master.step_corrected`, which
    calls this function back on the unfused paths.
    """
    if master_corrections is not None and any(c is not None for c in master_corrections):
        if found_inf is not None and found_inf.item() != 0:
            return  # a GradScaler found inf/NaN: nothing changes
        rest = _master.step_corrected(
            adopt, params, grads, exp_avgs, exp_avg_sqs, state_steps, master_corrections,
            exp_avg_scales, exp_avg_sq_scales, foreach=foreach, capturable=capturable,
            differentiable=differentiable, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            clip_exp=clip_exp, clip_fn=clip_fn, weight_decay=weight_decay, decouple=decouple,
            maximize=maximize, nesterov=nesterov, caution=caution, grad_scale=grad_scale,
        )  # fmt: skip
        if not rest:
            return
        params, grads, exp_avgs, exp_avg_sqs, state_steps = (
            [seq[i] for i in rest] for seq in (params, grads, exp_avgs, exp_avg_sqs, state_steps)
        )
        if exp_avg_scales is not None and exp_avg_sq_scales is not None:
            exp_avg_scales = [exp_avg_scales[i] for i in rest]
            exp_avg_sq_scales = [exp_avg_sq_scales[i] for i in rest]
        found_inf = None  # read above
    # The Triton kernels (CUDA, or CPU under ADOPTIM_FUSED_BACKEND=triton): the float one
    # reads found_inf on the device; the other paths, and every 8-bit path (whose step
    # counts are on the host), read it here.
    triton = _triton_kernel.selected(
        params, fused=fused, foreach=foreach, differentiable=differentiable
    )
    eight_bit = exp_avg_scales is not None and any(s is not None for s in exp_avg_scales)
    if found_inf is not None and (eight_bit or not triton) and found_inf.item() != 0:
        return
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    # Host-side scalars are cheapest; tensors keep compiled and captured steps sync-free.
    as_tensors = capturable or differentiable or is_compiling()
    lr, beta1, beta2 = (as_scalar(x, on_host=not as_tensors) for x in (lr, beta1, beta2))
    if is_compiling() and not isinstance(lr, Tensor) and params:
        # Dynamo specialises a float used as an op's number argument (alpha=-lr) or passed
        # to torch.tensor(): every new value from a scheduler would recompile. Added to a
        # tensor it stays a graph input, and the paths take the tensor-lr route.
        lr = torch.zeros((), dtype=torch.float64, device=params[0].device) + lr
    kwargs = dict(
        scalars_as_tensors=as_tensors,
        has_complex=has_complex,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        clip_exp=clip_exp,
        clip_fn=clip_fn,
        weight_decay=weight_decay,
        decouple=decouple,
        maximize=maximize,
        nesterov=nesterov,
        caution=caution,
        grad_scale=grad_scale,
        stochastic_rounding=stochastic_rounding,
    )
    use_fused = fused is True or (
        fused is None and foreach is None and _cpu_kernel.default_to_fused(params, differentiable)
    )
    if eight_bit:
        quantized = [i for i, s in enumerate(exp_avg_scales) if s is not None]
        use_foreach = foreach if foreach is not None else _default_foreach(params, differentiable)
        path = "foreach" if use_foreach else "forloop"
        _lowbit.adopt_8bit(
            quantized, params, grads, exp_avgs, exp_avg_scales, exp_avg_sqs,
            exp_avg_sq_scales, state_steps,
            path="triton" if triton else "fused" if use_fused else path,
            strict=fused is True, **kwargs,
        )  # fmt: skip
        rest = [i for i, s in enumerate(exp_avg_scales) if s is None]
        if not rest:
            return
        lists = tuple([seq[i] for i in rest] for seq in lists)
        params = lists[0]
    if triton:
        # fused=True: a failed compile raises; under the default it warns and falls back.
        left = _triton_kernel.triton_adopt(
            *lists, strict=fused is True, found_inf=found_inf, **kwargs
        )
        if not left or (found_inf is not None and found_inf.item() != 0):
            return
        lists = tuple([seq[i] for i in left] for seq in lists)  # layouts it cannot walk
        foreach = _default_foreach(lists[0], differentiable)
        use_fused = False
    if use_fused:
        # fused=True asked for the kernel: a failed build raises instead of falling back.
        left = _cpu_kernel.fused_adopt(*lists, strict=fused is True, **kwargs)
        if left:  # the kernel is still being built, or cannot walk these tensors
            lists = tuple([seq[i] for i in left] for seq in lists)
            run_unfused(_forloop.single_tensor_adopt, *lists, **kwargs)
        return
    if foreach is None:
        foreach = _default_foreach(params, differentiable)
    path = _foreach.multi_tensor_adopt if foreach else _forloop.single_tensor_adopt
    run_unfused(path, *lists, **kwargs)
