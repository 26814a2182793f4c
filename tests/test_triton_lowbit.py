"""The Triton kernel for 8-bit state (``state_dtype="8bit"`` with fused=True on CUDA), checked
on CPU tensors through Triton's interpreter, and compiled ahead of time for sm_90 and gfx942.

As in tests/test_triton.py, ``ADOPTIM_FUSED_BACKEND=triton`` sends fused steps on CPU tensors
to the Triton kernels and ``TRITON_INTERPRET=1`` runs them with numpy. The kernel is compared
with the for-loop 8-bit path (dequantize, the float32 update, requantize: the definition)
step by step, each step from the same state: the kernel performs the same float32 operations
with the same random numbers, so parameters, codes and scales come out the same, bit for
bit (every path performs single-rounding operations only, issue #18). Against the C++ 8-bit
kernel the comparison is exact too. Every Triton test makes the
for-loop, foreach and C++ paths raise, unless caution hands the tensors to the for-loop path
by design. Launch shapes are shrunk (``SMALL8``: 2 blocks per program) so that tensors of a
few thousand elements span many programs and end in a masked tile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from unittest import mock

import pytest

# first: triton_setup sets TRITON_INTERPRET before anything imports triton
from triton_setup import (  # noqa: F401 (INTERPRETED: read by test_guards, test_same_seed)
    INTERPRETED,
    cuda_only,
    interpreter_only,
)

# isort: split
import test_reference_match as trm
import torch
from hypothesis import given, settings
from integration_paths import fused_unavailable_reason

import adoptim.paths.foreach as foreach_module
import adoptim.paths.forloop as forloop_module
from adoptim import ADOPT
from adoptim.kernels.cpu import launch as _cpu_kernel
from adoptim.kernels.triton import aot as _aot
from adoptim.kernels.triton import launch as _triton_kernel
from adoptim.kernels.triton import launch8 as _triton_lowbit

SMALL8 = _triton_lowbit.LaunchConfig8(rows=2, num_warps=1)
SMALL = _triton_kernel.LaunchConfig(block=16, chunk=32, num_warps=1, schedule_block=4)
KEYS8 = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the {name} path ran where the Triton kernel should have")

    return refuse


@contextlib.contextmanager
def on_triton(allow_forloop=False):
    """Fused steps on CPU tensors go to the Triton kernels; the other paths raise (the
    for-loop path may run with ``allow_forloop``: caution); yields the names of the
    interpreted launches."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[str] = []
    real_run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    refused = [(foreach_module, "multi_tensor_adopt", "foreach"),
               (_cpu_kernel, "fused_adopt", "C++ kernel"),
               (_cpu_kernel, "fused_adopt_8bit", "C++ 8-bit kernel")]  # fmt: skip
    if not allow_forloop:
        refused.append((forloop_module, "single_tensor_adopt", "for-loop"))
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {_triton_kernel.BACKEND_ENV: "triton"}))
        stack.enter_context(mock.patch.object(_triton_lowbit, "CONFIG", SMALL8))
        stack.enter_context(mock.patch.object(_triton_kernel, "CONFIG", SMALL))
        stack.enter_context(mock.patch.object(InterpretedFunction, "run", counting_run))
        for module, name, label in refused:
            stack.enter_context(mock.patch.object(module, name, _refuse(label)))
        yield launches


class Tally:
    """Codes compared and codes that differ (by one at most) over a run."""

    def __init__(self):
        self.codes = 0
        self.differ = 0

    def check(self):
        assert self.codes > 0
        assert self.differ == 0, (self.differ, self.codes)


