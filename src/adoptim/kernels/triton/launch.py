"""The fused path on GPUs: a Triton kernel (``_triton_jit``), and how a step is handed to it.

``ADOPT(params, fused=True)`` with CUDA (or ROCm: torch calls those ``cuda`` too) parameters
runs here. Per group of tensors that share a device and dtypes (parameter, state, 16-byte
alignment), a step is two launches, whatever the number of tensors:

1. ``schedule_kernel`` computes each tensor's scalars from its call count on the device (the
   schedule of :func:`adoptim.schedule.call_scalars`) and advances the count, unless
   GradScaler's ``found_inf`` is set;
2. ``adopt_kernel`` updates every element, walking a table of pointers, sizes and work items
   (one per chunk of ``CONFIG.chunk`` elements).

``caution=True`` adds one launch (a counting pass). Nothing is read on the host when the step
counts are on the device (``capturable=True``): the step can be captured in a CUDA graph.
With step counts on the host (the default), the scalars are computed there (no device sync:
the counts are host memory) and copied with the tables; only GradScaler's ``found_inf`` is
then read on the host, once per step, as on the other paths.

Tables are cached per layout (the tensors' addresses), so a steady training loop copies
nothing to the device per step. Tensors with 8-bit state (``state_dtype="8bit"``) take their
own kernel, launched by :mod:`adoptim.kernels.triton.launch8` under the same rule (:func:`selected`);
its variants are compiled ahead of time with these (:func:`variants`). Tensors with a
master-weight correction (``corrections``) take both kernels in their own buckets (the
``MASTER`` constexpr), bfloat16 parameters only: float16 ones are left to the unfused path.

On CPU tensors this path runs only when asked for, with ``ADOPTIM_FUSED_BACKEND=triton``, and
under Triton's interpreter (``TRITON_INTERPRET=1``): it is how the kernel's maths is tested on
machines without a GPU. Triton is optional (``pip install 'adoptim[gpu]'``); this module
imports it only when a Triton step runs.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adoptim import rng as _rng
from adoptim._utils import KERNEL_DTYPES as SUPPORTED_DTYPES
from adoptim._utils import is_compiling
from adoptim.kernels.triton.common import (
    COMPILE_OPTIONS,
    INSTALL_HINT,
    compile_failed,
    triton_installed,
)
from adoptim.kernels.triton.common import interpreting as _interpreting
from adoptim.kernels.triton.common import jit as _jit
from adoptim.kernels.triton.common import local as _local
from adoptim.kernels.triton.common import tl_dtype as _tl_dtype
from adoptim.kernels.triton.common import to_device as _to_device
from adoptim.schedule import call_scalars

__all__ = [
    "BACKEND_ENV",
    "CONFIG",
    "DEFAULT_ON_CUDA",
    "LaunchConfig",
    "selected",
    "triton_adopt",
    "triton_installed",
    "unsupported_reason",
]

BACKEND_ENV = "ADOPTIM_FUSED_BACKEND"
# The default (fused and foreach unset) on CUDA stays foreach until the kernel has passed
# scripts/gpu_check.sh on a real GPU; fused=True is an explicit choice until then.
DEFAULT_ON_CUDA = False
GPU_DEVICE_TYPES = ("cuda",)  # ROCm builds of torch name their devices "cuda" too

_REAL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_PLAIN = (Tensor, torch.nn.Parameter)
FLOAT_STATE_DTYPES = ("auto", "float32", "param")
STATE_DTYPES = (*FLOAT_STATE_DTYPES, "8bit")  # 8-bit: its own kernel (_triton_lowbit)
_EIGHT_BIT_MESSAGE = (
    "this launcher takes float state; 8-bit codes (state_dtype='8bit') go to the 8-bit "
    "Triton kernel, through adoptim.functional.adopt with their block scales"
)


@dataclass(frozen=True)
class LaunchConfig:
    """Launch shapes: ``block`` elements per inner iteration (BLOCK / (32 * num_warps) per
    thread: 8, so float32 loads are two 128-bit accesses, bfloat16 ones one); ``chunk``
    elements per program (torch's multi-tensor apply uses 65,536); ``schedule_block``
    tensors per program of the schedule kernel. Tests shrink them to cover many chunks with
    small tensors. Not tuned on a GPU yet (scripts/gpu_check.sh measures)."""

    block: int = 2048
    chunk: int = 65536
    num_warps: int = 8
    num_warps_amd: int = 4  # AMD's wavefronts have 64 lanes: the same 8 elements per thread
    schedule_block: int = 128


CONFIG = LaunchConfig()


def _backend_is_triton() -> bool:
    return os.environ.get(BACKEND_ENV, "").strip().lower() == "triton"


def _disabled() -> bool:
    return os.environ.get("ADOPTIM_DISABLE_FUSED", "") not in ("", "0")


# Device types on which a kernel failed to compile under the default (fused unset): the
# default takes the foreach path there from then on (one warning said why).
_failed: dict[str, str] = {}


def selected(
    params: list[Tensor],
    *,
    fused: bool | None,
    foreach: bool | None = None,
    differentiable: bool = False,
) -> bool:
    """Whether a step (or ``fused=True`` at construction) goes to the Triton kernel.

    * CPU parameters: only with ``ADOPTIM_FUSED_BACKEND=triton``, where fused steps (asked
      for, or the default) run the Triton kernel instead of the C++ one;
    * CUDA parameters: ``fused=True``; and with fused/foreach unset once ``DEFAULT_ON_CUDA``
      (after the GPU check) when triton is installed and compiled here.

    Never for ``differentiable=True`` or under torch.compile (the launcher is not traceable):
    those run the for-loop path, as for the CPU kernel.
    """
    if fused is False or differentiable or not params or is_compiling():
        return False
    kinds = {p.device.type for p in params}
    if kinds == {"cpu"}:
        if not _backend_is_triton():
            return False
        return fused is True or (foreach is None and not _disabled() and "cpu" not in _failed)
    if fused is True:  # other device types (meta, mps) get the C++ kernel's refusal
        return bool(kinds & set(GPU_DEVICE_TYPES))
    return (
        DEFAULT_ON_CUDA
        and foreach is None
        and kinds <= set(GPU_DEVICE_TYPES)
        and not _disabled()
        and not any(kind in _failed for kind in kinds)
        and triton_installed()
    )


def unsupported_reason(
    params: list[Tensor], state_dtypes: list[str] | None = None
) -> str | None:
    """Why ``fused=True`` cannot run these parameters on the Triton kernel, or None."""
    if _disabled():
        return "the fused kernels are disabled by the environment variable ADOPTIM_DISABLE_FUSED"
    kinds = sorted({p.device.type for p in params})
    if len(kinds) > 1:
        return (
            "the fused kernels take parameters on one device type, and these are on "
            f"{' and '.join(kinds)}; use one optimizer per device type, or foreach=True"
        )
    kind = kinds[0] if kinds else "cuda"
    if kind == "cpu":
        if not _interpreting():
            return (
                f"{BACKEND_ENV}=triton runs the Triton kernel on CPU tensors through Triton's "
                "interpreter: set TRITON_INTERPRET=1 (before triton is imported), or unset "
                f"{BACKEND_ENV} to use the C++ kernel"
            )
    elif kind not in GPU_DEVICE_TYPES:
        return (
            "the fused kernels run on CPU (C++) and on CUDA/ROCm GPUs (Triton), and a "
            f"parameter is on {kind}; use foreach=True or leave fused unset"
        )
    if not triton_installed():
        return (
            "the fused kernel for GPUs is written in Triton, which is not installed: "
            f"{INSTALL_HINT}; or use foreach=True (the default on CUDA)"
        )
    for p in params:
        if p.dtype not in SUPPORTED_DTYPES:
            return (
                f"the fused kernel does not support parameters of dtype {p.dtype} (supported: "
                "float32, float64, bfloat16, float16, complex64, complex128); leave fused unset"
            )
    for state_dtype in state_dtypes or ():
        if state_dtype not in STATE_DTYPES:
            return f"state_dtype={state_dtype!r} has no Triton kernel"
    return None


# --------------------------------------------------------------------------------------------
# Tables


class _Layout:
    """What a group of tensors needs on the device, built once per set of addresses.

    ``table``: int64 data_ptrs of p, g, m, v, then the sizes, the tensors' seeds (for
    stochastic rounding and 24-bit master weights; :mod:`adoptim.rng`), the data_ptrs of the
    master-weight corrections (0 where none), then one work item per chunk
    (``tensor << 32 | chunk``); ``steps``: data_ptrs of the step counts (device schedule);
    ``scalars``/``counts``: per-tensor buffers the kernels write and read within a step.
    """

    __slots__ = ("counts", "keep", "n_items", "scalars", "steps", "table")


class _Bucket:
    """The tensors of one launch: their indices in the step's lists, their data_ptrs (p, g,
    m, v per tensor), sizes and corrections' data_ptrs (0 where none)."""

    __slots__ = ("corrs", "index", "numels", "ptrs")

    def __init__(self) -> None:
        self.index: list[int] = []
        self.ptrs: list[int] = []
        self.numels: list[int] = []
        self.corrs: list[int] = []


