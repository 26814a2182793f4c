"""Master-weight correction (``master_weight_bits=24`` or ``32``): a bfloat16/float16 parameter
plus an integer correction per element that together hold a wider *master weight*.

The update runs on the master weight ``join(param, correction)`` (float32) and stores the
result back with ``split``, which writes the parameter the model sees and the correction.
The idea is FlashOptim's "ECC" master weights (Databricks, arXiv 2602.23349: bf16 weights
plus an 8-bit error-correcting code, "24-bit master weights") and, before it, Kahan-style
compensation of bf16 weights (Zamirai et al. 2020, "Revisiting BFloat16 Training", arXiv
2010.06192): keep what rounding the weight to bf16 threw away, so that updates far below
half a bf16 ulp still accumulate. The encoding below is written for this project.

bfloat16 (the main case): a bf16 value is the top 16 bits of a float32, so a master weight
of ``B = 16 + s`` bits (s = 8 or 16) is a float32 whose low ``32 - B`` bits are zero: sign,
the same 8-bit exponent, and ``B - 9`` stored mantissa bits (24: 15 bits, a relative
precision of 2**-16; 32: plain float32). Its top ``B`` bits, read as an integer ``q``, are
split as ``q = param_bits * 2**s + c`` with ``c`` the low ``s`` bits read as a *signed*
integer in ``[-2**(s-1), 2**(s-1))``:

* ``c`` (int8 for 24, int16 for 32) is the master weight's distance from the parameter in
  units of the master's own last bit (its ulp), counted in magnitude (the sign bit is part of
  ``param_bits``), so the exponent change between neighbours needs no case: when the master
  weight lies just under a power of two whose bf16 neighbour is that power, ``c < 0`` counts
  ulps of the lower binade. Reading ``c`` as signed rounds the parameter to *nearest*: low
  bits below half go down (``c >= 0``), above half go up (``c < 0``), and an exact tie
  (``c = -2**(s-1)``) goes up in magnitude, i.e. **ties away from zero**. Torch's
  ``.to(torch.bfloat16)`` breaks ties to even instead; no rule can: a bf16 value with an even
  mantissa would have ``2**s + 1`` master weights rounding to it under ties-to-even, one more
  than ``s`` bits can name. Both are correctly rounded; they differ only on exact ties (a
  fraction 2**-s of uniformly random values).
* ``join(param, c)`` = ``param_bits * 2**s + c``, shifted back into a float32; always exact.
  For every ``c``, splitting ``join(param, c)`` gives ``param`` and ``c`` back, so the model
  always sees the correctly rounded master weight, even after ``param`` was changed by hand
  (the master weight is then within half a parameter ulp of the new value).
* Rounding a float32 result to the master: 32 keeps it exactly (so a 32-bit run reproduces a
  float32-parameter run bit for bit); 24 rounds it *stochastically* on the 24-bit grid: up
  with probability equal to the fraction of a step it drops, so the master weight is
  unbiased and updates far below a 24-bit ulp (2**-16 of the weight) still accumulate on
  average. Round-to-nearest on that grid stalls where updates fall under half a step (10**4
  ADOPT steps at lr 1e-6: nearest never moved, stochastic kept the error at 7 % of the
  distance float32 travelled) and is biased where they are a few steps (lr 1e-4: max error
  0.065 against 0.0076; ``scripts/master_weights.py``, ``docs/memory.md``). The random numbers are counter-based, not drawn from a
  generator: the dither of :mod:`adoptim.formats.blockwise8` with the tensor's seed for the
  step (:mod:`adoptim.rng`: a hash of the user's seed, the tensor's state_dict index and its
  call count) on the parameter's stream (``STREAM_MASTER``; stochastic rounding of the parameter, its other user, is refused with a correction), so a run is reproducible and a resumed run continues
  identically. Loading float32 weights (``set_fp32_model_state_dict``) rounds to nearest even.
  With updates far below a step the master still moves only on average (noisily), as plain
  bf16 with stochastic rounding does at a 2**-8 step: the numerics check
  (:class:`UpdateStallWarning`) says so when it happens.
* Zero: ``+0``/``-0`` with ``c >= 0`` are master weights between 0 and half a bf16 denormal
  ulp of that sign; ``c < 0`` cannot come out of ``split`` for a zero parameter and is read as
  0 (the integer would wrap into a NaN pattern). Denormals: the integer arithmetic is the same
  (float32 and bf16 share the exponent field). Inf: a master weight beyond the largest finite
  bf16 (plus half its ulp) rounds the parameter to inf, as ``.to(torch.bfloat16)`` does, and
  the correction keeps the finite master (join(inf, c < 0) is finite); an infinite master
  has ``c = 0``. NaN: the parameter is NaN and ``c = 0``; join of a NaN parameter is NaN.

float16: its 5-bit exponent is not float32's, so the correction is a fraction of the
parameter's ulp instead: ``|master| = |param| + c * step``, ``step`` the fp16 spacing next to
``|param|`` on the side ``c`` points to (the spacing below a power of two is half the one
above), over ``2**s``; again in magnitude and signed, so ties go away from zero. The master
weight is then a float with fp16's exponent range and ``10 + s`` mantissa bits, rounded to
nearest even: for 32 that is finer than float32 inside fp16's normal range, where a float32
value splits and joins back exactly; below it the absolute resolution is ``2**-(24 + s)``,
and a master weight whose parameter overflows fp16 is inf (correction 0). The joined master
is a float32, so a 32-bit correction finer than float32 (which split never makes) is rounded
when joined.

FSDP2 (DTensor parameters: ``fully_shard`` of a model whose parameters are bf16 themselves,
e.g. ``model.to(torch.bfloat16)`` before ``fully_shard``; a ``MixedPrecisionPolicy`` keeps
float32 sharded parameters, which take no correction): the correction is a DTensor with the
parameter's mesh, placements and global shape, one int8/int16 element per element of the
rank's local shard (:func:`adoptim.distributed.sharded.like_param`). A DTensor, not a plain
per-rank tensor, because ``get_optimizer_state_dict`` and ``torch.distributed.checkpoint``
treat plain state tensors as replicated (one rank's copy saved, loaded on every rank), which
would hand rank 0's correction to every shard; as a DTensor each rank saves and loads its own
part, and ``full_state_dict=True`` gathers it like the moments. Each rank joins and splits
its local shard, whatever the update path (the float-state paths run on DTensors, whose work
tensor :func:`load` wraps; the 8-bit ones on local views). Elementwise, so any placement whose
local tensor holds the parameter's elements works (not ``Partial``). Random numbers: the
24-bit rounding of element ``j`` of a rank's local shard uses the tensor's key (its
state_dict index, the same on every rank) and the *local* index ``j``, as the 8-bit codes of
a shard do (:mod:`adoptim.distributed.sharded`), so a rank's shard rounds bit for bit as a
plain tensor holding that shard would, with no communication and no offsets. What depends on
the world size: the random number a given element gets (a shard's ``j`` is not the element's
index in the full tensor), so a 24-bit FSDP2 run is one process's up to that rounding noise
(and what the trajectory makes of it); 32 bits round nothing and are world-size independent
(an FSDP2 run with the full batch's gradient on every rank equals one process bit for bit);
on one rank each shard is the whole tensor and 24 bits are one process's bit for bit too.
The int16 corrections of 32 bits cannot be gathered on gloo (``full_tensor()`` raises
"Invalid scalar type": gloo has no int16 collectives), and torch's NCCL type table
(ProcessGroupNCCL.cpp) lists no int16 either (read, not run), so with 32 bits save sharded
(DCP's default), not with ``full_state_dict=True``; 24 bits' int8 gathers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adoptim.distributed import sharded as _sharded

__all__ = [
    "MASTER_BITS",
    "STATE_KEY",
    "UpdateStallWarning",
    "check_master_weight_bits",
    "correction_dtype",
    "has_correction",
    "join",
    "load",
    "new_correction",
    "split",
    "split_into",
    "store",
]

#: the state entry holding a parameter's correction (shaped like it)
STATE_KEY = "master_correction"
#: accepted values of ``master_weight_bits`` besides None
MASTER_BITS = (24, 32)
#: parameter dtypes that take a correction
CORRECTABLE = (torch.bfloat16, torch.float16)


class UpdateStallWarning(UserWarning):
    """The learning rate is too small for the weights' precision: most updates of a tensor
    round to nothing when stored (see :func:`adoptim.formats.master.stall_fraction`)."""


def check_master_weight_bits(value: Any) -> int | None:
    """``master_weight_bits`` as stored in param groups (None, 24 or 32), or a ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or value not in MASTER_BITS:
        raise ValueError(
            f"Invalid master_weight_bits: {value!r} (accepted: None = plain parameters; 24 = "
            "an 8-bit correction per bfloat16/float16 element; 32 = a 16-bit correction, "
            "float32 master weights)"
        )
    return int(value)


