"""The Triton kernels with master-weight corrections (``master_weight_bits=24|32`` on bfloat16
parameters), checked on CPU tensors through Triton's interpreter.

The kernels join the bf16 parameter and its correction into the float32 master weight in
registers and split the result back, with the integer arithmetic of
:mod:`adoptim.formats.master` and, for 24 bits, the same random numbers (``STREAM_MASTER``,
the tensor's step seed). So the kernel's step equals the for-loop path's bit for bit:
parameters, corrections, float moments or 8-bit codes and scales (``torch.equal``).

1. The join and split helpers alone, in a test kernel, against ``master.join``/``split`` on
   every bf16 pattern (every exponent: zero, denormals, powers of two, the largest finite
   value, inf, NaN), with the low bits and corrections that decide the rounding.
2. Whole steps through :func:`adoptim.functional.adopt`, the kernel against the for-loop path,
   over a few steps, float and 8-bit moments, 24 and 32 bits, with special values; and
   through the optimizer, with tensors the kernel takes and leaves side by side.

Without a GPU these run under the interpreter on CPU tensors (``ADOPTIM_FUSED_BACKEND=triton``);
on a CUDA machine without ``TRITON_INTERPRET`` the same tests run the compiled kernels on the
GPU (``fused=True``), against the for-loop path there (scripts/gpu_check.sh).
"""

from __future__ import annotations

import os
from unittest import mock

import pytest

# first: triton_setup sets TRITON_INTERPRET before anything imports triton
from triton_setup import INTERPRETED

# isort: split
import torch
import triton
import triton.language as tl

import adoptim.paths.foreach as foreach_module
import adoptim.paths.forloop as forloop_module
from adoptim import ADOPT
from adoptim.formats import blockwise8
from adoptim.formats import master as M
from adoptim.functional import adopt
from adoptim.kernels.triton import jit as _jit
from adoptim.kernels.triton import launch as _launch
from adoptim.kernels.triton import launch8 as _launch8

DEVICE = "cpu" if INTERPRETED else "cuda"  # (triton_setup: interpreted when there is no GPU)
# 300 elements: two programs of up to 4 blocks (the last one masked); fewer interpreted calls
# than the other Triton tests' shapes, for speed
SMALL = _launch.LaunchConfig(block=64, chunk=256, num_warps=1, schedule_block=4)
SMALL8 = _launch8.LaunchConfig8(rows=2, num_warps=1)


# --------------------------------------------------------------------------------------------
# 1. The helpers, on every bf16 pattern


