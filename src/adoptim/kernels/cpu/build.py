"""Building, caching and loading the fused CPU kernels (``csrc/fused_adopt.cpp``: the
float-state and 8-bit kernels, one update written once).

The kernels are built with ``torch.utils.cpp_extension`` on first use and cached, one shared
library (both sources, two ops in the ``adoptim`` namespace) for all tensors and dtypes.
Building takes 6-40 s, so it never blocks a step:

* the first time a fused step is wanted, a detached ``python -m adoptim.kernels.cpu.builder``
  process builds the library and moves it atomically into the cache
  (``$TORCH_EXTENSIONS_DIR/adoptim_fused/<key>/``, default ``~/.cache/torch_extensions``); the
  key hashes the sources, the compiler flags and the torch/Python versions;
* until the library is there, :func:`load_kernel` returns None and fused steps run the
  for-loop path (the same maths; the two agree within float32 rounding), then switch;
* a later process finds the library in the cache and loads it in milliseconds.

A build in a separate process, rather than a thread, survives the process that started it
(a short script still leaves a warm cache behind) and cannot leave torch's build lock behind.
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

import torch

__all__ = [
    "build_unavailable_reason",
    "buildable",
    "clear_failure",
    "failure_message",
    "is_loaded",
    "kernel_path",
    "load_kernel",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = (_CSRC / "fused_adopt.cpp",)
_LIB_NAME = "adoptim_fused.so"
# A failed build is not retried for this long (fix the compiler, or call clear_failure()).
_FAILURE_TTL_S = 3600.0
# A build that has not finished in this long is considered dead.
_BUILD_TTL_S = 900.0


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _build_flags() -> list[str]:
    # -fno-trapping-math changes no value (it lets the compiler evaluate both sides of a
    # select and vectorise floor); without it the 8-bit kernel's requantization loop stays
    # scalar, about 4x slower.
    # -ffp-contract=off: the kernels write every fused multiply-add they mean (std::fma, where
    # torch's vectorised kernels use one) and the compiler must not add others, so that the
    # kernels reproduce the for-loop path's float32 arithmetic bit for bit.
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    # Without these the loops are compiled for baseline x86-64 (SSE2) and run ~2x slower.
    # The instruction set follows the CPU capability torch itself dispatches to (and is part
    # of the cache key, so a cache shared with an older CPU gets its own build). With AVX-512
    # the 8-bit kernel, which is compute-bound, runs ~2x faster than with AVX2 (measured on
    # AMD EPYC Zen 4; the float kernel is memory-bound either way).
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                  "-mprefer-vector-width=512"]
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
    for source in _SOURCES:
        digest.update(source.read_bytes())
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
                [sys.executable, "-m", "adoptim.kernels.cpu.builder", str(directory)],
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


def failure_message(directory: Path | None = None) -> str | None:
    """The failed build's log, while a failure is recent; None otherwise."""
    directory = kernel_path().parent if directory is None else directory
    failed = directory / "build-failed"
    try:
        if time.time() - failed.stat().st_mtime < _FAILURE_TTL_S:
            log = (directory / "build.log").read_text(errors="replace")[-3000:]
            return (
                f"building the fused ADOPT kernel failed (log: {directory / 'build.log'}):\n"
                f"{log}\nLeave fused unset to use the for-loop path, or fix the compiler "
                "and call adoptim.kernels.cpu.build.clear_failure()."
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
                failure = failure_message(path.parent)
                if failure is not None:
                    if wait:
                        raise RuntimeError(failure)
                    return None
                if build and build_unavailable_reason() is None:
                    _start_build(path.parent)
                elif wait:
                    raise RuntimeError(build_unavailable_reason() or "the fused kernel is not built")
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
                sources=[str(source) for source in _SOURCES],
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


def build_unavailable_reason() -> str | None:
    """Why the kernel can be neither loaded from the cache nor built here, or None."""
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


def is_loaded() -> bool:
    """True once this process has loaded the kernel."""
    return _op is not None


_buildable_cache: dict[tuple, bool] = {}


def buildable() -> bool:
    """Whether the kernel is loaded, cached or can be built here (remembered per compiler
    and cache folder, so the default path choice costs nothing per step)."""
    if _op is not None:
        return True
    key = (os.environ.get("CXX"), os.environ.get("TORCH_EXTENSIONS_DIR"))
    if key not in _buildable_cache:
        ok = build_unavailable_reason() is None and failure_message() is None
        _buildable_cache[key] = ok
    return _buildable_cache[key]
