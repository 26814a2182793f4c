"""The fused CPU kernel (fused=True), float32 state for low-precision parameters, GradScaler
integration, and how fused=True/None behave where the kernel cannot run.

The kernel is built once per machine (10-40 s) and cached; tests that need it share the
``kernel`` fixture, which skips with the reason when it cannot be built here (no compiler).
Tests that compare the fused path with another path first make the for-loop path raise, so
that a silent fallback to it cannot pass for the kernel.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import adoptim.paths.forloop as forloop_module
from adoptim import ADOPT, ADOPTW
from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.cpu import launch as _cpu_kernel

# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="session")
def kernel():
    reason = _cpu_kernel.unsupported_reason()
    if reason is not None:
        pytest.skip(f"fused kernel unavailable: {reason}")
    return _kernel_cache.load_kernel(wait=True, timeout=600)


@pytest.fixture
def no_forloop(monkeypatch):
    """Make the for-loop path raise: what passes must have run the kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("the for-loop path ran where the fused kernel should have")

    monkeypatch.setattr(forloop_module, "single_tensor_adopt", refuse)


def reference_run(
    init,
    grad_seq,
    *,
    lr=1e-3,
    betas=(0.9, 0.9999),
    eps=1e-6,
    clip=0.25,
    weight_decay=0.0,
    decouple=False,
    maximize=False,
):
    """ADOPT in float64, straight from the algorithm notes, one tensor at a time, each with
    its own count of calls with a gradient. ``grad_seq[t][i]`` is None when tensor i has no
    gradient on call t."""
    beta1, beta2 = betas
    real = [torch.view_as_real(x) if x.is_complex() else x for x in init]
    theta = [x.detach().to(torch.float64).clone() for x in real]
    m = [torch.zeros_like(x) for x in theta]
    v = [torch.zeros_like(x) for x in theta]
    s = [0] * len(theta)
    for grads in grad_seq:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = (torch.view_as_real(g) if g.is_complex() else g).to(torch.float64)
            if maximize:
                g = -g
            if weight_decay and not decouple:
                g = g + weight_decay * theta[i]
            if s[i] == 0:
                v[i] = g * g
                s[i] = 1
                continue
            t = s[i]
            if weight_decay and decouple:
                theta[i] = theta[i] * (1 - lr * weight_decay)
            n = g / torch.clamp(v[i].sqrt(), min=eps)
            if clip is not None:
                c = clip(t) if callable(clip) else t**clip
                n = n.clamp(-c, c)
            m[i] = beta1 * m[i] + (1 - beta1) * n
            theta[i] = theta[i] - lr * m[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            s[i] += 1
    return theta, m, v, s


def gradient_schedule(shapes, steps, dtype, seed, holes=True):
    """Gradients per call; with ``holes`` tensor 1 starts late, tensor 2 is frozen for a
    while and then unfrozen, tensor 3 loses its gradient now and then."""
    gen = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(steps):
        grads = []
        for i, shape in enumerate(shapes):
            g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            if holes and (
                (i == 1 and t < 7) or (i == 2 and 10 <= t < 25) or (i == 3 and t % 9 == 4)
            ):
                g = None
            grads.append(g)
        seq.append(grads)
    return seq


def run_optimizer(init, grad_seq, **kw):
    params = [x.detach().clone().requires_grad_() for x in init]
    opt = ADOPT(params, **kw)
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g  # None: this tensor has no gradient on this call
        opt.step()
    return params, opt


def rel_err(a, b):
    """Largest ||a - b|| / ||b|| over tensors (real views for complex)."""
    worst = 0.0
    for x, y in zip(a, b):
        x = torch.view_as_real(x) if x.is_complex() else x
        y = torch.view_as_real(y) if y.is_complex() else y
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        worst = max(worst, ((x - y).norm() / y.norm().clamp(min=1e-30)).item())
    return worst


SHAPES = [(37,), (5, 7), (300, 11), (3, 4, 5), (1,), (2050,)]

OPTION_SETS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decouple": True},
    {"maximize": True},
    {"clip_lambda": None},
    {"clip_lambda": 1 / 3, "lr": 3e-3, "betas": (0.5, 0.99)},
    {"clip_lambda": lambda t: 0.5 + 0.1 * t},
    {"lr": torch.tensor(2e-3), "betas": (0.3, 0.999), "eps": 1e-3},
]