@triton.jit
def _split_join_kernel(x_ptr, u_ptr, p_ptr, c_ptr, pin_ptr, cin_ptr, j_ptr, n,
                       S: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pbits, corr = _jit._master_split(tl.load(x_ptr + offs, mask=mask, other=0.0),
                                     tl.load(u_ptr + offs, mask=mask, other=0.0), S)  # fmt: skip
    tl.store(p_ptr + offs, pbits, mask=mask)
    tl.store(c_ptr + offs, corr, mask=mask)
    joined = _jit._master_join(tl.load(pin_ptr + offs, mask=mask, other=0),
                               tl.load(cin_ptr + offs, mask=mask, other=0), S)  # fmt: skip
    tl.store(j_ptr + offs, joined, mask=mask)


def _kernel_split_join(x, u, p_in, c_in, bits):
    """The kernel helpers on flat tensors: (split param, split correction, joined master)."""
    n = x.numel()
    s = bits - 16
    x, u, p_in, c_in = (t.to(DEVICE) for t in (x, u, p_in, c_in))
    p = torch.empty(n, dtype=torch.int16, device=DEVICE)  # (bf16 bits: uint16 stored as int16)
    c = torch.empty(n, dtype=M.correction_dtype(bits), device=DEVICE)
    j = torch.empty(n, dtype=torch.float32, device=DEVICE)
    block = 1 << 16 if INTERPRETED else 1024
    _split_join_kernel[(-(-n // block),)](x, u, p, c, p_in.view(torch.int16), c_in, j, n, S=s,
                                         BLOCK=block)  # fmt: skip
    return p.view(torch.bfloat16).cpu(), c.cpu(), j.cpu()


# low 16 bits of a float32 that decide its rounding (24 bits: the low 8 and the carry into
# bit 8 and above; 32 bits: the sign of the low 16)
_LOWS = (0x0000, 0x0001, 0x007F, 0x0080, 0x00FF, 0x0100, 0x7F00, 0x7FFF, 0x8000, 0x8001,
         0xFF00, 0xFF7F, 0xFF80, 0xFFFF)  # fmt: skip


def _all_patterns():
    """Every float32 whose top 16 bits are any bf16 pattern, with each of the low halves
    above: float32, flat."""
    top = torch.arange(1 << 16, dtype=torch.int64)
    low = torch.tensor(_LOWS, dtype=torch.int64)
    bits = (top[:, None] << 16 | low[None, :]).reshape(-1)
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def _same_bits(a, b):
    ai = a.view(torch.int16) if a.dtype == torch.bfloat16 else a.view(torch.int32)
    bi = b.view(torch.int16) if b.dtype == torch.bfloat16 else b.view(torch.int32)
    return torch.equal(ai, bi)


def _same_floats(a, b):
    """Bit for bit, except that any NaN equals any NaN (join of a NaN parameter is its NaN
    pattern shifted, as in torch: compared as NaN)."""
    nan = torch.isnan(a) & torch.isnan(b)
    return torch.equal(torch.isnan(a), torch.isnan(b)) and _same_bits(
        torch.where(nan, 0.0, a), torch.where(nan, 0.0, b)
    )


@pytest.mark.parametrize("bits", [24, 32])
def test_split_and_join_match_the_format_on_every_bf16_pattern(bits):
    x = _all_patterns()
    n = x.numel()
    gen = torch.Generator().manual_seed(bits)
    # dither: the extremes (0 and the largest value below 1) and random numbers
    u = torch.rand(n, generator=gen)
    u[0::7] = 0.0
    u[1::7] = 1.0 - 2.0**-24
    dither = u if bits == 24 else None
    want_p, want_c = M.split(x, torch.bfloat16, bits, dither)
    # join: every parameter pattern with corrections at the extremes, 0, +-1, and random
    p_in = x.view(torch.int32).__rshift__(16).to(torch.int16).view(torch.bfloat16)
    lo, hi = (-128, 127) if bits == 24 else (-32768, 32767)
    c_in = torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int64)
    for k, value in enumerate((lo, hi, 0, -1, 1)):
        c_in[k::9] = value
    c_in = c_in.to(M.correction_dtype(bits))
    want_j = M.join(p_in, c_in)

    got_p, got_c, got_j = _kernel_split_join(x, u, p_in, c_in, bits)
    assert _same_bits(got_p, want_p), (got_p != want_p).nonzero()[:5]
    assert torch.equal(got_c, want_c)
    assert _same_floats(got_j, want_j)
    # the special cases were in the sample: NaN in, inf out of a finite master (32 bits), a
    # round-up truncated next to inf (24 bits), negative corrections on zero parameters
    assert torch.isnan(x).any() and torch.isinf(want_p.float()).any()
    assert ((p_in.float() == 0) & (c_in < 0)).any()


# --------------------------------------------------------------------------------------------
# 2. Whole steps: the kernel against the for-loop path

_SHAPES = ((300,), (5, 7))  # 300: two 256-blocks of random numbers, a masked tail
_SHAPES_8BIT = ((1100,), (5, 7))  # 1100: two full 512-tiles (SMALL8) and a masked one

BF16_MAX = torch.finfo(torch.bfloat16).max


def _special_params(shape, gen):
    """bf16 parameters with zeros, denormals, values at and next to powers of two, the
    largest finite value, infinities and NaN at the front, random values behind."""
    x = torch.randn(shape, generator=gen).reshape(-1)
    special = [0.0, -0.0, 1e-39, -3e-40, 2.0**-133, 1.0, 1.0 - 2.0**-9, 1.0 + 2.0**-7, -2.0,
               2.0**-126, -(2.0**-126) * (1 - 2.0**-7), BF16_MAX, -BF16_MAX, 0.5, 1e30,
               float("inf"), float("-inf"), float("nan")]  # fmt: skip
    k = min(len(special), x.numel())
    x[:k] = torch.tensor(special[:k])
    return x.reshape(shape).to(torch.bfloat16)


def _special_corrections(p, bits, gen):
    """Random corrections over the whole range, the extremes on the special values (negative
    ones on zeros and a positive one on inf: never made by split, read as 0)."""
    lo, hi = (-128, 127) if bits == 24 else (-32768, 32767)
    c = torch.randint(lo, hi + 1, p.shape, generator=gen, dtype=torch.int64).reshape(-1)
    c[:18] = torch.tensor([-5, lo, hi, lo, -1, 1, hi, lo, 0, 3, -3, hi, lo, 7, -7, hi, -1, 0])[
        : c.numel()
    ][:18]
    return c.reshape(p.shape).to(M.correction_dtype(bits))


def _state(shapes, bits, state, gen):
    """params, corrections, float moments or 8-bit (codes, scales), step counts."""
    params = [_special_params(s, gen) for s in shapes]
    corrections = [_special_corrections(p, bits, gen) for p in params]
    steps = [torch.tensor(float(t)) for t in (0, 4, 9)[: len(shapes)]]
    if state == "8bit":
        m8, sm, v8, sv = [], [], [], []
        for p in params:
            n = p.numel()
            st = blockwise8.new_state(p)
            m = torch.randn(n, generator=gen) * 0.1
            v = torch.rand(n, generator=gen) * 0.01
            m[:3] = 0.0
            blockwise8.quantize_m(m, 11, st["exp_avg"], st["exp_avg_scale"])
            blockwise8.quantize_v(v, 12, st["exp_avg_sq"], st["exp_avg_sq_scale"])
            m8.append(st["exp_avg"])
            sm.append(st["exp_avg_scale"])
            v8.append(st["exp_avg_sq"])
            sv.append(st["exp_avg_sq_scale"])
        st = dict(params=params, corrections=corrections, exp_avgs=m8, exp_avg_sqs=v8,
                  scales=(sm, sv), steps=steps)  # fmt: skip
    else:
        dtype = torch.float32 if state == "float32" else torch.bfloat16
        m = [(torch.randn(p.shape, generator=gen) * 0.1).to(dtype) for p in params]
        v = [(torch.rand(p.shape, generator=gen) * 0.01).to(dtype) for p in params]
        st = dict(params=params, corrections=corrections, exp_avgs=m, exp_avg_sqs=v,
                  scales=None, steps=steps)  # fmt: skip
    # (step counts stay on the host, as the optimizer keeps them for these formats)
    return {key: _to(value, "steps" != key) for key, value in st.items()}


def _to(value, move):
    if value is None or not move:
        return value
    if isinstance(value, tuple):
        return tuple([t.to(DEVICE) for t in seq] for seq in value)
    return [t.to(DEVICE) for t in value]


def _clone(st):
    out = {}
    for key, value in st.items():
        if value is None:
            out[key] = None
        elif isinstance(value, tuple):
            out[key] = tuple([t.clone() for t in seq] for seq in value)
        else:
            out[key] = [t.clone() for t in value]
    return out


def _step(st, grads, *, triton_path, **kw):
    scales = st["scales"] or (None, None)
    options = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, clip_exp=0.25,
                   weight_decay=0.0, decouple=False, maximize=False, seed=5)  # fmt: skip
    options.update(kw)
    args = (st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])
    extra = dict(exp_avg_scales=scales[0], exp_avg_sq_scales=scales[1],
                 master_corrections=st["corrections"])  # fmt: skip
    if triton_path:
        with (
            mock.patch.dict(os.environ, {_launch.BACKEND_ENV: "triton"}),
            mock.patch.object(_launch, "CONFIG", SMALL),
            mock.patch.object(_launch8, "CONFIG", SMALL8),
            mock.patch.object(forloop_module, "single_tensor_adopt", _refuse),
            mock.patch.object(foreach_module, "multi_tensor_adopt", _refuse),
        ):
            adopt(*args, **extra, fused=None if INTERPRETED else True, **options)
    else:
        adopt(*args, fused=False, foreach=False, **extra, **options)