def compare_and_resync(ref_params, ref_opt, params, opt, tally):
    """The Triton optimizer's step against the for-loop one's; then it continues from the
    for-loop one's values, so that each step is compared on its own."""
    for x, y in zip(ref_params, params):
        sa, sb = ref_opt.state.get(x, {}), opt.state.get(y, {})
        assert bool(sa) == bool(sb)
        if not sa:
            continue
        assert sa["step"].item() == sb["step"].item()
        if "exp_avg_scale" in sa:
            for key in ("exp_avg", "exp_avg_sq"):
                d = (sa[key].int() - sb[key].int()).abs()
                assert d.max() <= 1, key
                tally.codes += d.numel()
                tally.differ += int((d > 0).sum())
            for key in ("exp_avg_scale", "exp_avg_sq_scale"):
                assert torch.equal(sb[key], sa[key]), key
        else:  # float state (under min_8bit_size): the float Triton kernel
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sb[key], sa[key]), key
        assert torch.equal(y.detach(), x.detach())
        with torch.no_grad():
            y.copy_(x)
            for key, value in sa.items():
                sb[key].copy_(value)


# --------------------------------------------------------------------------------------------
# The kernel against the for-loop 8-bit path


OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decouple": True, "maximize": True},
    {"clip_lambda": None, "betas": (0.3, 0.999), "eps": 1e-3},  # lerp's large-weight formula
    {"lr": torch.tensor(3e-3), "nesterov": True},
    {"clip_lambda": trm.affine_clip, "nesterov": True, "weight_decay": 0.1},
]
SHAPES = [(5000,), (37, 300), (4100,), (300,)]  # the last under min_8bit_size: float state


def _twin(dtype, kw, shapes=SHAPES, seed=3, **extra):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    sr = dtype == torch.bfloat16
    kw = {"lr": 1e-2, "state_dtype": "8bit", "min_8bit_size": 4096, "stochastic_rounding": sr,
          **kw, **extra}  # fmt: skip
    a = [x.clone().requires_grad_() for x in init]
    b = [x.clone().requires_grad_() for x in init]
    opt_a = ADOPT(a, foreach=False, fused=False, **kw)
    with on_triton():
        opt_b = ADOPT(b, fused=True, **kw)
    return gen, a, opt_a, b, opt_b


