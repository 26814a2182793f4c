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
its variants are compiled ahead of time with these (:func:`variants`).

On CPU tensors this path runs only when asked for, with ``ADOPTIM_FUSED_BACKEND=triton``, and
under Triton's interpreter (``TRITON_INTERPRET=1``): it is how the kernel's maths is tested on
machines without a GPU. Triton is optional (``pip install 'adoptim[gpu]'``); this module
imports it only when a Triton step runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adoptim._utils import KERNEL_DTYPES as SUPPORTED_DTYPES
from adoptim._utils import is_compiling
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
INSTALL_HINT = "pip install 'adoptim[gpu]' (or pip install triton)"

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


def triton_installed() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


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


def _jit():
    """The kernels module (imports triton)."""
    from adoptim.kernels.triton import jit as _triton_jit

    return _triton_jit


# --------------------------------------------------------------------------------------------
# Tables


class _Layout:
    """What a group of tensors needs on the device, built once per set of addresses.

    ``table``: int64 data_ptrs of p, g, m, v, then the sizes, then one work item per chunk
    (``tensor << 32 | chunk``); ``steps``: data_ptrs of the step counts (device schedule);
    ``scalars``/``counts``: per-tensor buffers the kernels write and read within a step.
    """

    __slots__ = ("counts", "keep", "n_items", "scalars", "steps", "table")


class _Bucket:
    """The tensors of one launch: their indices in the step's lists, their data_ptrs (p, g,
    m, v per tensor) and sizes."""

    __slots__ = ("index", "numels", "ptrs")

    def __init__(self) -> None:
        self.index: list[int] = []
        self.ptrs: list[int] = []
        self.numels: list[int] = []


_layouts: OrderedDict[tuple, _Layout] = OrderedDict()
_MAX_LAYOUTS = 64


def _to_device(host: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """``host`` on ``device``, copied without a sync; also returns the pinned source, which
    a CUDA graph that captured the copy reads again at every replay (kept alive)."""
    if device.type == "cpu":
        return host, None
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


def _layout(device, bucket, steps, chunk) -> _Layout:
    key = (
        device,
        chunk,
        tuple(bucket.ptrs),
        tuple(bucket.numels),
        None if steps is None else tuple([s.data_ptr() for s in steps]),
    )
    layout = _layouts.get(key)
    if layout is not None:
        _layouts.move_to_end(key)
        return layout
    n = len(bucket.numels)
    ptrs = bucket.ptrs  # p, g, m, v of tensor 0, then of tensor 1, ...
    host = [ptrs[0::4], ptrs[1::4], ptrs[2::4], ptrs[3::4], list(bucket.numels)]
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


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the update is elementwise: each rank updates its own)."""
    if type(t) in (Tensor, torch.nn.Parameter):
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _tl_dtype(tl, dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }[dtype]


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


def compile_failed(
    message: str,
    exc: Exception,
    device: torch.device,
    *,
    strict: bool,
    failed: dict[str, str],
    warned: set[str],
    fallback: str,
    stacklevel: int,
) -> None:
    """A Triton kernel did not compile: under ``fused=True`` (``strict``) that is an error;
    under the default, ``failed`` remembers the device type (its steps take the unfused path
    from then on) and one warning per device type says so."""
    if strict:
        raise RuntimeError(message) from exc
    failed[device.type] = message
    if device.type not in warned:
        warned.add(device.type)
        warnings.warn(f"{message}\nadoptim {fallback} on {device.type}.", RuntimeWarning,
                      stacklevel=stacklevel)  # fmt: skip

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
    nesterov: bool = False,
    caution: bool = False,
    has_complex: bool = False,
    scalars_as_tensors: bool = False,
    **other: Any,
) -> list[int]:
    """The Triton path: update the tensors in place; return the indices it left alone, for
    the caller to run on an unfused path (tensors whose layout it cannot walk; all of them
    if a kernel failed to compile and ``strict`` is False, after one warning).

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
        key = (p.device, p_dtype, s_dtype, aligned)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
        bucket.index.append(i)
        bucket.ptrs.extend(ptrs)
        bucket.numels.append(p.numel())

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
            stochastic=stochastic_rounding and key[1] == torch.bfloat16,
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
    nesterov,
    caution,
) -> bool:
    """Launch the kernels for one bucket; False if they could not be compiled (non-strict)."""
    import triton.language as tl

    device, p_dtype, s_dtype, aligned = key
    cfg = CONFIG
    if torch.version.hip is not None and device.type == "cuda":
        cfg = LaunchConfig(cfg.block, cfg.chunk, cfg.num_warps_amd, cfg.num_warps_amd,
                           cfg.schedule_block)  # fmt: skip
    n = len(bucket.index)
    layout = _layout(device, bucket, None if hosted else steps, cfg.chunk)
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
        SCALE_G=grad_scale is not None or bool(maximize),
        HAS_INF=found_inf is not None,
        LR_ON_DEVICE=lr_ptr is not dummy,
        SMALL_WEIGHT=(1.0 - beta1) < 0.5,
        NESTEROV=bool(nesterov),
        CAUTION=bool(caution),
        STOCHASTIC=bool(stochastic),
        BLOCK=cfg.block,
        CHUNK=cfg.chunk,
    )
    seed = int(torch.randint(0, 2**62, ())) if stochastic else 0
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
        seed,
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
                        num_warps=cfg.num_warps, **constexprs
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
                    *update_args, COUNT_ONLY=True, num_warps=cfg.num_warps, **constexprs
                )
            jit.adopt_kernel[grid](
                *update_args, COUNT_ONLY=False, num_warps=cfg.num_warps, **constexprs
            )
    if hosted:
        torch._foreach_add_(steps, 1.0)
    return True


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation (``adoptim doctor --compile``, the PTX test)