_layouts: OrderedDict[tuple, _Layout] = OrderedDict()
_MAX_LAYOUTS = 64


def _layout(device, bucket, steps, chunk, tseeds) -> _Layout:
    key = (
        device,
        chunk,
        tuple(bucket.ptrs),
        tuple(bucket.numels),
        None if steps is None else tuple([s.data_ptr() for s in steps]),
        tseeds,
        tuple(bucket.corrs),
    )
    layout = _layouts.get(key)
    if layout is not None:
        _layouts.move_to_end(key)
        return layout
    n = len(bucket.numels)
    ptrs = bucket.ptrs  # p, g, m, v of tensor 0, then of tensor 1, ...
    seeds = list(tseeds) if tseeds is not None else [0] * n  # adoptim.rng.tensor_seed
    host = [ptrs[0::4], ptrs[1::4], ptrs[2::4], ptrs[3::4], list(bucket.numels), seeds,
            list(bucket.corrs)]
    items = []
    for k, numel in enumerate(bucket.numels):
        items.extend((k << 32) | c for c in range(-(-numel // chunk)))
    layout = _Layout()
    keep = []
    layout.table, pinned = _to_device(
        torch.tensor([x for column in host for x in column] + items, dtype=torch.int64), device
    )
    keep.append(pinned)
    layout.n_items = len(items)
    if steps is not None:
        layout.steps, pinned = _to_device(
            torch.tensor([s.data_ptr() for s in steps], dtype=torch.int64), device
        )
        keep.append(pinned)
    else:
        layout.steps = None
    layout.scalars = torch.empty((n, 4), dtype=torch.float64, device=device)
    layout.counts = torch.zeros(n, dtype=torch.int32, device=device)
    layout.keep = keep
    _layouts[key] = layout
    if len(_layouts) > _MAX_LAYOUTS:
        _layouts.popitem(last=False)
    return layout


# --------------------------------------------------------------------------------------------
# The step


def _walkable(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    if not (p.dtype in _REAL_DTYPES and g.dtype == p.dtype and m.dtype in _REAL_DTYPES):
        return False
    if v.dtype != m.dtype or g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
        return False
    if not (p.device == g.device == m.device == v.device):
        return False
    # Elements are walked in memory order: any dense layout works when m and v share it.
    if p.is_contiguous() and m.is_contiguous() and v.is_contiguous():
        return True
    return _dense(p) and p.stride() == m.stride() == v.stride()


def _master_walkable(p: Tensor, g: Tensor, m: Tensor, v: Tensor, corr: Tensor) -> bool:
    """Whether the kernel takes a tensor with a master-weight correction: a plain contiguous
    bfloat16 parameter (float16's correction is a fraction of its ulp, not bits of a float32:
    the unfused path), its gradient, float32 or bfloat16 moments (the update in float32) and
    its correction, all contiguous, alike and on one device."""
    return (
        type(p) in _PLAIN
        and type(corr) in _PLAIN
        and p.dtype == torch.bfloat16
        and g.dtype == p.dtype
        and m.dtype in (torch.float32, torch.bfloat16)
        and v.dtype == m.dtype
        and corr.dtype in (torch.int8, torch.int16)
        and g.shape == p.shape == m.shape == v.shape == corr.shape
        and p.device == g.device == m.device == v.device == corr.device
        and p.is_contiguous()
        and g.is_contiguous()
        and m.is_contiguous()
        and v.is_contiguous()
        and corr.is_contiguous()
    )


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlap, in some dim order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# Variants compiled in this process (their compile errors were handled once).
_ready: set[tuple] = set()
_warned: set[str] = set()


# Tests set this to run the host-side schedule (what CUDA steps with host step counts do)
# on CPU tensors too.
_force_host_schedule = False


def triton_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    strict: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Any = None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    keys: list[int] | None = None,
    nesterov: bool = False,
    caution: bool = False,
    has_complex: bool = False,
    scalars_as_tensors: bool = False,
    corrections: list[Tensor | None] | None = None,
    **other: Any,
) -> list[int]:
    """The Triton path: update the tensors in place; return the indices it left alone, for
    the caller to run on an unfused path (tensors whose layout it cannot walk; all of them
    if a kernel failed to compile and ``strict`` is False, after one warning).

    ``corrections`` (aligned with ``params``, None where absent): master-weight corrections
    (:mod:`adoptim.formats.master`); the kernel joins and splits them in registers for
    contiguous bfloat16 parameters with float32 or bfloat16 moments and leaves other
    corrected tensors (float16 parameters, DTensors, other layouts) to the unfused path.

    ``strict`` (``fused=True``): a missing triton or a failed compile raises, with Triton's
    message. ``found_inf``/``grad_scale`` are read on the device.
    """
    del has_complex, scalars_as_tensors  # complex is seen per tensor; scalars stay on device
    unknown = sorted(k for k, value in other.items() if value not in (None, False, 0, 0.0))
    if unknown:
        raise NotImplementedError(
            f"the Triton kernel does not implement {', '.join(unknown)} yet; use foreach=True"
        )
    all_indices = list(range(len(params)))
    if not triton_installed():
        if strict:
            raise RuntimeError(f"fused=True on GPUs needs Triton, not installed: {INSTALL_HINT}")
        return all_indices
    jit = _jit()

    # The per-step host cost of many tensors is this loop: the common case (plain, dense,
    # contiguous, one dtype for the parameter and its gradient) takes the first test only.
    buckets: dict[tuple, _Bucket] = {}
    aside: list[int] = []
    temporaries: list[Tensor] = []
    plain = all(type(t) in _PLAIN for t in params)
    for i in all_indices:
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        corr = corrections[i] if corrections is not None else None
        if corr is not None:
            if not _master_walkable(p, g, m, v, corr):
                aside.append(i)
                continue
            ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
            aligned = not ((ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | corr.data_ptr()) & 15)
            s = 8 if corr.dtype == torch.int8 else 16
            bucket = buckets.setdefault((p.device, p.dtype, m.dtype, aligned, s), _Bucket())
            bucket.index.append(i)
            bucket.ptrs.extend(ptrs)
            bucket.numels.append(p.numel())
            bucket.corrs.append(corr.data_ptr())
            continue
        if not plain and type(p) not in _PLAIN:  # DTensors: their local shards
            if caution:  # the mask's mean is over the whole tensor: the for-loop path
                aside.append(i)
                continue
            p, g, m, v = _local(p), _local(g), _local(m), _local(v)
        p_dtype, s_dtype = p.dtype, m.dtype
        if p_dtype in _COMPLEX_DTYPES:  # real and imaginary parts as separate coordinates
            p, g, m, v = (torch.view_as_real(t) if t.is_complex() else t for t in (p, g, m, v))
            p_dtype, s_dtype = p.dtype, m.dtype
        fast = (
            p_dtype in _REAL_DTYPES
            and g.dtype == p_dtype
            and s_dtype in _REAL_DTYPES
            and v.dtype == s_dtype
            and p.is_contiguous()
            and g.is_contiguous()
            and m.is_contiguous()
            and v.is_contiguous()
            and g.shape == p.shape == m.shape == v.shape
        )
        if not fast:
            if not (m.is_floating_point() or m.is_complex()):
                raise RuntimeError(f"{_EIGHT_BIT_MESSAGE} (exp_avg is {m.dtype})")
            if not _walkable(p, g, m, v):
                aside.append(i)
                continue
            if g.stride() != p.stride() and not (p.is_contiguous() and g.is_contiguous()):
                g = torch.empty_like(p).copy_(g)  # the parameter's layout
                temporaries.append(g)  # alive until the kernels are queued
        ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
        aligned = not ((ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]) & 15)
        key = (p.device, p_dtype, s_dtype, aligned, 0)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
        bucket.index.append(i)
        bucket.ptrs.extend(ptrs)
        bucket.numels.append(p.numel())
        bucket.corrs.append(0)

    def host_schedule(device, index) -> bool:
        if _force_host_schedule:
            return True
        return not all(
            state_steps[i].device == device
            and state_steps[i].dtype == torch.float32
            and state_steps[i].numel() == 1
            for i in index
        )

    hosted = {key: host_schedule(key[0], bucket.index) for key, bucket in buckets.items()}
    if found_inf is not None:
        devices = {key[0] for key in buckets}
        # Read on the host only where it is free (a CPU flag for GPU tensors) or where the
        # step counts are host-side anyway (then it costs one sync, as on the other paths).
        cpu_flag = found_inf.device.type == "cpu" and devices != {found_inf.device}
        if any(hosted.values()) or cpu_flag:
            if found_inf.item() != 0:
                return []
            found_inf = None

    for key, bucket in buckets.items():
        ok = _run_bucket(
            jit,
            key,
            bucket,
            [state_steps[i] for i in bucket.index],
            hosted[key],
            strict=strict,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            clip_exp=clip_exp,
            clip_fn=clip_fn,
            weight_decay=weight_decay,
            decouple=decouple,
            maximize=maximize,
            grad_scale=grad_scale,
            found_inf=found_inf,
            # (a corrected tensor's parameter is always the nearest bf16 of its master)
            stochastic=stochastic_rounding and key[1] == torch.bfloat16 and not key[4],
            seed=seed,
            keys=[i if keys is None else keys[i] for i in bucket.index],
            nesterov=nesterov,
            caution=caution,
        )
        if not ok:
            aside.extend(bucket.index)
    del temporaries  # (freed after the launches: stream-ordered reuse on CUDA)
    return sorted(aside)


def _run_bucket(
    jit,
    key,
    bucket,
    steps,
    hosted,
    *,
    strict,
    lr,
    beta1,
    beta2,
    eps,
    clip_exp,
    clip_fn,
    weight_decay,
    decouple,
    maximize,
    grad_scale,
    found_inf,
    stochastic,
    seed,
    keys,
    nesterov,
    caution,
) -> bool:
    """Launch the kernels for one bucket; False if they could not be compiled (non-strict)."""
    import triton.language as tl

    device, p_dtype, s_dtype, aligned, master = key
    cfg = CONFIG
    if torch.version.hip is not None and device.type == "cuda":
        cfg = LaunchConfig(cfg.block, cfg.chunk, cfg.num_warps_amd, cfg.num_warps_amd,
                           cfg.schedule_block)  # fmt: skip
    n = len(bucket.index)
    rounds = stochastic or master == 8  # random numbers: stochastic rounding, 24-bit masters
    tseeds = tuple(_rng.tensor_seed(seed, key) for key in keys) if rounds else None
    layout = _layout(device, bucket, None if hosted else steps, cfg.chunk, tseeds)
    dummy = layout.counts  # stands in for pointer arguments a variant does not use

    lr_ptr, lr_value = dummy, 0.0
    if isinstance(lr, Tensor):
        if lr.device == device:
            lr_ptr = lr
        else:
            lr_value = float(lr.item())  # a CPU tensor for GPU tensors: host memory, no sync
    else:
        lr_value = float(lr)
    if grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device, non_blocking=True)

    clip_mode, bounds = (1 if clip_exp is not None else 0), dummy
    if clip_exp is None and clip_fn is not None:
        clip_mode = 2
    c_dtype = tl.float64 if torch.float64 in (p_dtype, s_dtype) else tl.float32
    constexprs = dict(
        P_DTYPE=_tl_dtype(tl, p_dtype),
        S_DTYPE=_tl_dtype(tl, s_dtype),
        C_DTYPE=c_dtype,
        ALIGNED=aligned,
        COUPLED=weight_decay != 0 and not decouple,
        MAXIMIZE=bool(maximize),
        HAS_SCALE=grad_scale is not None,
        HAS_INF=found_inf is not None,
        LR_ON_DEVICE=lr_ptr is not dummy,
        NESTEROV=bool(nesterov),
        CAUTION=bool(caution),
        STOCHASTIC=bool(stochastic),
        MASTER=master,
        BLOCK=cfg.block,
        CHUNK=cfg.chunk,
    )
    update_args = (
        layout.table,
        n,
        layout.scalars,
        layout.counts,
        lr_ptr,
        lr_value,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        float(weight_decay) if decouple else 0.0,
        dummy if grad_scale is None else grad_scale,
        dummy if found_inf is None else found_inf,
    )
    schedule_constexprs = dict(
        CLIP=clip_mode,
        HAS_INF=found_inf is not None,
        CAUTION=bool(caution),
        BLOCK=cfg.schedule_block,
    )
    schedule_grid = (-(-n // cfg.schedule_block),)
    grid = (layout.n_items,)

    def schedule_args(bounds_arg):
        return (
            layout.steps,
            n,
            layout.scalars,
            layout.counts,
            bounds_arg,
            dummy if found_inf is None else found_inf,
            0.0 if clip_exp is None else float(clip_exp),
            float(beta2),
        )

    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        variant = (device.type, device.index, tuple(sorted(constexprs.items(), key=str)),
                   tuple(sorted(schedule_constexprs.items())), hosted)
        if variant not in _ready and not _interpreting():
            # Compile before anything runs, so that a failure leaves the step undone (the
            # fallback then takes the whole step, step counts included).
            try:
                for count_only in ([True, False] if caution else [False]):
                    jit.adopt_kernel.warmup(
                        *update_args, grid=grid, COUNT_ONLY=count_only,
                        num_warps=cfg.num_warps, **COMPILE_OPTIONS, **constexprs
                    )
                if not hosted:
                    jit.schedule_kernel.warmup(
                        *schedule_args(bounds), grid=schedule_grid, num_warps=4,
                        **schedule_constexprs
                    )
            except Exception as exc:  # noqa: BLE001 (any compile error; re-raised if strict)
                message = (
                    f"the Triton ADOPT kernel failed to compile for {device} (parameters "
                    f"{p_dtype}, state {s_dtype}): {type(exc).__name__}: {exc}"
                )
                compile_failed(message, exc, device, strict=strict, failed=_failed,
                               warned=_warned, fallback="falls back to the foreach path",
                               stacklevel=5)  # fmt: skip
                return False
            _ready.add(variant)

        # 1. The per-tensor scalars (and step counts advanced).
        if hosted:
            bound_list, sq_list, _ = call_scalars(
                steps, as_tensors=False, lr=0.0, beta2=beta2, weight_decay=0.0,
                clip_exp=clip_exp, clip_fn=clip_fn,
            )
            counts = [float(s.item()) for s in steps]
            started = [0.0 if s == 0 else 1.0 for s in counts]
            rows = torch.tensor([bound_list, sq_list, started, counts], dtype=torch.float64)
            table, _ = _to_device(rows.T.contiguous(), device)
            layout.scalars.copy_(table)
            if caution:
                layout.counts.zero_()
        else:
            if clip_mode == 2:  # a custom callable: on the step tensors, with torch ops
                bound_list, _, _ = call_scalars(
                    steps, as_tensors=True, lr=0.0, beta2=beta2, weight_decay=0.0,
                    clip_exp=None, clip_fn=clip_fn,
                )
                bounds = torch.stack(bound_list).to(device=device, dtype=torch.float64)
            jit.schedule_kernel[schedule_grid](
                *schedule_args(bounds), num_warps=4, **schedule_constexprs
            )

        # 2. The update (caution: a counting pass first).
        if layout.n_items:
            if caution:
                jit.adopt_kernel[grid](
                    *update_args, COUNT_ONLY=True, num_warps=cfg.num_warps,
                    **COMPILE_OPTIONS, **constexprs,
                )
            jit.adopt_kernel[grid](
                *update_args, COUNT_ONLY=False, num_warps=cfg.num_warps,
                **COMPILE_OPTIONS, **constexprs,
            )
    if hosted:
        torch._foreach_add_(steps, 1.0)
    return True


