"""Gradient release (adoptim.enable_gradient_release): each parameter stepped in a
post-accumulate-grad hook during backward, its gradient freed.

* The run equals ``backward(); step()`` bit for bit (parameters and every state tensor) on the
  for-loop path and the fused CPU kernel, with float32, 8-bit and bf16-parameter state, param
  groups, an LR scheduler (which must not warn), a parameter used twice in the graph, one that
  gets a gradient only on some steps and a frozen one; the foreach path too.
* ``state_dict()`` is interchangeable with a normal run's, through torch.save/torch.load.
* Gradients are freed during backward: live gradient tensors, counted with weakrefs from
  hooks, never exceed the largest parameter's, where a normal backward holds all of them.
* ADOPT's per-element clip bounds every released step by ``lr * t**0.25`` whatever the
  gradient (a 1e12 spike): why release is safe without global gradient clipping.
* Refused clearly: micro-batch accumulation, GradScaler, DDP (2 gloo ranks, with FSDP2 on
  the same ranks stepping its shards bit for bit as a normal FSDP2 step:
  tests/release_worker.py).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adoptim
from adoptim import ADOPT, ADOPTW
from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.cpu import launch as _cpu_kernel

STEPS = 7


@pytest.fixture(scope="module")
def kernel():
    reason = _cpu_kernel.unsupported_reason()
    if reason is not None:
        pytest.skip(f"fused kernel unavailable: {reason}")
    return _kernel_cache.load_kernel(wait=True, timeout=600)


class Net(nn.Module):
    """Every case a hook can meet: ``shared`` is used twice per forward (its hook must fire
    once, after both gradients are summed), ``late`` only on steps 1, 4, ... (no gradient
    on the others), ``frozen`` never gets one (requires_grad=False)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 32)
        self.shared = nn.Linear(32, 32)
        self.late = nn.Linear(32, 32)
        self.frozen = nn.Linear(32, 32)
        self.out = nn.Linear(32, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        if t % 3 == 1:
            h = h + torch.tanh(self.late(h))
        return self.out(torch.tanh(self.frozen(h)))


def _data():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(STEPS)
    ]


DATA = _data()


def _groups(model: Net) -> list[dict]:
    first = [*model.inp.parameters(), *model.shared.parameters()]
    rest = [*model.late.parameters(), *model.frozen.parameters(), *model.out.parameters()]
    return [{"params": first, "lr": 1e-2, "weight_decay": 0.1}, {"params": rest}]


def _build(kw, dtype):
    model = Net().to(dtype)
    opt = ADOPTW(_groups(model), lr=3e-3, weight_decay=0.02, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    return model, opt, sched


def _train(model, opt, sched, batches, start=0):
    for t, (x, y) in enumerate(batches, start):
        opt.zero_grad()
        F.mse_loss(model(x.to(next(model.parameters()).dtype), t).float(), y).backward()
        opt.step()
        sched.step()


def _run(kw, *, release, dtype=torch.float32):
    model, opt, sched = _build(kw, dtype)
    handle = adoptim.enable_gradient_release(model, opt) if release else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, sched, DATA)
    scheduler_warnings = [w for w in caught if "lr_scheduler" in str(w.message)]
    assert not scheduler_warnings, [str(w.message) for w in scheduler_warnings]
    if release:
        assert all(p.grad is None for p in model.parameters())  # freed during backward
        handle.remove()
    return model, opt