def _ref_kwargs(kw):
    out = dict(kw)
    if "clip_lambda" in out:
        out["clip"] = out.pop("clip_lambda")
    if isinstance(out.get("lr"), torch.Tensor):
        out["lr"] = out["lr"].item()
    return out


# --------------------------------------------------------------------------------------------
# Agreement with the reference and with the for-loop path


@pytest.mark.parametrize("kw", OPTION_SETS, ids=lambda kw: ",".join(kw) or "defaults")
def test_fused_matches_float64_reference_and_forloop(kernel, kw, monkeypatch):
    init = [
        torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)
    ]
    seq = gradient_schedule(SHAPES, 80, torch.float32, seed=1)
    loop, loop_opt = run_optimizer(init, seq, foreach=False, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(
            forloop_module,
            "single_tensor_adopt",
            lambda *a, **k: pytest.fail("for-loop path ran under fused=True"),
        )
        fused, fused_opt = run_optimizer(init, seq, fused=True, **kw)
    theta, _, _, s = reference_run(init, seq, **_ref_kwargs(kw))

    # float32 vs float64 over 80 steps: rounding of the inputs and ~1e-7 per operation.
    assert rel_err(fused, theta) < 2e-6
    # The two float32 paths do the same operations, each rounded once: the same bits.
    for p_f, p_l in zip(fused, loop):
        assert torch.equal(p_f, p_l)
        st_f, st_l = fused_opt.state[p_f], loop_opt.state[p_l]
        assert st_f["step"].item() == st_l["step"].item()
        assert torch.equal(st_f["exp_avg"], st_l["exp_avg"])
        assert torch.equal(st_f["exp_avg_sq"], st_l["exp_avg_sq"])
    # Per-tensor step counts: late, frozen and sometimes-missing tensors counted alone.
    assert [fused_opt.state[p]["step"].item() for p in fused] == [float(c) for c in s]
    assert s[0] == 80 and s[1] == 73 and s[2] == 65 and s[3] < 80


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64])
def test_fused_complex_and_double(kernel, no_forloop, dtype):
    shapes = [(17,), (4, 6)]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    seq = gradient_schedule(shapes, 50, dtype, seed=4, holes=False)
    fused, _ = run_optimizer(init, seq, fused=True, weight_decay=0.05)
    theta, *_ = reference_run(init, seq, weight_decay=0.05)
    tol = 2e-6 if dtype == torch.complex64 else 1e-12
    assert rel_err(fused, theta) < tol


def test_fused_100_steps_within_1e6_of_forloop(kernel):
    """The issue's acceptance figure, on the shapes of a small network."""
    shapes = [(256, 128), (128,), (128, 10), (10,), (64, 3, 3, 3)]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    seq = gradient_schedule(shapes, 100, torch.float32, seed=6, holes=False)
    fused, _ = run_optimizer(init, seq, fused=True, weight_decay=1e-2, decouple=True)
    loop, _ = run_optimizer(init, seq, foreach=False, weight_decay=1e-2, decouple=True)
    assert all(torch.equal(a, b) for a, b in zip(fused, loop))  # (the same bits, issue #18)
    # ... and not trivially: the parameters did move.
    assert rel_err(fused, init) > 1e-3


