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
from unittest import mock

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
            dither = None if nearest else M.step_dither(p, c, t)
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


# --------------------------------------------------------------------------------------------
# In the optimizer: every unfused path and state format against the float64 reference

import io  # noqa: E402
import warnings  # noqa: E402

from hypothesis import HealthCheck  # noqa: E402
from reference import ReferenceADOPT, as_real  # noqa: E402
from test_reference_match import build_groups, config  # noqa: E402

from adoptim import ADOPT, ADOPTW  # noqa: E402

MASTER_PATHS = {
    "for-loop": dict(foreach=False),
    "foreach": dict(foreach=True),
    "for-loop 8bit": dict(foreach=False, state_dtype="8bit", min_8bit_size=0),
    "foreach 8bit": dict(foreach=True, state_dtype="8bit", min_8bit_size=0),
    "default": dict(),
}
STEP_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("bits", [24, 32])
@pytest.mark.parametrize("path", list(MASTER_PATHS))
@STEP_SETTINGS
@given(cfg=config)
def test_each_step_matches_float64_reference_on_the_master_weight(path, bits, cfg):
    """Before each step the library's master weight (join, in float64) and moments seed a
    float64 reference step; after it the new master weight must match it to float32
    rounding (32 bits) or to one 24-bit step (24, stochastic), and the parameter must be the
    nearest bf16 of the master weight (split of it gives it back). Complex tensors in the
    same groups (complex64: no correction) step as before."""
    group_cfgs, plans, tensor_lr, seed = cfg
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(
            p.shape, generator=gen, dtype=torch.complex64 if p.is_complex else torch.float32
        )
        for p in plans
    ]
    params = [p if p.is_complex() else p.to(torch.bfloat16) for p in params]
    groups, hypers, clip_fn = build_groups(group_cfgs, plans, params, tensor_lr)
    opt = ADOPT(
        groups,
        clip_lambda=clip_fn if clip_fn is not None else 0.25,
        master_weight_bits=bits,
        **MASTER_PATHS[path],
    )
    for call in range(12):
        grads = []
        for p, plan in zip(params, plans):
            has = call >= plan.first_call and torch.rand((), generator=gen).item() >= plan.drop_prob
            g = plan.grad_scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            grads.append(g if has else None)
            p.grad = g.clone() if has else None
        refs = []
        for p, h, g in zip(params, hypers, grads):
            if g is None:
                refs.append(None)
                continue
            st = opt.state.get(p, {})
            start = M.stored_value(p, st.get(M.STATE_KEY)) if not p.is_complex() else p.detach()
            ref = ReferenceADOPT([start], [h])
            if "step" in st:
                m, v = opt.moments(p)
                ref.state[0].s = int(st["step"].item())
                ref.state[0].m = as_real(m).double()
                ref.state[0].v = as_real(v).double()
            refs.append(ref)
        opt.step()
        for p, g, ref in zip(params, grads, refs):
            if ref is None:
                continue
            ref.step([g])
            want = ref.theta[0]
            scale = max(want.abs().max().item(), 1.0)
            if p.is_complex():
                got = as_real(p.detach()).double()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)
                continue
            corr = opt.state[p][M.STATE_KEY]
            assert corr.dtype == M.correction_dtype(bits) and corr.shape == p.shape
            got = M.join(p.detach(), corr).double()
            tol = 1e-5 * want.abs() + 2e-6 * scale
            if bits == 24:  # stochastic on a grid of 2**-15 relative (16-bit significand)
                tol = tol + want.abs() * 2.0**-15
            assert ((got - want).abs() <= tol).all(), (got - want).abs().max()
            p_again, c_again = M.split(got.float(), torch.bfloat16, bits)
            assert torch.equal(p_again.view(torch.int16), p.detach().view(torch.int16))
            assert torch.equal(c_again, corr)


def _pair(seed=0, n=(64, 300)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in ((n[0], n[1]), (n[1],), (5,))]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes] for _ in range(steps)
    ]


