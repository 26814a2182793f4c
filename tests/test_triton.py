"""The Triton kernel (fused=True on CUDA), checked on CPU tensors through Triton's interpreter.

``ADOPTIM_FUSED_BACKEND=triton`` sends fused steps on CPU tensors to the Triton kernel, and
``TRITON_INTERPRET=1`` (set here before triton is imported, on machines without CUDA) runs it
with numpy: the kernel's maths, its pointer tables, per-tensor scalars and step counts are
tested against the float64 reference in the same scenarios as the other paths. Launch
shapes are shrunk (``SMALL``) so that tensors of a few dozen elements span several chunks and
have masked tails. Every test makes the for-loop, foreach and C++ paths raise, so a silent
fallback cannot pass for the kernel.

The ahead-of-time tests compile every kernel variant for sm_80 and sm_90 without a GPU and
read the PTX. On a machine with CUDA the interpreter tests skip (run this file with
``TRITON_INTERPRET=1`` for them) and the CUDA tests at the end run instead.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import subprocess
import sys
from unittest import mock

import pytest

# first: triton_setup sets TRITON_INTERPRET before anything imports triton
from triton_setup import (
    CUDA,
    INTERPRETED,
    cuda_only,
    interpreter_only,
)

# isort: split
import test_reference_match as trm
import torch
from hypothesis import example, given, settings
from reference import Hyper, ReferenceADOPT

import adoptim.paths.foreach as foreach_module
import adoptim.paths.forloop as forloop_module
from adoptim import ADOPT
from adoptim.kernels.cpu import launch as _cpu_kernel
from adoptim.kernels.triton import aot as _aot
from adoptim.kernels.triton import launch as _triton_kernel

# Launch shapes for the interpreter: 16-element blocks, 32-element chunks.
SMALL = _triton_kernel.LaunchConfig(block=16, chunk=32, num_warps=1, schedule_block=4)


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the {name} path ran where the Triton kernel should have")

    return refuse


class Launches:
    """Counts interpreted launches per kernel name."""

    def __init__(self):
        self.names: list[str] = []

    def __len__(self):
        return len(self.names)

    def count(self, name):
        return self.names.count(name)


@contextlib.contextmanager
def on_triton(config=SMALL):
    """Fused steps on CPU tensors go to the Triton kernel; every other path raises; yields a
    record of the interpreted launches."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = Launches()
    real_run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.names.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {_triton_kernel.BACKEND_ENV: "triton"}))
        stack.enter_context(mock.patch.object(_triton_kernel, "CONFIG", config))
        stack.enter_context(mock.patch.object(InterpretedFunction, "run", counting_run))
        for module, name, label in (
            (forloop_module, "single_tensor_adopt", "for-loop"),
            (foreach_module, "multi_tensor_adopt", "foreach"),
            (_cpu_kernel, "fused_adopt", "C++ kernel"),
        ):
            stack.enter_context(mock.patch.object(module, name, _refuse(label)))
        yield launches