def test_default_picks_kernel_on_cpu_and_explicit_flags_win(kernel, monkeypatch):
    p = torch.randn(10, requires_grad=True)
    calls = []
    real = forloop_module.single_tensor_adopt
    monkeypatch.setattr(
        forloop_module, "single_tensor_adopt", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    opt = ADOPT([p])  # fused unset: the kernel, which is built
    p.grad = torch.randn(10)
    opt.step()
    opt.step()
    assert calls == []
    opt = ADOPT([p], foreach=False)  # an explicit flag wins over the default
    opt.step()
    assert calls == [1]
    monkeypatch.setenv("ADOPTIM_DISABLE_FUSED", "1")
    opt = ADOPT([p])
    opt.step()
    assert calls == [1, 1]


def test_channels_last_and_noncontiguous_grad(kernel, no_forloop):
    w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    init = [w]
    seq = [[torch.randn(4, 3, 5, 5)] for _ in range(5)]  # contiguous grads: other layout
    fused, opt = run_optimizer(init, seq, fused=True)
    theta, *_ = reference_run(init, seq)
    assert rel_err(fused, theta) < 1e-6
    assert opt.state[fused[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# GradScaler


def _scaler_losses(params, opt, scaler, bad_steps, steps=8):
    """Step with a GradScaler; on ``bad_steps`` one gradient holds inf or NaN."""
    gen = torch.Generator().manual_seed(7)
    snapshots = []
    for t in range(steps):
        opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params)
        scaler.scale(loss).backward()
        if t in bad_steps:
            params[0].grad[0] = math.inf if t % 2 else math.nan
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        snapshots.append((before, [p.detach().clone() for p in params]))
    return snapshots


def test_gradscaler_fused_unscales_in_step_and_skips_inf(kernel, no_forloop):
    params = [torch.randn(50, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    opt = ADOPT(params, fused=True, lr=1e-2)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    states = []
    gen = torch.Generator().manual_seed(7)
    for t in range(6):
        opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params)
        scaler.scale(loss).backward()
        scaled = params[1].grad.clone()
        if t == 3:
            params[0].grad[0] = math.inf
        before = [p.detach().clone() for p in params]
        steps_before = [opt.state[p]["step"].item() if opt.state[p] else 0 for p in params]
        m_before = [opt.state[p]["exp_avg"].clone() if opt.state[p] else None for p in params]
        scaler.step(opt)
        scaler.update()
        # The scaler did not unscale .grad itself: the step took grad_scale instead.
        assert torch.equal(params[1].grad, scaled)
        if t == 3:  # inf: nothing changed, step counts included
            assert all(torch.equal(b, p) for b, p in zip(before, params))
            assert [opt.state[p]["step"].item() for p in params] == steps_before
            assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(m_before, params))
        elif t > 0:
            assert not torch.equal(before[1], params[1])
        states.append([opt.state[p]["step"].item() for p in params])
    assert states[-1] == [5.0, 5.0]  # six calls, one skipped


def test_gradscaler_fused_matches_unscaled_forloop(kernel):
    """Same run with a scaler (fused) and without (for-loop on unscaled gradients)."""
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(40, generator=gen), torch.randn(6, 7, generator=gen)]
    weights = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(12)]

    def train(use_scaler, **kw):
        params = [x.clone().requires_grad_() for x in init]
        opt = ADOPT(params, lr=1e-2, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        for t, w in enumerate(weights):
            opt.zero_grad()
            loss = sum((p * wi).sum() for p, wi in zip(params, w))
            scaler.scale(loss).backward()
            if use_scaler and t == 5:
                params[0].grad[1] = math.nan
            scaler.step(opt)
            scaler.update()
        return params, opt

    fused, fused_opt = train(True, fused=True)
    # The reference skips call 5 by not calling step at all.
    params = [x.clone().requires_grad_() for x in init]
    opt = ADOPT(params, lr=1e-2, foreach=False)
    for t, w in enumerate(weights):
        if t == 5:
            continue
        opt.zero_grad()
        sum((p * wi).sum() for p, wi in zip(params, w)).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(fused, params))
    assert fused_opt.state[fused[0]]["step"].item() == 11


@pytest.mark.parametrize("path", ["forloop", "foreach"])
def test_grad_scale_on_other_paths(path):
    """grad_scale/found_inf through the functional API on the non-fused paths."""
    from adoptim import adopt

    def run(scale, found_inf):
        p = torch.ones(5)
        state = [torch.zeros(5), torch.zeros(5), torch.tensor(1.0)]
        torch.manual_seed(0)
        g = torch.randn(5) * (scale or 1.0)
        adopt(
            [p],
            [g],
            [state[0]],
            [state[1].fill_(0.5)],
            [state[2]],
            foreach=path == "foreach",
            fused=False,
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            eps=1e-6,
            clip_exp=None,
            weight_decay=0.0,
            decouple=False,
            maximize=False,
            grad_scale=None if scale is None else torch.tensor(scale),
            found_inf=found_inf,
        )
        return p, state

    p_plain, _ = run(None, None)
    p_scaled, _ = run(1024.0, torch.tensor(0.0))
    assert torch.allclose(p_plain, p_scaled, rtol=0, atol=1e-7)
    assert not torch.equal(p_plain, torch.ones(5))
    p_skip, st = run(1024.0, torch.tensor(1.0))
    assert torch.equal(p_skip, torch.ones(5)) and st[2].item() == 1.0