@pytest.mark.parametrize("path", list(MASTER_PATHS))
@pytest.mark.parametrize(
    "kw",
    [{}, {"nesterov": True, "caution": True}, {"weight_decay": 0.1, "maximize": True}],
    ids=["adoptw", "nesterov+caution", "coupled-decay+maximize"],
)
def test_32_bits_reproduce_a_float32_run_bit_for_bit(path, kw):
    """bf16 parameters with 32-bit master weights take exactly the float32-parameter run's
    steps (same bf16 gradients): the exported float32 weights equal its parameters bit for
    bit, and the bf16 parameters are those rounded to nearest (ties away from zero)."""
    init = [x.to(torch.bfloat16) for x in _pair()]
    cls = ADOPTW if not kw else ADOPT
    f32 = [torch.nn.Parameter(x.float()) for x in init]
    b16 = [torch.nn.Parameter(x.clone()) for x in init]
    o32 = cls(f32, lr=3e-3, fused=False, **MASTER_PATHS[path], **kw)
    o16 = cls(b16, lr=3e-3, master_weight_bits=32, **MASTER_PATHS[path], **kw)
    for grads in _grads([x.shape for x in init], 25):
        for a, b, g in zip(f32, b16, grads):
            a.grad, b.grad = g.float(), g.clone()
        o32.step()
        o16.step()
    model = torch.nn.Module()
    model.w = torch.nn.ParameterList(b16)
    sd = o16.get_fp32_model_state_dict(model)
    for i, (a, b) in enumerate(zip(f32, b16)):
        assert torch.equal(sd[f"w.{i}"].view(torch.int32), a.detach().view(torch.int32))
        p_rta, _ = M.split(a.detach(), torch.bfloat16, 32)
        assert torch.equal(b.detach().view(torch.int16), p_rta.view(torch.int16))
        ties = (a.detach().view(torch.int32) & 0xFFFF) == 0x8000
        differ = b.detach().view(torch.int16) != a.detach().to(torch.bfloat16).view(torch.int16)
        assert not (differ & ~ties).any()


def test_24_bits_follow_float32_where_plain_bf16_drifts():
    init = [x.to(torch.bfloat16) for x in _pair(n=(32, 128))]
    runs = {}
    for name, kw in {
        "f32": dict(),
        "plain": dict(),
        "sr": dict(stochastic_rounding=True),
        "24": dict(master_weight_bits=24),
    }.items():
        ps = [torch.nn.Parameter(x.float() if name == "f32" else x.clone()) for x in init]
        opt = ADOPT(ps, lr=1e-4, foreach=False, fused=False, **kw)
        for grads in _grads([x.shape for x in init], 300):
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", M.UpdateStallWarning)
                opt.step()
        runs[name] = [M.stored_value(p, opt.state[p].get(M.STATE_KEY)) for p in ps]
    err = {
        k: max((a - b).abs().max().item() for a, b in zip(v, runs["f32"])) for k, v in runs.items()
    }
    assert err["24"] < 0.1 * err["plain"], err
    assert err["24"] < err["sr"], err


# --------------------------------------------------------------------------------------------
# Checkpoints, export and import


def _train(ps, opt, grads):
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(p.dtype)
        opt.step()


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("state", ["auto", "8bit"])
@pytest.mark.parametrize("bits", [24, 32])
def test_resume_bit_for_bit(bits, state):
    init = [x.to(torch.bfloat16) for x in _pair()]
    shapes = [x.shape for x in init]
    grads = _grads(shapes, 20)
    kw = dict(lr=1e-3, master_weight_bits=bits, state_dtype=state, min_8bit_size=0)
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = ADOPTW(a, **kw)
    _train(a, opt_a, grads[:10])
    ckpt = _save_load({"params": [p.detach() for p in a], "opt": opt_a.state_dict()})
    assert ckpt["opt"]["state"][0][M.STATE_KEY].dtype == M.correction_dtype(bits)
    b = [torch.nn.Parameter(x.clone()) for x in ckpt["params"]]
    opt_b = ADOPTW(b, **kw)
    opt_b.load_state_dict(ckpt["opt"])
    _train(a, opt_a, grads[10:])
    _train(b, opt_b, grads[10:])
    for x, y in zip(a, b):
        assert torch.equal(x.detach().view(torch.int16), y.detach().view(torch.int16))
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(sa[key], sb[key]), key


