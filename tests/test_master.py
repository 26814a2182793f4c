"""Master-weight correction (``master_weight_bits``): the format against a float64 reference
of its definition (hypothesis: exponent boundaries, zeros, denormals, inf, NaN), split/join
round trips, and a long run of small updates where plain bf16 stalls and the corrected
weight follows float32 master weights.

The reference works on Python floats (float64, exact for every float32/bf16/fp16 value) with
frexp/ldexp arithmetic, not on bit patterns, so that it checks the library's integer tricks
from the outside.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adoptim.formats import master as M

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

# --------------------------------------------------------------------------------------------
# The float64 reference


def _round_sig(x: float, sig_bits: int, emin: int, mode: str) -> float:
    """``x`` rounded to a binary float with ``sig_bits`` significand bits, minimum normal
    exponent ``emin`` (below it: fixed spacing, denormals) and unbounded exponent above;
    ``mode`` "even" (ties to even) or "away" (ties away from zero)."""
    if x == 0 or not math.isfinite(x):
        return x
    _, e = math.frexp(abs(x))  # |x| = f * 2**e, f in [0.5, 1)
    exp = max(e - 1, emin)
    spacing = math.ldexp(1.0, exp - (sig_bits - 1))
    k = abs(x) / spacing  # exact: a power-of-two scaling
    lo = math.floor(k)
    frac = k - lo
    if frac > 0.5 or (frac == 0.5 and (mode == "away" or lo % 2 == 1)):
        lo += 1
    return math.copysign(lo * spacing, x)


BF16_MAX_EXP = 128  # values >= 2**128 overflow float32/bf16-exponent formats


def ref_bf16(value: float, bits: int) -> tuple[float, float]:
    """(master, param) for a bf16 parameter: the master is ``value`` rounded to ``bits - 8``
    significand bits (24: 16, 32: float32 itself), ties to even; the parameter is the master
    rounded to bf16's 8, ties away from zero; overflow (>= 2**128) is inf."""
    if math.isnan(value):
        return math.nan, math.nan
    master = _round_sig(value, bits - 8, -126, "even")
    if abs(master) >= 2.0**BF16_MAX_EXP:
        master = math.copysign(math.inf, master)
    param = _round_sig(master, 8, -126, "away")
    if abs(param) >= 2.0**BF16_MAX_EXP:
        param = math.copysign(math.inf, param)
    return master, param


def ref_f16(value: float, bits: int) -> tuple[float, float]:
    """(master, param) for an fp16 parameter: the master is ``value`` rounded to fp16's
    exponent range with ``11 + s`` significand bits (ties to even), the parameter the master
    rounded to fp16 (ties away from zero); a parameter beyond fp16's range makes both inf."""
    if math.isnan(value):
        return math.nan, math.nan
    master = _round_sig(value, 11 + bits - 16, -14, "even")
    param = _round_sig(master, 11, -14, "away")
    if abs(param) > 65504.0:
        return math.copysign(math.inf, value), math.copysign(math.inf, value)
    return master, param


# --------------------------------------------------------------------------------------------
# Values: hypothesis scenarios


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


SPECIAL = [
    0.0, -0.0, math.inf, -math.inf, math.nan,
    _f32(0x00000001), _f32(0x80000001),  # smallest denormals
    _f32(0x00008000), _f32(0x00018000), _f32(0x007FFFFF),  # denormal ties, largest denormal
    _f32(0x00800000), _f32(0x807FFF80),  # smallest normal, a negative denormal near it
    _f32(0x7F7FFFFF), _f32(0xFF7F8000), _f32(0x7F7F7FFF),  # near the largest finite
    1.0, -1.0, _f32(0x3F7FFFFF), _f32(0x3F7F8000), _f32(0x3F808000), _f32(0x3F818000),
    65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14 - 2.0**-30,
]  # fmt: skip


def _near_boundary(draw_exp: int, delta: int, neg: bool) -> float:
    """A float32 ``delta`` units of the last place away from the power of two 2**exp."""
    bits = ((draw_exp + 127) << 23) + delta
    return -_f32(bits) if neg else _f32(bits)


values = st.lists(
    st.one_of(
        st.sampled_from(SPECIAL),
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.builds(
            _near_boundary,
            st.integers(-126, 127),
            st.integers(-(1 << 17), 1 << 17),
            st.booleans(),
        ),
        st.integers(0, 0xFFFFFFFF).map(_f32),  # any pattern: NaN payloads, denormals
        st.floats(-70000, 70000, width=32),
    ),
    min_size=1,
    max_size=64,
)