@contextlib.contextmanager
def triton_path(n_steps=None):
    """The reference scenarios of test_reference_match on the Triton path."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(trm.PATHS, {"triton": dict(fused=True)}))
        if n_steps is not None:
            stack.enter_context(mock.patch.object(trm, "N_STEPS", n_steps))
        launches = stack.enter_context(on_triton())
        yield launches


def check_float64(params, opt, ref):
    trm.assert_matches(params, opt, ref, rtol=1e-12, atol=1e-12)


def check_float32(params, opt, ref):
    trm.assert_matches(params, opt, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The float64 reference, in the scenarios every path runs (interpreter)

def _group(**kw):
    base = dict(lr=3e-2, beta1=0.9, beta2=0.9, eps=1e-6, clip="paper", weight_decay=0.0,
                decouple=False, maximize=False)  # fmt: skip
    return trm.GroupConfig(**{**base, **kw})


def _plan(shape, group=0, first_call=0, drop_prob=0.0, is_complex=False, grad_scale=1.0):
    return trm.TensorPlan(tuple(shape), is_complex, group, first_call, drop_prob, grad_scale)


# The hard cases: test_reference_match's own where it defines them (the same scenarios as
# the other paths), else these: late and frozen tensors sharing a bucket; complex and real
# tensors in one group; groups with different settings; a badly conditioned run.
_OWN_CASES = {
    "LATE_AND_FROZEN": (
        [_group(weight_decay=0.1, decouple=True), _group(lr=1e-3, beta2=0.9999)],
        [_plan((3,)), _plan((2, 2), first_call=17), _plan((), first_call=3, drop_prob=0.3),
         _plan((40,), drop_prob=0.3), _plan((3, 1), group=1, first_call=3)],
        False, 20240611,
    ),
    "COMPLEX_MIXED": (
        [_group(weight_decay=0.1, maximize=True), _group(lr=1e-3, clip="off")],
        [_plan((2, 3), is_complex=True), _plan((5,)),
         _plan((4, 5), first_call=17, drop_prob=0.3, is_complex=True, grad_scale=30.0),
         _plan((3,), group=1, drop_prob=0.3, is_complex=True)],
        True, 7,
    ),
    "SEVERAL_GROUPS": (
        [_group(lr=3e-2, weight_decay=0.1, maximize=True),
         _group(lr=1e-3, beta2=0.9999, clip="callable", weight_decay=0.1, decouple=True)],
        [_plan((4,)), _plan((4,), group=1), _plan((2, 3), first_call=3),
         _plan((), group=1, grad_scale=30.0), _plan((2,), group=1, is_complex=True)],
        True, 3,
    ),
    "ILL_CONDITIONED": (
        [_group(beta1=0.0, beta2=0.0, eps=1e-3, clip="off"), _group(lr=0.1, beta1=0.5, beta2=0.1)],
        [_plan((3,), grad_scale=1e-4), _plan((2, 2), first_call=3, drop_prob=0.3, grad_scale=1e-4),
         _plan((2,), first_call=17, is_complex=True), _plan((3,), group=1, grad_scale=30.0)],
        False, 11,
    ),
}  # fmt: skip
HARD = {name.lower(): getattr(trm, name, case) for name, case in _OWN_CASES.items()}
# Enough calls for the tensors that start at call 17 to take a dozen steps (an interpreted
# step costs ~0.1 s).
HARD_STEPS = 30


@interpreter_only
@pytest.mark.parametrize("case", list(HARD))
def test_hard_cases_float64_each_step(case):
    group_cfgs, plans, tensor_lr, seed = HARD[case]
    with triton_path(n_steps=HARD_STEPS) as launches:
        trm.run_against_reference("triton", group_cfgs, plans, torch.float64, tensor_lr, seed,
                                  check_float64)  # fmt: skip
    assert launches.count("adopt_kernel") >= HARD_STEPS


@interpreter_only
@pytest.mark.parametrize("case", ["late_and_frozen", "complex_mixed", "several_groups"])
def test_hard_cases_float32_trajectory(case):
    group_cfgs, plans, tensor_lr, seed = HARD[case]
    with triton_path(n_steps=HARD_STEPS):
        params, opt, ref = trm.run_against_reference(
            "triton", group_cfgs, plans, torch.float32, tensor_lr, seed
        )
    trm.assert_matches(params, opt, ref, rtol=2e-4, atol=2e-4)


# Random draws on top: few (each interpreted step costs ~0.1 s), over 12 steps.
FEW = settings(trm.SETTINGS, max_examples=4)


@interpreter_only
@FEW
@given(cfg=trm.config)
def test_random_float64_each_step(cfg):
    group_cfgs, plans, tensor_lr, seed = cfg
    with triton_path(n_steps=12):
        trm.run_against_reference("triton", group_cfgs, plans, torch.float64, tensor_lr, seed,
                                  check_float64)  # fmt: skip


@interpreter_only
@FEW
@given(cfg=trm.config)
@example(cfg=HARD["ill_conditioned"])
def test_random_float32_each_step(cfg):
    group_cfgs, plans, tensor_lr, seed = cfg
    with triton_path(n_steps=12):
        trm.run_against_reference("triton", group_cfgs, plans, torch.float32, tensor_lr, seed,
                                  check_float32)  # fmt: skip


# --------------------------------------------------------------------------------------------
# nesterov and caution (with the other options), against the reference


def run_with_reference(shapes, dtype, steps, opt_kw, grad_fn=None, seed=0, check=None):
    """ADOPT on the Triton path and the reference side by side; per-step check when given
    (then both continue from the reference's values)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    clip_exp = opt_kw.get("clip_lambda", 0.25)
    hyper = Hyper(
        lr=float(opt_kw.get("lr", 1e-3)),
        beta1=opt_kw.get("betas", (0.9, 0.9999))[0],
        beta2=opt_kw.get("betas", (0.9, 0.9999))[1],
        eps=opt_kw.get("eps", 1e-6),
        clip=None if clip_exp is None else (lambda t, e=clip_exp: t**e),
        weight_decay=opt_kw.get("weight_decay", 0.0),
        decouple=opt_kw.get("decouple", False),
        maximize=opt_kw.get("maximize", False),
        nesterov=opt_kw.get("nesterov", False),
        caution=opt_kw.get("caution", False),
    )
    ref = ReferenceADOPT(params, [hyper] * len(params))
    opt = ADOPT(params, fused=True, **opt_kw)
    for t in range(steps):
        grads = []
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            if grad_fn is not None:
                g = grad_fn(t, i, g)
            grads.append(g)
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(grads)
        if check is not None:
            check(params, opt, ref)
            trm.sync_to_reference(params, opt, ref)
    return params, opt, ref


OPTIONS = [
    dict(nesterov=True),
    dict(caution=True),
    dict(nesterov=True, caution=True, weight_decay=0.1, maximize=True, lr=3e-2),
    dict(caution=True, weight_decay=0.1, decouple=True, clip_lambda=None, betas=(0.5, 0.9)),
]


@interpreter_only
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nesterov_and_caution_match_reference(kw, dtype):
    missing = {"nesterov", "caution"} - set(inspect.signature(ADOPT).parameters)
    if missing:
        pytest.skip(f"ADOPT has no {', '.join(sorted(missing))} option here")
    shapes = [(37,), (5, 7), (1,), (70,)]  # 70: three chunks, the last one partial

    def holes(t, i, g):  # tensor 2 starts late, tensor 3 is frozen for a while
        return None if (i == 2 and t < 3) or (i == 3 and 4 <= t < 7) else g

    check = check_float64 if dtype == torch.float64 else check_float32
    with on_triton() as launches:
        run_with_reference(shapes, dtype, 10, kw, holes, check=check)
    if kw.get("caution"):  # the counting pass ran too
        assert launches.count("adopt_kernel") == 2 * 10


# --------------------------------------------------------------------------------------------
# The Triton kernel ran (not the C++ one, not a fallback); launches per step


@interpreter_only
def test_triton_kernel_ran_one_launch_per_dtype_group():
    params = [
        torch.randn(40, requires_grad=True),  # float32 group: 2 chunks
        torch.randn(3, 5, requires_grad=True),
        torch.randn(7, dtype=torch.float64, requires_grad=True),  # float64 group
        torch.randn(2, 3, dtype=torch.complex64, requires_grad=True),  # joins float32
    ]
    with on_triton() as launches:
        opt = ADOPT(params, fused=True)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    # Two groups (float32 with the complex one as a real view; float64), two kernels each.
    assert launches.count("schedule_kernel") == 3 * 2
    assert launches.count("adopt_kernel") == 3 * 2
    assert [opt.state[p]["step"].item() for p in params] == [3.0] * 4
    assert all(opt.state[p]["exp_avg_sq"].abs().sum() > 0 for p in params)


def test_cpu_tensors_use_cpp_kernel_unless_backend_is_triton(monkeypatch):
    p = [torch.randn(4)]
    monkeypatch.delenv(_triton_kernel.BACKEND_ENV, raising=False)
    assert not _triton_kernel.selected(p, fused=True)
    assert not _triton_kernel.selected(p, fused=None)
    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    assert _triton_kernel.selected(p, fused=True)
    assert _triton_kernel.selected(p, fused=None)
    assert not _triton_kernel.selected(p, fused=False)
    assert not _triton_kernel.selected(p, fused=None, foreach=True)
    assert not _triton_kernel.selected(p, fused=True, differentiable=True)


def test_importing_adoptim_does_not_import_triton():
    # (torch.optim itself imports triton when building an optimizer, where it is installed;
    # adoptim's kernels module is not imported unless a Triton step runs.)
    code = (
        "import sys, torch, adoptim\n"
        "assert 'triton' not in sys.modules, 'import adoptim imported triton'\n"
        "p = torch.zeros(3, requires_grad=True)\n"
        "opt = adoptim.ADOPT([p], foreach=False)\n"
        "p.grad = torch.ones(3)\n"
        "opt.step()\n"
        "assert 'adoptim.kernels.triton.jit' not in sys.modules, 'a step imported the kernels'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _triton_kernel.BACKEND_ENV}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --------------------------------------------------------------------------------------------
# Low precision, GradScaler, tensor lr, host-side schedule, layouts


def _ulp_bf16(x):
    x = x.abs().float().clamp(min=2.0**-126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


@interpreter_only
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_params_float32_state_match_forloop(low):
    """float32 state, the update in float32, the parameter rounded once: per step within
    2 ulp of the for-loop path (the interpreter's float32 -> bfloat16 store does not round
    to nearest even), state within float32 rounding."""
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=gen).to(low) for s in [(50,), (3, 7)]]
    kw = dict(lr=1e-2, weight_decay=0.1)
    tri = [x.clone().requires_grad_() for x in init]
    loop = [x.clone().requires_grad_() for x in init]
    loop_opt = ADOPT(loop, foreach=False, fused=False, **kw)
    with on_triton():
        tri_opt = ADOPT(tri, fused=True, **kw)
        for _ in range(6):
            grads = [torch.randn(x.shape, generator=gen).to(low) for x in init]
            for a, b, g in zip(tri, loop, grads):
                a.grad, b.grad = g.clone(), g.clone()
            tri_opt.step()
            with mock.patch.object(forloop_module, "single_tensor_adopt",
                                   _single_tensor_adopt):  # fmt: skip
                loop_opt.step()
            for a, b in zip(tri, loop):
                assert a.dtype == low and tri_opt.state[a]["exp_avg"].dtype == torch.float32
                assert ((a.float() - b.float()).abs() <= 2 * _ulp_bf16(b)).all()
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(
                        tri_opt.state[a][key], loop_opt.state[b][key], rtol=1e-5, atol=1e-7
                    )
                b.data.copy_(a.data)  # continue from the same parameters
    assert any((a.float() - x.float()).abs().max() > 0 for a, x in zip(tri, init))


_single_tensor_adopt = forloop_module.single_tensor_adopt  # the real one, for comparisons


@interpreter_only
def test_low_precision_state_in_parameter_dtype():
    """state_dtype="param": bfloat16 moments (v stuck at beta2 = 0.9999, as on every path)."""
    def run(lr, **path):
        p = torch.ones(20, dtype=torch.bfloat16, requires_grad=True)
        opt = ADOPT([p], lr=lr, state_dtype="param", **path)
        p.grad = torch.ones(20, dtype=torch.bfloat16)
        opt.step()
        p.grad = torch.full((20,), 2.0, dtype=torch.bfloat16)
        for _ in range(3):
            opt.step()
        return p, opt.state[p]["exp_avg_sq"]

    # lr 0.1: the parameter moves by more than half a bf16 ulp (at lr 1e-3 it does not, on
    # every path; the interpreter's truncating cast used to move it down all the same)
    for lr in (1e-3, 0.1):
        with on_triton():
            p, v = run(lr, fused=True)
        p_ref, v_ref = run(lr, foreach=False, fused=False)
        assert v.dtype == torch.bfloat16 and torch.equal(v, torch.ones_like(v))
        assert torch.equal(p, p_ref) and torch.equal(v, v_ref)
    assert (p < 1).all()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stochastic_rounding_keeps_small_updates(device):
    if device == "cpu" and not INTERPRETED:
        pytest.skip("interpreter tests: run with TRITON_INTERPRET=1")
    if device == "cuda" and (not CUDA or INTERPRETED):
        pytest.skip("needs a CUDA GPU")
    big = _triton_kernel.LaunchConfig(block=4096, chunk=8192, num_warps=1, schedule_block=4)

    def patches():
        return on_triton(big) if device == "cpu" else contextlib.nullcontext()

    def run(stochastic):
        torch.manual_seed(0)
        p = torch.ones(20000, dtype=torch.bfloat16, device=device, requires_grad=True)
        with patches():
            opt = ADOPT([p], lr=2**-10 * 10, clip_lambda=None, stochastic_rounding=stochastic,
                        fused=True)  # fmt: skip
            p.grad = torch.ones_like(p)
            opt.step()
            opt.step()  # theta -= lr * (1 - beta1) * 1 = 2**-10, a quarter ulp below 1
        return p.detach().float().cpu()

    nearest = run(False)
    if device == "cuda":  # round to nearest even: the quarter-ulp update is lost
        assert torch.equal(nearest, torch.ones(20000))
    else:  # the interpreter's float32 -> bfloat16 store truncates instead (see notes)
        assert len(nearest.unique()) == 1
    sr = run(True)
    assert abs((1.0 - sr.mean().item()) - 2**-10) < 1e-4
    assert set(sr.unique().tolist()) <= {1.0, 1.0 - 2**-8}


@interpreter_only
@pytest.mark.parametrize("host_schedule", [False, True], ids=["device-schedule", "host-schedule"])
def test_gradscaler_unscales_on_device_and_skips_inf(host_schedule, monkeypatch):
    """grad_scale and found_inf go to the kernels as tensors (no host read when the step
    counts are on the tensors' device); an inf step changes nothing, step counts included.
    host-schedule: what CUDA steps with host-side step counts do (scalars from the host)."""
    monkeypatch.setattr(_triton_kernel, "_force_host_schedule", host_schedule)
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(40, generator=gen), torch.randn(6, 7, generator=gen)]
    weights = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(8)]
    params = [x.clone().requires_grad_() for x in init]
    with on_triton():
        opt = ADOPT(params, lr=1e-2, fused=True)
        assert opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for t, w in enumerate(weights):
            opt.zero_grad()
            scaler.scale(sum((p * wi).sum() for p, wi in zip(params, w))).backward()
            scaled = params[1].grad.clone()
            if t == 5:
                params[0].grad[1] = math.inf
            before = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            assert torch.equal(params[1].grad, scaled)  # .grad was not unscaled in place
            if t == 5:
                assert all(torch.equal(b, p) for b, p in zip(before, params))
    # The same run without a scaler, skipping call 5, on the real for-loop path.
    loop = [x.clone().requires_grad_() for x in init]
    loop_opt = ADOPT(loop, lr=1e-2, foreach=False, fused=False)
    for t, w in enumerate(weights):
        if t == 5:
            continue
        loop_opt.zero_grad()
        sum((p * wi).sum() for p, wi in zip(loop, w)).backward()
        loop_opt.step()
    for a, b in zip(params, loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [opt.state[p]["step"].item() for p in params] == [7.0, 7.0]


@interpreter_only
def test_tensor_lr_read_on_device_and_custom_clip():
    """A tensor lr on the tensors' device is read by the kernel (capturable=True keeps the
    steps there too); a custom clip callable runs on the step tensors (torch ops)."""
    lr = torch.tensor(3e-2, dtype=torch.float64)

    def clip(t):
        return 0.5 + 0.25 * t

    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(33, generator=gen, dtype=torch.float64)]
    grads = [torch.randn(33, generator=gen, dtype=torch.float64) for _ in range(6)]
    ref = ReferenceADOPT(init, [Hyper(lr=3e-2, clip=clip, weight_decay=0.1, decouple=True)])
    p = init[0].clone().requires_grad_()
    with on_triton():
        opt = ADOPT([p], lr=lr, clip_lambda=clip, weight_decay=0.1, decouple=True,
                    fused=True, capturable=True)  # fmt: skip
        for g in grads:
            p.grad = g.clone()
            opt.step()
            ref.step([g])
    torch.testing.assert_close(p.detach(), ref.theta[0], rtol=1e-12, atol=1e-12)