# --------------------------------------------------------------------------------------------
# Low-precision parameters: float32 state, rounding


def _bf16_v_run(path_kw, state_dtype, steps=20):
    p = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    opt = ADOPT([p], state_dtype=state_dtype, **path_kw)
    p.grad = torch.ones(64, dtype=torch.bfloat16)
    opt.step()  # v = 1
    p.grad = torch.full((64,), 2.0, dtype=torch.bfloat16)
    for _ in range(steps):
        opt.step()  # v += 1e-4 * (4 - v) each call: 3e-4, below bf16's 2**-8 half-ulp at 1
    return opt.state[p]["exp_avg_sq"]


PATHS = {
    "forloop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_second_moment_moves_only_with_float32_state(path, request):
    if path == "fused":
        request.getfixturevalue("kernel")
    v32 = _bf16_v_run(PATHS[path], "auto")
    assert v32.dtype == torch.float32
    expected = 4 - 3 * 0.9999**20  # v_t = 4 - 3 * beta2**t
    assert torch.allclose(v32, torch.full_like(v32, expected), rtol=1e-5)
    assert (v32 > 1.005).all()
    # The same run with bf16 state: v is stuck at 1, which the option exists to prevent.
    v16 = _bf16_v_run(PATHS[path], "param")
    assert v16.dtype == torch.bfloat16
    assert torch.equal(v16, torch.ones_like(v16))


def test_state_dtype_option_values_and_state_dict(tmp_path):
    p = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(8, dtype=torch.float16, requires_grad=True)
    r = torch.randn(8, requires_grad=True)
    opt = ADOPTW([p, q, r], foreach=False, fused=False)
    assert opt.param_groups[0]["state_dtype"] == "auto"
    for x in (p, q, r):
        x.grad = torch.randn_like(x)
    opt.step()
    opt.step()
    assert [opt.state[x]["exp_avg_sq"].dtype for x in (p, q, r)] == [torch.float32] * 3
    assert ADOPT([p], state_dtype=torch.float32).param_groups[0]["state_dtype"] == "float32"
    assert ADOPT([p], state_dtype=None).param_groups[0]["state_dtype"] == "param"
    with pytest.raises(ValueError, match="state_dtype"):
        ADOPT([p], state_dtype="float16")
    # load_state_dict: torch casts moments to the parameter dtype; ours stay float32, exactly.
    sd = opt.state_dict()
    v_saved = sd["state"][0]["exp_avg_sq"].clone()
    path = tmp_path / "opt.pt"
    torch.save(sd, path)
    opt2 = ADOPTW([p, q, r], foreach=False, fused=False)
    opt2.load_state_dict(torch.load(path))
    assert opt2.state[p]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["exp_avg_sq"], v_saved)
    assert opt2.state[r]["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_fused_low_precision_matches_forloop(kernel, low):
    """float32 state, update in float32, parameter rounded to nearest even once: the kernel
    and the for-loop path land on the same low-precision values, bit for bit."""
    shapes = [(300,), (7, 9)]
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=gen).to(low) for s in shapes]
    seq = gradient_schedule(shapes, 30, low, seed=10, holes=False)
    fused, f_opt = run_optimizer(init, seq, fused=True, lr=1e-2, weight_decay=0.1)
    loop, l_opt = run_optimizer(init, seq, foreach=False, fused=False, lr=1e-2, weight_decay=0.1)
    for a, b in zip(fused, loop):
        assert a.dtype == low
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(f_opt.state[a][key], l_opt.state[b][key])
    theta, *_ = reference_run(init, seq, lr=1e-2, weight_decay=0.1)
    assert rel_err(fused, theta) < 2e-2  # bf16 has 8 significant bits
    assert rel_err(fused, init) > 1e-2  # and it moved


