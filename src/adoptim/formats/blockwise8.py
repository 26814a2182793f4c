"""The 8-bit moment format (``state_dtype="8bit"``): block-wise quantization of m and v.

Each parameter's moments are flattened (real views for complex parameters) and cut into blocks
of :data:`BLOCK` = 256 consecutive elements (the last block may be shorter); every block keeps
one float32 scale per moment, as in block-wise quantization (Dettmers et al. 2021, "8-bit
Optimizers via Block-wise Quantization", ICLR 2022). State per element: 2 bytes, plus
2 x 4 / 256 bytes of scales (2.03 bytes per element, float32: 8).

* ``m`` (``exp_avg``, int8 codes ``q`` in [-127, 127], scale ``A`` = the block's largest
  ``|m|``): ``m = q * (A / 127)``. ADOPT's ``m`` is an average of *normalised*, clipped
  gradients, so its entries have similar magnitudes and a linear code loses little.
* ``v`` (``exp_avg_sq``, uint8 codes ``q`` in [0, 255], scale ``S`` = the block's largest
  ``sqrt(v)``): ``sqrt(v) = S * (q / 255)**2``, i.e. ``v**(1/4)`` coded linearly. ``sqrt(v)``
  is what the update divides by; companding it once more spreads the 256 codes over a
  dynamic range of ``255**4`` (4e9) in ``v`` instead of ``255`` (linear ``v``) or ``255**2``
  (linear ``sqrt(v)``), which is what keeps coordinates far below their block's largest
  ``v`` accurate. A nonzero ``v`` is never stored as code 0 (``g / sqrt(v)`` would become
  ``g / eps``: the zero-point problem of the second moment, Li et al. 2023, "Memory
  Efficient Optimizers with 4-bit States", NeurIPS 2023); only ``v == 0`` is.

Rounding is stochastic and unbiased in the stored quantity (``m``, and ``v`` itself rather than
its code): at beta2 = 0.9999 a step changes ``v`` by ~0.01 %, far below one code, so rounding to
nearest freezes ``v``, and rounding ``sqrt(v)``'s code unbiasedly still biases ``v`` by the
rounding variance on every step (measured: ``scripts/lowbit_format.py``, docs/lowbit.md).

The random numbers are reproducible and the same on every path: each tensor's seed for a step
is a hash of the user's seed, the tensor's key and its call count (:func:`state_seed`, the
rule of :mod:`adoptim.rng`), so it changes on every step,
needs no generator (the user's random stream is untouched, and DDP ranks,
ZeroRedundancyOptimizer shards and a resumed run all draw the same numbers as one
uninterrupted process), and the kernel computes it itself. (Tensors of one size share the
pattern on a step; each rounding is unbiased all the same. Salting the seed with the state's
values was tried and dropped: a last-bit difference between two paths' float32 arithmetic,
e.g. torch's ``sqrt`` is not correctly rounded, then changed every rounding after it.) Each
block takes one offset ``u0`` from a hash of (seed, block, stream), and element ``j`` of the
block uses ``u = frac(u0 + frac(j * phi))`` (a Weyl sequence, phi the golden ratio's
fractional part): uniform for every element over seeds, so each rounding is unbiased, with
one hash per block instead of one per element. The fused kernel
(``kernels/cpu/csrc/fused_adopt.cpp``) performs exactly these float32 operations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adoptim import rng as _rng
from adoptim.distributed import sharded as _sharded

__all__ = [
    "BLOCK",
    "KEYS",
    "QUANTIZABLE",
    "applies",
    "check_state",
    "from_float",
    "load",
    "new_state",
    "store",
    "to_float",
    "DEFAULT_MIN_8BIT_SIZE",
    "M_LEVELS",
    "V_LEVELS",
    "block_offsets",
    "dequantize_m",
    "dequantize_v",
    "dither",
    "num_blocks",
    "quantize_m",
    "quantize_v",
    "state_seed",
    "weyl",
]

BLOCK = 256
M_LEVELS = 127  # int8 codes for m: [-127, 127]
V_LEVELS = 255  # uint8 codes for sqrt(v): [0, 255]
#: Tensors with fewer elements keep float32 state (as bitsandbytes and torchao do).
DEFAULT_MIN_8BIT_SIZE = 4096
# Block b of stream s hashes seed + (3 * b + s) * golden: three streams never share an input
# (a fourth, 3, would be stream 0's next block: a tensor's master dither would then equal its
# m codes' dither one block further on).
STREAM_M, STREAM_V, STREAM_PARAM = 0, 1, 2
#: the stream that rounds 24-bit master weights (:mod:`adoptim.formats.master`): the
#: parameter's own, which nothing else uses for such a tensor (stochastic rounding of the
#: parameter and a master-weight correction exclude each other)
STREAM_MASTER = STREAM_PARAM

_PHI = (math.sqrt(5.0) - 1.0) / 2.0
#: frac(j * phi) for j in a block, computed in float64 and rounded once (the kernel does the same)
WEYL = torch.tensor([(j * _PHI) % 1.0 for j in range(BLOCK)], dtype=torch.float64).float()
_MASK32 = 0xFFFFFFFF
_weyl_on: dict[torch.device, Tensor] = {}


def weyl(device: torch.device | str | None = None) -> Tensor:
    """:data:`WEYL` on ``device`` (copied once per device: the random numbers of a tensor's
    step are made where the tensor lives, so that a CUDA step mixes no CPU tensor in)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return WEYL
    table = _weyl_on.get(device)
    if table is None:
        table = _weyl_on[device] = WEYL.to(device)
    return table


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (Wellons) on uint32 values held in int64: the kernel's ``hash32``."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def state_seed(step: float, tensor_seed: int) -> int:
    """The rounding seed of a tensor for one step: :func:`adoptim.rng.step_seed` of its
    :func:`adoptim.rng.tensor_seed` (the user's seed and the tensor's key) and its call
    count before the step; every path and kernel computes the same."""
    return _rng.step_seed(tensor_seed, step)


