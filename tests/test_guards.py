"""Guards for what a planted-bug campaign against the suite found unguarded (issue 18): each
test here failed on the bug it is named for (planted by hand, one at a time; see the commit
that added it), and passes on the correct code.

* ``from_adam``: the clip of the converted m at c_t, and v's bias correction with Adam's
  beta2 when ADOPT's betas are overridden;
* 8-bit state with a GradScaler on the unfused 8-bit path equals an unscaled run;
* 8-bit v never stores a nonzero v as code 0, on every path, in a block whose v spans more
  than the format's 255**4;
* ``min_8bit_size`` at the boundary, in real elements (complex counts twice);
* the 8-bit roundings are unbiased in what they store (E[decoded v] = v, E[decoded m] = m);
* on CUDA, ``step`` of a capturable or fused optimizer is on the parameter's device after
  ``load_state_dict``.
"""

from __future__ import annotations

import importlib
import io
import math

import pytest
import torch
from integration_paths import fused_unavailable_reason

import adoptim.paths.forloop as forloop_module
from adoptim import ADOPT
from adoptim.formats import blockwise8 as quant

# --------------------------------------------------------------------------------------------
# Helpers

#: the 8-bit paths: name -> constructor flags (the Triton kernel is reached by on_triton)
PATHS8 = {
    "for-loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(fused=True),
}


def _require_kernel(monkeypatch):
    """Skip where the C++ kernel cannot be built; wait for it, and make the for-loop path
    raise, so that a quiet fallback to it cannot pass for the kernel."""
    reason = fused_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)

    def refuse(*args, **kwargs):
        raise AssertionError("the for-loop path ran where the fused kernel should have")

    monkeypatch.setattr(forloop_module, "single_tensor_adopt", refuse)


def _triton_lowbit():
    """tests/test_triton_lowbit.py, for its ``on_triton`` context (Triton's interpreter on CPU
    tensors). Imported here, not at the top: importing it sets TRITON_INTERPRET before
    triton is imported and skips the test (not this module) where triton is missing or too
    old; the tests that use it need the interpreter."""
    module = importlib.import_module("test_triton_lowbit")
    if not module.INTERPRETED:
        pytest.skip("interpreter tests: run with TRITON_INTERPRET=1")
    return module


# --------------------------------------------------------------------------------------------
# from_adam