def _extra_bits(bits: int) -> int:
    return bits - 16


def correction_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 24 else torch.int16


def has_correction(param: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param`` keeps a correction under its group's options (bf16/fp16 only;
    complex and float32/float64 parameters ignore ``master_weight_bits``)."""
    return group.get("master_weight_bits") is not None and param.dtype in CORRECTABLE


def new_correction(param: Tensor, bits: int) -> Tensor:
    """A zero correction for ``param``: the master weight equals the parameter. For a
    DTensor parameter (FSDP2) a DTensor with its placements, holding one element per element
    of the rank's local shard (module docstring, "FSDP2")."""
    if _sharded.is_dtensor(param):
        local = torch.zeros_like(param.to_local(), dtype=correction_dtype(bits))
        return _sharded.like_param(local.contiguous(), param)
    return torch.zeros_like(
        param, dtype=correction_dtype(bits), memory_format=torch.preserve_format
    )


# --------------------------------------------------------------------------------------------
# bfloat16: integer arithmetic on the float32 bit pattern


def _bf16_join(param: Tensor, corr: Tensor, s: int) -> Tensor:
    p = param.view(torch.int16).to(torch.int32)  # the bf16 bits, sign-extended
    c = corr.to(torch.int32)
    mag = p & 0x7FFF
    # Never produced by split (would wrap into a NaN pattern): a zero parameter with c < 0,
    # an infinite one with c > 0. Read as c = 0.
    c = torch.where(((mag == 0) & (c < 0)) | ((mag == 0x7F80) & (c > 0)), 0, c)
    q = p * (1 << s) + c  # top B bits of the master (no overflow: |p| <= 2**15, |c| < 2**s)
    return (q * (1 << (16 - s))).view(torch.float32)