def block_offsets(
    seed: int, stream: int, blocks: int, device: torch.device | str | None = None
) -> Tensor:
    """One uniform offset in [0, 1) per block (float32, 24 random bits, on ``device``);
    ``seed`` < 2**32 (a host integer: no device read)."""
    b = torch.arange(blocks, dtype=torch.int64, device=device)
    x = _hash32((int(seed) + (3 * b + stream) * 0x9E3779B9) & _MASK32)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dither(
    seed: int, stream: int, numel: int, device: torch.device | str | None = None
) -> Tensor:
    """The uniform numbers ``u`` in [0, 1) used to round ``numel`` elements (float32, on
    ``device``: the same values on every device, as int64, float32 additions and a select)."""
    blocks = num_blocks(numel)
    u = block_offsets(seed, stream, blocks, device)[:, None] + weyl(device)[None, :]
    u = torch.where(u >= 1.0, u - 1.0, u)  # frac: both terms are in [0, 1)
    return u.reshape(-1)[:numel]


def _sqrt32(x: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt, as the kernel's (torch's float32 sqrt on CPU can be an
    ulp off); through float64, whose rounding back to float32 is exact."""
    return torch.sqrt(x.double()).float()


def _levels_over(levels: float, x: Tensor) -> Tensor:
    """``levels / x`` correctly rounded in float32, and 0 where x == 0 (torch computes a
    scalar divided by a tensor through a reciprocal, an ulp off the kernel's division)."""
    return torch.where(x > 0, levels / x.double(), 0.0).float()


def _per_element(per_block: Tensor, numel: int) -> Tensor:
    return per_block.repeat_interleave(BLOCK)[:numel]


def _block_reduce_max(x: Tensor) -> Tensor:
    """The largest entry of each block of the flat, non-negative ``x`` (NaN propagates)."""
    pad = (-x.numel()) % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, BLOCK).amax(dim=1)


def dequantize_m(codes: Tensor, scale: Tensor) -> Tensor:
    """float32 m from int8 codes and per-block largest |m|: ``q * (A / 127)``."""
    step = scale / M_LEVELS
    return codes.to(torch.float32) * _per_element(step, codes.numel())