def _same(a: float, b: float) -> bool:
    """Equal as floats, with NaN equal to NaN and the sign of zero compared."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


@pytest.mark.parametrize("bits", [24, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@SETTINGS
@given(xs=values)
@example(xs=SPECIAL)
def test_split_join_match_float64_reference(dtype, bits, xs):
    v = torch.tensor(xs, dtype=torch.float32)
    p, c = M.split(v, dtype, bits)
    assert p.dtype == dtype and c.dtype == M.correction_dtype(bits) and c.shape == v.shape
    master = M.join(p, c)
    assert master.dtype == torch.float32
    ref = ref_bf16 if dtype == torch.bfloat16 else ref_f16
    for i, x in enumerate(v.tolist()):
        want_master, want_param = ref(x, bits)
        got_master, got_param = master[i].item(), p[i].float().item()
        assert _same(got_param, want_param), (x, got_param, want_param)
        assert _same(got_master, want_master), (x, got_master, want_master)
        if math.isnan(x) or math.isinf(want_master):
            assert c[i].item() == 0 or not math.isnan(x)


@pytest.mark.parametrize(
    "dtype,bits", [(torch.bfloat16, 24), (torch.bfloat16, 32), (torch.float16, 24)]
)
def test_any_param_and_correction_join_to_a_master_that_rounds_back(dtype, bits):
    """Every (param, correction) pair, including ones split never makes (a parameter changed
    by hand), joins to a master weight whose split gives the same pair: the model always sees
    the correctly rounded master weight. Exceptions, by design: a zero parameter with a
    negative correction and an infinite one with a positive correction read as correction 0
    (split never makes them), and a NaN parameter joins to NaN."""
    s = bits - 16
    gen = torch.Generator().manual_seed(0)
    pbits = torch.arange(-32768, 32768, dtype=torch.int32)
    if bits == 32:  # a sample of corrections per parameter, the extremes included
        cvals = torch.randint(-(1 << 15), 1 << 15, (pbits.numel(),), generator=gen)
        cvals[::7] = -(1 << 15)
        cvals[1::7] = (1 << 15) - 1
        grid_p, grid_c = pbits, cvals.to(torch.int32)
    else:  # all 2**16 x 2**8 pairs, in a strided sample to keep the test short
        grid_p = pbits.repeat_interleave(8)
        grid_c = torch.randint(-(1 << (s - 1)), 1 << (s - 1), (grid_p.numel(),), generator=gen)
        grid_c[::8] = -(1 << (s - 1))
    p = grid_p.to(torch.int16).view(dtype)
    c = grid_c.to(M.correction_dtype(bits))
    master = M.join(p, c)
    p2, c2 = M.split(master, dtype, bits)
    pf = p.float()
    nan = torch.isnan(pf)
    assert torch.isnan(master[nan]).all()
    zero_neg = ((pf == 0) & (c < 0)) | (torch.isinf(pf) & (c > 0))
    expect_c = torch.where(zero_neg, torch.zeros_like(c), c)
    ok = ~nan
    if dtype == torch.float16:  # fp16: infinite parameters keep an infinite master, c = 0
        inf = torch.isinf(pf)
        expect_c = torch.where(inf, torch.zeros_like(c), expect_c)
    assert torch.equal(p2.view(torch.int16)[ok], p.view(torch.int16)[ok])
    assert torch.equal(c2[ok], expect_c[ok])
    # and the master is within half a parameter ulp: the parameter is a nearest value
    fin = ok & torch.isfinite(pf) & torch.isfinite(master)
    assert ((master[fin].double() - pf[fin].double()).abs() <= _half_ulp(p[fin])).all()


def _half_ulp(p: torch.Tensor) -> torch.Tensor:
    x = p.float().abs().double()
    _, e = torch.frexp(x)
    mant = 8 if p.dtype == torch.bfloat16 else 11
    emin = -126 if p.dtype == torch.bfloat16 else -14
    exp = torch.clamp(e.double() - 1, min=emin)
    return torch.pow(2.0, exp - (mant - 1)) / 2


def test_32_bits_hold_float32_exactly_and_round_like_torch_except_ties():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(1 << 18, generator=gen) * torch.exp(4 * torch.randn(1 << 18, generator=gen))
    v[:5] = torch.tensor([1.0 + 2.0**-8, -(1.0 + 5 * 2.0**-8), 2.0**-130 * 1.5, 0.0, -0.0])
    p, c = M.split(v, torch.bfloat16, 32)
    assert torch.equal(M.join(p, c).view(torch.int32), v.view(torch.int32))
    differ = p.view(torch.int16) != v.to(torch.bfloat16).view(torch.int16)
    ties = (v.view(torch.int32) & 0xFFFF) == 0x8000  # exact halfway: torch goes to even
    assert ties[:2].all() and differ[:2].all()  # ties: torch to even (down), here away (up)
    assert not (differ & ~ties).any()


def test_correction_zero_is_the_parameter_itself():
    p = torch.randn(1000).to(torch.bfloat16)
    for bits in (24, 32):
        assert torch.equal(M.join(p, M.new_correction(p, bits)), p.float())
    h = torch.randn(1000).to(torch.float16)
    assert torch.equal(M.join(h, M.new_correction(h, 24)), h.float())


def test_option_validation():
    assert M.check_master_weight_bits(None) is None
    assert M.check_master_weight_bits(24) == 24
    for bad in (16, 8, True, "24", 24.5):
        with pytest.raises(ValueError, match="master_weight_bits"):
            M.check_master_weight_bits(bad)


# --------------------------------------------------------------------------------------------
# Small updates: plain bf16 stalls, the corrected weight follows float32


def _accumulate(
    n_steps: int, delta: float, bits: int | None, nearest: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_steps`` additions of ``delta * (1 + noise)`` to weights near 1, stored after each
    one in bf16 (bits None) or bf16 + correction; returns (stored float32, float32 master)."""
    gen = torch.Generator().manual_seed(2)
    w32 = 1.0 + 0.5 * torch.rand(1024, generator=gen)
    sign = torch.where(torch.rand(1024, generator=gen) < 0.5, -1.0, 1.0)
    p = w32.to(torch.bfloat16)
    c = None if bits is None else M.new_correction(p, bits)
    w32 = p.float()  # the same start
    for t in range(n_steps):
        upd = sign * delta * (1 + 0.1 * torch.rand(1024, generator=gen))
        w32 = w32 + upd
        stored = M.stored_value(p, c) + upd
        if c is None:
            p = stored.to(torch.bfloat16)
        else:
            dither = None if nearest else M.step_dither(p, c, float(t))
            p, c = M.split(stored, torch.bfloat16, bits, dither)
    return M.stored_value(p, c), w32


