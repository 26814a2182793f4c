"""Same seed, same result (issue #18): every path computes the same bits.

The for-loop path, the foreach path, the C++ kernel and the Triton kernel (under its
interpreter on CPU) leave ``torch.equal`` parameters and state after several steps, for
every option and state format, and all of them equal a fresh transcription of the
specification (``spec_reference.py``: single-rounding IEEE operations, correctly rounded
sqrt). No step draws from torch's global generator, and bfloat16 stochastic rounding
resumes bit for bit from a state dict.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from contextlib import ExitStack
from unittest import mock

import pytest

# first: triton_setup sets TRITON_INTERPRET before anything imports triton (and skips a
# module without triton: here only the Triton cases skip)
try:
    import triton_setup  # noqa: F401

    HAVE_TRITON = True
except pytest.skip.Exception:
    HAVE_TRITON = False

# isort: split
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_reference import spec_step, spec_step_8bit

from adoptim import ADOPT
from adoptim.formats import blockwise8 as _quant
from adoptim.functional import adopt
from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.triton import launch as _triton_kernel
from adoptim.kernels.triton import launch8 as _triton_lowbit

PATHS = ("forloop", "foreach", "cpp", "triton")
# small launch shapes: tensors of a few hundred elements span several programs and chunks
SMALL = _triton_kernel.LaunchConfig(block=16, chunk=32, num_warps=1, schedule_block=4)
SMALL8 = _triton_lowbit.LaunchConfig8(rows=2, num_warps=1)
# The optimizer-level checks below (generator, resume, determinism) are about where the random
# numbers come from, not tile boundaries (the kernel-level tests above cover those with SMALL):
# wider tiles keep the interpreter's per-tile cost down (10x fewer tiles on their 10k elements).
MEDIUM = _triton_kernel.LaunchConfig(block=256, chunk=1024, num_warps=1, schedule_block=4)
MEDIUM8 = _triton_lowbit.LaunchConfig8(rows=4, num_warps=1)


@pytest.fixture(scope="module")
def kernel():
    op = _kernel_cache.load_kernel(wait=True, timeout=900)
    if op is None:
        pytest.skip(f"the C++ kernel cannot be built here: {_kernel_cache.failure_message()}")
    return op


def _path_kwargs(path: str) -> dict:
    return {
        "forloop": dict(foreach=False, fused=False),
        "foreach": dict(foreach=True, fused=False),
        "cpp": dict(fused=True),
        "triton": dict(fused=True),
    }[path]


def _on_path(path: str, stack: ExitStack, host_schedule: bool = False, tiles: str = "small") -> None:
    if path == "triton":
        config, config8 = (SMALL, SMALL8) if tiles == "small" else (MEDIUM, MEDIUM8)
        stack.enter_context(mock.patch.dict(os.environ, {_triton_kernel.BACKEND_ENV: "triton"}))
        stack.enter_context(mock.patch.object(_triton_kernel, "CONFIG", config))
        stack.enter_context(mock.patch.object(_triton_lowbit, "CONFIG", config8))
        if host_schedule:
            stack.enter_context(mock.patch.object(_triton_kernel, "_force_host_schedule", True))
    else:
        stack.enter_context(mock.patch.dict(os.environ, {_triton_kernel.BACKEND_ENV: ""}))


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, with NaN equal to NaN (a NaN gradient's element)."""
    a, b = _real(a), _real(b)
    if a.is_floating_point():
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


SHAPES = ((37,), (300,), (5, 7))
SHAPES_8BIT = ((700,), (4096,), (300,))