def _refuse(*args, **kwargs):
    raise AssertionError("an unfused path ran where the Triton kernel should have")


def _assert_equal(a, b):
    """Parameters (their bits: a NaN parameter is the one quiet NaN on every path),
    corrections, codes and counts exactly; float moments and scales exactly up to NaN
    payloads."""
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16)), "params"
    for key in ("corrections", "exp_avgs", "exp_avg_sqs", "steps"):
        for x, y in zip(a[key], b[key]):
            same = _same_floats(x.float(), y.float()) if x.is_floating_point() else torch.equal(x, y)
            assert same, key
    if a["scales"] is not None:
        for xs, ys in zip(a["scales"], b["scales"]):
            for x, y in zip(xs, ys):
                assert _same_floats(x, y), "scales"


def _run_and_compare(bits, state, steps=3, shapes=None, **kw):
    gen = torch.Generator().manual_seed(bits + len(state))
    shapes = shapes or (_SHAPES_8BIT if state == "8bit" else _SHAPES)
    ref = _state(shapes, bits, state, gen)
    got = _clone(ref)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16).to(DEVICE)
                 for p in ref["params"]]  # fmt: skip
        grads[0].view(-1)[20:24] = 0.0
        _step(ref, grads, triton_path=False, **kw)
        _step(got, [g.clone() for g in grads], triton_path=True, **kw)
        _assert_equal(got, ref)
    return got


