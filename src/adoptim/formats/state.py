"""Per-parameter optimizer state under the format its group asks for.

The formats (one module each): :mod:`~adoptim.formats.floating` (float moments) and
:mod:`~adoptim.formats.blockwise8` (8-bit moments) for m and v; :mod:`~adoptim.formats.params`
for the parameter itself. This module is what the optimizer calls: create state, read the
moments as float32, convert between formats when a checkpoint of another format is loaded,
and validate the options.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adoptim.distributed import sharded as _sharded
from adoptim.formats import blockwise8, floating

__all__ = [
    "STATE_DTYPES",
    "check_8bit_groups",
    "check_min_8bit_size",
    "conform_state",
    "is_8bit",
    "moments",
    "new_state",
    "resolve_state_dtype",
    "restore_state_dtypes",
    "state_dtype_for",
    "step_device",
]

STATE_DTYPES = ("auto", "float32", "param", "8bit")
is_8bit = blockwise8.applies
state_dtype_for = floating.state_dtype_for


def resolve_state_dtype(value: Any) -> str:
    """Normalise the ``state_dtype`` option to plain data (kept in param groups)."""
    if value in (torch.float32, "float32", "fp32"):
        return "float32"
    if value is None or value == "param":
        return "param"
    if value == "auto":
        return "auto"
    if value == "8bit":
        return "8bit"
    raise ValueError(
        f"Invalid state_dtype: {value!r} (accepted: 'auto' = float32 state for bfloat16/"
        "float16 parameters and the parameter's dtype otherwise; 'float32' (or "
        "torch.float32); 'param' (or None) = the parameter's dtype; '8bit' = block-wise "
        "8-bit m and v for tensors with at least min_8bit_size elements)"
    )


def check_min_8bit_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid min_8bit_size: {value!r} (accepted: an integer >= 0)")
    return value


def check_8bit_groups(param_groups: list[dict[str, Any]], *, fused: bool | None) -> None:
    """Refuse, at construction, what ``state_dtype="8bit"`` does not support."""
    for group in param_groups:
        if group.get("state_dtype") != "8bit":
            continue
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                raise ValueError(
                    f"state_dtype='8bit' cannot be used with {flag}=True: requantizing the "
                    "moments draws random numbers on the host and rounds, which neither a "
                    "CUDA graph nor autograd can follow; use state_dtype='auto'"
                )
        for p in group["params"]:
            if _sharded.is_dtensor(p):  # FSDP2: each rank quantizes its local shard
                reason = _sharded.refusal(p)
                if reason is not None:
                    raise ValueError(f"state_dtype='8bit' cannot be used: {reason}")
            elif type(p) not in (Tensor, torch.nn.Parameter):
                raise ValueError(
                    f"state_dtype='8bit' takes plain tensors and DTensors, and a parameter "
                    f"is a {type(p).__name__}; use state_dtype='auto'"
                )


def new_state(param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    """Zero moments for ``param`` in the format its group asks for (``step`` not included)."""
    if blockwise8.applies(param, group):
        return blockwise8.new_state(param)
    return floating.new_state(param, group)


def moments(state: dict[str, Any], param: Tensor) -> tuple[Tensor, Tensor]:
    """(m, v) of one parameter as new float32 tensors shaped like it (complex64 for complex
    parameters), whatever the state format; zeros before its first step."""
    if "exp_avg" not in state:
        shape_dtype = torch.complex64 if param.is_complex() else torch.float32
        if _sharded.is_dtensor(param):  # sharded like it
            zeros = torch.zeros_like(param, dtype=shape_dtype)
        else:
            zeros = torch.zeros(param.shape, dtype=shape_dtype, device=param.device)
        return zeros, zeros.clone()
    if "exp_avg_scale" in state:
        return blockwise8.to_float(state, param)
    return floating.to_float(state, param)


def conform_state(optimizer: torch.optim.Optimizer) -> None:
    """Bring every parameter's moments to the format its group asks for: float moments
    (a float32-state checkpoint, ``from_adam``) are quantized for 8-bit tensors, 8-bit ones
    (an 8-bit checkpoint) are dequantized for float-state tensors."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            have = "exp_avg_scale" in state
            want = blockwise8.applies(p, group)
            if have:
                blockwise8.check_state(p, state)
            if want and not have:
                step = float(state.get("step", 0.0))
                state.update(blockwise8.from_float(p, state["exp_avg"], state["exp_avg_sq"], step))
            elif have and not want:
                m, v = blockwise8.to_float(state, p)
                for key in blockwise8.KEYS:
                    del state[key]
                dtype = p.dtype if p.is_complex() else state_dtype_for(p, group["state_dtype"])
                state["exp_avg"], state["exp_avg_sq"] = m.to(dtype), v.to(dtype)


def restore_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo torch's casts on ``load_state_dict``, then convert moments between formats.

    ``Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype, which
    would turn float32 moments of a bfloat16 parameter into bfloat16 ones, and 8-bit codes
    and scales into floats; they are taken again from the saved tensors (float moments at the
    dtype the ``state_dtype`` option asks for, codes and scales as saved). Then
    :func:`conform_state` quantizes float moments for 8-bit tensors and dequantizes 8-bit
    ones for float-state tensors.
    """
    saved = state_dict.get("state", {})
    saved_ids = iter([i for group in state_dict.get("param_groups", []) for i in group["params"]])
    for group in optimizer.param_groups:
        for p in group["params"]:
            pid = next(saved_ids, None)
            if pid not in saved:
                continue
            if "exp_avg_scale" in saved[pid]:  # 8-bit: codes and scales exactly as saved
                for key in blockwise8.KEYS:
                    optimizer.state[p][key] = saved[pid][key].to(device=p.device, copy=True)
                continue
            want = state_dtype_for(p, group.get("state_dtype", "auto"))
            if want == p.dtype:
                continue
            for key in floating.KEYS:
                value = saved[pid].get(key)
                if isinstance(value, Tensor) and value.is_floating_point():
                    optimizer.state[p][key] = value.to(device=p.device, dtype=want, copy=True)
    conform_state(optimizer)


def step_device(param: Tensor, group: dict[str, Any]) -> torch.device:
    """Where a parameter's ``step`` lives: on the host (reading it costs no device sync, as in
    torch.optim.Adam), or on the parameter's device when the step must not sync with the host
    (``capturable``, and ``fused=True`` on a GPU, whose Triton kernel advances it there)."""
    on_device = group.get("capturable") or (
        group.get("fused") is True and param.device.type != "cpu"
    )
    return param.device if on_device else torch.device("cpu")