def _bf16_split(value: Tensor, s: int, dither: Tensor | None) -> tuple[Tensor, Tensor]:
    bits = value.contiguous().view(torch.int32)
    drop = 16 - s  # bits below the master's last bit: 8 for 24, 0 for 32
    if drop and dither is not None:  # up with probability (dropped bits) / 2**drop
        noise = (dither.reshape(bits.shape) * (1 << drop)).to(torch.int32)
        q = (bits + noise) >> drop
        # next to the largest finite value a round-up could reach inf: truncate those
        over = ((q & 0x7FFFFF) == 0x7F8000) & torch.isfinite(value)  # inf's top 24 bits
        q = torch.where(over, bits >> drop, q)
    elif drop:
        q = bits >> drop  # arithmetic shift: the top 24 bits of the pattern, sign-extended
        rem = bits & ((1 << drop) - 1)
        half = 1 << (drop - 1)
        up = (rem > half) | ((rem == half) & ((q & 1) == 1))  # nearest, ties to even
        q = q + up.to(torch.int32)  # increments the magnitude; the carry moves the exponent
    else:
        q = bits
    low = q & ((1 << s) - 1)
    c = low - ((low & (1 << (s - 1))) << 1)  # the low s bits as a signed integer
    p = (q - c) >> s
    nan = torch.isnan(value)  # (NaN patterns may have wrapped above)
    p = torch.where(nan, 0x7FC0, p)
    c = torch.where(nan, 0, c)
    return p.to(torch.int16).view(torch.bfloat16), c.to(correction_dtype(16 + s))


# --------------------------------------------------------------------------------------------
# float16: a signed fraction of the parameter's ulp, in magnitude

_F16_TINY = 2.0**-24  # fp16's denormal spacing


def _f16_unit(mag: Tensor, below: Tensor, s: int) -> Tensor:
    """One correction step at the fp16 magnitude ``mag`` (float32, >= 0, finite): the fp16
    spacing above ``mag`` over ``2**s``, or below it where ``below`` (which is half as much
    when ``mag`` is a normal power of two above the smallest normal)."""
    frac, exp = torch.frexp(mag)  # mag = frac * 2**exp, frac in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(mag), (exp - 11).to(torch.float32))
    ulp = torch.where(mag < 2.0**-14, _F16_TINY, ulp)
    halve = below & (frac == 0.5) & (mag > 2.0**-14)
    return torch.where(halve, ulp * 0.5, ulp) * 2.0**-s