def _option_cases():
    """Every option once in the default run: three with float32 parameters, one each with
    bfloat16, float16 and complex64; the rest of the product under the ``slow`` marker (the
    interpreter takes 5-30 s a case: the whole product is ~6 minutes on 2 cores)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
    default = {(torch.bfloat16, 1), (torch.float16, 2), (torch.complex64, 4)}
    for dtype in dtypes:
        for i, kw in enumerate(OPTIONS):
            slow = (dtype, i) not in default and (dtype != torch.float32 or i in (1, 2, 4))
            name = f"{str(dtype).removeprefix('torch.')}-{','.join(kw) or 'defaults'}"
            yield pytest.param(kw, dtype, id=name, marks=[pytest.mark.slow] if slow else [])


@interpreter_only
@pytest.mark.parametrize(("kw", "dtype"), list(_option_cases()))
def test_triton_8bit_matches_forloop_each_step(kw, dtype):
    gen, a, opt_a, b, opt_b = _twin(dtype, kw)
    tally = Tally()
    steps = 5
    for t in range(steps):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(dtype) * (30.0 if t == 0 else 1.0)
            x.grad, y.grad = g, g.clone()
        opt_a.step()
        with on_triton() as launches:
            opt_b.step()
        assert launches.count("adopt_8bit_kernel") == 1  # one launch for the 8-bit tensors
        assert launches.count("adopt_kernel") == 1  # and one for the float-state tensor
        compare_and_resync(a, opt_a, b, opt_b, tally)  # every tensor bit for bit
    tally.check()
    assert opt_b.state[b[0]]["exp_avg"].dtype == torch.int8
    assert "exp_avg_scale" not in opt_b.state[b[3]]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_8bit_is_the_cpp_kernel_bit_for_bit(dtype):
    """The C++ 8-bit kernel performs the same written operations: the same parameters, codes
    and scales, over several steps without resyncing (grad_scale aside: the C++ kernel
    multiplies by its inverse, the Triton kernel divides as the for-loop path does)."""
    reason = fused_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(11)
    shapes = [(5000,), (37, 300), (4100,)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    kw = dict(lr=1e-2, state_dtype="8bit", min_8bit_size=0, weight_decay=0.1, nesterov=True,
              stochastic_rounding=dtype == torch.bfloat16)  # fmt: skip
    a = [x.clone().requires_grad_() for x in init]
    b = [x.clone().requires_grad_() for x in init]
    opt_a = ADOPT(a, fused=True, **kw)  # the C++ kernel
    with on_triton():
        opt_b = ADOPT(b, fused=True, **kw)
    for _ in range(6):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen).to(dtype)
            y.grad = x.grad.clone()
        with mock.patch.object(forloop_module, "single_tensor_adopt", _refuse("for-loop")):
            opt_a.step()
        with on_triton():
            opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for key in KEYS8:
            assert torch.equal(opt_a.state[x][key], opt_b.state[y][key]), key


# --------------------------------------------------------------------------------------------
# Scenarios: groups, weight-decay modes, clip modes, complex, late and frozen tensors,
# tensors under min_8bit_size (float state, the float kernel, in the same step)


def _scaled(plans):
    """The drawn plans with tensors of 413 to 3213 elements (a tensor of n elements: 400 *
    min(n, 8) + 13; complex ones have twice the real elements), so that min_8bit_size=1000
    splits them (tensors of 1 and 2 elements keep float state, unless complex)."""
    out = []
    for plan in plans:
        n = min(math.prod(plan.shape), 8)
        out.append(trm.TensorPlan((n * 400 + 13,), plan.is_complex, plan.group,
                                  plan.first_call, plan.drop_prob, plan.grad_scale))  # fmt: skip
    return out


def run_scenario(group_cfgs, plans, tensor_lr, seed, calls=20):
    plans = _scaled(plans)
    caution = any(c.caution for c in group_cfgs)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(p.shape, generator=gen,
                        dtype=torch.complex64 if p.is_complex else torch.float32)
            for p in plans]  # fmt: skip
    a = [x.clone() for x in init]
    b = [x.clone() for x in init]
    groups_a, _, clip_fn = trm.build_groups(group_cfgs, plans, a, tensor_lr)
    groups_b, _, _ = trm.build_groups(group_cfgs, plans, b, tensor_lr)
    kw = dict(clip_lambda=clip_fn if clip_fn is not None else 0.25, state_dtype="8bit",
              min_8bit_size=1000)  # fmt: skip
    opt_a = ADOPT(groups_a, foreach=False, fused=False, **kw)
    with on_triton():
        opt_b = ADOPT(groups_b, fused=True, **kw)
    tally = Tally()
    eight_bit_launches = 0
    for call in range(calls):
        for x, y, plan in zip(a, b, plans):
            has = call >= plan.first_call and torch.rand((), generator=gen).item() >= plan.drop_prob
            g = plan.grad_scale * torch.randn(x.shape, generator=gen, dtype=x.dtype)
            if has and torch.rand((), generator=gen).item() < 0.1:
                g = torch.zeros_like(g)
            x.grad = g if has else None
            y.grad = g.clone() if has else None
        opt_a.step()
        with on_triton(allow_forloop=caution) as launches:
            opt_b.step()
        eight_bit_launches += launches.count("adopt_8bit_kernel")
        compare_and_resync(a, opt_a, b, opt_b, tally)
    if any("exp_avg_scale" in opt_a.state.get(x, {}) for x in a):
        tally.check()
        if not all(c.caution for c in group_cfgs):
            assert eight_bit_launches > 0
    return opt_b, b


HARD = {"late_and_frozen": trm.LATE_AND_FROZEN, "complex_mixed": trm.COMPLEX_MIXED,
        "several_groups": trm.SEVERAL_GROUPS, "ill_conditioned": trm.ILL_CONDITIONED}  # fmt: skip


@interpreter_only
@pytest.mark.parametrize("case", [
    "late_and_frozen", "several_groups",
    # complex views and ill-conditioned scales: ~80 s together under the interpreter
    pytest.param("complex_mixed", marks=pytest.mark.slow),
    pytest.param("ill_conditioned", marks=pytest.mark.slow),
])  # fmt: skip
def test_hard_cases_match_forloop(case):
    group_cfgs, plans, tensor_lr, seed = HARD[case]
    opt, params = run_scenario(group_cfgs, plans, tensor_lr, seed, calls=24)
    kinds = {"exp_avg_scale" in opt.state[p] for p in params if opt.state.get(p)}
    assert kinds == {True, False}  # 8-bit and float-state tensors side by side
    late = [p for p, plan in zip(params, plans) if plan.first_call == 17]
    assert all(opt.state[p]["step"].item() <= 24 - 17 for p in late)


@interpreter_only
@pytest.mark.slow  # ~30 s an example under the interpreter; the hard cases above run by default
@settings(trm.SETTINGS, max_examples=2)
@given(cfg=trm.config)
def test_random_scenarios_match_forloop(cfg):
    group_cfgs, plans, tensor_lr, seed = cfg
    run_scenario(group_cfgs, plans, tensor_lr, seed, calls=12)


@interpreter_only
@pytest.mark.slow
@settings(trm.SETTINGS, max_examples=12)
@given(cfg=trm.config)
def test_random_scenarios_match_forloop_many(cfg):
    """The same draw, more examples (~25 s each under the interpreter)."""
    group_cfgs, plans, tensor_lr, seed = cfg
    run_scenario(group_cfgs, plans, tensor_lr, seed, calls=12)


# --------------------------------------------------------------------------------------------
# GradScaler, caution, the default path, compile failures


@interpreter_only
def test_gradscaler_unscales_in_the_kernel_and_skips_inf():
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(5000, generator=gen), torch.randn(60, 70, generator=gen)]
    weights = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(6)]
    params = [x.clone().requires_grad_() for x in init]
    with on_triton() as launches:
        opt = ADOPT(params, lr=1e-2, fused=True, state_dtype="8bit")
        assert opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for t, w in enumerate(weights):
            opt.zero_grad()
            scaler.scale(sum((p * wi).sum() for p, wi in zip(params, w))).backward()
            if t == 3:
                params[0].grad[1] = math.inf
            before = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            if t == 3:
                assert all(torch.equal(x, p) for x, p in zip(before, params))
    assert launches.count("adopt_8bit_kernel") == 5
    loop = [x.clone().requires_grad_() for x in init]
    loop_opt = ADOPT(loop, lr=1e-2, foreach=False, fused=False, state_dtype="8bit")
    for t, w in enumerate(weights):
        if t == 3:
            continue
        loop_opt.zero_grad()
        sum((p * wi).sum() for p, wi in zip(loop, w)).backward()
        loop_opt.step()
    for x, y in zip(loop, params):  # power-of-two scales: the same unscaled gradients
        assert torch.equal(y, x)
        assert opt.state[y]["step"].item() == 5
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[y][key], loop_opt.state[x][key])


@interpreter_only
def test_caution_runs_the_forloop_path_and_matches_it():
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(6000, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt_a = ADOPT([a], lr=1e-2, caution=True, foreach=False, fused=False, state_dtype="8bit")
    with on_triton(allow_forloop=True) as launches:
        opt_b = ADOPT([b], lr=1e-2, caution=True, fused=True, state_dtype="8bit")
        for _ in range(4):
            g = torch.randn(6000, generator=gen)
            a.grad, b.grad = g, g.clone()
            opt_a.step()
            opt_b.step()
    assert "adopt_8bit_kernel" not in launches
    assert torch.equal(a, b)


@interpreter_only
def test_default_takes_the_8bit_kernel_under_the_float_kernels_rule():
    """fused unset: the 8-bit tensors take the Triton kernel exactly where the float ones do
    (here: CPU tensors under ADOPTIM_FUSED_BACKEND=triton; on CUDA once DEFAULT_ON_CUDA)."""
    p = torch.randn(5000, requires_grad=True)
    with on_triton() as launches:
        opt = ADOPT([p], state_dtype="8bit")
        p.grad = torch.randn(5000)
        opt.step()
    assert launches.count("adopt_8bit_kernel") == 1


def test_path_choice_on_cuda(monkeypatch):
    """Which 8-bit path a CUDA step takes (meta tensors stand in for CUDA ones: only the
    device type is read): fused=True -> the Triton kernel; fused unset -> foreach while
    DEFAULT_ON_CUDA is off, the Triton kernel once it is on (the float kernel's rule)."""
    from adoptim import functional

    seen = []
    monkeypatch.setattr(  # the Triton 8-bit launcher takes everything ...
        _triton_lowbit, "triton_adopt_8bit", lambda index, *a, **kw: seen.append("triton") or []
    )
    monkeypatch.setattr(  # ... else the unfused path named by the function it runs
        functional, "run_unfused",
        lambda path, *a, **kw: seen.append(
            "foreach" if path is foreach_module.multi_tensor_adopt else "forloop"
        ),
    )  # fmt: skip
    monkeypatch.setattr(_triton_kernel, "GPU_DEVICE_TYPES", ("cuda", "meta"))
    monkeypatch.setattr(functional, "_default_foreach", lambda params, differentiable: True)
    monkeypatch.setattr(_triton_kernel, "triton_installed", lambda: True)
    p = torch.empty(5000, device="meta")
    args = ([p], [torch.empty_like(p)], [torch.empty(5000, dtype=torch.int8, device="meta")],
            [torch.empty(5000, dtype=torch.uint8, device="meta")], [torch.zeros(())])  # fmt: skip
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, clip_exp=0.25, weight_decay=0.0,
              decouple=False, maximize=False, exp_avg_scales=[torch.empty(20, device="meta")],
              exp_avg_sq_scales=[torch.empty(20, device="meta")])  # fmt: skip
    functional.adopt(*args, fused=True, **kw)
    functional.adopt(*args, **kw)
    monkeypatch.setattr(_triton_kernel, "DEFAULT_ON_CUDA", True)
    functional.adopt(*args, **kw)
    functional.adopt(*args, foreach=True, **kw)
    assert seen == ["triton", "foreach", "triton", "foreach"]
    # and fused=True with 8-bit state is no longer refused at construction for CUDA
    assert _triton_kernel.unsupported_reason([p], ["8bit"]) is None


