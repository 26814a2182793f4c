"""What the Triton launchers share (:mod:`adoptim.kernels.triton.launch` for float moments,
:mod:`adoptim.kernels.triton.launch8` for 8-bit ones; :mod:`adoptim.kernels.triton.aot`
compiles both ahead of time): finding triton, host-to-device copies of the launch tables,
dtype names, the compile options, and the handling of a kernel that fails to compile.

Nothing here imports triton at module level, so that importing adoptim never does.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from torch import Tensor

__all__ = [
    "COMPILE_OPTIONS",
    "INSTALL_HINT",
    "compile_failed",
    "interpreting",
    "jit",
    "local",
    "tl_dtype",
    "to_device",
    "triton_installed",
]

INSTALL_HINT = "pip install 'adoptim[gpu]' (or pip install triton)"

#: What every launch and compile passes to Triton besides the constexprs: no contraction of
#: a product and an add into an fma, so that each operation rounds once, as on every path.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def triton_installed() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def jit():
    """The kernels module (imports triton)."""
    from adoptim.kernels.triton import jit as _triton_jit

    return _triton_jit


def to_device(host: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """``host`` on ``device``, copied without a sync; also returns the pinned source, which
    a CUDA graph that captured the copy reads again at every replay (kept alive)."""
    if device.type == "cpu":
        return host, None
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


def tl_dtype(tl, dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }[dtype]


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the update is elementwise: each rank updates its own)."""
    if type(t) in (Tensor, torch.nn.Parameter):
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


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