def test_checkpoint_without_correction_loads_with_zero_correction():
    init = [x.to(torch.bfloat16) for x in _pair()]
    grads = _grads([x.shape for x in init], 6)
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = ADOPT(a, lr=1e-3)
    _train(a, opt_a, grads[:3])
    sd = _save_load(opt_a.state_dict())
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = ADOPT(b, lr=1e-3, master_weight_bits=24)
    opt_b.load_state_dict(sd)
    assert M.STATE_KEY not in opt_b.state[b[0]]
    assert torch.equal(opt_b.get_fp32_model_state_dict(_module(b))["w.0"], b[0].detach().float())
    _train(b, opt_b, grads[3:])
    assert opt_b.state[b[0]][M.STATE_KEY].dtype == torch.int8
    assert opt_b.param_groups[0]["master_weight_bits"] == 24


def test_checkpoint_with_correction_into_an_optimizer_without_drops_it_with_a_warning():
    init = [x.to(torch.bfloat16) for x in _pair()]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = ADOPT(a, lr=1e-3, master_weight_bits=24)
    _train(a, opt_a, _grads([x.shape for x in init], 3))
    sd = _save_load(opt_a.state_dict())
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = ADOPT(b, lr=1e-3)
    with pytest.warns(UserWarning, match="master-weight corrections for 3 parameter"):
        opt_b.load_state_dict(sd)
    assert all(M.STATE_KEY not in opt_b.state[p] for p in b)
    assert torch.equal(b[0].detach(), a[0].detach())  # the model is unchanged
    assert opt_b.param_groups[0]["master_weight_bits"] is None


def test_checkpoint_24_loads_into_32_and_back():
    init = [x.to(torch.bfloat16) for x in _pair()]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = ADOPT(a, lr=1e-3, master_weight_bits=24)
    _train(a, opt_a, _grads([x.shape for x in init], 3))
    masters = opt_a.get_fp32_model_state_dict(_module(a))
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = ADOPT(b, lr=1e-3, master_weight_bits=32)
    opt_b.load_state_dict(_save_load(opt_a.state_dict()))
    assert opt_b.state[b[0]][M.STATE_KEY].dtype == torch.int16
    for k, v in opt_b.get_fp32_model_state_dict(_module(b)).items():
        assert torch.equal(v, masters[k])  # 24-bit masters are exact in 32 bits


def _module(ps):
    model = torch.nn.Module()
    model.w = torch.nn.ParameterList(ps)
    return model


@pytest.mark.parametrize("bits", [24, 32])
def test_fp32_export_import_round_trip(bits):
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.BatchNorm1d(30))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["0.weight"] = torch.randn(30, 40, generator=gen) * 0.1
    model.to(torch.bfloat16)
    model[1].float()  # a float32 norm layer in a bf16 model: no correction for it
    opt = ADOPT(model.parameters(), lr=1e-3, master_weight_bits=bits)
    opt.set_fp32_model_state_dict(model, weights)
    out = opt.get_fp32_model_state_dict(model)
    assert set(out) == set(weights)
    assert out["1.num_batches_tracked"].dtype == torch.int64
    w, back = weights["0.weight"], out["0.weight"]
    assert back.dtype == torch.float32
    if bits == 32:
        assert torch.equal(back.view(torch.int32), w.view(torch.int32))
    else:
        assert ((back - w).abs() <= w.abs() * 2.0**-16).all()
        assert not torch.equal(back, w.to(torch.bfloat16).float())  # more than bf16 kept
    assert torch.equal(model[0].weight.detach(), M.split(w, torch.bfloat16, bits)[0])
    assert torch.equal(out["1.weight"], weights["1.weight"])
    # set before the first step: the step still creates the rest of the state
    x = torch.randn(8, 40, generator=gen).to(torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    opt.step()
    assert {"step", "exp_avg", "exp_avg_sq", M.STATE_KEY} <= set(opt.state[model[0].weight])
    with pytest.raises(KeyError, match="missing keys"):
        opt.set_fp32_model_state_dict(model, {"0.weight": w})


# --------------------------------------------------------------------------------------------
# Options, numerics check, bytes


def test_options_are_validated_naming_the_argument():
    p = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))
    with pytest.raises(ValueError, match="master_weight_bits"):
        ADOPT([p], master_weight_bits=16)
    # fused=True: the C++ kernel takes the correction on CPU, the Triton kernels on CUDA
    # (test_master_fused_accepted_on_every_device)
    ADOPT([p], master_weight_bits=24, fused=True)
    with pytest.raises(ValueError, match="stochastic_rounding=True cannot be used"):
        ADOPTW([p], master_weight_bits=24, stochastic_rounding=True)
    with pytest.raises(ValueError, match="capturable=True"):
        ADOPT([p], master_weight_bits=32, capturable=True)
    # float32 parameters ignore it (a mixed model: norms kept in float32)
    q = torch.nn.Parameter(torch.randn(10))
    opt = ADOPT([p, q], master_weight_bits=24)
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert M.STATE_KEY in opt.state[p] and M.STATE_KEY not in opt.state[q]