# (parameter dtype, state dtype, options): the scenarios of issue #18
FLOAT_CASES = [
    (torch.float32, torch.float32, {}),
    (torch.float64, torch.float64, {}),
    (torch.float32, torch.float32, dict(weight_decay=0.1)),
    (torch.float32, torch.float32, dict(weight_decay=0.1, decouple=True)),
    (torch.float32, torch.float32, dict(maximize=True, nesterov=True)),
    (torch.float32, torch.float32, dict(caution=True)),
    (torch.float32, torch.float32, dict(caution=True, nesterov=True, maximize=True)),
    (torch.float32, torch.float32, dict(clip_exp=None)),
    (torch.float32, torch.float32, dict(clip_exp=None, clip_fn=lambda s: 0.5 * s)),
    (torch.float32, torch.float32, dict(lr=torch.tensor(0.01))),
    (torch.float32, torch.float32, dict(scale=1024.0)),
    (torch.float32, torch.float32, dict(scale=3000.0, maximize=True)),
    (torch.bfloat16, torch.float32, {}),
    (torch.bfloat16, torch.float32, dict(stochastic=True)),
    (torch.bfloat16, torch.bfloat16, {}),
    (torch.bfloat16, torch.bfloat16, dict(stochastic=True, seed=5)),
    (torch.float16, torch.float32, {}),
    (torch.float16, torch.float16, {}),
    (torch.complex64, torch.complex64, dict(weight_decay=0.1)),
    (torch.complex128, torch.complex128, dict(nesterov=True)),
    (torch.float64, torch.float64, dict(caution=True, weight_decay=0.01, decouple=True)),
]

EIGHT_BIT_CASES = [
    (torch.float32, {}),
    (torch.float32, dict(weight_decay=0.1)),
    (torch.float32, dict(weight_decay=0.1, decouple=True)),
    (torch.float32, dict(maximize=True, nesterov=True)),
    (torch.float32, dict(caution=True)),
    (torch.float32, dict(scale=1024.0)),
    (torch.float32, dict(scale=3000.0)),
    (torch.float32, dict(clip_exp=None)),
    (torch.float32, dict(lr=torch.tensor(0.01))),
    (torch.bfloat16, {}),
    (torch.bfloat16, dict(stochastic=True, seed=3)),
    (torch.float16, {}),
    (torch.complex64, {}),
]


def _hyper(opts: dict) -> dict:
    return dict(
        lr=opts.get("lr", 0.01), beta1=0.9, beta2=0.999, eps=1e-6,
        clip_exp=opts.get("clip_exp", 0.25), clip_fn=opts.get("clip_fn"),
        weight_decay=opts.get("weight_decay", 0.0), decouple=opts.get("decouple", False),
        maximize=opts.get("maximize", False), nesterov=opts.get("nesterov", False),
        caution=opts.get("caution", False),
    )  # fmt: skip


def _grads(params, gen, t, opts):
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    gs = [g * 10.0 ** (t % 4 - 2) for g in gs]  # magnitudes from 1e-2 to 10
    if opts.get("nan") and t == 2:
        gs[0].view(-1)[5] = float("nan")
    scale = opts.get("scale")
    return [g * scale for g in gs] if scale else gs