@interpreter_only
def test_layouts_channels_last_misaligned_and_noncontiguous_grad():
    """Any dense layout shared by the moments; a gradient in another layout is copied; a
    view that does not start on 16 bytes takes the unaligned variant."""
    w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    base = torch.randn(41)
    shifted = base[1:]  # data_ptr 4 bytes past an aligned allocation
    params = [w.requires_grad_(), shifted]
    shifted.requires_grad_()
    gen = torch.Generator().manual_seed(1)
    seq = [[torch.randn(4, 3, 5, 5, generator=gen), torch.randn(40, generator=gen)]
           for _ in range(4)]  # fmt: skip
    init = [x.detach().clone() for x in params]
    with on_triton():
        opt = ADOPT(params, fused=True)
        for grads in seq:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    ref = ReferenceADOPT(init, [Hyper(), Hyper()])
    for grads in seq:
        ref.step(grads)
    for p, theta in zip(params, ref.theta):
        torch.testing.assert_close(p.detach().double(), theta, rtol=1e-5, atol=1e-6)
    assert opt.state[w]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    keys = {key for key in _triton_kernel._layouts}
    assert keys  # the tables were cached


# --------------------------------------------------------------------------------------------
# Set-ups that cannot run, and compile failures


class _FakeParam:
    def __init__(self, device_type, dtype=torch.float32):
        self.device = torch.device(device_type)
        self.dtype = dtype