@pytest.mark.parametrize("state", ["float32", "8bit"])
@pytest.mark.parametrize("bits", [24, 32])
def test_kernel_step_equals_forloop_with_special_values(bits, state):
    got = _run_and_compare(bits, state)
    assert all(float(s) > 0 for s in got["steps"])


def test_bf16_moments_and_options_equal_forloop():
    """bfloat16 moments (state_dtype="param"), decoupled decay, nesterov and caution (the
    counting pass reads the master weight too)."""
    _run_and_compare(24, "bfloat16", steps=2, weight_decay=0.1, decouple=True, nesterov=True,
                     caution=True)  # fmt: skip


def test_corrections_the_kernels_cannot_walk_are_left_to_the_unfused_path():
    """float16 parameters (their correction is a fraction of an fp16 ulp, not float32 bits)
    and a non-contiguous correction: both launchers return them untouched."""
    gen = torch.Generator().manual_seed(0)
    half = torch.randn(40, generator=gen).to(torch.float16)
    bf16 = torch.randn(40, generator=gen).to(torch.bfloat16)
    c = torch.randint(-128, 128, (40,), generator=gen).to(torch.int8)
    strided = torch.zeros(80, dtype=torch.int8)[::2]
    for p, corr in ((half, c), (bf16, strided)):
        before = p.clone()
        m, v = torch.zeros(40), torch.zeros(40)
        with mock.patch.object(_launch, "CONFIG", SMALL):
            left = _launch.triton_adopt(
                [p], [p.clone()], [m], [v], [torch.tensor(0.0)], strict=True, lr=1e-3,
                beta1=0.9, beta2=0.999, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
                decouple=False, maximize=False, corrections=[corr],
            )  # fmt: skip
        assert left == [0]
        st = blockwise8.new_state(p)
        left8 = _launch8.triton_adopt_8bit(
            [0], [p], [p.clone()], [st["exp_avg"]], [st["exp_avg_scale"]], [st["exp_avg_sq"]],
            [st["exp_avg_sq_scale"]], [torch.tensor(0.0)], strict=True, grad_scale=None,
            stochastic_rounding=False, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6,
            clip_exp=0.25, weight_decay=0.0, decouple=False, maximize=False,
            corrections=[corr],
        )  # fmt: skip
        assert left8 == [0]
        assert torch.equal(p, before)