def run_float(path, p_dtype, s_dtype, opts, steps=5, shapes=SHAPES):
    """``steps`` steps of the functional API on one path; the spec's result alongside."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(p_dtype) for s in shapes]
    state = [[torch.zeros_like(p, dtype=s_dtype) for p in params] for _ in range(2)]
    steps_t = [torch.zeros(()) for _ in params]
    spec = copy.deepcopy((params, state, steps_t))
    hyper = _hyper(opts)
    scale = opts.get("scale")
    with ExitStack() as stack:
        # float64: the device schedule's power-law bound is exp(p log s), not libm's pow
        _on_path(path, stack, host_schedule=p_dtype in (torch.float64, torch.complex128))
        for t in range(steps):
            grads = _grads(params, gen, t, opts)
            adopt(params, grads, state[0], state[1], steps_t, **_path_kwargs(path),
                  has_complex=params[0].is_complex(),
                  grad_scale=torch.tensor(scale) if scale else None,
                  stochastic_rounding=opts.get("stochastic", False), seed=opts.get("seed", 0),
                  **hyper)  # fmt: skip
            spec_step(spec[0], [g.clone() for g in grads], spec[1][0], spec[1][1], spec[2],
                      grad_scale=scale, stochastic=opts.get("stochastic", False),
                      seed=opts.get("seed", 0), **hyper)  # fmt: skip
    return (params, *state, steps_t), (spec[0], *spec[1], spec[2])


def run_8bit(path, p_dtype, opts, steps=5, shapes=SHAPES_8BIT):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(p_dtype) for s in shapes]
    n = [p.numel() * (2 if p.is_complex() else 1) for p in params]
    qm = [torch.zeros(k, dtype=torch.int8) for k in n]
    qv = [torch.zeros(k, dtype=torch.uint8) for k in n]
    sm = [torch.zeros(_quant.num_blocks(k)) for k in n]
    sv = [torch.zeros(_quant.num_blocks(k)) for k in n]
    steps_t = [torch.zeros(()) for _ in params]
    spec = copy.deepcopy((params, qm, sm, qv, sv, steps_t))
    hyper = _hyper(opts)
    scale = opts.get("scale")
    with ExitStack() as stack:
        _on_path(path, stack)
        for t in range(steps):
            grads = _grads(params, gen, t, opts)
            adopt(params, grads, qm, qv, steps_t, **_path_kwargs(path),
                  has_complex=params[0].is_complex(),
                  grad_scale=torch.tensor(scale) if scale else None,
                  stochastic_rounding=opts.get("stochastic", False), seed=opts.get("seed", 0),
                  exp_avg_scales=sm, exp_avg_sq_scales=sv, **hyper)  # fmt: skip
            spec_step_8bit(spec[0], [g.clone() for g in grads], *spec[1:],
                           grad_scale=scale, stochastic=opts.get("stochastic", False),
                           seed=opts.get("seed", 0), **hyper)  # fmt: skip
    return (params, qm, sm, qv, sv, steps_t), spec


def _assert_same(got, want, names):
    bad = []
    for name, xs, ys in zip(names, got, want):
        for i, (x, y) in enumerate(zip(xs, ys)):
            if not _same(x, y):
                a, b = _real(x).double(), _real(y).double()
                bad.append(f"{name}[{i}]: {int((a != b).sum())} of {a.numel()} differ, "
                           f"max {float((a - b).abs().max()):.3g}")  # fmt: skip
    assert not bad, "; ".join(bad)


FLOAT_NAMES = ("param", "exp_avg", "exp_avg_sq", "step")
EIGHT_BIT_NAMES = ("param", "m codes", "m scales", "v codes", "v scales", "step")


def _needs(path, request):
    if path == "cpp":
        request.getfixturevalue("kernel")
    if path == "triton" and not HAVE_TRITON:
        pytest.skip("triton is not installed (or too old for the interpreter tests)")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(FLOAT_CASES)))
def test_float_state_every_path_equals_the_spec(path, case, request):
    _needs(path, request)
    p_dtype, s_dtype, opts = FLOAT_CASES[case]
    got, want = run_float(path, p_dtype, s_dtype, opts)
    _assert_same(got, want, FLOAT_NAMES)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(EIGHT_BIT_CASES)))
def test_8bit_state_every_path_equals_the_spec(path, case, request):
    _needs(path, request)
    p_dtype, opts = EIGHT_BIT_CASES[case]
    got, want = run_8bit(path, p_dtype, opts)
    _assert_same(got, want, EIGHT_BIT_NAMES)


@pytest.mark.parametrize("path", PATHS)
def test_nan_gradient_same_on_every_path(path, request):
    """A NaN gradient without GradScaler: the element's theta, m, v become NaN; with 8-bit
    state its block's scales become NaN (torch's amax propagates it; the C++ kernel's max
    used to skip it), so the whole block's m and v read back as NaN from the next step on."""
    _needs(path, request)
    got, want = run_float(path, torch.float32, torch.float32, dict(nan=True))
    _assert_same(got, want, FLOAT_NAMES)
    assert torch.isnan(got[0][0]).any()
    got, want = run_8bit(path, torch.float32, dict(nan=True))
    _assert_same(got, want, EIGHT_BIT_NAMES)
    assert torch.isnan(got[2][0][0]) and torch.isnan(got[4][0][0])  # block 0's scales


