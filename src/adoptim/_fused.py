"""The fused (single-pass) ADOPT step on CPU, and the extras every path shares with it.

The kernel is C++ (``csrc/fused_adopt.cpp``), built with ``torch.utils.cpp_extension`` on first
use and cached, one shared library for all tensors and dtypes. Building takes 6-40 s, so it
never blocks a step:

* the first time a fused step is wanted, a detached ``python -m adoptim._fused_build`` process
  builds the library and moves it atomically into the cache
  (``$TORCH_EXTENSIONS_DIR/adoptim_fused/<key>/``, default ``~/.cache/torch_extensions``); the
  key hashes the source, the compiler flags and the torch/Python versions;
* until the library is there, fused steps run the for-loop path (the same maths; the two
  agree within float32 rounding), then switch;
* a later process finds the library in the cache and loads it in milliseconds.

A build in a separate process, rather than a thread, survives the process that started it
(a short script still leaves a warm cache behind) and cannot leave torch's build lock behind.

Also here, because the kernel does them too and the other paths must agree with it:
unscaling by a ``GradScaler``'s scale, and float32 state for bfloat16/float16 parameters
(the update is computed in float32 and the parameter is rounded back once, to nearest even
or stochastically).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adoptim._utils import is_compiling, view_as_real_if_complex

__all__ = [
    "kernel_path",
    "load_kernel",
    "resolve_state_dtype",
    "unsupported_reason",
]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_adopt.cpp"
_LIB_NAME = "adoptim_fused.so"
SUPPORTED_DTYPES = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.complex64,
    torch.complex128,
)
LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_DTYPES = ("auto", "float32", "param")
# A failed build is not retried for this long (fix the compiler, or call clear_failure()).
_FAILURE_TTL_S = 3600.0
# A build that has not finished in this long is considered dead.
_BUILD_TTL_S = 900.0


# --------------------------------------------------------------------------------------------
# Options shared by all paths


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


# --------------------------------------------------------------------------------------------
# Where the kernel can run


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _build_flags() -> list[str]:
    flags = ["-O3", "-fno-math-errno"]
    # Without these the loop is compiled for baseline x86-64 (SSE2) and runs ~2x slower.
    # (AVX-512 flags were measured too: no faster here, the loop is memory-bound with AVX2.)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    # at::parallel_for is inline OpenMP: without -fopenmp its pragma is ignored and the
    # kernel runs on one thread whatever torch.get_num_threads() says.
    if torch.backends.openmp.is_available():
        flags += ["-fopenmp"]
    return flags


def _build_path() -> str:
    """PATH for the builder: the caller's, plus this interpreter's scripts folder, where
    ``pip install ninja`` (a dependency) puts ninja even when the venv is not activated."""
    scripts = os.path.dirname(sys.executable)
    return os.pathsep.join([os.environ.get("PATH", ""), scripts])


def _cache_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    return Path(root) / "adoptim_fused"


def _cache_key() -> str:
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    for part in (
        " ".join(_build_flags()),
        torch.__version__,
        sys.version,
        platform.machine(),
        str(torch.compiled_with_cxx11_abi()),
    ):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def kernel_path() -> Path:
    """Where this installation's built kernel lives (or will live)."""
    return _cache_root() / _cache_key() / _LIB_NAME