def _f16_join(param: Tensor, corr: Tensor, s: int) -> Tensor:
    pf = param.to(torch.float32)
    mag = pf.abs()
    finite = torch.isfinite(pf)
    c = corr.to(torch.float32)
    c = torch.where((mag == 0) & (c < 0), 0.0, c)
    safe = torch.where(finite, mag, 0.0)
    out = torch.copysign(safe + c * _f16_unit(safe, c < 0, s), pf)
    return torch.where(finite, out, pf)


def _f16_split(value: Tensor, s: int, dither: Tensor | None) -> tuple[Tensor, Tensor]:
    v = value.to(torch.float32)
    mag = v.abs()
    pm = mag.to(torch.float16).to(torch.float32)  # nearest, ties to even (fixed below)
    pm_safe = torch.where(torch.isfinite(pm), pm, 0.0)
    # |v| - pm is exact (Sterbenz, or pm = 0); dividing by a power of two is exact. The
    # correction's parity is the master grid's (pm is a multiple of 2**s steps), so rounding
    # c to even rounds the master to nearest even on its own grid.
    r = mag - pm_safe
    if dither is not None:  # up with probability equal to the fraction of a step dropped
        u = dither.reshape(mag.shape)
        c = torch.floor(r / _f16_unit(pm_safe, r < 0, s) + u)
    else:
        c = torch.round(r / _f16_unit(pm_safe, r < 0, s))
    # a tie (or what rounds to one) goes away from zero: one fp16 up
    tie = (c >= 2 ** (s - 1)) & torch.isfinite(pm) & torch.isfinite(mag)
    if bool(tie.any()):
        up = torch.nextafter(pm_safe.to(torch.float16), torch.tensor(math.inf, dtype=torch.float16))
        up = up.to(torch.float32)
        up_safe = torch.where(torch.isfinite(up), up, 0.0)
        r_up = mag - up_safe
        # from the value rounded to the grid (above), re-expressed from the new parameter
        grid = pm_safe + c * _f16_unit(pm_safe, c < 0, s)
        c = torch.where(tie, torch.round((grid - up_safe) / _f16_unit(up_safe, r_up < 0, s)), c)
        pm = torch.where(tie, up, pm)
    # beyond fp16's range the master overflows with the parameter: inf, correction 0
    keep = torch.isfinite(pm) & torch.isfinite(v)
    c = torch.where(keep, c, 0.0)
    p = torch.where(torch.isnan(v), v, torch.copysign(pm, v))
    return p.to(torch.float16), c.to(correction_dtype(16 + s))


# --------------------------------------------------------------------------------------------
# The two operations every path uses


def join(param: Tensor, corr: Tensor) -> Tensor:
    """The master weight of ``param`` (bf16/fp16) and its correction, as a new float32 tensor
    shaped like ``param``."""
    s = 8 if corr.dtype == torch.int8 else 16
    if param.dtype == torch.bfloat16:
        return _bf16_join(param, corr, s)
    return _f16_join(param, corr, s)


