"""Checkpoints: state_dict()/load_state_dict() across paths and devices, torch.save/torch.load
(weights_only=True), deepcopy and pickling; resuming reproduces the uninterrupted trajectory;
Adam state dicts are refused, and ADOPT.from_adam converts an Adam optimizer."""

from __future__ import annotations

import copy
import functools
import io
import itertools
import pickle

import pytest
import torch
from integration_paths import batches, make_model, require_path

from adoptim import ADOPT, ADOPTW

# Every flag explicit, so that switching an optimizer's groups to a path really selects it.
_PATH_KW = {
    "for-loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "default": {"foreach": None, "fused": None},
    "fused": {"foreach": None, "fused": True},
}
_STEPS, _SPLIT = 6, 3


def _train(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _make(path, cls=ADOPTW, lr=1e-2):
    model = make_model()
    opt = cls(model.parameters(), lr=lr, weight_decay=0.05, **_PATH_KW[path])
    return model, opt


def _state_tensors(opt, model):
    return [opt.state[p][k] for p in model.parameters() for k in ("step", "exp_avg", "exp_avg_sq")]


def _roundtrip(obj, map_location=None):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, map_location=map_location)


@pytest.mark.parametrize(
    ("save_path", "load_path"),
    [pytest.param(a, b, id=f"{a}->{b}") for a, b in itertools.product(_PATH_KW, repeat=2)],
)
def test_resume_across_paths_reproduces_uninterrupted_run(save_path, load_path):
    require_path(save_path)
    require_path(load_path)
    data = batches(_STEPS)

    # Uninterrupted: one optimizer; after _SPLIT steps it switches to the loading path.
    model, opt = _make(save_path)
    _train(model, opt, data[:_SPLIT])
    for group in opt.param_groups:
        group.update(_PATH_KW[load_path])
    _train(model, opt, data[_SPLIT:])

    # Interrupted: save after _SPLIT steps, load into a fresh optimizer of the other path.
    model_a, opt_a = _make(save_path)
    _train(model_a, opt_a, data[:_SPLIT])
    ckpt = _roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, "cpu")
    model_b, opt_b = _make(load_path)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    # The loading optimizer keeps its own path (the checkpoint's flags do not override it).
    for flag, value in _PATH_KW[load_path].items():
        assert opt_b.param_groups[0][flag] == value
    _train(model_b, opt_b, data[_SPLIT:])

    for a, b in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(_state_tensors(opt, model), _state_tensors(opt_b, model_b)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert float(opt_b.state[next(model_b.parameters())]["step"]) == _STEPS


def test_resume_with_scheduler_and_tensor_lr():
    data = batches(_STEPS)

    def fresh():
        model = make_model()
        opt = ADOPT(model.parameters(), lr=torch.tensor(2e-2), foreach=True)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=_STEPS)

    model, opt, sched = fresh()
    _train(model, opt, data, sched)

    model_a, opt_a, sched_a = fresh()
    _train(model_a, opt_a, data[:_SPLIT], sched_a)
    ckpt = _roundtrip(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}
    )
    model_b, opt_b, sched_b = fresh()
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    _train(model_b, opt_b, data[_SPLIT:], sched_b)
    for a, b in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor)