def _assert_same(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), f"{name} differs"
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i, st in sd_a["state"].items():
        assert st.keys() == sd_b["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(v, sd_b["state"][i][k]), f"state {i} {k!r} differs"


FORLOOP = {"foreach": False, "fused": False}
FUSED = {"fused": True}
_8BIT = {"state_dtype": "8bit", "min_8bit_size": 512}  # weights 8-bit, biases float32
CASES = {
    "forloop-f32": (FORLOOP, torch.float32),
    "forloop-8bit": ({**FORLOOP, **_8BIT}, torch.float32),
    "forloop-bf16": (FORLOOP, torch.bfloat16),
    # stochastic rounding of bf16 parameters is bit for bit with 8-bit state (its random bits
    # come from the state's seed); with float32 state they come from torch's generator, drawn
    # in another order under release (not covered: same distribution, other bits)
    "forloop-bf16-8bit-sr": (
        {**FORLOOP, **_8BIT, "min_8bit_size": 0, "stochastic_rounding": True},
        torch.bfloat16,
    ),
    "forloop-nesterov-caution": ({**FORLOOP, "nesterov": True, "caution": True}, torch.float32),
    # bf16 parameters with a 24-bit master-weight correction (the lean configuration)
    "forloop-bf16-master24": ({**FORLOOP, "master_weight_bits": 24}, torch.bfloat16),
    "forloop-bf16-master24-8bit": (
        {**FORLOOP, **_8BIT, "master_weight_bits": 24},
        torch.bfloat16,
    ),
    "default-bf16-master24-8bit": ({**_8BIT, "master_weight_bits": 24}, torch.bfloat16),
    "foreach-f32": ({"foreach": True, "fused": False}, torch.float32),
    "foreach-8bit": ({"foreach": True, "fused": False, **_8BIT}, torch.float32),
    "fused-f32": (FUSED, torch.float32),
    "fused-8bit": ({**FUSED, **_8BIT}, torch.float32),
    "fused-bf16": (FUSED, torch.bfloat16),
    "fused-bf16-8bit": ({**FUSED, **_8BIT}, torch.bfloat16),
    "fused-nesterov-caution": ({**FUSED, "nesterov": True, "caution": True}, torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_release_equals_backward_then_step_bit_for_bit(case, request):
    kw, dtype = CASES[case]
    if kw.get("fused"):
        request.getfixturevalue("kernel")
    normal = _run(kw, release=False, dtype=dtype)
    released = _run(kw, release=True, dtype=dtype)
    _assert_same(normal, released)
    model, opt = released
    # Each hook fired once per backward: `shared` (used twice) was stepped once per step,
    # `late` only on the steps that used it, `frozen` never.
    assert opt.state[model.shared.weight]["step"].item() == STEPS
    assert opt.state[model.late.weight]["step"].item() == len(range(1, STEPS, 3))
    assert model.frozen.weight not in opt.state
    start = Net().to(dtype)
    assert not torch.equal(model.shared.weight, start.shared.weight)  # it trained


@pytest.mark.parametrize("case", ["forloop-f32", "forloop-8bit", "fused-8bit"])
@pytest.mark.parametrize("first", ["release", "normal"])
def test_state_dict_interchangeable_with_a_normal_run(case, first, request):
    """Save after 3 steps under one regime, load into fresh objects under the other, go on:
    the end is bit for bit the uninterrupted normal run's."""
    kw, dtype = CASES[case]
    if kw.get("fused"):
        request.getfixturevalue("kernel")
    expected = _run(kw, release=False, dtype=dtype)
    model, opt, sched = _build(kw, dtype)
    handle = adoptim.enable_gradient_release(model, opt) if first == "release" else None
    _train(model, opt, sched, DATA[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)  # fmt: skip
    if handle is not None:
        handle.remove()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, sched = _build(kw, dtype)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    handle = adoptim.enable_gradient_release(model, opt) if first == "normal" else None
    _train(model, opt, sched, DATA[3:], start=3)
    _assert_same(expected, (model, opt))


def test_remove_restores_normal_stepping():
    model, opt, _ = _build(FORLOOP, torch.float32)
    handle = adoptim.enable_gradient_release(model, opt)
    assert opt.__dict__.get("zero_grad") is not None  # the iteration marker
    handle.remove()
    handle.remove()  # idempotent
    assert "zero_grad" not in opt.__dict__ and "_step_supports_amp_scaling" not in opt.__dict__
    model(DATA[0][0], 0).sum().backward()
    assert model.inp.weight.grad is not None  # no longer freed
    before = model.inp.weight.detach().clone()
    opt.step()
    assert opt.state[model.inp.weight]["step"].item() == 1
    opt.zero_grad()
    assert model.inp.weight.grad is None
    assert torch.equal(model.inp.weight, before)  # first call only stores v, as ADOPT does
    with adoptim.enable_gradient_release(model, opt) as handle:  # enabling again works
        assert handle.active and opt.__dict__.get("zero_grad") is not None
    assert not handle.active and "zero_grad" not in opt.__dict__


def test_parameters_without_hook_are_stepped_by_step():
    """A parameter of opt that is not released (not passed, or frozen at enable time and
    unfrozen later) keeps its gradient and opt.step() steps it, as a normal step would."""
    model, opt, _ = _build(FORLOOP, torch.float32)
    handle = adoptim.enable_gradient_release(list(model.inp.parameters()), opt)
    model.frozen.requires_grad_(True)
    for t, (x, y) in enumerate(DATA[:2]):
        opt.zero_grad()
        F.mse_loss(model(x, t), y).backward()
        assert model.inp.weight.grad is None and model.out.weight.grad is not None
        assert model.frozen.weight.grad is not None
        opt.step()
    assert opt.state[model.frozen.weight]["step"].item() == 2
    assert opt.state[model.inp.weight]["step"].item() == 2
    handle.remove()


def test_step_params_does_not_walk_every_parameter():
    """step_params([p]) looks p's group up in a cached index: it must not iterate over the
    group's parameter list (a pass over all parameters per hook would make release
    quadratic)."""

    class NoIter(list):
        def __iter__(self):
            raise AssertionError("step_params walked a param group")

    params = [torch.zeros(3, requires_grad=True) for _ in range(50)]
    opt = ADOPT(params, lr=1e-2, foreach=False, fused=False)
    params[0].grad = torch.ones(3)
    opt.step_params([params[0]])  # builds the index
    group = opt.param_groups[0]
    group["params"] = NoIter(group["params"])
    params[7].grad = torch.ones(3)
    opt.step_params([params[7]])
    assert opt.state[params[7]]["step"].item() == 1
    assert params[8] not in opt.state
    group["params"] = list(params)  # a parameter it does not know rebuilds the index
    with pytest.raises(ValueError, match="none of this optimizer's param groups"):
        opt.step_params([torch.zeros(3, requires_grad=True)])


def _deep_net(widths=(8, 64, 128, 64, 32, 4)):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("release", [False, True])
def test_gradients_are_freed_during_backward(release):
    """Count the gradient tensors alive at each moment of backward (weakrefs taken in a
    probe hook registered before the release hook, so it runs first and sees each gradient
    just accumulated): under release never more than one, at most the largest parameter's
    bytes; a normal backward ends holding all of them. A release that stepped but did not
    free (``p.grad = None`` removed) fails this test."""
    model = _deep_net()
    params = list(model.parameters())
    opt = ADOPT(params, lr=1e-3, foreach=False, fused=False)
    refs: list[weakref.ref] = []
    peaks = {"count": 0, "bytes": 0}

    def probe(p):
        refs.append(weakref.ref(p.grad))
        alive = [r() for r in refs if r() is not None]
        peaks["count"] = max(peaks["count"], len(alive))
        peaks["bytes"] = max(peaks["bytes"], sum(g.numel() * g.element_size() for g in alive))

    for p in params:
        p.register_post_accumulate_grad_hook(probe)
    handle = adoptim.enable_gradient_release(model, opt) if release else None
    for _ in range(2):
        refs.clear()
        model(torch.randn(32, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    largest = max(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    if release:
        assert peaks == {"count": 1, "bytes": largest}
        assert all(r() is None for r in refs)
        handle.remove()
    else:
        assert peaks == {"count": len(params), "bytes": total}
    assert largest < total / 2  # the model has several comparable layers


def test_per_element_clip_bounds_released_steps_under_a_gradient_spike():
    """Without global gradient clipping (which release cannot do), a 1e12 gradient spike
    moves no element by more than lr * c_t, c_t = t**0.25 (t: the calls so far): the
    normalised gradient is clipped at c_t, so |m| <= c_t and |delta theta| <= lr * c_t.
    The unclipped ADOPT (clip_lambda=None) jumps by orders of magnitude: the check has
    teeth."""
    lr = 1e-3
    jumps = {}
    for clip in (0.25, None):
        torch.manual_seed(0)
        theta = nn.Parameter(torch.randn(4096))
        opt = ADOPT([theta], lr=lr, clip_lambda=clip, foreach=False, fused=False)
        handle = adoptim.enable_gradient_release([theta], opt)
        worst = 0.0
        for t in range(30):
            scale = 1e12 if t == 20 else 1.0
            before = theta.detach().clone()
            calls = opt.state[theta]["step"].item() if theta in opt.state else 0.0
            (scale * (theta - 1.0) ** 2).sum().mul(0.5).backward()
            opt.step()
            delta = (theta.detach() - before).abs()
            ratio = (delta.max() / (lr * max(calls, 1.0) ** 0.25)).item()
            worst = max(worst, ratio)
            if clip is not None:
                slack = lr * calls**0.25 * 1e-6 + before.abs() * torch.finfo(torch.float32).eps
                assert bool((delta <= lr * calls**0.25 + slack).all()), (t, ratio)
        handle.remove()
        jumps[clip] = worst
    assert jumps[0.25] <= 1.0 + 1e-5
    assert jumps[None] > 1e3, jumps


def test_micro_batch_accumulation_is_refused():
    model, opt, _ = _build(FORLOOP, torch.float32)
    handle = adoptim.enable_gradient_release(model, opt)
    x, y = DATA[0]
    F.mse_loss(model(x[:8], 0), y[:8]).backward()
    with pytest.raises(RuntimeError, match="accumulate gradients over micro-batches"):
        F.mse_loss(model(x[8:], 0), y[8:]).backward()
    handle.remove()
    # Each backward followed by opt.step() or opt.zero_grad() is fine.
    model, opt, _ = _build(FORLOOP, torch.float32)
    handle = adoptim.enable_gradient_release(model, opt)
    for t in range(3):
        F.mse_loss(model(x, t), y).backward()
        (opt.zero_grad if t % 2 else opt.step)()
    handle.remove()


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_is_refused(fused, request):
    if fused:
        request.getfixturevalue("kernel")
    model = nn.Linear(4, 2)
    opt = ADOPT(model.parameters(), lr=1e-2, fused=fused)
    handle = adoptim.enable_gradient_release(model, opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler cannot be used with gradient release"):
        scaler.step(opt)
    assert "found_inf" not in opt.__dict__  # a later backward does not read a stale flag
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    handle.remove()
    assert getattr(opt, "_step_supports_amp_scaling", False) is fused


def test_refusals_name_the_argument():
    model = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="opt must be an adoptim.ADOPT"):
        adoptim.enable_gradient_release(model, torch.optim.Adam(model.parameters()))
    opt = ADOPT([model.weight])
    with pytest.raises(ValueError, match=r"model_or_params\[1\].*none of opt's param groups"):
        adoptim.enable_gradient_release(model, opt)
    model.weight.grad = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="already has a gradient"):
        adoptim.enable_gradient_release([model.weight], opt)
    model.weight.grad = None
    handle = adoptim.enable_gradient_release([model.weight], opt)
    with pytest.raises(RuntimeError, match="already active"):
        adoptim.enable_gradient_release([model.weight], opt)
    handle.remove()
    with pytest.raises(ValueError, match="differentiable"):
        adoptim.enable_gradient_release(model, ADOPT(model.parameters(), differentiable=True))


# --------------------------------------------------------------------------------------------
# Two gloo ranks: DDP refused, FSDP2 released bit for bit (tests/release_worker.py)

_TIMEOUT_S = 240


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _has_fully_shard(), reason="needs gloo and FSDP2's fully_shard")
def test_ddp_refused_and_fsdp2_release_equals_normal_fsdp2(tmp_path, kernel):
    import dist_worker
    from test_distributed import _free_port

    worker = Path(__file__).with_name("release_worker.py")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(worker), "release", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {_TIMEOUT_S}s:\n{out.decode()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out.decode()[-4000:]
    assert (tmp_path / "release.done").exists()
    assert "DistributedDataParallel is not supported" in (tmp_path / "ddp-refusals.txt").read_text()
    # The released FSDP2 runs are bit for bit the normal FSDP2 runs (checked in the worker);
    # the float32 one also reproduces one process on the full batch, within float32
    # rounding. (8-bit shards quantize in other blocks than the full tensor:
    # test_distributed holds 8-bit FSDP2 to a plain tensor per shard instead.)
    got = torch.load(tmp_path / "release-fsdp2-for-loop.pt", weights_only=True)
    for g, e in zip(got, dist_worker.reference_params("for-loop"), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_spike_experiment_runs_and_shows_the_bound(monkeypatch):
    """adoptim.experiments.release_spike (the table in docs/memory.md), small: ADOPT under
    release moves no element by more than lr * c_t on the spike step; without its clip
    it jumps."""
    from adoptim.experiments import release_spike

    monkeypatch.setattr(release_spike, "DIM", 64)
    monkeypatch.setattr(release_spike, "AFTER", 5)
    rows = {r["optimizer"]: r for r in release_spike.measure(16)}
    assert set(rows) == set(release_spike.KINDS)
    assert rows["ADOPT (release)"]["spike step"] <= 2.0 * (1 + 1e-5)  # c_16 = 2
    assert rows["ADOPT, no clip"]["spike step"] > 1e3