@interpreter_only
def test_compile_failure_raises_under_fused_true_and_falls_back_once_otherwise(monkeypatch):
    from adoptim.kernels.triton import jit as _triton_jit

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: something Triton said")

    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    init = torch.randn(5000)
    p = init.clone().requires_grad_()
    strict = ADOPT([p], fused=True, state_dtype="8bit")  # (checks for the interpreter)
    p.grad = torch.randn(5000)
    from adoptim.kernels.triton import common as _triton_common

    monkeypatch.setattr(_triton_common, "interpreting", lambda: False)  # compile first
    monkeypatch.setattr(_triton_jit.adopt_8bit_kernel, "warmup", broken, raising=False)
    for name, value in (("_ready", set()), ("_failed", {}), ("_warned", set())):
        monkeypatch.setattr(_triton_lowbit, name, value)
    with pytest.raises(RuntimeError, match="8-bit kernel failed to compile.*something Triton"):
        strict.step()
    assert strict.state[p]["step"].item() == 0 and torch.equal(p, init)  # nothing ran
    q, r = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt, ref = ADOPT([q], state_dtype="8bit"), ADOPT([r], foreach=False, fused=False,
                                                     state_dtype="8bit")  # fmt: skip
    with pytest.warns(RuntimeWarning, match="failed to compile.*something Triton") as seen:
        for _ in range(3):
            g = torch.randn(5000)
            q.grad, r.grad = g, g.clone()
            opt.step()
            ref.step()
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1
    assert torch.equal(q, r) and opt.state[q]["step"].item() == 3
    assert "cpu" in _triton_lowbit._failed