def split(
    value: Tensor, dtype: torch.dtype, bits: int, dither: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Round the float32 ``value`` to a ``bits``-bit master weight and return
    ``(param, correction)``: the parameter (``dtype``, bf16 or fp16) is the master weight
    correctly rounded (ties away from zero), the correction is the rest.

    The master weight is ``value`` rounded to nearest even, or, with ``dither`` (uniform
    numbers in [0, 1), one per element) and 24 bits, rounded up with probability equal to the
    fraction of a 24-bit step it drops (unbiased). 32 bits hold a float32 exactly (bf16) and
    ignore ``dither``."""
    s = _extra_bits(bits)
    if bits == 32:
        dither = None
    if dtype == torch.bfloat16:
        return _bf16_split(value.to(torch.float32), s, dither)
    if dtype == torch.float16:
        return _f16_split(value, s, dither)
    raise TypeError(f"master weights are for bfloat16/float16 parameters, got {dtype}")


def bits_of(corr: Tensor) -> int:
    """The master weight's width a correction gives: 24 (int8) or 32 (int16)."""
    return 24 if corr.dtype == torch.int8 else 32


def split_into(param: Tensor, corr: Tensor, value: Tensor, dither: Tensor | None = None) -> None:
    """Store the float32 ``value`` into ``param`` and ``corr`` in place (same shapes)."""
    p, c = split(value.reshape(param.shape), param.dtype, bits_of(corr), dither)
    param.copy_(p)
    corr.copy_(c)


# --------------------------------------------------------------------------------------------
# The numerics check

#: the check runs on a tensor's calls whose count before the call is a multiple of this
CHECK_EVERY = 100
#: warn when more than this fraction of a tensor's moving elements did not change: rounded
#: to nearest, an update under half a step of the stored precision is lost
STALL_FRACTION = 0.5
#: the same for stochastic rounding (24-bit master weights, bf16 with stochastic_rounding),
#: where an update of a fraction f of a step changes the stored value with probability f and
#: is kept on average: only updates under ~1/1000 of a step are worth a warning (progress
#: then drowns in rounding noise for thousands of steps, and on 24-bit master weights the
#: float32 sum itself starts to drop them at 2**-10 of a step)
STALL_FRACTION_STOCHASTIC = 0.999


def step_dither(param: Tensor, corr: Tensor, seed: int) -> Tensor | None:
    """The uniform numbers that round ``param``'s 24-bit master weight with the step's
    ``seed`` (:mod:`adoptim.rng`: the one seed of every random number of this tensor's step;
    its own stream), or None for 32 bits, which round nothing."""
    if corr.dtype != torch.int8:
        return None
    from adoptim.formats import blockwise8 as _quant

    n = param.numel()
    return _quant.dither(seed, _quant.STREAM_MASTER, n, param.device)


def stored_value(param: Tensor, corr: Tensor | None) -> Tensor:
    """What the optimizer holds for ``param``: its master weight, or a float32 copy of it."""
    if corr is None:
        return param.detach().to(torch.float32, copy=True)
    return join(param.detach(), corr)


def stall_fraction(before: Tensor, after: Tensor, grad: Tensor) -> float:
    """Of the elements with a nonzero gradient (whose update is nonzero), the fraction whose
    stored value did not change in this step; 0.0 when none has a gradient."""
    moving = (grad != 0) & torch.isfinite(before)
    n = int(moving.sum())
    if n == 0:
        return 0.0
    stuck = int((moving & (before == after)).sum())
    return stuck / n


# --------------------------------------------------------------------------------------------
# The step: the update runs on float32 master weights, split stores them back


def load(param: Tensor, corr: Tensor, *, flat: bool = False) -> Tensor:
    """The float32 master weight of ``param`` as a work tensor for the update paths (a new
    tensor, flattened with ``flat``: the 8-bit moments are flat), as
    :func:`adoptim.formats.params.load_param` loads a parameter without correction.

    DTensors (FSDP2): joined on the rank's local shard. A DTensor ``param`` gives a DTensor
    sharded like it (the float-state paths run on DTensors), or with ``flat`` the flat local
    tensor; a local ``param`` (the 8-bit paths step local views) takes ``corr``'s local
    tensor."""
    work = join(_sharded.local(param).detach(), _sharded.local(corr))
    if flat:
        return work.reshape(-1)
    return _sharded.like_param(work, param) if _sharded.is_dtensor(param) else work


def store(param: Tensor, corr: Tensor, work: Tensor, seed: int) -> None:
    """Store the updated master weight ``work`` into ``param`` and ``corr``; ``seed`` is the
    tensor's seed for this step (:func:`adoptim.rng.step_seed`), for the 24-bit rounding.
    DTensors are split on the rank's local shard, with the random numbers of its local
    element indices (module docstring, "FSDP2")."""
    param, corr, work = (_sharded.local(t) for t in (param, corr, work))
    split_into(param, corr, work, step_dither(param, corr, seed))


# --------------------------------------------------------------------------------------------
# The optimizer's side: options, loading, full-precision export and import


def check_groups(param_groups: list[dict[str, Any]], *, fused: bool | None) -> None:
    """Refuse, at construction, what ``master_weight_bits`` does not support. (``fused`` is
    accepted everywhere: the C++ and Triton kernels take bfloat16 parameters with a
    correction and leave float16 ones to the unfused paths.)"""
    for group in param_groups:
        bits = group.get("master_weight_bits")
        if bits is None:
            continue
        if group.get("stochastic_rounding"):
            raise ValueError(
                "stochastic_rounding=True cannot be used with master_weight_bits: the "
                "parameter is always the nearest bf16/fp16 of its master weight, which 24 bits "
                "already round stochastically and 32 bits hold exactly; drop "
                "stochastic_rounding (or use master_weight_bits=None to round the parameter "
                "itself stochastically)"
            )
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                raise ValueError(
                    f"master_weight_bits cannot be used with {flag}=True: the master weight "
                    "is split into parameter and correction with integer arithmetic and "
                    "rounded with the step count read on the host, which neither a CUDA "
                    "graph nor autograd can follow; use master_weight_bits=None"
                )
        for p in group["params"]:
            if p.dtype not in CORRECTABLE or type(p) in (Tensor, torch.nn.Parameter):
                continue
            if not _sharded.is_dtensor(p):
                raise ValueError(
                    f"master_weight_bits takes plain tensors and DTensors (FSDP2), and a "
                    f"parameter is a {type(p).__name__}; use master_weight_bits=None for it"
                )
            # The correction is elementwise, joined and split on each rank's local tensor:
            # any placement whose local tensor holds the parameter's elements works (Shard,
            # Replicate, FSDP2's), not a Partial one (a sum of the ranks' local tensors).
            if any(placement.is_partial() for placement in p.placements):
                raise ValueError(
                    f"master_weight_bits: a DTensor parameter has placements "
                    f"{tuple(p.placements)}; a Partial placement's local tensors are "
                    "summands, not elements, so a correction cannot be kept per element; "
                    "use master_weight_bits=None for it"
                )


def restore_after_load(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After ``Optimizer.load_state_dict`` (which casts every state tensor of a bf16 parameter
    to bf16): take each correction again from the saved tensors, exactly, and bring it to the
    format this optimizer's groups ask for:

    * saved and wanted with the same width: as saved (a resumed run continues bit for bit);
    * saved 24 and wanted 32, or the reverse: re-split the joined master weight (32 -> 24
      rounds to nearest even);
    * none saved (a checkpoint without correction): zero, i.e. the master weight is the
      parameter; it is created at the parameter's next step;
    * saved but not wanted (``master_weight_bits=None``, or a float32 parameter): dropped,
      with a warning. The parameter is already the nearest bf16 of the saved master weight,
      so the model is unchanged; what is lost is the precision below it.
    """
    import warnings

    saved = state_dict.get("state", {})
    saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    dropped = 0
    for (p, group), pid in zip(params, saved_ids):
        state = optimizer.state.get(p)
        if not state or STATE_KEY not in state:
            continue
        value = saved.get(pid, {}).get(STATE_KEY)
        if not isinstance(value, Tensor) or value.dtype not in (torch.int8, torch.int16):
            raise ValueError(
                f"loaded state dict has a {STATE_KEY!r} that is not an int8/int16 tensor "
                f"({type(value).__name__})"
            )
        if value.shape != p.shape:
            raise ValueError(
                f"loaded state dict's {STATE_KEY!r} has shape {tuple(value.shape)} but its "
                f"parameter has shape {tuple(p.shape)} (a state dict from another model?)"
            )
        if not has_correction(p, group):
            del state[STATE_KEY]
            dropped += 1
            continue
        _check_sharding(p, value)
        # on the local shard for DTensors (FSDP2): the correction is elementwise
        local = _sharded.local(value).to(device=_sharded.local(p).device, copy=True)
        want = correction_dtype(group["master_weight_bits"])
        if local.dtype != want:
            with torch.no_grad():
                p_local = _sharded.local(p)
                master = join(p_local.detach(), local)
                p_new, local = split(master, p.dtype, group["master_weight_bits"])
                p_local.copy_(p_new)
        state[STATE_KEY] = _sharded.like_param(local, p) if _sharded.is_dtensor(p) else local
    if dropped:
        warnings.warn(
            f"load_state_dict: the checkpoint holds master-weight corrections for {dropped} "
            "parameter(s) and this optimizer keeps none (master_weight_bits=None, or not a "
            "bf16/fp16 parameter): they are dropped. The parameters keep their values, each "
            "the nearest bf16/fp16 of its master weight; the precision below that is lost. "
            "Build the optimizer with the checkpoint's master_weight_bits to keep it.",
            stacklevel=3,
        )


def _check_sharding(p: Tensor, value: Tensor) -> None:
    """A saved correction must be sharded as its parameter is (both plain, or DTensors with
    the same placements): loading does not move elements between ranks."""
    if _sharded.is_dtensor(p) == _sharded.is_dtensor(value) and (
        not _sharded.is_dtensor(p) or tuple(value.placements) == tuple(p.placements)
    ):
        return

    def where(t: Tensor) -> str:
        if _sharded.is_dtensor(t):
            return f"a DTensor with placements {tuple(t.placements)}"
        return "a plain tensor"

    raise ValueError(
        f"loaded state dict's {STATE_KEY!r} is {where(value)}, but its parameter (shape "
        f"{tuple(p.shape)}) is {where(p)}: a correction loads into the sharding it was saved "
        "with. Under FSDP2 save and load with torch.distributed.checkpoint.state_dict's "
        "get_optimizer_state_dict/set_optimizer_state_dict (full_state_dict=True gives a "
        "checkpoint any sharding, or one process, can load), or move the weights with "
        "get_fp32_model_state_dict/set_fp32_model_state_dict"
    )


def _param_groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def fp32_model_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """``model.state_dict()`` with float32 tensors: each parameter with a correction as its
    master weight, every other floating-point entry (parameters and buffers) as a float32
    copy; other entries (integer buffers) as they are."""
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, Tensor):
            out[key] = value
            continue
        state = optimizer.state.get(value, {}) if isinstance(value, torch.nn.Parameter) else {}
        corr = state.get(STATE_KEY)
        if corr is not None:  # DTensors (FSDP2): joined per shard, sharded like the param
            master = join(_sharded.local(value).detach(), _sharded.local(corr))
            out[key] = _sharded.like_param(master, value) if _sharded.is_dtensor(value) else master
        elif value.is_floating_point():
            out[key] = value.detach().to(torch.float32, copy=True)
        else:
            out[key] = value.detach().clone()
    return out


def load_fp32_model_state_dict(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, sd: dict, *, strict: bool = True
) -> None:
    """Load float32 weights ``sd`` into ``model`` (whatever its dtypes): each parameter that
    takes a correction gets the nearest bf16/fp16 of the master weight, and the correction
    the rest (32 bits: exactly the float32 value; 24: rounded to nearest even); every other
    entry is copied with a cast. ``strict``: missing or unexpected keys raise a KeyError."""
    groups = _param_groups_by_param(optimizer)
    own = model.state_dict(keep_vars=True)
    if strict:
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"set_fp32_model_state_dict: missing keys {missing}, unexpected keys "
                f"{unexpected} (pass strict=False to load the matching ones)"
            )
    with torch.no_grad():
        for key, target in own.items():
            if key not in sd or not isinstance(target, Tensor):
                continue
            value = sd[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"set_fp32_model_state_dict: {key!r} has shape {tuple(value.shape)}, the "
                    f"model's has {tuple(target.shape)}"
                )
            if _sharded.is_dtensor(target):  # FSDP2: this rank's elements, as a DTensor
                value = _as_sharded_like(value, target, key)
            group = groups.get(id(target))
            if group is not None and has_correction(target, group):
                bits = group["master_weight_bits"]
                local = _sharded.local(target)
                p, c = split(
                    _sharded.local(value).to(device=local.device, dtype=torch.float32),
                    target.dtype, bits,
                )  # fmt: skip
                local.copy_(p)
                if _sharded.is_dtensor(target):
                    c = _sharded.like_param(c, target)
                optimizer.state[target][STATE_KEY] = c
            else:
                target.copy_(value)
                state = (
                    optimizer.state.get(target) if isinstance(target, torch.nn.Parameter) else None
                )
                if state and STATE_KEY in state:  # a stale correction would move it back
                    state[STATE_KEY].zero_()


def _as_sharded_like(value: Tensor, target: Tensor, key: str) -> Tensor:
    """``value`` (a full tensor, or a DTensor placed as ``target``) as a DTensor placed as the
    DTensor ``target``: a full tensor is cut on each rank without communication (every rank
    holds it, as after ``torch.load``)."""
    from torch.distributed.tensor import distribute_tensor

    if _sharded.is_dtensor(value):
        if tuple(value.placements) != tuple(target.placements):
            raise ValueError(
                f"set_fp32_model_state_dict: {key!r} is a DTensor with placements "
                f"{tuple(value.placements)}, the model's has {tuple(target.placements)}; pass "
                "the full tensor (e.g. value.full_tensor()) or one sharded as the model is"
            )
        return value
    local = _sharded.local(target)
    value = value.to(device=local.device)
    return distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)


class NumericsCheck:
    """The numerics check of one optimizer: on the calls where a bf16/fp16 tensor's count
    before the call is a positive multiple of :data:`CHECK_EVERY`, compare the first
    :data:`CHECK_SAMPLE` elements of its stored value (master weight, or the parameter)
    before and after the step; among those with a nonzero gradient, if more than
    :data:`STALL_FRACTION` (rounding to nearest: plain bf16/fp16, 32-bit master weights) or
    :data:`STALL_FRACTION_STOCHASTIC` (stochastic rounding: 24-bit master weights, bf16 with
    ``stochastic_rounding``) did not change, the learning rate is too small for the weights'
    precision. Warns once per optimizer, naming every tensor found on that call. Costs
    nothing on other calls and a copy of at most 4,096 elements per tensor on check calls;
    skipped for ``lr == 0``, and where a host read is unwelcome (capturable,
    differentiable, torch.compile)."""

    def __init__(self) -> None:
        self.warned = False

    def before(self, optimizer: torch.optim.Optimizer) -> list | None:
        if self.warned or torch.compiler.is_compiling():
            return None
        picked = []
        for gi, group in enumerate(optimizer.param_groups):
            if group.get("capturable") or group.get("differentiable"):
                continue
            lr = group["lr"]
            if (lr.item() if isinstance(lr, Tensor) else lr) == 0:
                continue
            for pi, p in enumerate(group["params"]):
                if p.grad is None or p.dtype not in CORRECTABLE:
                    continue
                state = optimizer.state.get(p, {})
                step = state.get("step")
                if step is None:
                    continue
                t = float(step)
                if t <= 0 or t % CHECK_EVERY:
                    continue
                corr = state.get(STATE_KEY)
                picked.append((gi, pi, group, p, _sample(p, corr), _sample_grad(p.grad)))
        return picked or None

    def after(self, optimizer: torch.optim.Optimizer, picked: list | None) -> None:
        if not picked:
            return
        import warnings

        found = []
        for gi, pi, group, p, before, grad in picked:
            after = _sample(p, optimizer.state.get(p, {}).get(STATE_KEY))
            frac = stall_fraction(before, after, grad)
            corr = optimizer.state.get(p, {}).get(STATE_KEY)
            stochastic = (corr is not None and corr.dtype == torch.int8) or (
                corr is None and group.get("stochastic_rounding") and p.dtype == torch.bfloat16
            )
            if frac > (STALL_FRACTION_STOCHASTIC if stochastic else STALL_FRACTION):
                names = group.get("param_names")
                name = names[pi] if names else f"param_groups[{gi}]['params'][{pi}]"
                kind = (
                    f"{group['master_weight_bits']}-bit master weights"
                    if corr is not None
                    else f"plain {str(p.dtype).replace('torch.', '')}"
                    + (" with stochastic rounding" if stochastic else "")
                )
                found.append(f"{name} (shape {tuple(p.shape)}, {kind}: {frac:.0%} unchanged)")
        if found:
            self.warned = True
            warnings.warn(
                "The learning rate is too small for these weights' precision: their nonzero "
                "updates did not change the stored value in this step (rounded to nearest: "
                "most of them round to nothing; stochastically: nearly all, so progress "
                "drowns in rounding noise): "
                + "; ".join(found)
                + ". Use master_weight_bits=24 or 32 (bf16/fp16 parameters), a larger lr, or "
                "float32 parameters. (Checked every "
                f"{CHECK_EVERY} steps on a sample of each bf16/fp16 tensor; warned once.)",
                UpdateStallWarning,
                stacklevel=3,
            )


#: elements per tensor the numerics check compares
CHECK_SAMPLE = 4096


# (DTensors, FSDP2: each rank samples its local shard, without communication)


def _sample(p: Tensor, corr: Tensor | None) -> Tensor:
    flat = _sharded.local(p).detach().reshape(-1)[:CHECK_SAMPLE]
    if corr is None:
        return flat.to(torch.float32, copy=True)
    return join(flat, _sharded.local(corr).reshape(-1)[:CHECK_SAMPLE])


def _sample_grad(g: Tensor) -> Tensor:
    return _sharded.local(g).detach().reshape(-1)[:CHECK_SAMPLE].clone()