def test_state_dict_keys_and_step_location():
    model, opt = _make("for-loop")
    _train(model, opt, batches(2))
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert {"lr", "betas", "eps", "clip_exp", "weight_decay", "decouple"} <= set(group)
    assert "amsgrad" not in group
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    # step stays on the host unless capturable (reading it costs no device sync).
    assert sd["state"][0]["step"].device.type == "cpu"
    # A capturable optimizer that loads it gets step on the parameter's device.
    model_c = make_model()
    opt_c = ADOPTW(model_c.parameters(), capturable=True)
    opt_c.load_state_dict(_roundtrip(sd))
    assert opt_c.param_groups[0]["capturable"] is True
    assert opt_c.state[next(model_c.parameters())]["step"].device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_checkpoint_loads_on_cpu_and_back():
    data = batches(_STEPS)
    model, opt = _make("foreach")
    model.cuda()
    opt = ADOPTW(model.parameters(), lr=1e-2, weight_decay=0.05, foreach=True, capturable=True)
    _train(model, opt, [(x.cuda(), y.cuda()) for x, y in data[:_SPLIT]])
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()}, "cpu")
    model_b, opt_b = _make("for-loop")
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    state = opt_b.state[next(model_b.parameters())]
    assert state["exp_avg"].device.type == "cpu" and state["step"].device.type == "cpu"
    _train(model_b, opt_b, data[_SPLIT:])
    assert float(state["step"]) == _STEPS


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_identically(how):
    data = batches(_STEPS)
    model, opt = _make("foreach")
    _train(model, opt, data[:_SPLIT])
    if how == "deepcopy":
        model_c, opt_c = copy.deepcopy((model, opt))
    else:
        model_c, opt_c = pickle.loads(pickle.dumps((model, opt)))
    # The copy is independent and tied to the copied parameters.
    assert next(model_c.parameters()) is opt_c.param_groups[0]["params"][0]
    assert opt_c.clip_lambda is None and opt_c.param_groups[0]["clip_exp"] == 0.25
    _train(model, opt, data[_SPLIT:])
    _train(model_c, opt_c, data[_SPLIT:])
    for a, b in zip(model.parameters(), model_c.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# Param groups as lists of (dtype, shape[, _NO_GRAD]); _NO_GRAD: never has a gradient, so it
# has no state. Full-precision parameters come before, between and after low-precision ones.
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
_NO_GRAD = "no grad"
_MIXED_GROUPS = {
    "f32 first": [[(_F32, (3,)), (_BF16, (5, 2)), (_F32, (7,)), (_F16, (4,))]],
    "same shapes": [[(_F32, (4,)), (_F16, (4,)), (_F64, (4,)), (_BF16, (4,)), (_F32, (4,))]],
    "low last": [[(_F64, (2, 3)), (_F32, (6,)), (_BF16, (3, 2)), (_F16, (6,))]],
    "no-grad before low": [
        [(_F32, (2,), _NO_GRAD), (_BF16, (3,)), (_F16, (2,), _NO_GRAD), (_F32, (5,)), (_BF16, (2,))]
    ],
    "two groups": [
        [(_F32, (3,)), (_F32, (2, 2))],
        [(_F16, (3,)), (_F32, (5,)), (_BF16, (2, 2)), (_F64, (1,))],
    ],
}


def _mixed_optimizer(groups, state_dtype, seed):
    """ADOPT over fresh parameters laid out as ``groups``; returns (optimizer, [(param,
    spec)] in order)."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        [torch.randn(spec[1], generator=gen).to(spec[0]).requires_grad_() for spec in group]
        for group in groups
    ]
    opt = ADOPT(
        [{"params": ps} for ps in params],
        lr=1e-2,
        state_dtype=state_dtype,
        foreach=False,
        fused=False,
    )
    return opt, [(p, spec) for ps, group in zip(params, groups) for p, spec in zip(ps, group)]


def _set_grads(flat, make):
    for p, spec in flat:
        p.grad = None if _NO_GRAD in spec else make(p)


@pytest.mark.parametrize("state_dtype", ["auto", "float32"])
@pytest.mark.parametrize("layout", list(_MIXED_GROUPS))
def test_load_restores_each_parameters_own_float32_state_in_mixed_groups(layout, state_dtype):
    """torch's load_state_dict casts the moments to the parameter's dtype; the float32
    moments of bfloat16/float16 parameters are then taken again from the saved tensors. Each
    parameter must get its own (shape and values), whatever the order of full- and
    low-precision parameters, and of parameters without state, around it."""
    groups = _MIXED_GROUPS[layout]
    opt, flat = _mixed_optimizer(groups, state_dtype, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        _set_grads(flat, lambda p: torch.randn(p.shape, generator=gen).to(p.dtype))
        opt.step()
    ckpt = _roundtrip(opt.state_dict())

    opt_b, flat_b = _mixed_optimizer(groups, state_dtype, seed=2)
    opt_b.load_state_dict(ckpt)
    for (p, spec), (q, _) in zip(flat, flat_b):
        if _NO_GRAD in spec:
            assert len(opt_b.state.get(q, {})) == 0, spec
            continue
        low = p.dtype in (torch.bfloat16, torch.float16)
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = opt_b.state[q][key], opt.state[p][key]
            assert got.dtype == (torch.float32 if low else p.dtype), (key, spec)
            assert got.shape == p.shape, (key, spec)
            assert torch.equal(got, want), (key, spec)
        assert float(opt_b.state[q]["step"]) == 3

    # Both continue alike: with no weight decay the moments do not depend on theta.
    _set_grads(flat, torch.ones_like)
    _set_grads(flat_b, torch.ones_like)
    opt.step()
    opt_b.step()
    for (p, spec), (q, _) in zip(flat, flat_b):
        if _NO_GRAD not in spec:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_b.state[q][key], opt.state[p][key]), (key, spec)


def test_adam_state_dict_is_refused_with_a_clear_message():
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, batches(1))
    opt = ADOPT(model.parameters())
    with pytest.raises(ValueError, match=r"torch\.optim\.Adam.*from_adam"):
        opt.load_state_dict(adam.state_dict())
    assert len(opt.state) == 0


def _trained_adam(cls=torch.optim.AdamW, steps=20, **kw):
    model = make_model()
    adam = cls(model.parameters(), lr=1e-2, betas=(0.9, 0.999), **kw)
    _train(model, adam, batches(steps, seed=5))
    return model, adam


def test_from_adam_converts_state_as_documented():
    model, adam = _trained_adam(weight_decay=0.01)
    opt = ADOPT.from_adam(adam)
    group = opt.param_groups[0]
    # Adam's betas (0.9, 0.999) are not carried over: ADOPT's defaults, as the README advises
    assert group["lr"] == 1e-2 and group["betas"] == (0.9, 0.9999)
    assert group["weight_decay"] == 0.01 and group["decouple"] is True  # AdamW: decoupled
    assert group["eps"] == 1e-6  # Adam's eps (added, 1e-8) is not ADOPT's (a floor)
    for p in model.parameters():
        old, new = adam.state[p], opt.state[p]
        t = float(old["step"])
        assert float(new["step"]) == t == 20
        v = old["exp_avg_sq"] / (1 - 0.999**t)
        torch.testing.assert_close(new["exp_avg_sq"], v)
        m = (old["exp_avg"] / v.sqrt().clamp(min=1e-6)).clamp(-(t**0.25), t**0.25)
        torch.testing.assert_close(new["exp_avg"], m)
        assert new["exp_avg"].abs().max() > 0
    # The Adam optimizer is left as it was.
    assert float(adam.state[next(model.parameters())]["step"]) == 20


def test_from_adam_continues_v_at_adopts_beta2():
    """v is bias-corrected with Adam's beta2 (which produced it) and then averaged on with
    ADOPT's 0.9999 (the README's advice), unless betas= says otherwise."""
    x, y = batches(1, seed=9)[0]
    for kw, beta2 in (({}, 0.9999), ({"betas": (0.9, 0.999)}, 0.999)):
        model, adam = _trained_adam()
        opt = ADOPT.from_adam(adam, **kw)
        assert opt.param_groups[0]["betas"][1] == beta2
        v0 = {p: opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()}
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = {p: p.grad.clone() for p in model.parameters()}
        opt.step()
        for p in model.parameters():
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"],
                                       beta2 * v0[p] + (1 - beta2) * grads[p] ** 2)


def test_from_adam_first_step_continues_at_adams_pace():
    """The first ADOPT update after conversion is about the size of the Adam update it
    replaces; with exp_avg='zero' it is much smaller (momentum restarts)."""
    x, y = batches(1, seed=9)[0]

    def update_norm(opt_factory):
        model, adam = _trained_adam()
        opt = opt_factory(adam)
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, [(x, y)])
        return sum((p.detach() - b).norm() ** 2 for p, b in zip(model.parameters(), before)) ** 0.5

    adam_step = update_norm(lambda adam: adam)
    normalized = update_norm(lambda adam: ADOPT.from_adam(adam))
    zero = update_norm(lambda adam: ADOPT.from_adam(adam, exp_avg="zero"))
    assert 0.5 < normalized / adam_step < 2.0
    assert zero < 0.5 * normalized


def test_from_adam_options_overrides_and_errors():
    model, adam = _trained_adam(torch.optim.Adam, weight_decay=0.1)
    opt = ADOPT.from_adam(adam, lr=3e-3, foreach=True)
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["foreach"] is True
    assert opt.param_groups[0]["decouple"] is False  # Adam: coupled (L2) decay
    w = ADOPTW.from_adam(adam)
    assert isinstance(w, ADOPTW) and w.param_groups[0]["decouple"] is True
    # A state dict from the converted optimizer is an ADOPT one and round-trips.
    fresh = ADOPT(model.parameters())
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    _train(model, fresh, batches(2))
    assert float(fresh.state[next(model.parameters())]["step"]) == 22
    with pytest.raises(TypeError, match="Adam or AdamW"):
        ADOPT.from_adam(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="exp_avg"):
        ADOPT.from_adam(adam, exp_avg="copy")


def test_from_adam_without_state_starts_fresh():
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    opt = ADOPT.from_adam(adam)
    assert len(opt.state) == 0
    _train(model, opt, batches(1))
    assert float(opt.state[next(model.parameters())]["step"]) == 1


def test_deepcopy_and_pickle_keep_a_custom_clip_schedule():
    model = make_model()
    clip = functools.partial(pow, exp=1 / 3)  # picklable, unlike a lambda
    opt = ADOPT(model.parameters(), clip_lambda=clip)
    _train(model, opt, batches(2))
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.clip_lambda is not None and copied.clip_lambda(8.0) == 2.0
        assert copied.param_groups[0]["clip_exp"] is None


def test_from_adam_copies_a_tensor_lr():
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2))
    _train(model, adam, batches(1))
    opt = ADOPT.from_adam(adam)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    _train(model, opt, batches(1), sched)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(5e-3)
    assert float(adam.param_groups[0]["lr"]) == pytest.approx(
        1e-2
    )  # Adam's lr tensor is not shared
