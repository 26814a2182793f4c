"""State formats: the dtype of each parameter's moments, and how the update paths handle
moments wider than their parameter (float32 state for bfloat16/float16 parameters).

With float32 state every path computes the update in float32 and rounds the parameter once
(to nearest even, or stochastically for bfloat16), as the kernel does.

``state_dtype="8bit"`` keeps m and v as block-wise 8-bit codes (format: :mod:`adoptim.formats.blockwise8`;
the step: :mod:`adoptim.formats.blockwise8_step`) for float32/bfloat16/float16/complex64 parameters with at
least ``min_8bit_size`` real elements (default 4,096, as bitsandbytes and torchao); smaller
tensors, and float64 ones, keep the moments ``"auto"`` would give them. State entries of an
8-bit tensor, all plain tensors: ``exp_avg`` (int8 codes of m, flat), ``exp_avg_scale``
(float32, one per block of 256), ``exp_avg_sq`` (uint8 codes of v, flat), ``exp_avg_sq_scale``
and ``step``. For a DTensor parameter (FSDP2) they are DTensors holding the local shard's
codes and scales (layout: :mod:`adoptim.distributed.sharded`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adoptim import rng as _rng
from adoptim.distributed import sharded as _sharded
from adoptim.formats import blockwise8 as _quant

__all__ = [
    "LOW_PRECISION",
    "QUANTIZABLE",
    "STATE_DTYPES",
    "check_8bit_groups",
    "check_min_8bit_size",
    "conform_state",
    "is_8bit",
    "moments",
    "new_state",
    "resolve_state_dtype",
    "restore_state_dtypes",
    "run_unfused",
    "state_dtype_for",
    "write_back",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_DTYPES = ("auto", "float32", "param", "8bit")
#: parameter dtypes whose moments ``state_dtype="8bit"`` quantizes
QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
SCALE_KEYS = {"exp_avg": "exp_avg_scale", "exp_avg_sq": "exp_avg_sq_scale"}
#: the state entries of an 8-bit tensor besides ``step``, in the update paths' order
_8BIT_KEYS = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")


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


def _real_numel(param: Tensor) -> int:
    return param.numel() * (2 if param.is_complex() else 1)


def is_8bit(param: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param``'s moments are kept in 8 bits under its group's options."""
    return (
        group.get("state_dtype") == "8bit"
        and param.dtype in QUANTIZABLE
        and _real_numel(param) >= group.get("min_8bit_size", _quant.DEFAULT_MIN_8BIT_SIZE)
    )


