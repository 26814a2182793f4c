"""The Triton path for 8-bit moments (``state_dtype="8bit"`` with ``fused=True`` on CUDA/ROCm,
and under the same rule as the float Triton kernel by default: see
:func:`adoptim.kernels.triton.launch.selected`): hands a step to ``_triton_jit.adopt_8bit_kernel``.

One launch per group of tensors that share a device, a parameter dtype and 16-byte alignment:
one program per tile of ``CONFIG.rows`` blocks of 256 elements (the format's block) of one
tensor, found through a table of pointers, sizes and work items cached per layout (as for
the float kernel). The kernel runs the float32 update of the for-loop path on each block and
requantizes it with the format's random numbers (:mod:`adoptim.formats.blockwise8`), as the C++ 8-bit
kernel does (``csrc/fused_adopt.cpp``).

The per-tensor scalars (clip bound, weight of g*g, decoupled decay) and each tensor's
rounding seed (:func:`adoptim.formats.blockwise8.state_seed`, from the seed, its key and its call count) are computed
on the host, as on the other 8-bit paths: 8-bit state keeps its step counts on the host
(``capturable=True`` is refused), so this costs no device read; they are copied to the device
with the step (one small pinned copy per group), and the counts are advanced on the host.
A tensor ``lr`` is read on the host (``lr.item()``, as the C++ 8-bit path does); GradScaler's
``grad_scale`` is read by the kernel, its ``found_inf`` on the host (as on the other 8-bit
paths: :func:`adoptim.functional.adopt`).

Not implemented in the kernel, and left to the unfused path (the caller runs them there):
``caution`` (its rescaling needs the mean of a mask over the whole tensor before any element
is written; the C++ 8-bit kernel leaves it to the for-loop path too), and tensors it cannot
walk as one flat array (non-contiguous parameters; parameter dtypes other than float32,
bfloat16, float16, complex64 as a real view).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adoptim import rng as _rng
from adoptim._utils import view_as_real_if_complex
from adoptim.formats import blockwise8 as _quant
from adoptim.kernels.triton import common as _common
from adoptim.kernels.triton.common import COMPILE_OPTIONS
from adoptim.schedule import call_scalars

__all__ = ["CONFIG", "KERNEL_DTYPES", "LaunchConfig8", "triton_adopt_8bit"]

#: parameter dtypes the kernel takes (complex64 as its float32 real view)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchConfig8:
    """Launch shapes: ``rows`` blocks of 256 per program, ``num_warps`` warps (8 rows and 4
    warps: 16 elements per thread, so that the int8/uint8 codes are one 128-bit access per
    thread and float32 theta and g four). Not tuned on a GPU yet."""

    rows: int = 8
    num_warps: int = 4
    num_warps_amd: int = 2  # AMD's wavefronts have 64 lanes: the same 16 elements per thread


CONFIG = LaunchConfig8()


class _Layout:
    """Per set of addresses: ``table`` (int64 data_ptrs of p, g, m codes, m scales, v codes,
    v scales, the sizes, the master-weight corrections' data_ptrs (0 where none), then the
    work items ``tensor << 32 | tile``) and the per-tensor scalar rows the step copies in."""

    __slots__ = ("keep", "n_items", "scalars", "table")


_layouts: OrderedDict[tuple, _Layout] = OrderedDict()
_MAX_LAYOUTS = 64
_ready: set[tuple] = set()  # variants compiled in this process
_failed: dict[str, str] = {}  # device types where a compile failed under the default
_warned: set[str] = set()


def _layout(device: torch.device, ptrs: list[int], numels: list[int], rows: int,
            corrs: list[int]) -> _Layout:  # fmt: skip
    key = (device, rows, tuple(ptrs), tuple(numels), tuple(corrs))
    layout = _layouts.get(key)
    if layout is not None:
        _layouts.move_to_end(key)
        return layout
    tile = rows * _quant.BLOCK
    items = []
    for k, numel in enumerate(numels):
        items.extend((k << 32) | t for t in range(-(-numel // tile)))
    columns = [ptrs[c::6] for c in range(6)]
    host = torch.tensor([x for column in columns for x in column] + list(numels) + list(corrs)
                        + items, dtype=torch.int64)  # fmt: skip
    layout = _Layout()
    layout.table, pinned = _common.to_device(host, device)
    layout.keep = [pinned]
    layout.n_items = len(items)
    layout.scalars = torch.empty((len(numels), 4), dtype=torch.float64, device=device)
    _layouts[key] = layout
    if len(_layouts) > _MAX_LAYOUTS:
        _layouts.popitem(last=False)
    return layout


def _constexprs(tl, p_dtype, *, aligned, coupled, maximize, has_scale, nesterov, stochastic,
                rows, master=0) -> dict[str, Any]:  # fmt: skip
    return dict(
        P_DTYPE=_common.tl_dtype(tl, p_dtype),
        ALIGNED=aligned,
        COUPLED=coupled,
        MAXIMIZE=maximize,
        HAS_SCALE=has_scale,
        NESTEROV=nesterov,
        STOCHASTIC=stochastic,
        MASTER=master,
        ROWS=rows,
    )


def triton_adopt_8bit(
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
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Any = None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
    nesterov: bool = False,
    caution: bool = False,
    seed: int = 0,
    keys: list[int] | None = None,
    corrections: list[Tensor | None] | None = None,
    **other: Any,
) -> list[int]:
    """Step the tensors ``index`` (plain tensors: the caller hands DTensors' local shards)
    with the kernel; return those it left to the unfused path: with ``caution`` all of them,
    layouts it cannot walk, and all of them where the kernel failed to compile under the
    default (``strict`` False, after one warning; ``strict``: a failure raises).

    ``corrections`` (aligned with ``params``, None where absent): master-weight corrections
    (:mod:`adoptim.formats.master`), joined and split in registers for contiguous bfloat16
    parameters; other corrected tensors (float16 parameters, other layouts) are left."""
    del other  # scalars_as_tensors, has_complex: per tensor here, scalars on the host
    if caution or not index:
        return list(index)
    if not _common.triton_installed():
        if strict:
            raise RuntimeError(
                f"fused=True on GPUs needs Triton, not installed: {_common.INSTALL_HINT}"
            )
        return list(index)
    jit = _common.jit()
    lr = float(lr.item()) if isinstance(lr, Tensor) else float(lr)

    buckets: dict[tuple, list] = {}  # key -> [indices, ptrs, numels, correction ptrs]
    aside: list[int] = []
    temporaries: list[Tensor] = []
    for i in index:
        (p,) = view_as_real_if_complex(params[i])
        (g,) = view_as_real_if_complex(grads[i])
        qm, sm, qv, sv = m_codes[i], m_scales[i], v_codes[i], v_scales[i]
        n = p.numel()
        if not (
            p.dtype in KERNEL_DTYPES
            and g.dtype == p.dtype
            and g.shape == p.shape
            and p.is_contiguous()
            and p.device == g.device == qm.device == qv.device == sm.device == sv.device
            and qm.dtype == torch.int8
            and qv.dtype == torch.uint8
            and qm.numel() == n == qv.numel()
            and qm.is_contiguous()
            and qv.is_contiguous()
            and sm.is_contiguous()
            and sv.is_contiguous()
        ):
            aside.append(i)
            continue
        if p.device.type in _failed and not strict:
            aside.append(i)
            continue
        corr = corrections[i] if corrections is not None else None
        if corr is not None and not (
            type(corr) in (Tensor, torch.nn.Parameter)  # (not a DTensor's: the unfused path)
            and p.dtype == torch.bfloat16  # (float16: its correction is not float32 bits)
            and corr.dtype in (torch.int8, torch.int16)
            and corr.shape == params[i].shape
            and corr.is_contiguous()
            and corr.device == p.device
        ):
            aside.append(i)
            continue
        if not g.is_contiguous():
            g = g.contiguous()
            temporaries.append(g)  # alive until the kernel is queued
        ptrs = [p.data_ptr(), g.data_ptr(), qm.data_ptr(), sm.data_ptr(), qv.data_ptr(),
                sv.data_ptr()]  # fmt: skip
        c_ptr = 0 if corr is None else corr.data_ptr()
        aligned = not ((ptrs[0] | ptrs[1] | ptrs[2] | ptrs[4] | c_ptr) & 15)
        master = 0 if corr is None else (8 if corr.dtype == torch.int8 else 16)
        bucket = buckets.setdefault((p.device, p.dtype, aligned, master), [[], [], [], []])
        bucket[0].append(i)
        bucket[1].extend(ptrs)
        bucket[2].append(n)
        bucket[3].append(c_ptr)

    for key, (idx, ptrs, numels, corrs) in buckets.items():
        ok = _run_bucket(
            jit, key, idx, ptrs, numels, corrs, [state_steps[i] for i in idx], strict=strict,
            grad_scale=grad_scale,
            # (a corrected tensor's parameter is always the nearest bf16 of its master)
            stochastic=stochastic_rounding and key[1] == torch.bfloat16 and not key[3],
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip_exp=clip_exp, clip_fn=clip_fn,
            weight_decay=weight_decay, decouple=decouple, maximize=maximize, nesterov=nesterov,
            tseeds=[_rng.tensor_seed(seed, i if keys is None else keys[i]) for i in idx],
        )  # fmt: skip
        if not ok:
            aside.extend(idx)
    del temporaries  # (freed after the launch: stream-ordered reuse on CUDA)
    return sorted(aside)


def _run_bucket(jit, key, idx, ptrs, numels, corrs, steps, *, strict, grad_scale, stochastic, lr,
                beta1, beta2, eps, clip_exp, clip_fn, weight_decay, decouple, maximize,
                nesterov, tseeds) -> bool:  # fmt: skip
    """Launch the kernel for one bucket; False if it could not be compiled (non-strict)."""
    import triton.language as tl

    device, p_dtype, aligned, master = key
    cfg = CONFIG
    num_warps = cfg.num_warps_amd if torch.version.hip is not None else cfg.num_warps
    layout = _layout(device, ptrs, numels, cfg.rows, corrs)

    # The per-tensor scalars and seeds, from the host-side call counts (no device read).
    counts = [float(s) for s in steps]
    bounds, sq_weights, decays = call_scalars(
        steps, as_tensors=False, lr=lr, beta2=beta2,
        weight_decay=weight_decay if decouple else 0.0, clip_exp=clip_exp, clip_fn=clip_fn,
    )  # fmt: skip
    seeds = [float(_quant.state_seed(c, t)) for c, t in zip(counts, tseeds)]
    rows = torch.tensor([bounds, sq_weights, decays, seeds], dtype=torch.float64)
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device, non_blocking=True)

    coupled = weight_decay != 0 and not decouple
    constexprs = _constexprs(
        tl, p_dtype, aligned=aligned, coupled=coupled, maximize=bool(maximize),
        has_scale=grad_scale is not None, nesterov=bool(nesterov), stochastic=stochastic,
        rows=cfg.rows, master=master,
    )  # fmt: skip
    args = (
        layout.table,
        len(numels),
        layout.scalars,
        _quant.weyl(device) if grad_scale is None else grad_scale,  # (a float32 stand-in)
        lr,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay) if coupled else 0.0,
    )
    grid = (layout.n_items,)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        variant = (device.type, device.index, tuple(sorted(constexprs.items(), key=str)))
        if variant not in _ready and not _common.interpreting():
            # Compile before anything runs, so that a failure leaves the step undone (the
            # fallback then takes the whole step, step counts included).
            try:
                jit.adopt_8bit_kernel.warmup(*args, grid=grid, num_warps=num_warps,
                                             **COMPILE_OPTIONS, **constexprs)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 (any compile error; re-raised if strict)
                message = (
                    f"the Triton ADOPT 8-bit kernel failed to compile for {device} "
                    f"(parameters {p_dtype}): {type(exc).__name__}: {exc}"
                )
                _common.compile_failed(
                    message, exc, device, strict=strict, failed=_failed, warned=_warned,
                    fallback="runs the 8-bit tensors on the foreach path", stacklevel=6,
                )
                return False
            _ready.add(variant)
        table, pinned = _common.to_device(rows.T.contiguous(), device)
        layout.scalars.copy_(table)
        if layout.n_items:
            jit.adopt_8bit_kernel[grid](*args, num_warps=num_warps, **COMPILE_OPTIONS,
                                        **constexprs)  # fmt: skip
        del pinned  # (the caching host allocator keeps it until the copy is done)
    torch._foreach_add_(steps, 1.0)
    return True