# --------------------------------------------------------------------------------------------
# Ahead of time, for real GPUs: every 8-bit variant compiles for sm_90 and gfx942; accesses


_AOT = """
import json, re
from triton.backends.compiler import GPUTarget
from adoptim.kernels.triton import aot as tk
out = []
for label, target in [("sm_90", GPUTarget("cuda", 90, 32)), ("gfx942", GPUTarget("hip", "gfx942", 64))]:
    for v in [v for v in tk.variants() if v.kind == "update8"]:
        r = {"kernel": v.name, "target": label, "options": v.options}
        try:
            c = tk.aot_compile(v, target)
        except Exception as exc:
            r.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        else:
            r.update(ok=True, **tk.access_summary(c.asm, v))
            if "ptx" in c.asm:
                r["fma"] = len(re.findall(r"\\bfma\\.rn\\.f32\\b", c.asm["ptx"]))
                r["approx"] = len(re.findall(r"\\.approx\\.", c.asm["ptx"]))
        out.append(r)
print(json.dumps(out))
"""


def test_every_8bit_variant_compiles_ahead_of_time_with_128_bit_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True,
                          env=env, timeout=600, check=False)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"the compile process failed:\n{proc.stderr[-3000:]}")
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    n = len([v for v in _aot.variants() if v.kind == "update8"])
    assert n == 8 and len(records) == 2 * n
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed
    for r in records:
        # theta and g read once, the codes read once, all written once, 128 bits wide
        assert r["load_bits"] == 128 and r["loads_per_element"] == 1.0, r
        assert r["store_bits"] == 128 and r["stores_per_element"] == 1.0, r
        if r["kernel"] == "update(fp32/8bit)":
            # 16 float32 elements per thread: theta and g 4 x 128 bits each, each code 128
            assert r["vector_loads"] == 10 and r["vector_stores"] == 6, r
        if r["target"] == "sm_90":
            # no contraction (enable_fp_fusion=False) and none written: every operation
            # rounds once, as on every path; IEEE division and square roots
            assert r["fma"] == 0, r
            assert r["approx"] == 0, r