def dequantize_sqrt_v(codes: Tensor, scale: Tensor) -> Tensor:
    """float32 sqrt(v) from uint8 codes and per-block largest sqrt(v): ``(q*q) * (S / 255**2)``."""
    step = scale / (V_LEVELS * V_LEVELS)
    q = codes.to(torch.float32)
    return (q * q) * _per_element(step, codes.numel())


def dequantize_v(codes: Tensor, scale: Tensor) -> Tensor:
    """float32 v: the square of :func:`dequantize_sqrt_v` (whose float32 sqrt gives it back)."""
    s = dequantize_sqrt_v(codes, scale)
    return s * s


def quantize_m(m: Tensor, seed: int, codes: Tensor, scale: Tensor) -> None:
    """Store the flat float32 ``m`` into ``codes`` (int8) and ``scale`` (float32, per block),
    rounding stochastically: E[dequantized] = m."""
    n = m.numel()
    amax = _block_reduce_max(m.abs())
    scale.copy_(amax)
    inv = _levels_over(M_LEVELS, amax)
    y = m * _per_element(inv, n)
    q = torch.floor(y + dither(seed, STREAM_M, n, m.device)).clamp_(-M_LEVELS, M_LEVELS)
    # a NaN m (its block's scale is then NaN too): code 0, as the kernels store it (a
    # float -> int8 cast of NaN is undefined)
    codes.copy_(torch.where(torch.isnan(q), 0.0, q))


def quantize_v(v: Tensor, seed: int, codes: Tensor, scale: Tensor) -> None:
    """Store the flat, non-negative float32 ``v`` into ``codes`` (uint8) and ``scale``
    (per-block largest sqrt(v)), rounding stochastically so that E[dequantized v] = v
    (unbiased in v, not in its code), and never to code 0 unless v == 0."""
    n = v.numel()
    s = _sqrt32(v)
    smax = _sqrt32(_block_reduce_max(v))  # == the largest sqrt(v): sqrt is monotonic
    scale.copy_(smax)
    step = smax / (V_LEVELS * V_LEVELS)
    inv = _levels_over(V_LEVELS * V_LEVELS, smax)
    step_e, inv_e = _per_element(step, n), _per_element(inv, n)
    lo = torch.floor(_sqrt32(s * inv_e)).clamp_(0, V_LEVELS - 1)  # 255 * sqrt(s / S)
    hi = lo + 1
    s_lo, s_hi = (lo * lo) * step_e, (hi * hi) * step_e
    v_lo, v_hi = s_lo * s_lo, s_hi * s_hi
    # up with probability (v - v_lo) / (v_hi - v_lo): unbiased in v
    up = dither(seed, STREAM_V, n, v.device) * (v_hi - v_lo) < v - v_lo
    q = lo + up.to(torch.float32)
    q = torch.where((q == 0) & (v > 0), torch.ones_like(q), q)  # no zero code for v > 0
    codes.copy_(torch.where(torch.isnan(q), 0.0, q))  # NaN (a NaN or inf v): code 0


# ---------------------------------------------------------------------------------------
# The format as the optimizer sees it: which tensors it takes, their state entries, and the
# load/store around the update. State entries of an 8-bit tensor, all plain tensors (DTensors
# holding the local shard's codes and scales under FSDP2, layout in adoptim.distributed.sharded):
# ``exp_avg`` (int8 codes of m, flat), ``exp_avg_scale`` (float32, one per block),
# ``exp_avg_sq`` (uint8 codes of v, flat), ``exp_avg_sq_scale``.

#: the state entries besides ``step``, in the update paths' order
KEYS = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")
#: parameter dtypes whose moments ``state_dtype="8bit"`` quantizes
QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)


def _real_numel(param: Tensor) -> int:
    return param.numel() * (2 if param.is_complex() else 1)