def _adam_after_burst(betas, steps=100, size=(40, 30)):
    """Adam after ``steps`` steps whose last gradient is 1000x the earlier ones (a burst)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(size, generator=gen).requires_grad_()
    adam = torch.optim.Adam([p], lr=1e-3, betas=betas)
    for t in range(steps):
        p.grad = torch.randn(size, generator=gen) * (10.0 if t == steps - 1 else 0.01)
        adam.step()
    return p, adam


def _converted_f64(adam, p, beta2_adam, eps=1e-6, clip_exp=0.25):
    """from_adam's documented conversion in float64: v = v_adam / (1 - beta2_adam**t),
    m = clip(m_adam / max(sqrt(v), eps), t**clip_exp); and m before the clip."""
    old = adam.state[p]
    t = float(old["step"])
    v = old["exp_avg_sq"].double() / (1 - beta2_adam**t)
    unclipped = old["exp_avg"].double() / v.sqrt().clamp(min=eps)
    bound = t**clip_exp
    return unclipped.clamp(-bound, bound), v, unclipped, bound


def test_from_adam_clips_the_converted_m_at_c_t():
    # beta1 = 0.5 and a burst: m_adam ~ g/2, sqrt(v) ~ |g| * sqrt((1 - beta2) / (1 - beta2^t))
    # ~ 0.1 |g|, so m_adam / sqrt(v) ~ 5 > c_100 = 3.16 (with Adam's default beta1 = 0.9 it
    # is ~1, and a conversion that skips the clip passes).
    p, adam = _adam_after_burst((0.5, 0.999))
    opt = ADOPT.from_adam(adam)
    m, v, unclipped, bound = _converted_f64(adam, p, 0.999)
    assert (unclipped.abs() > bound).float().mean() > 0.5, "the clip must bind for this test"
    state = opt.state[p]
    assert float(state["step"]) == 100.0
    torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=2e-6, atol=0)
    torch.testing.assert_close(state["exp_avg"].double(), m, rtol=2e-6, atol=0)
    assert state["exp_avg"].abs().max().item() == pytest.approx(bound, rel=1e-6)


def test_from_adam_bias_corrects_v_with_adams_beta2_when_betas_are_overridden():
    # Adam's beta2 = 0.999, ADOPT's 0.99: after 100 steps 1 - beta2^t is 0.095 vs 0.634, so
    # v corrected with ADOPT's beta2 would be 6.7x too small.
    p, adam = _adam_after_burst((0.9, 0.999))
    opt = ADOPT.from_adam(adam, betas=(0.9, 0.99))
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    m, v, _, _ = _converted_f64(adam, p, 0.999)
    state = opt.state[p]
    torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=2e-6, atol=0)
    torch.testing.assert_close(state["exp_avg"].double(), m, rtol=2e-6, atol=0)


# --------------------------------------------------------------------------------------------
# 8-bit state with a GradScaler


@pytest.mark.parametrize(
    "kw",
    [
        # fused=True hands the scale to the step (GradScaler does not unscale .grad);
        # caution sends the 8-bit tensors to the for-loop 8-bit path, which divides by it
        pytest.param(dict(fused=True, caution=True), id="fused+caution"),
        pytest.param(dict(fused=True), id="fused"),
        # unfused: GradScaler unscales .grad itself before an ordinary step
        pytest.param(dict(foreach=False, fused=False), id="for-loop"),
        pytest.param(dict(foreach=True, fused=False), id="foreach"),
    ],
)
def test_8bit_with_gradscaler_equals_the_unscaled_run(kw):
    """Equal bit for bit, not within a tolerance: the scale is a power of two (2**16, halved
    to 2**15 by the overflowing step), so the scaled gradient S*g and its unscaling (S*g)/S or
    (S*g)*(1/S) are exact in float32 for these magnitudes (no overflow, no subnormals), and
    the step sees the same gradient as the unscaled run; the step that overflows is skipped
    whole, as if the unscaled run had not taken it."""
    if kw.get("fused"):
        reason = fused_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(64, 80, generator=gen), torch.randn(100, generator=gen)]  # 8-bit, f32
    grads = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(6)]
    bad = 3  # the scaled run's gradient overflows on this call

    def run(scaled):
        params = [x.clone().requires_grad_() for x in init]
        opt = ADOPT(params, lr=1e-2, state_dtype="8bit", **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for t, w in enumerate(grads):
            if t == bad and not scaled:
                continue  # the scaled run skips it
            opt.zero_grad()
            loss = sum((p * g).sum() for p, g in zip(params, w))
            if scaled:
                scaler.scale(loss).backward()
                if t == bad:
                    params[0].grad[0, 0] = math.inf
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        if scaled:
            assert scaler.get_scale() == 2.0**15  # halved once: the inf step was seen
        return params, opt

    plain, plain_opt = run(False)
    scaled, scaled_opt = run(True)
    assert "exp_avg_scale" in plain_opt.state[plain[0]]  # the big tensor is 8-bit
    for i, (x, y) in enumerate(zip(plain, scaled)):
        differ = int((x != y).sum())
        assert differ == 0, f"param {i}: {differ} of {x.numel()} elements differ"
        sx, sy = plain_opt.state[x], scaled_opt.state[y]
        assert sx.keys() == sy.keys()
        for key in sx:
            assert torch.equal(sx[key], sy[key]), key
    assert float(scaled_opt.state[scaled[0]]["step"]) == len(grads) - 1


# --------------------------------------------------------------------------------------------
# 8-bit v: no zero code for a nonzero v


def _wide_block_grads(steps=3, n=4096):
    """Gradients where, in every block of 256, element 0 is O(1), one element is always 0
    (v = 0: code 0), and the rest are about a millionth of element 0: their v is ~1e-12 of
    the block's largest, below the smallest nonzero code's (255**-4 = 2.3e-10 of it), so
    unbiased rounding alone would store ~99.6 % of them as code 0."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        g = torch.empty(n).uniform_(0.5, 2.0, generator=gen) * 1e-6
        g *= torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        g[0::256] = 1.0 + torch.rand(n // 256, generator=gen)
        g[7::256] = 0.0
        out.append(g)
    return out


def _run_wide_block(path_kw, context=None):
    grads = _wide_block_grads()
    p = torch.zeros(4096, requires_grad=True)
    with context if context is not None else _nullcontext():
        opt = ADOPT([p], lr=1e-3, state_dtype="8bit", **path_kw)
        codes = []
        for g in grads:
            p.grad = g.clone()
            opt.step()
            codes.append(opt.state[p]["exp_avg_sq"].clone())
    # The float32 v of each call, to state the precondition and which codes may be 0.
    v = torch.zeros(4096, dtype=torch.float64)
    for t, (g, q) in enumerate(zip(grads, codes)):
        g = g.double()
        v = g * g if t == 0 else 0.9999 * v + 1e-4 * g * g
        blocks = v.view(-1, 256)
        tiny = blocks[:, 1:7]
        assert (tiny / blocks[:, :1]).max() < 255.0**-4  # the test's premise
        nonzero = v > 0
        zero_codes = int((q[nonzero] == 0).sum())
        assert zero_codes == 0, f"call {t}: {zero_codes} nonzero v stored as code 0"
        assert bool((q[~nonzero] == 0).all()), f"call {t}: a zero v got a nonzero code"


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("path", ["for-loop", "foreach", "fused"])
def test_8bit_nonzero_v_never_gets_code_0(path, monkeypatch):
    if path == "fused":
        _require_kernel(monkeypatch)
    _run_wide_block(PATHS8[path])


def test_8bit_nonzero_v_never_gets_code_0_triton_interpreted():
    tl8 = _triton_lowbit()
    _run_wide_block(dict(fused=True), tl8.on_triton())


# --------------------------------------------------------------------------------------------
# min_8bit_size at the boundary


@pytest.mark.parametrize(
    ("shape", "dtype", "min_size", "eight_bit"),
    [
        ((4095,), torch.float32, 4096, False),
        ((4096,), torch.float32, 4096, True),
        ((63, 65), torch.float32, 4096, False),  # 4,095 elements, 2-D
        ((64, 64), torch.bfloat16, 4096, True),
        ((2047,), torch.complex64, 4096, False),  # 4,094 real elements
        ((2048,), torch.complex64, 4096, True),  # 4,096 real elements
        ((2048,), torch.complex64, 4097, False),
        ((4097,), torch.float32, 4097, True),
        ((1,), torch.float32, 1, True),
        ((0,), torch.float32, 1, False),
        ((0,), torch.float32, 0, True),
        ((1,), torch.float32, 0, True),
    ],
)
def test_min_8bit_size_boundary_counts_real_elements(shape, dtype, min_size, eight_bit):
    """Tensors with at least ``min_8bit_size`` real elements (a complex element counts twice)
    get 8-bit moments; the others float state. Checked where state is created (the first
    step) and where a float checkpoint is loaded (converted to the loading optimizer's
    format), and the tensor then steps."""
    gen = torch.Generator().manual_seed(2)

    def grad():
        return torch.randn(shape, generator=gen).to(dtype)

    p = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    opt = ADOPT([p], lr=1e-2, state_dtype="8bit", min_8bit_size=min_size, foreach=False,
                fused=False)  # fmt: skip
    for _ in range(2):
        p.grad = grad()
        opt.step()
    state = opt.state[p]
    real = p.numel() * (2 if p.is_complex() else 1)
    assert ("exp_avg_scale" in state) == eight_bit, (shape, dtype, min_size)
    if eight_bit:
        assert state["exp_avg"].dtype == torch.int8 and state["exp_avg"].numel() == real
        assert state["exp_avg_sq"].dtype == torch.uint8 and state["exp_avg_sq"].numel() == real
    else:
        assert state["exp_avg"].shape == p.shape
    # A float-state checkpoint of the same tensor, loaded into an 8-bit optimizer.
    q = p.detach().clone().requires_grad_()
    float_opt = ADOPT([q], lr=1e-2, foreach=False, fused=False)
    q.grad = grad()
    float_opt.step()
    loaded = ADOPT([q], lr=1e-2, state_dtype="8bit", min_8bit_size=min_size, foreach=False,
                   fused=False)  # fmt: skip
    loaded.load_state_dict(float_opt.state_dict())
    assert ("exp_avg_scale" in loaded.state[q]) == eight_bit
    q.grad = grad()
    loaded.step()
    assert torch.isfinite(torch.view_as_real(q) if q.is_complex() else q.float()).all()


# --------------------------------------------------------------------------------------------
# Unbiased 8-bit rounding, tested on the format itself

SEEDS = 2000  # roundings per element; the bounds below are 5 standard errors


def _mean_decoded(quantize, dequantize, x, code_dtype):
    """The mean over SEEDS seeds (each a real step's seed) of dequantize(quantize(x)), in
    float64, and the per-element spread of the two levels each element rounds between."""
    codes = torch.empty(x.numel(), dtype=code_dtype)
    scale = torch.empty(quant.num_blocks(x.numel()))
    total = torch.zeros(x.numel(), dtype=torch.float64)
    low = torch.full((x.numel(),), math.inf, dtype=torch.float64)
    high = torch.full((x.numel(),), -math.inf, dtype=torch.float64)
    for step in range(SEEDS):
        quantize(x, quant.state_seed(float(step), x.numel()), codes, scale)
        d = dequantize(codes, scale).double()
        total += d
        low, high = torch.minimum(low, d), torch.maximum(high, d)
    return total / SEEDS, low, high, scale


def test_8bit_v_rounding_is_unbiased_in_v():
    """E[decoded v] = v over seeds (quantize_v's claim, in v itself, not in its code).

    The values sit between codes 1 and 40 of their block (the block's largest is code 255
    exactly), where rounding that is unbiased in the code q (v ~ q**4) or in sqrt(v) (~q**2)
    instead is biased by up to ~0.2 of the gap between the two levels; the bound is 5
    standard errors of a two-level rounding, (gap / 2) * 5 / sqrt(SEEDS) = 0.056 gap. The
    smallest nonzero code is excluded: a v below it is rounded up on purpose (no zero code
    for a nonzero v)."""
    gen = torch.Generator().manual_seed(4)
    n = 512
    smax = torch.tensor([2.0, 3e-4])  # two blocks, two scales
    code = 1.0 + 39.0 * torch.rand(n, generator=gen, dtype=torch.float64)  # fractional codes
    s = (code / 255.0) ** 2 * smax.double().repeat_interleave(256)  # sqrt(v) at that code
    v = (s * s).float()
    v[0], v[256] = smax[0] ** 2, smax[1] ** 2  # each block's largest: its scale
    mean, low, high, _ = _mean_decoded(quant.quantize_v, quant.dequantize_v, v, torch.uint8)
    gap = high - low
    interior = gap > 0
    assert interior.sum() > 0.9 * n  # nearly all elements rounded both ways over the seeds
    err = (mean - v.double()).abs()
    bound = 5 * 0.5 * gap / math.sqrt(SEEDS) + 1e-6 * v.double()
    worst = (err / bound)[interior].max().item()
    assert worst <= 1, f"decoded v is biased: {worst:.2f} x the bound"
    # the two summaries of bias across elements: a small systematic one shows here first
    rel = ((mean - v.double()) / gap)[interior]
    assert abs(rel.mean().item()) < 5 * 0.5 / math.sqrt(SEEDS * interior.sum().item())


def test_8bit_m_rounding_is_unbiased():
    """E[decoded m] = m over seeds; rounding to nearest (or any deterministic rounding) is
    off by up to half a level and fails the 5-standard-error bound (0.056 of a level)."""
    gen = torch.Generator().manual_seed(6)
    n = 512
    m = torch.randn(n, generator=gen)
    m[0] = 5.0  # block 1's largest
    m[256:] *= -0.003  # block 2: another scale
    mean, low, high, scale = _mean_decoded(quant.quantize_m, quant.dequantize_m, m, torch.int8)
    level = (scale.double() / quant.M_LEVELS).repeat_interleave(256)
    err = (mean - m.double()).abs()
    bound = 5 * 0.5 * level / math.sqrt(SEEDS) + 1e-6 * m.double().abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"decoded m is biased: {worst:.2f} x the bound"
    assert ((high - low) > 0).float().mean() > 0.9  # the rounding is random, not fixed


# --------------------------------------------------------------------------------------------
# CUDA: `step` on the parameter's device after load_state_dict


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (step's device on "
                    "CUDA after load_state_dict)")  # fmt: skip
@pytest.mark.parametrize(
    "kw",
    [dict(capturable=True), dict(fused=True), dict(fused=True, state_dtype="8bit")],
    ids=["capturable", "fused", "fused-8bit"],
)
@pytest.mark.parametrize("saved_by", ["same", "host-step"])
def test_cuda_loaded_step_is_on_the_parameter_device(kw, saved_by):
    """A capturable or fused=True optimizer on CUDA keeps `step` on the device (its step
    must not read it on the host); a loaded state dict, saved by the same kind of optimizer
    or by one whose `step` is on the host (and moved through a CPU checkpoint file), must
    put it there too, and the next step runs."""
    if kw.get("fused"):
        pytest.importorskip("triton", reason="fused=True on CUDA takes the Triton kernel")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 80).cuda()  # 5,120 weights: 8-bit under fused-8bit
    saver_kw = kw if saved_by == "same" else {k: v for k, v in kw.items() if k == "state_dtype"}
    saver = ADOPT(model.parameters(), lr=1e-3, **saver_kw)
    for _ in range(2):
        model(torch.randn(8, 64, device="cuda")).square().mean().backward()
        saver.step()
        saver.zero_grad()
    buf = io.BytesIO()
    torch.save(saver.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu")
    opt = ADOPT(model.parameters(), lr=1e-3, **kw)
    opt.load_state_dict(sd)
    for p in model.parameters():
        assert opt.state[p]["step"].device == p.device, (kw, saved_by)
    model(torch.randn(8, 64, device="cuda")).square().mean().backward()
    opt.step()
    for p in model.parameters():
        assert opt.state[p]["step"].device == p.device
        assert float(opt.state[p]["step"]) == 3.0