def test_unsupported_reasons(monkeypatch):
    cuda = [_FakeParam("cuda")]
    monkeypatch.setattr(_triton_kernel, "triton_installed", lambda: False)
    reason = _triton_kernel.unsupported_reason(cuda)
    assert "adoptim[gpu]" in reason and "Triton" in reason
    monkeypatch.setattr(_triton_kernel, "triton_installed", lambda: True)
    assert _triton_kernel.unsupported_reason(cuda) is None
    assert _triton_kernel.unsupported_reason(cuda, ["8bit"]) is None  # its own kernel
    mixed = [_FakeParam("cuda"), _FakeParam("cpu")]
    assert "one device type" in _triton_kernel.unsupported_reason(mixed)
    assert "int32" in _triton_kernel.unsupported_reason([_FakeParam("cuda", torch.int32)])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _triton_kernel.unsupported_reason([_FakeParam("cpu")])
    # fused=True picks Triton for CUDA (and mixed, to say why not); others get the C++ refusal
    assert _triton_kernel.selected(cuda, fused=True)
    assert _triton_kernel.selected(mixed, fused=True)
    assert not _triton_kernel.selected([_FakeParam("meta")], fused=True)
    # The default on CUDA stays foreach until the kernel has passed the GPU check.
    assert not _triton_kernel.DEFAULT_ON_CUDA
    assert not _triton_kernel.selected(cuda, fused=None)