@pytest.mark.parametrize("path", list(PATHS))
def test_stochastic_rounding_keeps_small_updates(path, request):
    """Updates of a quarter ulp: lost under round-to-nearest, kept on average under
    stochastic rounding."""
    if path == "fused":
        request.getfixturevalue("kernel")

    def run(stochastic):
        torch.manual_seed(0)
        p = torch.ones(20000, dtype=torch.bfloat16, requires_grad=True)
        # bf16 ulp just below 1 is 2**-8; |update| = lr * |m| = lr * 0.1 * 1 ~ 2**-10
        opt = ADOPT(
            [p], lr=2**-10 * 10, clip_lambda=None, stochastic_rounding=stochastic, **PATHS[path]
        )
        p.grad = torch.ones(20000, dtype=torch.bfloat16)
        opt.step()
        opt.step()  # theta -= lr * (1 - beta1) * 1 = 2**-10
        return p.detach().float()

    rne = run(False)
    assert torch.equal(rne, torch.ones_like(rne))
    sr = run(True)
    mean_step = 1.0 - sr.mean().item()
    # E[change] = 2**-10 (~9.8e-4); with 20000 samples of {0, 2**-8} the mean is within 10%.
    assert abs(mean_step - 2**-10) < 1e-4
    assert set(sr.unique().tolist()) <= {1.0, 1.0 - 2**-8}


def _binomial_bounds(n: int, p: float, tail: float = 1e-10) -> tuple[int, int]:
    """The narrowest [lo, hi] holding a Binomial(n, p) count but for `tail` on each side."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, below = 0, 0.0
    while below + pmf[lo] < tail:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while above + pmf[hi] < tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


SR_PATHS = {
    **PATHS,
    # bfloat16 moments: every path still computes in float32 and rounds the parameter
    # stochastically (the unfused ones on float32 copies, as the kernel does in registers).
    "fused, bf16 state": {"fused": True, "state_dtype": "param"},
    "forloop, bf16 state": {"foreach": False, "fused": False, "state_dtype": "param"},
    "foreach, bf16 state": {"foreach": True, "fused": False, "state_dtype": "param"},
}


@pytest.mark.parametrize("path", list(SR_PATHS))
def test_stochastic_rounding_unbiased_for_every_element_over_many_steps(path, request):
    """Each step's float32 update is a quarter of an ulp, the same for every element. With
    fresh rounding noise on every step, for every element and every tensor, each element
    moves one ulp on a step with probability 1/4, independently: after N steps it has moved
    a Binomial(N, 1/4) number of ulps. Noise reused from step to step keeps the overall mean
    right while most elements never move (and the others move every step); noise shared
    between elements, or between the tensors of one kernel call, moves them in lockstep."""
    if path.startswith("fused"):
        request.getfixturevalue("kernel")
        request.getfixturevalue("no_forloop")
    torch.manual_seed(0)
    ulp, steps, n, p_move = 2.0**-7, 256, 2048, 0.25  # bf16's ulp on [1, 2)
    # Every bf16 value on [1.875, 2): after at most ~110 ulps down they are still in [1, 2).
    start = 1.875 + ulp * (torch.arange(n) % 16).float()
    params = [start.to(torch.bfloat16).requires_grad_() for _ in range(2)]  # one kernel call
    # beta1 = 0, g = 1 and v = 1 (beta2 = 0.5 keeps it there): m = 1, the update is exactly lr.
    opt = ADOPT(
        params, lr=p_move * ulp, betas=(0.0, 0.5), stochastic_rounding=True, **SR_PATHS[path]
    )
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # the first call only sets v = g*g
    for _ in range(steps):
        opt.step()
    moves = [(start - p.detach().float()) / ulp for p in params]  # in ulps, per element
    k_all = torch.cat(moves)
    lo, hi = _binomial_bounds(steps, p_move)
    outside = k_all[(k_all < lo) | (k_all > hi)]
    assert outside.numel() == 0, (
        f"{outside.numel()} of {k_all.numel()} elements moved a number of ulps outside "
        f"[{lo}, {hi}] in {steps} steps (expected {steps * p_move:.0f} each); e.g. "
        f"{outside.unique()[:8].tolist()}"
    )
    assert torch.equal(k_all, k_all.round())  # on the grid: all stayed in [1, 2)
    mean, sd = steps * p_move, math.sqrt(steps * p_move * (1 - p_move))
    # The spread across elements is the binomial one (elements in lockstep: ~0).
    assert 0.9 < k_all.std().item() / sd < 1.1
    # The two tensors rounded in one call, each with its own noise: uncorrelated.
    corr = torch.corrcoef(torch.stack(moves))[0, 1].item()
    assert abs(corr) < 0.15, f"the two tensors' moves are correlated ({corr:.2f})"
    assert abs(k_all.mean().item() - mean) < 6 * sd / math.sqrt(k_all.numel())


# --------------------------------------------------------------------------------------------
# Where the kernel cannot run: fused=True raises (at construction), fused=None falls back


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    """An empty kernel cache and no kernel loaded; builds are recorded, not started."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_kernel_cache, "_op", None)
    monkeypatch.setattr(_kernel_cache, "_last_poll", 0.0)
    monkeypatch.setattr(_kernel_cache, "_buildable_cache", {})
    started = []
    monkeypatch.setattr(_kernel_cache, "_start_build", lambda directory: started.append(directory))
    return started