def applies(param: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param``'s moments are kept in 8 bits under its group's options: tensors of a
    quantizable dtype with at least ``min_8bit_size`` real elements."""
    return (
        group.get("state_dtype") == "8bit"
        and param.dtype in QUANTIZABLE
        and _real_numel(param) >= group.get("min_8bit_size", DEFAULT_MIN_8BIT_SIZE)
    )


def new_state(param: Tensor) -> dict[str, Tensor]:
    """Zero codes and scales for ``param`` (of its local shard for a DTensor)."""
    if _sharded.is_dtensor(param):
        return _sharded.new_sharded_state(param, BLOCK)
    n = _real_numel(param)
    blocks = num_blocks(n)
    device = param.device
    return {
        "exp_avg": torch.zeros(n, dtype=torch.int8, device=device),
        "exp_avg_scale": torch.zeros(blocks, dtype=torch.float32, device=device),
        "exp_avg_sq": torch.zeros(n, dtype=torch.uint8, device=device),
        "exp_avg_sq_scale": torch.zeros(blocks, dtype=torch.float32, device=device),
    }


def local_state(param: Tensor, codes_and_scales: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The flat (m codes, m scales, v codes, v scales) the update reads and writes: the
    tensors themselves, or a DTensor's local shard's (sharing the storage)."""
    if any(_sharded.is_dtensor(t) for t in codes_and_scales):
        return _sharded.local_views(param, None, codes_and_scales, BLOCK)[2]
    return codes_and_scales


def load(m_codes: Tensor, m_scale: Tensor, v_codes: Tensor, v_scale: Tensor):
    """(m, v) as new flat float32 tensors (local, plain tensors)."""
    return dequantize_m(m_codes, m_scale), dequantize_v(v_codes, v_scale)


def store(m: Tensor, v: Tensor, seed: int, m_codes, m_scale, v_codes, v_scale) -> None:
    """Requantize the updated flat float32 ``m`` and ``v`` with the step's ``seed``."""
    quantize_m(m, seed, m_codes, m_scale)
    quantize_v(v, seed, v_codes, v_scale)


def _shape_like(flat: Tensor, param: Tensor) -> Tensor:
    if param.is_complex():
        return torch.view_as_complex(flat.view(*param.shape, 2))
    return flat.view(param.shape)


def to_float(state: dict[str, Any], param: Tensor) -> tuple[Tensor, Tensor]:
    """(m, v) as new float32 tensors shaped like ``param`` (complex64 for complex; sharded
    like it for a DTensor)."""
    local = local_state(param, tuple(state[k] for k in KEYS))
    m, v = load(*local)
    if _sharded.is_dtensor(param):
        return _sharded.shaped_like(m, param), _sharded.shaped_like(v, param)
    return _shape_like(m, param), _shape_like(v, param)


def check_state(param: Tensor, state: dict[str, Any]) -> None:
    """Refuse codes and scales that do not fit ``param`` (another model, another sharding)."""
    if _sharded.is_dtensor(param):
        _sharded.check_sharded_state(param, state, BLOCK)
        return
    n = _real_numel(param)
    for key in ("exp_avg", "exp_avg_sq"):
        if state[key].numel() != n or state[key].dtype not in (torch.int8, torch.uint8):
            raise ValueError(
                f"8-bit state {key!r} has {state[key].numel()} {state[key].dtype} "
                f"codes but its parameter has {n} elements"
            )


def from_float(param: Tensor, m: Tensor, v: Tensor, step: float,
               tensor_seed: int) -> dict[str, Tensor]:  # fmt: skip
    """New 8-bit state holding the float moments ``m``, ``v`` (shaped like ``param``, or its
    local shard for a DTensor), quantized with the seed of call count ``step``."""
    state = new_state(param)
    local = local_state(param, tuple(state[k] for k in KEYS))
    flat_m, flat_v = (_real_flat_f32(t) for t in (m, v))
    seed = state_seed(step, tensor_seed)  # as the step from this count would
    store(flat_m, flat_v, seed, *local)
    return state


def _real_flat_f32(t: Tensor) -> Tensor:
    local = t.to_local() if _sharded.is_dtensor(t) else t
    real = torch.view_as_real(local) if local.is_complex() else local
    return real.reshape(-1).to(torch.float32, copy=True)