def unsupported_reason(params: list[Tensor] | None = None) -> str | None:
    """Why the fused kernel cannot run on these parameters here, or None if it can.

    Checked at construction for ``fused=True`` (which then raises with this text) and by the
    default choice for ``fused=None`` (which then quietly takes another path).
    """
    if os.environ.get("ADOPTIM_DISABLE_FUSED", "") not in ("", "0"):
        return "the fused kernel is disabled by the environment variable ADOPTIM_DISABLE_FUSED"
    for p in params or ():
        if type(p) not in (Tensor, torch.nn.Parameter):
            return (
                f"the fused kernel takes plain tensors, and a parameter is a {type(p).__name__} "
                "(e.g. a DTensor from FSDP2 or tensor parallelism); use foreach=True or "
                "leave fused unset"
            )
        if p.device.type != "cpu":
            return (
                f"the fused kernel runs on CPU tensors only and a parameter is on {p.device}; "
                "on CUDA use foreach=True (the default there) or leave fused unset"
            )
        if p.dtype not in SUPPORTED_DTYPES:
            return (
                f"the fused kernel does not support parameters of dtype {p.dtype} (supported: "
                "float32, float64, bfloat16, float16, complex64, complex128); leave fused unset"
            )
    if _op is not None or kernel_path().exists():
        return None
    if sys.platform == "win32":
        return "building the fused kernel is not supported on Windows; leave fused unset"
    if _compiler() is None:
        return (
            "the fused kernel is built on first use and needs a C++ compiler, but "
            f"{os.environ.get('CXX', 'c++')!r} was not found on PATH: install g++ or clang "
            "(or point CXX at one), or leave fused unset to use the for-loop path"
        )
    if shutil.which("ninja", path=_build_path()) is None:
        return (
            "building the fused kernel needs ninja (pip install ninja), or leave fused unset "
            "to use the for-loop path"
        )
    return None


# --------------------------------------------------------------------------------------------
# Building and loading (see the module docstring)

_op: Callable | None = None
_lock = threading.Lock()
_last_poll = 0.0
_builder: subprocess.Popen | None = None  # the builder this process started, if any