@interpreter_only
def test_fused_true_without_interpreter_raises_at_construction(monkeypatch):
    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="fused=True cannot be used: .*TRITON_INTERPRET=1"):
        ADOPT([torch.zeros(3, requires_grad=True)], fused=True)


@interpreter_only
def test_compile_failure_raises_under_fused_true_and_falls_back_once_otherwise(monkeypatch):
    """Compile errors (simulated: warmup raises) surface with Triton's message under
    fused=True; under the default the step runs on the unfused path after one warning."""
    from adoptim.kernels.triton import jit as _triton_jit

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: something Triton said")

    monkeypatch.setattr(_triton_kernel, "_interpreting", lambda: False)  # compile first
    monkeypatch.setattr(_triton_jit.adopt_kernel, "warmup", broken, raising=False)
    monkeypatch.setattr(_triton_kernel, "_ready", set())
    monkeypatch.setattr(_triton_kernel, "_failed", {})
    monkeypatch.setattr(_triton_kernel, "_warned", set())
    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.randn(5)
    state = [torch.zeros(5), torch.zeros(5), torch.zeros(())]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.9, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
              decouple=False, maximize=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="failed to compile.*something Triton said"):
        _triton_kernel.triton_adopt([p], [p.grad], *([s] for s in state), strict=True, **kw)
    assert state[2].item() == 0  # nothing ran, the step count included
    with pytest.warns(RuntimeWarning, match="falls back to the foreach path"):
        left = _triton_kernel.triton_adopt([p], [p.grad], *([s] for s in state), strict=False,
                                           **kw)  # fmt: skip
    assert left == [0] and state[2].item() == 0
    assert "cpu" in _triton_kernel._failed