@pytest.mark.parametrize("path", ["cpp", "triton"])
@settings(max_examples=12, deadline=None)
@given(
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    beta2=st.sampled_from([0.5, 0.9, 0.999, 0.9999]),
    lr=st.floats(1e-5, 1.0),
    eps=st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]),
    wd=st.sampled_from([0.0, 0.01, 0.3]),
    decouple=st.booleans(),
    nesterov=st.booleans(),
    caution=st.booleans(),
    maximize=st.booleans(),
)
def test_hypothesis_kernels_equal_the_spec(path, beta1, beta2, lr, eps, wd, decouple,
                                           nesterov, caution, maximize):  # fmt: skip
    if path == "cpp" and _kernel_cache.load_kernel(wait=True, timeout=900) is None:
        pytest.skip("the C++ kernel cannot be built here")
    if path == "triton" and not HAVE_TRITON:
        pytest.skip("triton is not installed")
    opts = dict(weight_decay=wd, decouple=decouple, nesterov=nesterov, caution=caution,
                maximize=maximize, lr=lr)  # fmt: skip
    hyper = _hyper(opts)
    hyper.update(beta1=beta1, beta2=beta2, eps=eps)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps_t = [torch.zeros(()) for _ in params]
    spec = copy.deepcopy((params, m, v, steps_t))
    with ExitStack() as stack:
        _on_path(path, stack)
        for t in range(3):
            grads = _grads(params, gen, t, {})
            adopt(params, grads, m, v, steps_t, **_path_kwargs(path), **hyper)
            spec_step(*spec[:1], [g.clone() for g in grads], *spec[1:], **hyper)
    _assert_same((params, m, v, steps_t), spec, FLOAT_NAMES)


# --------------------------------------------------------------------------------------------
# The optimizer: global generator untouched, resume bit for bit, seed in param groups


def _model_params(dtype, gen):
    return [torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_()
            for s in ((64, 80), (80,), (5000,))]  # fmt: skip


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["auto", "param", "8bit"])
def test_global_generator_untouched(path, fmt, request):
    _needs(path, request)
    gen = torch.Generator().manual_seed(0)
    params = _model_params(torch.bfloat16, gen)
    with ExitStack() as stack:
        _on_path(path, stack, tiles="medium")
        opt = ADOPT(params, lr=0.01, state_dtype=fmt, stochastic_rounding=True,
                    min_8bit_size=1000, **_path_kwargs(path))  # fmt: skip
        torch.manual_seed(123)
        before = torch.get_rng_state()
        _train(opt, params, gen, 3)
        assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["auto", "8bit"])
def test_bf16_stochastic_rounding_resumes_bit_for_bit(path, fmt, request):
    """Six steps in one run equal three steps, a state_dict round trip into a new optimizer
    (and new parameter objects), and three more; the seed is in the param groups."""
    _needs(path, request)
    with ExitStack() as stack:
        _on_path(path, stack, tiles="medium")

        def make(params):
            return ADOPT(params, lr=0.01, state_dtype=fmt, stochastic_rounding=True, seed=7,
                         min_8bit_size=1000, **_path_kwargs(path))  # fmt: skip

        params = _model_params(torch.bfloat16, torch.Generator().manual_seed(0))
        opt = make(params)
        _train(opt, params, torch.Generator().manual_seed(1), 6)

        params_b = _model_params(torch.bfloat16, torch.Generator().manual_seed(0))
        opt_b = make(params_b)
        gen = torch.Generator().manual_seed(1)
        _train(opt_b, params_b, gen, 3)
        saved = copy.deepcopy(opt_b.state_dict())
        assert all(group["seed"] == 7 for group in saved["param_groups"])
        params_c = [p.detach().clone().requires_grad_() for p in params_b]
        opt_c = ADOPT(params_c, lr=0.01, state_dtype=fmt, stochastic_rounding=True, seed=0,
                      min_8bit_size=1000, **_path_kwargs(path))  # fmt: skip
        opt_c.load_state_dict(saved)  # the checkpoint's seed (7) wins
        _train(opt_c, params_c, gen, 3)
    for a, b in zip(params, params_c):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt_c.state[b][key]), key