# (parameter dtype, state dtype) pairs the optimizer creates (state_dtype "auto"/"param").
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
)
# Parameter dtypes of the 8-bit kernel (complex64 runs as float32).
EIGHT_BIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SIG_NAMES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.uint8: "8bit",  # s_dtype of the 8-bit kernel's variants
}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: ``kind`` is "update", "count" (caution's first pass),
    "schedule" or "update8" (the 8-bit kernel, ``s_dtype`` uint8; "all options" there:
    coupled decay, maximize, GradScaler, nesterov); the flags are the kernel's constexprs."""

    kind: str
    p_dtype: torch.dtype = torch.float32
    s_dtype: torch.dtype = torch.float32
    options: bool = False  # coupled decay, maximize, GradScaler, tensor lr, nesterov, caution
    stochastic: bool = False
    clip: int = 1  # schedule kernel: 0 none, 1 power law, 2 given bounds

    @property
    def name(self) -> str:
        if self.kind == "schedule":
            return f"schedule(clip={('none', 'power', 'callable')[self.clip]})"
        pair = f"{_SIG_NAMES[self.p_dtype]}/{_SIG_NAMES[self.s_dtype]}"
        flags = (("all options", self.options), ("stochastic", self.stochastic))
        extras = [x for x, on in flags if on]
        kind = "update" if self.kind == "update8" else self.kind
        return f"{kind}({pair}{', ' + ', '.join(extras) if extras else ''})"


def variants() -> list[Variant]:
    """Every variant worth compiling ahead of time: per dtype pair the plain update, the one
    with every option on, caution's counting pass; stochastic rounding for bfloat16; the
    schedule kernel per clip mode."""
    out = []
    for p_dtype, s_dtype in DTYPE_PAIRS:
        out.append(Variant("update", p_dtype, s_dtype))
        out.append(Variant("update", p_dtype, s_dtype, options=True))
        out.append(Variant("count", p_dtype, s_dtype, options=True))
        if p_dtype == torch.bfloat16:
            out.append(Variant("update", p_dtype, s_dtype, stochastic=True))
    out.extend(Variant("schedule", clip=clip) for clip in (0, 1, 2))
    for p_dtype in EIGHT_BIT_DTYPES:  # the 8-bit kernel, the same choices
        out.append(Variant("update8", p_dtype, torch.uint8))
        out.append(Variant("update8", p_dtype, torch.uint8, options=True))
        if p_dtype == torch.bfloat16:
            out.append(Variant("update8", p_dtype, torch.uint8, stochastic=True))
    return out


def aot_compile(variant: Variant, target, cfg: LaunchConfig | None = None):
    """Compile ``variant`` for ``target`` (a ``triton.backends.compiler.GPUTarget``) without a
    GPU; returns Triton's compiled kernel (``.asm`` holds ``ttir``, ``ptx``/``amdgcn``...)."""
    import triton
    import triton.language as tl

    if variant.kind == "update8":
        from adoptim.kernels.triton import launch8 as _triton_lowbit

        return _triton_lowbit.aot_compile(variant, target)
    jit = _jit()
    cfg = cfg or CONFIG
    if variant.kind == "schedule":
        signature = {
            "steps_ptr": "*i64",
            "n_tensors": "i32",
            "scalars_ptr": "*fp64",
            "counts_ptr": "*i32",
            "bounds_ptr": "*fp64",
            "found_inf_ptr": "*fp32",
            "clip_exp": "fp64",
            "beta2": "fp64",
        }
        constexprs = dict(CLIP=variant.clip, HAS_INF=True, CAUTION=True, BLOCK=cfg.schedule_block)
        fn, num_warps = jit.schedule_kernel, 4
    else:
        on = variant.options
        c_dtype = tl.float64 if torch.float64 in (variant.p_dtype, variant.s_dtype) else tl.float32
        signature = {
            "table_ptr": "*i64",
            "n_tensors": "i32",
            "scalars_ptr": "*fp64",
            "counts_ptr": "*i32",
            "lr_ptr": "*fp32",
            "lr": "fp64",
            "beta1": "fp64",
            "beta2": "fp64",
            "eps": "fp64",
            "weight_decay": "fp64",
            "decoupled_wd": "fp64",
            "grad_scale_ptr": "*fp32",
            "found_inf_ptr": "*fp32",
            "seed": "i64",
        }
        constexprs = dict(
            P_DTYPE=_tl_dtype(tl, variant.p_dtype),
            S_DTYPE=_tl_dtype(tl, variant.s_dtype),
            C_DTYPE=c_dtype,
            ALIGNED=True,
            COUPLED=on,
            MAXIMIZE=on,
            HAS_SCALE=on,
            SCALE_G=on,
            HAS_INF=on,
            LR_ON_DEVICE=on,
            SMALL_WEIGHT=False,
            NESTEROV=on,
            CAUTION=on or variant.kind == "count",
            COUNT_ONLY=variant.kind == "count",
            STOCHASTIC=variant.stochastic,
            BLOCK=cfg.block,
            CHUNK=cfg.chunk,
        )
        fn, num_warps = jit.adopt_kernel, cfg.num_warps
        if target.backend == "hip":
            num_warps = cfg.num_warps_amd
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def _global_accesses(
    asm: str, isa: str, element_bytes: int
) -> tuple[list[tuple[int, bool]], list[tuple[int, bool]]]:
    """(bytes, is_vector) of each global load and store instruction in PTX or AMDGCN: PTX
    vectors are ``.v2``/``.v4``; on AMD, accesses wider than the widest element (uniform
    table reads are scalar ``s_load`` there)."""
    import re

    if isa == "ptx":
        sizes = {"8": 1, "16": 2, "32": 4, "64": 8}
        pattern = r"\b{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b"
        found = {}
        for op in ("ld", "st"):
            found[op] = [
                (int(v or 1) * sizes[b], bool(v))
                for v, b in re.findall(pattern.format(op=op), asm)
            ]
        return found["ld"], found["st"]
    sizes = {"dwordx4": 16, "dwordx3": 12, "dwordx2": 8, "dword": 4, "short": 2, "ushort": 2,
             "short_d16": 2, "short_d16_hi": 2, "b128": 16, "b96": 12, "b64": 8, "b32": 4,
             "b16": 2, "u16": 2}  # fmt: skip
    found = {}
    for op in ("load", "store"):
        names = re.findall(rf"\b(?:global|buffer)_{op}_(\w+)", asm)
        found[op] = [(sizes[n], sizes[n] > element_bytes) for n in names if n in sizes]
    return found["load"], found["store"]


def access_summary(asm: dict, variant: Variant, cfg: LaunchConfig | None = None) -> dict:
    """Global memory accesses of a compiled update/count kernel (``asm``: Triton's
    ``compiled.asm``, PTX or AMDGCN): the widest load and store (bits) and, in the unmasked
    full-block loop, loads and stores per element (1.0: each input element read once, each
    output written once). Counted from the vector accesses' bytes (the masked tail and the
    table reads are scalar) against one thread's share of a block of theta, g, m, v (theta,
    m, v written)."""
    cfg = cfg or CONFIG
    block, warps, warps_amd = cfg.block, cfg.num_warps, cfg.num_warps_amd
    if variant.kind == "update8":  # theta, g, m codes, v codes (the scales are per 256)
        from adoptim.kernels.triton import launch8 as _triton_lowbit

        cfg8 = _triton_lowbit.CONFIG
        block, warps, warps_amd = cfg8.rows * 256, cfg8.num_warps, cfg8.num_warps_amd
    if "ptx" in asm:
        isa, warp = "ptx", 32
    else:
        isa, warp, warps = "amdgcn", 64, warps_amd
    p_size = torch.empty((), dtype=variant.p_dtype).element_size()
    s_size = torch.empty((), dtype=variant.s_dtype).element_size()
    # (AMD: a vector is wider than the widest element, and the 8-bit kernel reads float32
    # scales per block)
    widest = max(p_size, 4 if variant.kind == "update8" else s_size)
    loads, stores = _global_accesses(asm[isa], isa, widest)
    per_thread = block // (warp * warps)
    want_loaded = per_thread * (2 * p_size + 2 * s_size)
    writes = variant.kind in ("update", "update8")
    want_stored = per_thread * (p_size + 2 * s_size) if writes else 0
    vec_loads = [b for b, vector in loads if vector]
    vec_stores = [b for b, vector in stores if vector]
    return {
        "isa": isa,
        "load_bits": 8 * max(vec_loads or [b for b, _ in loads] or [0]),
        "store_bits": 8 * max(vec_stores or [b for b, _ in stores] or [0]),
        "loads_per_element": sum(vec_loads) / want_loaded,
        "stores_per_element": sum(vec_stores) / want_stored if want_stored else 0.0,
        "vector_loads": len(vec_loads),
        "vector_stores": len(vec_stores),
    }


def default_targets() -> list[tuple[str, Any]]:
    """What ``adoptim doctor --compile`` compiles for: the local GPU, or without one sm_80,
    sm_90 and AMD gfx942 (``(label, GPUTarget)`` pairs)."""
    from triton.backends.compiler import GPUTarget

    if torch.cuda.is_available():
        import triton

        target = triton.runtime.driver.active.get_current_target()
        label = f"sm_{target.arch}" if target.backend == "cuda" else str(target.arch)
        return [(label, target)]
    return [
        ("sm_80", GPUTarget("cuda", 80, 32)),
        ("sm_90", GPUTarget("cuda", 90, 32)),
        ("gfx942", GPUTarget("hip", "gfx942", 64)),
    ]


def compile_report(targets: list[tuple[str, Any]] | None = None) -> list[dict]:
    """Compile every variant for every target; one record per (variant, target): outcome,
    seconds, and for PTX the access summary. Needs a process where triton is not in
    interpreter mode (the kernels are then compiled functions)."""
    import time

    records = []
    for label, target in targets or default_targets():
        for variant in variants():
            record: dict[str, Any] = {"kernel": variant.name, "target": label}
            start = time.perf_counter()
            try:
                compiled = aot_compile(variant, target)
            except Exception as exc:  # noqa: BLE001 - reported per variant
                record.update(ok=False, error=f"{type(exc).__name__}: {exc}".strip())
            else:
                record["ok"] = True
                if variant.kind != "schedule":
                    record.update(access_summary(compiled.asm, variant))
            record["seconds"] = round(time.perf_counter() - start, 2)
            records.append(record)
    return records