def test_plain_bf16_stalls_where_the_corrected_weight_follows_float32():
    n, delta = 3000, 3e-4  # 3e-4 per step: under half a bf16 ulp (2**-8 near 1)
    plain, ref = _accumulate(n, delta, None)
    moved_ref = (ref - _accumulate(0, delta, None)[1]).abs()
    start = _accumulate(0, delta, None)[0]
    assert (plain == start).all()  # every update rounded away: bf16 never moved
    assert (moved_ref > 0.85).all()  # while float32 moved by about 0.95 each
    c24, ref24 = _accumulate(n, delta, 24)
    c32, ref32 = _accumulate(n, delta, 32)
    assert torch.equal(c32, ref32)  # 32 bits are float32: bit for bit
    # 24 bits, stochastic: the error is a random walk of 2**-16-sized steps, ~1e-3 after
    # 3000 steps against a total movement of ~0.95; nearest rounding drifts further
    err = (c24 - ref24).abs()
    assert err.mean() < 3e-3 and err.max() < 2e-2, (err.mean(), err.max())
    near, ref_near = _accumulate(n, delta, 24, nearest=True)
    assert (near - ref_near).abs().mean() > 4 * err.mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_24_bit_rounding_is_unbiased_and_on_the_grid(dtype):
    """With a dither the 24-bit master is one of the two grid neighbours of the value (the
    nearest-even master or the one next to it), and its mean over many dithers is the value."""
    gen = torch.Generator().manual_seed(4)
    v = (torch.rand(512, generator=gen) + 0.5) * torch.where(
        torch.rand(512, generator=gen) < 0.5, -1.0, 1.0
    )
    if dtype == torch.float16:
        v = v * 300
    total = torch.zeros(512, dtype=torch.float64)
    draws = 400
    p0, c0 = M.split(v, dtype, 24)
    near = M.join(p0, c0).double()
    for _ in range(draws):
        u = torch.rand(512, generator=gen)
        p, c = M.split(v, dtype, 24, u)
        got = M.join(p, c).double()
        step = (v.double().abs() * 2.0**-15).clamp(min=1e-30)
        assert ((got - v.double()).abs() < step * 1.01).all()
        ps, _ = M.split(got.float(), dtype, 24)
        assert torch.equal(ps.view(torch.int16), p.view(torch.int16))  # p rounds the master
        total += got
    mean_err = (total / draws - v.double()).abs()
    bias_near = (near - v.double()).abs()
    assert mean_err.mean() < 0.2 * bias_near.mean()