def test_fused_true_without_compiler_raises_at_construction(cold_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    p = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"fused=True cannot be used: .*C\+\+ compiler"):
        ADOPT([p], fused=True)
    opt = ADOPT([p])  # fused unset: quietly the for-loop path, and no build attempt
    p.grad = torch.ones(4)
    opt.step()
    opt.step()
    assert cold_cache == []
    assert not torch.equal(p, torch.zeros(4))


def test_ninja_is_found_next_to_the_interpreter_and_its_absence_is_explained(
    cold_cache, monkeypatch, tmp_path
):
    # The kernel builds with the machine's compiler and the `ninja` that pip installs next to
    # this interpreter, which is found even when that folder is not on PATH (venv not active).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "c++").symlink_to(shutil.which("c++") or "/bin/true")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CXX", raising=False)
    scripts = tmp_path / "venv-bin"
    scripts.mkdir()
    monkeypatch.setattr(_kernel_cache.sys, "executable", str(scripts / "python"))
    assert "needs ninja (pip install ninja)" in _cpu_kernel.unsupported_reason()
    (scripts / "ninja").symlink_to(shutil.which("ninja", path=_kernel_cache._build_path()) or "/bin/true")
    assert _cpu_kernel.unsupported_reason() is None


def test_fused_true_unsupported_device_and_dtype():
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="CPU tensors only.*meta"):
        ADOPT([meta], fused=True)
    int_param = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="does not support parameters of dtype torch.int32"):
        ADOPT([int_param], fused=True)
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        ADOPT([p], fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused=True and differentiable=True"):
        ADOPT([p], fused=True, differentiable=True)


def test_fused_runs_forloop_while_kernel_builds(cold_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/true")  # "a compiler": the build itself is stubbed out
    init = [torch.randn(20), torch.randn(3, 3)]
    seq = gradient_schedule([(20,), (3, 3)], 6, torch.float32, seed=11, holes=False)
    fused, _ = run_optimizer(init, seq, fused=True)
    loop, _ = run_optimizer(init, seq, foreach=False, fused=False)
    assert cold_cache, "a build should have been started"
    # The stand-in is the for-loop path itself: identical results.
    assert all(torch.equal(a, b) for a, b in zip(fused, loop))


def test_failed_build_raises_for_fused_true_only(cold_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/true")
    directory = _kernel_cache.kernel_path().parent
    directory.mkdir(parents=True)
    (directory / "build.log").write_text("error: something the compiler said\n")
    (directory / "build-failed").touch()
    p = torch.randn(4, requires_grad=True)
    opt = ADOPT([p], fused=True)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="something the compiler said"):
        opt.step()
    monkeypatch.setattr(_kernel_cache, "_last_poll", 0.0)
    opt = ADOPT([p])  # fused unset: silently the for-loop path
    opt.step()
    assert cold_cache == []


@pytest.mark.slow
def test_cold_build_in_fresh_cache(tmp_path):
    """End to end: a fresh process with an empty cache builds, publishes and uses the kernel."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "adoptim.tools.bench", "--startup-child", "b", "0.001", "adopt", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["first_step_s"] < 30 and res["steps_until_kernel_ran"] >= 1
    assert list(tmp_path.glob("adoptim_fused/*/adoptim_fused.so"))