@interpreter_only
def test_fused_true_without_triton_raises_at_construction_naming_the_extra(monkeypatch):
    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    monkeypatch.setattr(_triton_kernel, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"fused=True cannot be used: .*adoptim\[gpu\]"):
        ADOPT([torch.zeros(3, requires_grad=True)], fused=True)


@interpreter_only
def test_default_falls_back_with_one_warning_when_the_kernel_fails_to_compile(monkeypatch):
    """Under the default (fused unset; here CPU tensors with the Triton backend), a compile
    failure warns once and the step runs on the unfused path: the same result."""
    from adoptim.kernels.triton import jit as _triton_jit

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: something Triton said")

    monkeypatch.setattr(_triton_kernel, "_interpreting", lambda: False)
    monkeypatch.setattr(_triton_jit.adopt_kernel, "warmup", broken, raising=False)
    monkeypatch.setattr(_triton_kernel, "_ready", set())
    monkeypatch.setattr(_triton_kernel, "_failed", {})
    monkeypatch.setattr(_triton_kernel, "_warned", set())
    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    init = torch.randn(9)
    grads = [torch.randn(9) for _ in range(3)]
    p, q = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt, ref = ADOPT([p]), ADOPT([q], foreach=False, fused=False)
    with pytest.warns(RuntimeWarning, match="failed to compile.*something Triton said") as seen:
        for g in grads:
            p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1
    assert torch.equal(p, q) and opt.state[p]["step"].item() == 3