def test_numerics_check_warns_once_naming_the_stalled_tensors():
    gen = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(1 + torch.rand(64, 64, generator=gen).to(torch.bfloat16))
    ok = torch.nn.Parameter(torch.rand(64, generator=gen))  # float32: not checked
    opt = ADOPT([{"params": [ok]}, {"params": [big]}], lr=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2 * M.CHECK_EVERY + 1):
            big.grad = torch.randn(big.shape, generator=gen).to(torch.bfloat16)
            ok.grad = torch.randn(ok.shape, generator=gen)
            opt.step()
    stalls = [w for w in caught if issubclass(w.category, M.UpdateStallWarning)]
    assert len(stalls) == 1
    msg = str(stalls[0].message)
    assert "param_groups[1]['params'][0]" in msg and "(64, 64)" in msg and "bfloat16" in msg
    # the same lr with 24-bit master weights: ~90 % of the elements do not change in a step
    # (updates are ~1/15 of a 24-bit step), but stochastic rounding keeps them on average:
    # no warning
    big2 = torch.nn.Parameter(big.detach().clone())
    opt2 = ADOPT([big2], lr=1e-5, master_weight_bits=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", M.UpdateStallWarning)
        for _ in range(M.CHECK_EVERY + 1):
            big2.grad = torch.randn(big.shape, generator=gen).to(torch.bfloat16)
            opt2.step()


def test_numerics_check_names_tiny_lr_for_24_bits_and_skips_lr_zero():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(1 + torch.rand(4096, generator=gen).to(torch.bfloat16))
    opt = ADOPT([w], lr=1e-9, master_weight_bits=24)
    with pytest.warns(M.UpdateStallWarning, match="24-bit master weights"):
        for _ in range(M.CHECK_EVERY + 1):
            w.grad = torch.randn(w.shape, generator=gen).to(torch.bfloat16)
            opt.step()
    opt0 = ADOPT([torch.nn.Parameter(w.detach().clone())], lr=0.0)
    p0 = opt0.param_groups[0]["params"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", M.UpdateStallWarning)
        for _ in range(M.CHECK_EVERY + 1):
            p0.grad = torch.randn(w.shape, generator=gen).to(torch.bfloat16)
            opt0.step()


def test_persistent_bytes_per_parameter_with_24_bits_and_8bit_state():
    n = 1 << 16
    p = torch.nn.Parameter(torch.randn(256, n // 256).to(torch.bfloat16))
    opt = ADOPT([p], master_weight_bits=24, state_dtype="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    extra = {k: t.numel() * t.element_size() for k, t in state.items() if k != "step"}
    assert extra[M.STATE_KEY] == n  # one byte per element
    per_param = (p.numel() * p.element_size() + sum(extra.values())) / n
    assert per_param == 2 + 1 + 2 + 2 * 4 / 256  # bf16 + correction + 8-bit m, v + scales
    assert per_param <= 5.1


@pytest.mark.parametrize("bits", [24, 32])
def test_float16_parameters_follow_a_float32_run(bits):
    """fp16 master weights: inside fp16's normal range 32 bits hold the float32 run's weights
    (to float32 rounding where a weight nears fp16's denormals), 24 bits stay within a few
    2**-18 steps of them; plain fp16 does not."""
    gen = torch.Generator().manual_seed(6)
    init = (1 + torch.rand(2048, generator=gen)).to(torch.float16)
    f32 = torch.nn.Parameter(init.float())
    h = torch.nn.Parameter(init.clone())
    plain = torch.nn.Parameter(init.clone())
    opts = [
        ADOPT([f32], lr=1e-4, foreach=False, fused=False),
        ADOPT([h], lr=1e-4, master_weight_bits=bits),
        ADOPT([plain], lr=1e-4, foreach=False, fused=False),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.UpdateStallWarning)
        for _ in range(60):
            g = torch.randn(2048, generator=gen).to(torch.float16)
            for p, opt in zip((f32, h, plain), opts):
                p.grad = g.to(p.dtype)
                opt.step()
    master = M.join(h.detach(), opts[1].state[h][M.STATE_KEY])
    err = (master - f32.detach()).abs().max().item()
    err_plain = (plain.detach().float() - f32.detach()).abs().max().item()
    if bits == 32:
        assert torch.equal(master, f32.detach())
    else:
        assert err < 2e-3 * 2.0**-3, err  # a handful of 2**-18-relative steps near 1..2
    assert err < 0.1 * err_plain, (err, err_plain)
    assert torch.equal(h.detach(), M.split(master, torch.float16, bits)[0])


def test_found_inf_leaves_parameters_and_corrections_unchanged():
    from adoptim.functional import adopt

    p = torch.randn(300).to(torch.bfloat16)
    corr = torch.full((300,), 5, dtype=torch.int8)
    m, v = torch.zeros(300), torch.ones(300)
    step = torch.tensor(3.0)
    before = (p.clone(), corr.clone(), m.clone(), v.clone())
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
              decouple=False, maximize=False)  # fmt: skip
    adopt([p], [torch.ones(300).to(torch.bfloat16)], [m], [v], [step],
          found_inf=torch.tensor(1.0), master_corrections=[corr], **kw)  # fmt: skip
    for a, b in zip(before, (p, corr, m, v)):
        assert torch.equal(a, b)
    assert step.item() == 3.0
    adopt([p], [torch.ones(300).to(torch.bfloat16)], [m], [v], [step],
          found_inf=torch.tensor(0.0), master_corrections=[corr], **kw)  # fmt: skip
    assert step.item() == 4.0 and not torch.equal(corr, before[1])


def test_master_fused_accepted_on_every_device():
    """fused=True with a correction is accepted on CPU (the C++ kernel) and off it (the
    Triton kernels take it since they join and split in registers; it was refused before)."""
    for device in ("cpu", "meta"):
        p = torch.empty(10, dtype=torch.bfloat16, device=device)
        M.check_groups([{"params": [p], "master_weight_bits": 24}], fused=True)
        M.check_groups([{"params": [p], "master_weight_bits": 32, "fused": True}], fused=None)


# --------------------------------------------------------------------------------------------
# The C++ kernel takes the correction: the same bits as the for-loop path

from adoptim.formats import blockwise8 as _b8  # noqa: E402
from adoptim.functional import adopt as _adopt_fn  # noqa: E402
from adoptim.kernels.cpu import build as _kernel_cache  # noqa: E402
from adoptim.kernels.cpu import launch as _cpu_launch  # noqa: E402


@pytest.fixture(scope="module")
def cpp_kernel():
    op = _kernel_cache.load_kernel(wait=True, timeout=900)
    if op is None:
        pytest.skip(f"the C++ kernel cannot be built here: {_kernel_cache.failure_message()}")
    return op


def _bf16(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _special_params(bits: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 tensor of 600 elements (three 8-bit blocks, the last one short) with the values
    where split and join have cases, each with corrections at their extremes: powers of two
    (exponent boundaries) and their neighbours, +-0, denormals, the largest finite value,
    +-inf and NaN; the rest random normals with random corrections."""
    lo, hi = -(1 << (bits - 17)), (1 << (bits - 17)) - 1  # the correction's range
    patterns = [
        0x3F80, 0x3F7F, 0x3F81, 0xBF80, 0xBF7F, 0x4000, 0x3FFF,  # 1, its neighbours, -1, 2
        0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x807F,  # +-0, denormals, smallest normal
        0x7F7F, 0xFF7F, 0x7F7E,  # the largest finite values
        0x7F80, 0xFF80, 0x7FC0, 0xFFC1,  # +-inf, NaNs
    ]
    corr_values = [0, 1, -1, lo, hi, lo + 1, hi - 1]
    p_bits, c_vals = [], []
    for pat in patterns:
        for c in corr_values:
            p_bits.append(pat if pat < 0x8000 else pat - 0x10000)
            c_vals.append(c)
    n_special = len(p_bits)
    rest = 600 - n_special
    p = torch.cat([_bf16(p_bits), torch.randn(rest, generator=gen).to(torch.bfloat16)])
    c_rest = torch.randint(lo, hi + 1, (rest,), generator=gen)
    c = torch.cat([torch.tensor(c_vals), c_rest]).to(M.correction_dtype(bits))
    return p, c


def _bitwise_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (bf16 parameters, corrections, codes); float32 moments and scales with
    NaN equal to NaN (a NaN's sign and payload from torch's ops are not the kernel's)."""
    if a.dtype == torch.bfloat16:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.is_floating_point():
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


KERNEL_OPTIONS = {
    "adoptw": dict(weight_decay=0.1, decouple=True),
    "coupled-decay+maximize": dict(weight_decay=0.1, maximize=True),
    "nesterov+clip-off": dict(nesterov=True, clip_exp=None),
    "caution": dict(caution=True),
    "gradscaler-pow2": dict(grad_scale=1024.0),
    "gradscaler-3": dict(grad_scale=3.0, weight_decay=0.01, decouple=True),
    "tiny-lr": dict(lr=1e-39),  # the master weights of denormal parameters stay denormal
}


def _kernel_run(fused: bool, bits: int, state: str, opts: dict, steps: int = 3):
    """Three tensors (special values, a random (37, 20) matrix, one of 5 elements) stepped
    ``steps`` times by the functional API on the kernel (``fused``) or the for-loop path;
    returns every tensor it updates."""
    gen = torch.Generator().manual_seed(bits + len(state))
    special, special_c = _special_params(bits, gen)
    params = [special, torch.randn(37, 20, generator=gen).to(torch.bfloat16),
              torch.randn(5, generator=gen).to(torch.bfloat16)]  # fmt: skip
    corrections = [special_c] + [
        torch.randint(-100, 100, p.shape, generator=gen).to(M.correction_dtype(bits))
        for p in params[1:]
    ]
    if state == "8bit":
        st = [_b8.new_state(p) for p in params]
        m = [s["exp_avg"] for s in st]
        v = [s["exp_avg_sq"] for s in st]
        scales = dict(exp_avg_scales=[s["exp_avg_scale"] for s in st],
                      exp_avg_sq_scales=[s["exp_avg_sq_scale"] for s in st])  # fmt: skip
    else:
        m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        scales = {}
    step_t = [torch.zeros((), dtype=torch.float32) for _ in params]
    opts = dict(opts)
    grad_scale = opts.pop("grad_scale", None)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
                 decouple=False, maximize=False) | opts  # fmt: skip
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
        _adopt_fn(params, grads, m, v, step_t, fused=fused, foreach=False,
                  master_corrections=corrections, seed=7, keys=[3, 1, 4],
                  grad_scale=None if grad_scale is None else torch.tensor(grad_scale),
                  found_inf=None if grad_scale is None else torch.tensor(0.0),
                  **scales, **hyper)  # fmt: skip
    out = {"param": params, "correction": corrections, "m": m, "v": v, "step": step_t}
    out.update({k: list(x) for k, x in scales.items()})
    return out


@pytest.mark.parametrize("opts", list(KERNEL_OPTIONS), ids=list(KERNEL_OPTIONS))
@pytest.mark.parametrize("state", ["float", "8bit"])
@pytest.mark.parametrize("bits", [24, 32])
def test_cpp_kernel_equals_forloop_path_bit_for_bit(cpp_kernel, bits, state, opts):
    """The C++ kernel joins, updates and splits the master weight as the for-loop path does:
    parameters, corrections, moments (or codes and scales) and step counts bit for bit, over
    three steps, on the special values of split/join (exponent boundaries, zeros,
    denormals, the largest finite values, inf, NaN) and random ones; 24 bits round with the
    same dither (stream STREAM_MASTER, the tensor's step seed)."""
    ran = []
    real = _cpu_launch.fused_adopt_8bit if state == "8bit" else _cpu_launch.fused_adopt

    def spy(*args, **kwargs):  # the kernel must take the corrected tensors, not leave them
        left = real(*args, **kwargs)
        ran.append((kwargs.get("corrections") is not None, left))
        return left

    name = "fused_adopt_8bit" if state == "8bit" else "fused_adopt"
    with mock.patch.object(_cpu_launch, name, spy):
        got = _kernel_run(True, bits, state, KERNEL_OPTIONS[opts])
    want = _kernel_run(False, bits, state, KERNEL_OPTIONS[opts])
    caution_8bit = state == "8bit" and KERNEL_OPTIONS[opts].get("caution")
    assert ran and all(with_corr for with_corr, _ in ran)
    if not caution_8bit:  # (the 8-bit kernel leaves caution to the for-loop path)
        assert all(left == [] for _, left in ran)
    for key, tensors in want.items():
        for i, (a, b) in enumerate(zip(got[key], tensors)):
            assert _bitwise_same(a, b), (key, i)


def test_cpp_kernel_leaves_float16_and_strided_corrected_tensors(cpp_kernel):
    """float16 parameters with a correction (a fraction of an fp16 ulp, not bits) and
    non-contiguous bf16 ones come back as left, and step on the for-loop path: the same bits
    as a for-loop run."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(40, 30, generator=gen) for _ in range(3)]

    def tensors():
        ps = [base[0].to(torch.float16), base[1].to(torch.bfloat16).t(),
              base[2].to(torch.bfloat16)]  # fmt: skip
        cs = [torch.full(p.shape, 3, dtype=torch.int8) for p in ps]
        cs[1] = cs[1].t().contiguous().t()  # the same layout as its parameter
        return ps, cs

    results = []
    for fused in (True, False):
        ps, cs = tensors()
        grads = [torch.ones_like(p) for p in ps]
        m = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        v = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        steps = [torch.zeros(()) for _ in ps]
        if fused:
            left = _cpu_launch.fused_adopt(
                ps, grads, m, v, steps, corrections=cs, lr=1e-2, beta1=0.9, beta2=0.999,
                eps=1e-6, clip_exp=0.25, clip_fn=None, weight_decay=0.0, decouple=False,
                maximize=False, nesterov=False, caution=False, has_complex=False,
            )  # fmt: skip
            assert left == [0, 1]
            steps = [torch.zeros(()) for _ in ps]
            ps, cs = tensors()
            m = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
            v = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        _adopt_fn(ps, grads, m, v, steps, fused=fused, foreach=False, master_corrections=cs,
                  lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
                  decouple=False, maximize=False)  # fmt: skip
        results.append((ps, cs))
    for a, b in zip(*[r[0] + r[1] for r in results]):
        assert torch.equal(a, b)


def test_fused_run_while_the_kernel_builds_equals_a_warm_run(cpp_kernel):
    """While the kernel is being built the dispatch steps every tensor on the for-loop path;
    a run whose first steps do that (the kernel 'still building') ends with the same bits as
    a run on the kernel from its first step: bf16 + 24-bit correction, float and 8-bit state."""
    def train(building_steps: int):
        gen = torch.Generator().manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16))
              for s in ((64, 80), (300,), (9,))]  # fmt: skip
        opts = [ADOPT(ps[:2], lr=1e-3, master_weight_bits=24, weight_decay=0.1),
                ADOPT(ps[2:], lr=1e-3, master_weight_bits=24, state_dtype="8bit",
                      min_8bit_size=0)]  # fmt: skip
        for step in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            if step < building_steps:  # as load_kernel answers while the build runs
                with mock.patch.object(_cpu_launch, "load_kernel", lambda build=True: None):
                    for o in opts:
                        o.step()
            else:
                for o in opts:
                    o.step()
        return ps, opts

    cold, cold_opts = train(3)
    warm, warm_opts = train(0)
    for a, b in zip(cold, warm):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for oc, ow in zip(cold_opts, warm_opts):
        for a, b in zip(oc.param_groups[0]["params"], ow.param_groups[0]["params"]):
            for key, value in oc.state[a].items():
                assert _bitwise_same(value, ow.state[b][key]), key


def test_a_steps_random_streams_share_no_number():
    """The streams one tensor's step draws from (m's codes, v's codes, and its parameter's:
    stochastic rounding or the 24-bit master) never reuse a block's random offset: with the
    master on a fourth stream 3, its block b hashed the same input as m's block b + 1, so the
    master weight and the m codes of the next block were rounded with the same numbers."""
    from adoptim.formats import blockwise8 as b8

    blocks = 64
    for seed in (0, 12345, 2**32 - 1):
        offsets = [b8.block_offsets(seed, s, blocks).tolist()
                   for s in (b8.STREAM_M, b8.STREAM_V, b8.STREAM_MASTER)]  # fmt: skip
        seen = [x for stream in offsets for x in stream]
        assert len(set(seen)) == len(seen), seed
