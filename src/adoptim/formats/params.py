"""How a parameter is held between steps, and loaded into and stored from the update.

The update runs in a compute dtype (:func:`compute_dtype`): float32, or float64 for float64 and
complex128 parameters. A parameter already of that dtype is updated in place through a real
view; a bfloat16/float16 one is loaded as a float32 copy and rounded back once after the
update (to nearest even, or for bfloat16 with ``stochastic_rounding``, stochastically with
counter-based bits: :func:`stochastic_round_bf16`). The C++ and Triton kernels do the same in
registers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adoptim.distributed import sharded as _sharded
from adoptim.formats import blockwise8 as _b8

__all__ = ["compute_dtype", "load_param", "stochastic_round_bf16", "store_param"]

_WIDE = (torch.float64, torch.complex128)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter of ``dtype`` is updated in."""
    return torch.float64 if dtype in _WIDE else torch.float32


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def load_param(param: Tensor, *, flat: bool = False) -> tuple[Tensor, bool]:
    """``param`` as a real tensor of the compute dtype (flattened with ``flat``) and whether
    that is a view of it (updated in place) rather than a copy to store back."""
    real = _real(param)
    direct = real.dtype == compute_dtype(param.dtype) and (not flat or real.is_contiguous())
    if direct:
        return (real.view(-1) if flat else real), True
    work = real.to(compute_dtype(param.dtype), copy=True)
    return (work.reshape(-1) if flat else work), False


def store_param(param: Tensor, work: Tensor, *, stochastic: bool, seed: int) -> None:
    """Store the updated ``work`` (from :func:`load_param`, not a view) into ``param``;
    ``seed``: the step's seed (:mod:`adoptim.rng`) for stochastic rounding. DTensors (FSDP2)
    are rounded on the rank's local shard, with its local element indices' random numbers
    (as the 8-bit codes and master-weight corrections of a shard are)."""
    real = _real(param)
    if stochastic and real.dtype == torch.bfloat16 and work.dtype == torch.float32:
        real, work = _sharded.local(real), _sharded.local(work)
        work = stochastic_round_bf16(work, seed)
    real.copy_(work.view(real.shape))


def stochastic_round_bf16(value: Tensor, seed: int) -> Tensor:
    """float32 -> bfloat16, rounding up with probability equal to the discarded fraction, so
    that E[result] = value and updates far below half an ulp still move a parameter on average.

    The 16 random bits come from the 8-bit format's counter-based dither (stream 2) for
    ``seed``: no generator is drawn from, so the caller's random stream is untouched and a
    resumed run rounds as the uninterrupted one. NaN stays NaN; a value next to the largest
    finite bfloat16 is truncated rather than rounded up to inf.
    """
    u = _b8.dither(seed, _b8.STREAM_PARAM, value.numel(), value.device)
    noise = (u * 65536.0).to(torch.int32).view(value.shape)
    bits = value.contiguous().view(torch.int32)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    truncated = (bits & -65536).view(torch.float32)
    result = torch.where(torch.isinf(rounded) & torch.isfinite(value), truncated, rounded)
    return torch.where(torch.isnan(value), value, result).to(torch.bfloat16)