def test_eight_bit_codes_are_refused_by_the_float_launcher():
    """8-bit state has its own kernel (tests/test_triton_lowbit.py); codes handed to the
    float-state launcher are refused, not read as floats."""
    p = torch.randn(8)
    codes = torch.zeros(8, dtype=torch.uint8)
    with mock.patch.dict(os.environ, {_triton_kernel.BACKEND_ENV: "triton"}):
        with pytest.raises(RuntimeError, match="takes float state; 8-bit codes"):
            _triton_kernel.triton_adopt(
                [p], [p.clone()], [codes], [codes.clone()], [torch.zeros(())], strict=True,
                lr=1e-3, beta1=0.9, beta2=0.9, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
                decouple=False, maximize=False,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Ahead of time, for real GPUs: every variant compiles; PTX access widths


def _compile_in_subprocess(archs):
    """Compile every variant in a process without the interpreter (in this one, with
    TRITON_INTERPRET=1, the kernels are interpreted functions); its records as JSON."""
    code = (
        "import json, sys\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from adoptim.kernels.triton import aot as tk\n"
        f"targets = [(f'sm_{{a}}', GPUTarget('cuda', a, 32)) for a in {list(archs)}]\n"
        "print(json.dumps(tk.compile_report(targets)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600, check=False)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"the compile process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_ahead_of_time_with_128_bit_loads():
    records = _compile_in_subprocess([80, 90])
    failed = [r for r in records if not r["ok"]]
    if failed and all("cannot" in r["error"].lower() or "not found" in r["error"].lower()
                      for r in failed):  # fmt: skip
        pytest.skip(f"triton's CUDA backend cannot compile offline here: {failed[0]['error']}")
    assert not failed, failed
    assert {r["target"] for r in records} == {"sm_80", "sm_90"}
    assert len(records) == 2 * len(_aot.variants())
    for r in records:
        if r["kernel"].startswith("schedule"):
            continue
        # Full blocks: one load per input element and one store per output, 128 bits wide.
        assert r["load_bits"] == 128 and r["loads_per_element"] == 1.0, r
        if r["kernel"].startswith("update"):
            assert r["store_bits"] == 128 and r["stores_per_element"] == 1.0, r
    for r in records:
        if r["kernel"] == "update(fp32/fp32)":
            # 8 float32 elements per thread per block, 4 inputs: 8 loads of 4 x 32 bits.
            assert r["vector_loads"] == 8 and r["vector_stores"] == 6, r


# --------------------------------------------------------------------------------------------
# On a CUDA GPU (scripts/gpu_check.sh): the kernel against the for-loop and foreach paths


def _cuda_run(path_kw, dtype=torch.float32, steps=20, capturable=False, **kw):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1000,), (65536 * 2 + 17,), (3, 5), (1,), (64, 3, 3, 3)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    params = [x.cuda().requires_grad_() for x in init]
    opt = ADOPT(params, capturable=capturable, **path_kw, **kw)
    grads = [[torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes] for _ in range(steps)]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return params, opt


@cuda_only
@pytest.mark.parametrize(
    "kw",
    [{}, dict(weight_decay=0.1), dict(weight_decay=0.1, decouple=True, maximize=True),
     dict(nesterov=True, caution=True), dict(clip_lambda=None)],  # fmt: skip
    ids=lambda kw: ",".join(kw) or "defaults",
)
@pytest.mark.parametrize("capturable", [False, True])
def test_cuda_triton_matches_forloop_and_foreach(kw, capturable):
    tri, tri_opt = _cuda_run(dict(fused=True), capturable=capturable, **kw)
    loop, _ = _cuda_run(dict(foreach=False), capturable=capturable, **kw)
    each, _ = _cuda_run(dict(foreach=True), capturable=capturable, **kw)
    for a, b, c in zip(tri, loop, each):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert all(tri_opt.state[p]["step"].item() == 20 for p in tri)


@cuda_only
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_matches_forloop(low):
    """float32 state, parameter rounded to nearest even once: the same values as the for-loop
    path (a rare 1-ulp tie aside)."""
    tri, tri_opt = _cuda_run(dict(fused=True), dtype=low, lr=1e-2, weight_decay=0.1)
    loop, _ = _cuda_run(dict(foreach=False, fused=False), dtype=low, lr=1e-2, weight_decay=0.1)
    for a, b in zip(tri, loop):
        assert a.dtype == low and tri_opt.state[a]["exp_avg_sq"].dtype == torch.float32
        assert (a != b).float().mean().item() < 0.01
        assert ((a.float() - b.float()).abs() <= 2 * _ulp_bf16(b)).all()


@cuda_only
@pytest.mark.parametrize("capturable", [False, True])
def test_cuda_gradscaler_skips_inf_steps(capturable):
    params = [torch.randn(5000, device="cuda", requires_grad=True) for _ in range(2)]
    opt = ADOPT(params, fused=True, capturable=capturable, lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    for t in range(6):
        opt.zero_grad()
        scaler.scale(sum((p * p).sum() for p in params)).backward()
        if t == 3:
            params[0].grad[0] = math.inf
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if t == 3:
            assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert [opt.state[p]["step"].item() for p in params] == [5.0, 5.0]


@cuda_only
def test_cuda_graph_capture_of_a_fused_step():
    params = [torch.randn(4096, device="cuda", requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ADOPT(params, fused=True, capturable=True, lr=torch.tensor(1e-3, device="cuda"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compiles the kernels and caches the tables
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    before = [p.detach().clone() for p in params]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    # Capturing records the kernels without running them: 3 warm-up steps, then 5 replays.
    assert all(opt.state[p]["step"].item() == 3 + 5 for p in params)


@cuda_only
def test_cuda_fused_step_does_not_sync():
    params = [torch.randn(10000, device="cuda", requires_grad=True) for _ in range(4)]
    opt = ADOPT(params, fused=True, capturable=True)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(sum(p.sum() for p in params)).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.grad_scale = scaler._scale
        opt.found_inf = torch.zeros((), device="cuda")
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        opt.grad_scale = opt.found_inf = None


# --------------------------------------------------------------------------------------------
# DTensor parameters (FSDP2, tensor parallelism): both fused kernels on the local shards


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dtensor_parameters_take_the_fused_kernel_on_their_shards(backend, one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    if backend == "triton" and not INTERPRETED:
        pytest.skip("interpreter tests: run with TRITON_INTERPRET=1")
    if backend == "cpp":
        reason = _cpu_kernel.unsupported_reason()
        if reason is not None:
            pytest.skip(f"C++ kernel unavailable: {reason}")
        from adoptim.kernels.cpu import build as _kernel_cache

        _kernel_cache.load_kernel(wait=True, timeout=600)
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(5)]
    plain = [x.clone().requires_grad_() for x in init]
    plain_opt = ADOPT(plain, foreach=False, fused=False, weight_decay=0.1, nesterov=True)
    dparams = [
        torch.nn.Parameter(distribute_tensor(x.clone(), one_rank_mesh, [Shard(0)]))
        for x in init
    ]
    patches = on_triton() if backend == "triton" else contextlib.ExitStack()
    with patches, mock.patch.object(forloop_module, "single_tensor_adopt",
                                    _refuse("for-loop")):  # fmt: skip
        opt = ADOPT(dparams, fused=True, weight_decay=0.1, nesterov=True)
        for gs in grads:
            for p, g in zip(dparams, gs):
                p.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
            opt.step()
    for gs in grads:
        for p, g in zip(plain, gs):
            p.grad = g.clone()
        plain_opt.step()
    for d, p in zip(dparams, plain):
        torch.testing.assert_close(d.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
    assert opt.state[dparams[0]]["step"].item() == 5