def _builder_alive(marker: Path) -> bool:
    try:
        pid = int(marker.read_text().strip() or 0)
        age = time.time() - marker.stat().st_mtime
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return age < 10.0  # just created: its owner is about to write the builder's pid
    if age > _BUILD_TTL_S:
        return False
    if _builder is not None and _builder.pid == pid:
        return _builder.poll() is None  # our own child: poll() also reaps it when it ends
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_build(directory: Path) -> None:
    """Start the detached builder unless one is already running for this key."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "building.pid"
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _builder_alive(marker):
                return
            marker.unlink(missing_ok=True)  # left by a builder that died
            continue
        with open(directory / "build.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "adoptim._fused_build", str(directory)],
                env={**os.environ, "PATH": _build_path()},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives this process
            )
        global _builder
        _builder = proc
        os.write(fd, str(proc.pid).encode())
        os.close(fd)
        return


def clear_failure() -> None:
    """Forget a failed build so that the next fused step tries again."""
    (kernel_path().parent / "build-failed").unlink(missing_ok=True)


def _failure_message(directory: Path) -> str | None:
    failed = directory / "build-failed"
    try:
        if time.time() - failed.stat().st_mtime < _FAILURE_TTL_S:
            log = (directory / "build.log").read_text(errors="replace")[-3000:]
            return (
                f"building the fused ADOPT kernel failed (log: {directory / 'build.log'}):\n"
                f"{log}\nLeave fused unset to use the for-loop path, or fix the compiler "
                "and call adoptim._fused.clear_failure()."
            )
    except OSError:
        pass
    return None


def load_kernel(*, build: bool = True, wait: bool = False, timeout: float = 600.0):
    """The kernel op if it is ready; None while it is being built (or cannot be).

    With ``build`` a missing kernel is built in the background; with ``wait`` this blocks
    until it is loaded, and raises RuntimeError if the build fails or takes over ``timeout``
    seconds. Cheap to call on every step: the cache is looked at most every 0.25 s.
    """
    global _op, _last_poll
    if _op is not None:
        return _op
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if wait or now - _last_poll > 0.25:
            _last_poll = now
            with _lock:
                if _op is not None:
                    return _op
                path = kernel_path()
                if path.exists():
                    torch.ops.load_library(str(path))
                    _op = torch.ops.adoptim.fused_adopt_
                    return _op
                failure = _failure_message(path.parent)
                if failure is not None:
                    if wait:
                        raise RuntimeError(failure)
                    return None
                if build and unsupported_reason() is None:
                    _start_build(path.parent)
                elif wait:
                    raise RuntimeError(unsupported_reason() or "the fused kernel is not built")
        if not wait:
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fused ADOPT kernel was not built within {timeout:.0f} s")
        time.sleep(0.2)


def _build_main(directory: Path) -> int:
    """Entry point of the builder process: build into a private folder, then publish."""
    from torch.utils import cpp_extension

    marker = directory / "building.pid"
    cflags = _build_flags()
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix="build-") as tmp:
            t0 = time.perf_counter()
            cpp_extension.load(
                name="adoptim_fused",
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else [],
                build_directory=tmp,
                is_python_module=False,
                verbose=True,
            )
            staged = directory / f".{_LIB_NAME}.{os.getpid()}"
            shutil.copy2(os.path.join(tmp, _LIB_NAME), staged)
            os.replace(staged, directory / _LIB_NAME)  # atomic: readers see all or nothing
            print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
        (directory / "build-failed").unlink(missing_ok=True)
        return 0
    except Exception as exc:  # noqa: BLE001 - recorded for the process that asked
        print(f"build failed: {exc!r}", flush=True)
        (directory / "build-failed").touch()
        return 1
    finally:
        marker.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The step


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
) -> None:
    """The fused path: one pass over memory per tensor, all tensors in one kernel call.

    Runs the for-loop path instead while the kernel is being built, under torch.compile
    (the op has no tracing rules), and for tensors whose layout the kernel cannot walk as
    one flat array (rare: non-dense parameters).
    """
    from adoptim.optimizer import _call_scalars, _single_tensor_adopt

    op = None if is_compiling() else load_kernel(build=True)
    if op is None and strict:  # fused=True: a failed build is an error, not a slow path
        failure = _failure_message(kernel_path().parent)
        if failure is not None:
            raise RuntimeError(failure)
    if op is None:
        run_unfused(
            _single_tensor_adopt,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            grad_scale=grad_scale,
            stochastic_rounding=stochastic_rounding,
            **kwargs,
        )
        return

    lr = kwargs["lr"]
    lr = lr.item() if isinstance(lr, Tensor) else float(lr)
    weight_decay, decouple = kwargs["weight_decay"], kwargs["decouple"]
    bounds, sq_weights, decays = _call_scalars(
        state_steps,
        as_tensors=False,
        lr=lr,
        beta2=kwargs["beta2"],
        weight_decay=weight_decay if decouple else 0.0,
        clip_exp=kwargs["clip_exp"],
        clip_fn=kwargs["clip_fn"],
    )
    scale = 1.0 if grad_scale is None else float(grad_scale.item())

    # One kernel call per (parameter dtype, state dtype); tensors it cannot walk go aside.
    # This loop is the per-step Python cost of many small tensors: cheap checks first.
    buckets: dict[tuple, list[int]] = {}
    aside: list[int] = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
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
            kwargs["beta1"],
            kwargs["beta2"],
            kwargs["eps"],
            weight_decay,
            weight_decay != 0 and not decouple,
            kwargs["maximize"],
            scale,
            stochastic,
            seed,
        )
    if aside:
        def pick(seq: list) -> list:
            return [seq[i] for i in aside]

        run_unfused(
            _single_tensor_adopt,
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(state_steps),
            grad_scale=grad_scale,
            stochastic_rounding=stochastic_rounding,
            **kwargs,
        )


def default_to_fused(params: list[Tensor], differentiable: bool) -> bool:
    """The rule for ``fused=None`` (with ``foreach=None``): the fused kernel for CPU
    parameters when it can be built here, except when differentiating through the step or
    under torch.compile."""
    if differentiable or is_compiling():
        return False
    if os.environ.get("ADOPTIM_DISABLE_FUSED", "") not in ("", "0"):
        return False
    if not all(p.device.type == "cpu" and p.dtype in SUPPORTED_DTYPES for p in params):
        return False
    if not all(type(p) in (Tensor, torch.nn.Parameter) for p in params):
        return False  # tensor subclasses (FSDP2's DTensor shards) take the unfused paths
    return _op is not None or _buildable()


_buildable_cache: dict[tuple, bool] = {}


def _buildable() -> bool:
    key = (os.environ.get("CXX"), os.environ.get("TORCH_EXTENSIONS_DIR"))
    if key not in _buildable_cache:
        ok = unsupported_reason() is None and _failure_message(kernel_path().parent) is None
        _buildable_cache[key] = ok
    return _buildable_cache[key]
