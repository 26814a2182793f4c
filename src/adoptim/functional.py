"""The functional form of ADOPT, :func:`adopt`, and the rule that picks the path a step takes.

Paths (the update maths is :mod:`adoptim.update`, written once per language):

* the Triton kernel (:mod:`adoptim.kernels.triton`): CUDA/ROCm parameters with ``fused=True``;
* the C++ kernel (:mod:`adoptim.kernels.cpu`): CPU parameters, by default where it builds;
* the foreach path (:mod:`adoptim.paths.foreach`): the default on CUDA otherwise;
* the for-loop path (:mod:`adoptim.paths.forloop`): everything else, and what a kernel
  leaves (tensors it cannot walk, every tensor while the C++ kernel is still being built).

Every path computes the same bits; each tensor's state format (float or 8-bit moments,
low-precision parameters) is loaded and stored around the unfused paths by
:func:`adoptim.paths.run.run_unfused`, and inside the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adoptim._utils import as_scalar, is_compiling
from adoptim.distributed import sharded as _sharded
from adoptim.formats.blockwise8 import BLOCK
from adoptim.kernels.cpu import launch as _cpu_kernel
from adoptim.kernels.triton import launch as _triton_kernel
from adoptim.paths import foreach as _foreach
from adoptim.paths import forloop as _forloop
from adoptim.paths.run import FOREACH_CHUNK_ELEMENTS, run_unfused

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
    seed: int = 0,
    keys: list[int] | None = None,
) -> None:
    """Functional ADOPT: update ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps``
    in place. See :class:`ADOPT` for the algorithm and the arguments.

    ``grad_scale``/``found_inf`` are a GradScaler's: gradients are divided by ``grad_scale``,
    and if ``found_inf`` is nonzero nothing changes, step counts included (one host read).
    Moments wider than their parameter (float32 state for bfloat16) make the update run in
    float32 and round the parameter once (``stochastic_rounding`` for bfloat16).
    Tensors with a block scale in ``exp_avg_scales``/``exp_avg_sq_scales`` have 8-bit
    moments (``exp_avgs``/``exp_avg_sqs`` hold their codes; see
    :mod:`adoptim.formats.blockwise8`) and take the same path as the others.
    Tensors with a correction in ``master_corrections`` (``master_weight_bits``,
    :mod:`adoptim.formats.master`) are stepped on their float32 master weights: by the C++
    and Triton kernels for bfloat16 parameters (the kernels join and split the master weight
    in registers), on the unfused paths for float16 ones.
    ``seed`` and ``keys`` (one per tensor, the same after save/load and on every rank: the
    optimizer passes each parameter's index in its state_dict numbering; default 0, 1, ...)
    give the random numbers of stochastic rounding and of the 8-bit codes (:mod:`adoptim.rng`).
    """
    n = len(params)
    scales = [None] * n
    if exp_avg_scales is not None and exp_avg_sq_scales is not None:
        scales = [None if m is None else (m, v) for m, v in zip(exp_avg_scales, exp_avg_sq_scales)]
    eight_bit = [i for i, s in enumerate(scales) if s is not None]
    corrections = master_corrections if master_corrections is not None else [None] * n
    corrected = [i for i, c in enumerate(corrections) if c is not None]

    # 1. The path: a kernel (Triton on GPUs, C++ on CPUs) or the unfused paths.
    triton = _triton_kernel.selected(
        params, fused=fused, foreach=foreach, differentiable=differentiable
    )
    cpu_kernel = not triton and (
        fused is True
        or (fused is None and foreach is None and _cpu_kernel.default_to_fused(params, differentiable))
    )
    # 2. GradScaler found inf/NaN: nothing moves. The float Triton kernel reads the flag on
    # the device (no sync, CUDA graphs); everything else reads it here, once.
    if found_inf is not None and (eight_bit or corrected or not triton) and found_inf.item() != 0:
        return

    # Host-side scalars are cheapest; tensors keep compiled and captured steps sync-free.
    as_tensors = capturable or differentiable or is_compiling()
    lr, beta1, beta2 = (as_scalar(x, on_host=not as_tensors) for x in (lr, beta1, beta2))
    if is_compiling() and not isinstance(lr, Tensor) and params:
        # Dynamo specialises a float used as an op's number argument (alpha=-lr) or passed
        # to torch.tensor(): every new value from a scheduler would recompile. Added to a
        # tensor it stays a graph input, and the paths take the tensor-lr route.
        lr = torch.zeros((), dtype=torch.float64, device=params[0].device) + lr
    kwargs = dict(
        scalars_as_tensors=as_tensors, has_complex=has_complex, lr=lr, beta1=beta1,
        beta2=beta2, eps=eps, clip_exp=clip_exp, clip_fn=clip_fn, weight_decay=weight_decay,
        decouple=decouple, maximize=maximize, nesterov=nesterov, caution=caution,
        grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, seed=seed,
    )  # fmt: skip
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    keys = list(range(n)) if keys is None else list(keys)

    # 3. The kernel takes what it can and says what it left: tensors it cannot walk, all of
    # them while the C++ kernel is still being built (fused=True: a failed build raises).
    # Under torch.compile the kernels have no tracing rules: the for-loop path runs, which
    # Inductor fuses into one loop per tensor (and nothing of the kernels' caches is traced).
    left = list(range(n))
    # (tensors with a master-weight correction: only to a kernel that takes it)
    takes_corr = ("triton" if triton else "cpp") in _KERNELS_TAKING_CORRECTIONS
    take = [i for i in range(n) if takes_corr or corrections[i] is None]
    if (triton or cpu_kernel) and not is_compiling() and take:
        sub = tuple([seq[i] for i in take] for seq in lists)
        sub_corr = [corrections[i] for i in take] if takes_corr and corrected else None
        kernel_left = _run_kernel(triton, sub, [scales[i] for i in take], found_inf=found_inf,
                                  strict=fused is True, keys=[keys[i] for i in take],
                                  corrections=sub_corr, **kwargs)  # fmt: skip
        left = sorted(set(range(n)).difference(take).union(take[k] for k in kernel_left))
        if not left or (found_inf is not None and found_inf.item() != 0):
            return
        foreach = _default_foreach([params[i] for i in left], differentiable)

    # 4. The rest on the foreach or for-loop path, each tensor's format loaded around it.
    if foreach is None:
        foreach = _default_foreach(params, differentiable)
    path = _foreach.multi_tensor_adopt if foreach else _forloop.single_tensor_adopt
    if len(left) < n:
        lists = tuple([seq[i] for i in left] for seq in lists)
        scales = [scales[i] for i in left]
        keys = [keys[i] for i in left]
        corrections = [corrections[i] for i in left]
    run_unfused(path, *lists, scales=scales, corrections=corrections, keys=keys,
                budget=FOREACH_CHUNK_ELEMENTS if foreach else 0, **kwargs)  # fmt: skip


#: the kernels whose launchers take ``corrections=`` (master-weight corrections, aligned with
#: the parameters, None where absent); the others never see a corrected tensor
_KERNELS_TAKING_CORRECTIONS = ("cpp", "triton")


def _run_kernel(triton: bool, lists, scales, *, found_inf, strict: bool, keys: list[int],
                corrections: list | None = None, **kwargs) -> list[int]:  # fmt: skip
    """Step what the Triton (``triton``) or C++ kernel takes; return the indices it left.
    ``corrections`` (None: none of the tensors has one) goes to the launchers as is."""
    params, grads, exp_avgs, exp_avg_sqs, state_steps = lists
    if corrections is not None:
        kwargs["corrections"] = corrections
    float_idx = [i for i, s in enumerate(scales) if s is None]
    eight_idx = [i for i, s in enumerate(scales) if s is not None]
    left: list[int] = []
    if float_idx:
        sub = tuple([seq[i] for i in float_idx] for seq in lists)
        sub_kw = dict(kwargs, keys=[keys[i] for i in float_idx])
        if corrections is not None:
            sub_kw["corrections"] = [corrections[i] for i in float_idx]
        if triton:
            rest = _triton_kernel.triton_adopt(*sub, strict=strict, found_inf=found_inf, **sub_kw)
        else:
            rest = _cpu_kernel.fused_adopt(*sub, strict=strict, **sub_kw)
        left += [float_idx[k] for k in rest]
    if eight_idx:
        # DTensors (FSDP2): the kernels step each rank's local shard and its local codes
        p8, g8 = list(params), list(grads)
        codes = [None] * len(params)
        for i in eight_idx:
            state = (exp_avgs[i], scales[i][0], exp_avg_sqs[i], scales[i][1])
            if _sharded.is_dtensor(params[i]):
                p8[i], g8[i], state = _sharded.local_views(params[i], grads[i], state, BLOCK)
            codes[i] = state
        m_codes, m_scales, v_codes, v_scales = (
            [c[k] if c is not None else None for c in codes] for k in range(4)
        )
        if triton:
            from adoptim.kernels.triton import launch8

            launch_8bit = launch8.triton_adopt_8bit
        else:
            launch_8bit = _cpu_kernel.fused_adopt_8bit
        left += launch_8bit(eight_idx, p8, g8, m_codes, m_scales, v_codes, v_scales,
                            state_steps, strict=strict, keys=keys, **kwargs)  # fmt: skip
    return sorted(left)