def new_state(param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    """Zero moments for ``param`` in the format its group asks for (``step`` not included)."""
    if is_8bit(param, group) and _sharded.is_dtensor(param):
        return _sharded.new_sharded_state(param)  # codes and scales of the local shard
    if is_8bit(param, group):
        n = _real_numel(param)
        blocks = _quant.num_blocks(n)
        return {
            "exp_avg": torch.zeros(n, dtype=torch.int8, device=param.device),
            "exp_avg_scale": torch.zeros(blocks, dtype=torch.float32, device=param.device),
            "exp_avg_sq": torch.zeros(n, dtype=torch.uint8, device=param.device),
            "exp_avg_sq_scale": torch.zeros(blocks, dtype=torch.float32, device=param.device),
        }
    dtype = state_dtype_for(param, group["state_dtype"])
    return {
        key: torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq")
    }


def _shape_like(flat: Tensor, param: Tensor) -> Tensor:
    """A flat real float32 tensor as one shaped like ``param`` (complex64 for complex)."""
    if param.is_complex():
        return torch.view_as_complex(flat.view(*param.shape, 2))
    return flat.view(param.shape)


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
    if "exp_avg_scale" in state and _sharded.is_dtensor(param):  # the local shard's blocks
        _, _, (m_codes, m_scale, v_codes, v_scale) = _sharded.local_views(
            param, None, tuple(state[k] for k in _8BIT_KEYS)
        )
        m = _quant.dequantize_m(m_codes, m_scale)
        v = _quant.dequantize_v(v_codes, v_scale)
        return _sharded.shaped_like(m, param), _sharded.shaped_like(v, param)
    if "exp_avg_scale" in state:
        m = _quant.dequantize_m(state["exp_avg"], state["exp_avg_scale"])
        v = _quant.dequantize_v(state["exp_avg_sq"], state["exp_avg_sq_scale"])
        return _shape_like(m, param), _shape_like(v, param)
    dtype = torch.complex64 if param.is_complex() else torch.float32
    return (
        state["exp_avg"].to(dtype, copy=True),
        state["exp_avg_sq"].to(dtype, copy=True),
    )


def conform_state(optimizer: torch.optim.Optimizer) -> None:
    """Bring every parameter's moments to the format its group asks for: float moments
    (a float32-state checkpoint, ``from_adam``) are quantized for 8-bit tensors, 8-bit ones
    (an 8-bit checkpoint) are dequantized for float-state tensors."""
    pid = -1  # each parameter's index in the state_dict numbering: its key in adoptim.rng
    for group in optimizer.param_groups:
        for p in group["params"]:
            pid += 1
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            have = "exp_avg_scale" in state
            want = is_8bit(p, group)
            sharded = _sharded.is_dtensor(p)
            if have and sharded:
                _sharded.check_sharded_state(p, state)
            elif have:
                n = _real_numel(p)
                for key in ("exp_avg", "exp_avg_sq"):
                    if state[key].numel() != n or state[key].dtype not in (torch.int8, torch.uint8):
                        raise ValueError(
                            f"8-bit state {key!r} has {state[key].numel()} {state[key].dtype} "
                            f"codes but its parameter has {n} elements"
                        )
            if want and not have:
                m, v = (
                    _real_flat_f32(state[k].to_local() if sharded else state[k])
                    for k in ("exp_avg", "exp_avg_sq")
                )
                state.update(new_state(p, group))
                _, _, (m_codes, m_scale, v_codes, v_scale) = _sharded.local_views(
                    p, None, tuple(state[k] for k in _8BIT_KEYS)
                )
                step = float(state.get("step", 0.0))
                seed = _quant.state_seed(step, _rng.tensor_seed(group.get("seed", 0), pid))
                _quant.quantize_m(m, seed, m_codes, m_scale)
                _quant.quantize_v(v, seed, v_codes, v_scale)
            elif have and not want:
                m, v = moments(state, p)
                del state["exp_avg_scale"], state["exp_avg_sq_scale"]
                dtype = state_dtype_for(p, group["state_dtype"])
                if p.is_complex():
                    dtype = p.dtype
                state["exp_avg"] = m.to(dtype)
                state["exp_avg_sq"] = v.to(dtype)


def _real_flat_f32(t: Tensor) -> Tensor:
    real = torch.view_as_real(t) if t.is_complex() else t
    return real.reshape(-1).to(torch.float32, copy=True)


def state_dtype_for(param: Tensor, state_dtype: str) -> torch.dtype:
    """The dtype of ``exp_avg``/``exp_avg_sq`` for ``param`` under the ``state_dtype`` option.

    ``auto``, ``float32`` and ``8bit`` (for the tensors it does not quantize) keep float32
    moments for bfloat16 and float16 parameters (in bfloat16, ``(1 - beta2) * g*g`` is below
    v's resolution at beta2 = 0.9999, so v would never move); wider parameters keep their own
    dtype either way.
    """
    if state_dtype != "param" and param.dtype in LOW_PRECISION:
        return torch.float32
    return param.dtype


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
                for key in ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale"):
                    value = saved[pid][key]
                    optimizer.state[p][key] = value.to(device=p.device, copy=True)
                continue
            want = state_dtype_for(p, group.get("state_dtype", "auto"))
            if want == p.dtype:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                value = saved[pid].get(key)
                if isinstance(value, Tensor) and value.is_floating_point():
                    optimizer.state[p][key] = value.to(device=p.device, dtype=want, copy=True)
    conform_state(optimizer)


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
    seed: int = 0,
    keys: list[int] | None = None,
    **kwargs: Any,
) -> None:
    """Run the for-loop or foreach path ``func`` with the kernel's extras.

    * ``grad_scale`` (from a GradScaler): gradients are divided by it first;
    * parameters whose moments are wider than they are (float32 state for bfloat16/float16):
      the step runs on float32 copies of the parameter and gradient, and the result is
      rounded back once, as the kernel does. No master copy is kept between steps;
    * bfloat16 parameters with bfloat16 state and ``stochastic_rounding``: the step runs on
      float32 copies of all four, the moments are rounded back to nearest and the parameter
      stochastically, as the kernel does (which computes in float32 whatever the state).
    """
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    widen = [
        i
        for i, (p, m) in enumerate(zip(params, exp_avgs))
        if m.dtype != p.dtype or (stochastic_rounding and p.dtype == torch.bfloat16)
    ]
    if not widen:
        func(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        return
    work_params, work_grads = list(params), list(grads)
    work_m, work_v = list(exp_avgs), list(exp_avg_sqs)
    narrow = [i for i in widen if exp_avgs[i].dtype == params[i].dtype]  # bf16 state + SR
    for i in widen:
        work_params[i] = params[i].to(torch.float32)
        work_grads[i] = grads[i].to(torch.float32)
    for i in narrow:
        work_m[i], work_v[i] = exp_avgs[i].float(), exp_avg_sqs[i].float()
    seeds = {}  # stochastic rounding's seeds, from the call counts before the step
    if stochastic_rounding:
        for i in widen:
            if params[i].dtype == torch.bfloat16:
                key = i if keys is None else keys[i]
                seeds[i] = _rng.step_seed(_rng.tensor_seed(seed, key), float(state_steps[i]))
    func(work_params, work_grads, work_m, work_v, state_steps, **kwargs)
    for i in widen:
        write_back(params[i], work_params[i], stochastic_rounding, seeds.get(i, 0))
    for i in narrow:
        exp_avgs[i].copy_(work_m[i])
        exp_avg_sqs[i].copy_(work_v[i])


def write_back(param: Tensor, value: Tensor, stochastic: bool, seed: int = 0) -> None:
    """Store the float32 ``value`` into the low-precision ``param``.

    Round to nearest even, or for bfloat16 with ``stochastic``, round up with probability
    equal to the discarded fraction, so that E[param] = value and updates far below half an
    ulp still move the parameter on average; the random bits are the counter-based ones of
    :mod:`adoptim.rng` for this step's ``seed`` (no generator is drawn from).
    """
    if not (stochastic and param.dtype == torch.bfloat16 and value.dtype == torch.float32):
        param.copy_(value)
        return
    param.copy_(_quant.stochastic_round_bf16(value, seed))


def step_device(param: Tensor, group: dict[str, Any]) -> torch.device:
    """Where a parameter's ``step`` lives: on the host (reading it costs no device sync, as in
    torch.optim.Adam), or on the parameter's device when the step must not sync with the host
    (``capturable``, and ``fused=True`` on a GPU, whose Triton kernel advances it there)."""
    on_device = group.get("capturable") or (
        group.get("fused") is True and param.device.type != "cpu"
    )
    return param.device if on_device else torch.device("cpu")

