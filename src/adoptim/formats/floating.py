"""The float moment format: ``exp_avg`` (m) and ``exp_avg_sq`` (v) as tensors shaped like the
parameter, in float32 (``state_dtype="auto"``/``"float32"`` for bfloat16/float16 parameters)
or in the parameter's dtype (``"param"``, and every wider parameter).

For the update, moments of the compute dtype are used in place; narrower ones (bfloat16 state
with ``"param"``) are loaded as float32 copies and rounded back to nearest once, as the kernels
do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adoptim.formats.params import compute_dtype

__all__ = ["KEYS", "LOW_PRECISION", "load", "new_state", "state_dtype_for", "store", "to_float"]

KEYS = ("exp_avg", "exp_avg_sq")
LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def new_state(param: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    dtype = state_dtype_for(param, group["state_dtype"])
    return {
        key: torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        for key in KEYS
    }


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def load(param: Tensor, m: Tensor, v: Tensor, *, flat: bool = False) -> tuple[Tensor, Tensor, bool]:
    """(m, v) as real tensors of ``param``'s compute dtype, and whether they are the state
    tensors themselves (views) rather than copies to store back."""
    dtype = compute_dtype(param.dtype)
    m_real, v_real = _real(m), _real(v)
    if m_real.dtype == dtype and (not flat or (m_real.is_contiguous() and v_real.is_contiguous())):
        return (m_real.view(-1), v_real.view(-1), True) if flat else (m_real, v_real, True)
    m_work, v_work = (t.to(dtype, copy=True) for t in (m_real, v_real))
    if flat:
        m_work, v_work = m_work.reshape(-1), v_work.reshape(-1)
    return m_work, v_work, False


def store(m: Tensor, v: Tensor, m_work: Tensor, v_work: Tensor) -> None:
    """Store copies made by :func:`load` back (rounded to nearest)."""
    for dst, src in ((m, m_work), (v, v_work)):
        real = _real(dst)
        real.copy_(src.view(real.shape))


def to_float(state: dict[str, Any], param: Tensor) -> tuple[Tensor, Tensor]:
    """(m, v) as new float32 tensors shaped like ``param`` (complex64 for complex)."""
    dtype = torch.complex64 if param.is_complex() else torch.float32
    return state["exp_avg"].to(dtype, copy=True), state["exp_avg_sq"].to(dtype, copy=True)