@pytest.mark.skipif(not INTERPRETED, reason="the optimizer reaches the kernel with fused unset "
                    "only on CPU tensors under ADOPTIM_FUSED_BACKEND=triton")  # fmt: skip
def test_optimizer_mixes_tensors_the_kernel_takes_and_leaves():
    """Through ADOPT (seed, keys from the state_dict numbering): a corrected bf16 tensor with
    8-bit moments and a float32 one take the kernels, a corrected float16 one is left to the
    for-loop path; after two steps everything equals a for-loop optimizer's, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(300, generator=gen).to(torch.bfloat16), torch.randn(30, generator=gen),
            torch.randn(40, generator=gen).to(torch.float16),
            torch.randn(6, 5, generator=gen).to(torch.bfloat16)]  # fmt: skip
    grads = [[torch.randn(x.shape, generator=gen).to(x.dtype) for x in init] for _ in range(2)]
    kw = dict(lr=1e-2, master_weight_bits=24, state_dtype="8bit", min_8bit_size=256, seed=7)

    def run(triton_path):
        params = [x.clone().requires_grad_() for x in init]
        opt = ADOPT(params, foreach=None if triton_path else False, **kw)
        unfused = []
        real = forloop_module.single_tensor_adopt

        def counting(params, *args, **kwargs):
            unfused.extend(p.numel() for p in params)
            return real(params, *args, **kwargs)

        with (
            mock.patch.dict(os.environ, {_launch.BACKEND_ENV: "triton"} if triton_path else {}),
            mock.patch.object(_launch, "CONFIG", SMALL),
            mock.patch.object(_launch8, "CONFIG", SMALL8),
            mock.patch.object(forloop_module, "single_tensor_adopt", counting),
        ):
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = g.clone()
                opt.step()
        return params, opt, unfused

    ref_params, ref_opt, _ = run(False)
    params, opt, unfused = run(True)
    assert sorted(set(unfused)) == [40]  # only the float16 tensor ran unfused
    for x, y in zip(ref_params, params):
        assert torch.equal(x.detach().view(torch.uint8), y.detach().view(torch.uint8))
        sa, sb = ref_opt.state[x], opt.state[y]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert "master_correction" in opt.state[params[0]] and "exp_avg_scale" in opt.state[params[0]]


# --------------------------------------------------------------------------------------------
# Bigger sweeps (-m slow): more steps, the options, bf16 moments


@pytest.mark.slow
@pytest.mark.parametrize("state", ["float32", "bfloat16", "8bit"])
@pytest.mark.parametrize("bits", [24, 32])
@pytest.mark.parametrize(
    "kw",
    [dict(weight_decay=0.1, maximize=True), dict(weight_decay=0.1, decouple=True, nesterov=True),
     dict(grad_scale=torch.tensor(4.0), clip_exp=None), dict(caution=True)],  # fmt: skip
    ids=["coupled-maximize", "decoupled-nesterov", "gradscale-noclip", "caution"],
)
def test_sweep_kernel_equals_forloop(bits, state, kw):
    if state == "8bit" and kw.get("caution"):
        pytest.skip("caution with 8-bit state runs the for-loop path by design")
    if "grad_scale" in kw:
        kw = dict(kw, grad_scale=kw["grad_scale"].to(DEVICE))
    shapes = ((1100, 3), (5, 7), (1,)) if state == "8bit" else ((700,), (5, 7), (1,))
    _run_and_compare(bits, state, steps=5, shapes=shapes, **kw)