# --------------------------------------------------------------------------------------------
# On a CUDA GPU (scripts/gpu_check.sh): the kernel against the for-loop and foreach paths


def _cuda_run(path_kw, dtype=torch.float32, steps=10, **kw):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5000,), (65536 * 2 + 17,), (300,), (64, 3, 3, 3)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    params = [x.cuda().requires_grad_() for x in init]
    opt = ADOPT(params, state_dtype="8bit", min_8bit_size=1000, **path_kw, **kw)
    grads = [[torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes]
             for _ in range(steps)]  # fmt: skip
    out = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        out.append(([p.detach().clone() for p in params],
                    [{k: v.clone() for k, v in opt.state[p].items()} for p in params]))
    return out


@cuda_only
@pytest.mark.parametrize(
    "kw",
    [{}, dict(weight_decay=0.1, nesterov=True), dict(weight_decay=0.1, decouple=True,
                                                     maximize=True, clip_lambda=None)],
    ids=lambda kw: ",".join(kw) or "defaults",
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_8bit_matches_forloop_and_foreach(kw, dtype):
    """Free-running (no resync), so codes may drift apart where torch's CUDA kernels round
    an intermediate differently: compared within a code and by the parameters' distance."""
    sr = dict(stochastic_rounding=True) if dtype == torch.bfloat16 else {}
    tri = _cuda_run(dict(fused=True), dtype, **kw, **sr)
    for other in (dict(foreach=False, fused=False), dict(foreach=True, fused=False)):
        ref = _cuda_run(other, dtype, **kw, **sr)
        _, sa = tri[0]  # the first step: the same codes
        _, sb = ref[0]
        for s, t in zip(sa, sb):
            for key in s:
                if key in ("exp_avg", "exp_avg_sq") and "exp_avg_scale" in s:
                    d = (s[key].int() - t[key].int()).abs()
                    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, key
        (pa, _), (pb, _) = tri[-1], ref[-1]
        for x, y in zip(pa, pb):
            rel = ((x.float() - y.float()).norm() / y.float().norm()).item()
            assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-3), rel
    assert all(s["step"].item() == 10 for s in tri[-1][1])
