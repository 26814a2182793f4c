"""The optimizer's random numbers: counter-based, the same on every path, no generator.

A step's randomness (bfloat16 stochastic rounding of parameters, the 8-bit format's rounding
of its codes) is a pure function of

* the user's ``seed`` (``ADOPT(..., seed=0)``, kept in the param group),
* the tensor's *key*: its index in the optimizer's ``state_dict()`` numbering, the same
  after save/load and on every DDP rank,
* the tensor's call count before the step (its ``step`` state),
* the element's index ``j`` in the tensor,

so a run replays bit for bit from a checkpoint, DDP ranks round a replicated tensor alike,
which path runs (for-loop, foreach, C++ or Triton kernel; kernel built yet or not) and which
tensors share a kernel call change nothing, and the caller's ``torch`` generator is never
drawn from (``torch.get_rng_state()`` is the same before and after a step).

The rule: ``step_seed(tensor_seed(seed, key), count)`` is a 32-bit seed per tensor and step
(lowbias32 hashes, C. Wellons); element ``j`` takes the uniform number
``frac(block_offset(s, j // 256, stream) + weyl[j % 256])``
(:func:`adoptim.formats.blockwise8.dither`: one hash per block of 256, then a Weyl sequence
over the block), with one stream per use (m's codes, v's codes, the parameter). The C++
kernel (``kernels/cpu/csrc/fused_adopt.cpp``) and the Triton kernels compute the same
hashes.
"""

from __future__ import annotations

import struct

__all__ = ["MASK32", "check_seed", "hash32", "step_seed", "tensor_seed", "tensor_seeds"]

MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_STEP_SALT = 0x85EBCA6B


def hash32(x: int) -> int:
    """lowbias32 (C. Wellons) on a uint32."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def check_seed(seed: object) -> int:
    """The ``seed`` option: an integer in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ValueError(f"Invalid seed: {seed!r} (accepted: an integer in [0, 2**63))")
    return seed


def tensor_seed(seed: int, key: int) -> int:
    """A tensor's seed: the user's ``seed`` (both 32-bit halves) mixed with its ``key``."""
    x = hash32((seed & MASK32) ^ _GOLDEN)
    x = hash32(x ^ ((seed >> 32) & MASK32))
    return hash32(x ^ (key & MASK32))


def tensor_seeds(seed: int, keys: list[int] | None, count: int) -> list[int]:
    """:func:`tensor_seed` of each tensor; ``keys`` None numbers them 0, 1, ... (the
    functional API's lists)."""
    return [tensor_seed(seed, key) for key in (keys if keys is not None else range(count))]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def step_seed(tseed: int, count: float) -> int:
    """A tensor's seed for one step: its :func:`tensor_seed` and its call count before the
    step (the float32 ``step`` state, hashed as its bits)."""
    return hash32(tseed ^ hash32(_f32_bits(float(count)) ^ _STEP_SALT))