def test_seed_option_validated_and_defaulted_for_old_checkpoints():
    p = torch.zeros(3, requires_grad=True)
    for bad in (-1, 1.5, True, "1", 1 << 63):
        with pytest.raises(ValueError, match="seed"):
            ADOPT([p], seed=bad)
    opt = ADOPT([p], seed=9)
    state = opt.state_dict()
    del state["param_groups"][0]["seed"]  # a checkpoint from before the option
    opt.load_state_dict(state)
    assert opt.param_groups[0]["seed"] == 0


def test_seed_changes_the_rounding():
    def final(seed):
        params = _model_params(torch.bfloat16, torch.Generator().manual_seed(0))
        opt = ADOPT(params, lr=1e-4, stochastic_rounding=True, seed=seed, foreach=False)
        _train(opt, params, torch.Generator().manual_seed(1), 3)
        return params

    a, b, c = final(0), final(0), final(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("path", PATHS)
def test_deterministic_algorithms_no_warning(path, request):
    _needs(path, request)
    gen = torch.Generator().manual_seed(0)
    params = _model_params(torch.bfloat16, gen)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with ExitStack() as stack, warnings.catch_warnings():
            warnings.simplefilter("error")
            _on_path(path, stack, tiles="medium")
            for fmt in ("auto", "8bit"):
                opt = ADOPT(params, lr=0.01, state_dtype=fmt, stochastic_rounding=True,
                            caution=True, min_8bit_size=1000, **_path_kwargs(path))  # fmt: skip
                _train(opt, params, gen, 2)
    finally:
        torch.use_deterministic_algorithms(previous)


# --------------------------------------------------------------------------------------------
# The background build is invisible: a first run whose early steps take the for-loop path
# (the kernel still building) ends where a run with the kernel from step 1 does

_SCRIPT = r"""
import sys, time, torch
from adoptim import ADOPT
from adoptim.kernels.cpu import build
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
opt = ADOPT(model.parameters(), lr=1e-2, weight_decay=0.01, decouple=True)
x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
kernel_steps = 0
for step in range(60):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    kernel_steps += build.is_loaded()  # (loaded by the first step where the cache is warm)
    if sys.argv[1] == "cold" and step == 30:
        build.load_kernel(wait=True, timeout=900)  # the kernel takes over mid-run
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kernel_steps": kernel_steps},
           sys.argv[2])
"""


@pytest.mark.slow
def test_background_build_is_invisible(tmp_path, kernel):
    """Two fresh processes: one with an empty kernel cache (its first steps run the for-loop
    path while the kernel builds), one with the cache built (the kernel from step 1)."""
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop(_triton_kernel.BACKEND_ENV, None)
    results = {}
    for mode in ("cold", "warm"):
        if mode == "cold":
            env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "empty-cache")
        else:
            env.pop("TORCH_EXTENSIONS_DIR", None)
            if "TORCH_EXTENSIONS_DIR" in os.environ:
                env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
        out = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, str(script), mode, str(out)], env=env, check=True,
                       timeout=1800)  # fmt: skip
        results[mode] = torch.load(out)
    assert results["cold"]["kernel_steps"] < 60 == results["warm"]["kernel_steps"]
    for key, value in results["warm"]["model"].items():
        assert torch.equal(value, results["cold"]["model"][key]), key
    for pid, state in results["warm"]["opt"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, results["cold"]["opt"]["state"][pid][key]), (pid, key)
