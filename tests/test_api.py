"""The optimizer as a user meets it: constructor, errors, drop-in compatibility, state."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from adoptim import ADOPT, ADOPTW, PowerClip

try:  # the official implementation, for drop-in checks (in the `test` extra)
    from adopt import ADOPT as OfficialADOPT
except Exception:  # noqa: BLE001 - any import failure means "not available here"
    OfficialADOPT = None

needs_official = pytest.mark.skipif(OfficialADOPT is None, reason="torch-adopt not installed")


def make_params(seed=0, shapes=((3, 4), (5,), ())):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def feed(params, gen, skip=()):
    """Give each parameter a fresh random gradient, or None for the indices in ``skip``."""
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen)


def train(opt, params, steps, seed=1, skip=lambda call: ()):
    gen = torch.Generator().manual_seed(seed)
    for call in range(steps):
        feed(params, gen, skip(call))
        opt.step()


# --- construction and errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "learning rate"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "one element"),
        (dict(eps=-1e-6), "eps"),
        (dict(betas=(1.0, 0.9999)), "index 0"),
        (dict(betas=(0.9, 1.0)), "index 1"),
        (dict(betas=(0.9, -0.1)), "index 1"),
        (dict(betas=(0.9,)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(clip_lambda=-0.25), "clip exponent"),
        (dict(clip_lambda=float("nan")), "clip exponent"),
        (dict(foreach=True, differentiable=True), "differentiable"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ADOPT(make_params(), **kwargs)


def test_clip_lambda_of_a_wrong_type_is_refused():
    with pytest.raises(TypeError, match="clip_lambda"):
        ADOPT(make_params(), clip_lambda="t**0.25")


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        ADOPT(emb.parameters()).step()


@needs_official
def test_constructor_accepts_everything_torch_adopt_accepts():
    ours = inspect.signature(ADOPT.__init__).parameters
    theirs = inspect.signature(OfficialADOPT.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, f"torch-adopt argument {name!r} missing"
        assert ours[name].kind == param.kind, name
        if name not in ("self", "params", "clip_lambda"):
            assert ours[name].default == param.default, name
    # Their default clip is a lambda t: t ** 0.25; ours is the same schedule, kept as data.
    assert ours["clip_lambda"].default == PowerClip(0.25)


# --- drop-in for torch-adopt ---------------------------------------------------------------


@needs_official
@pytest.mark.parametrize("decouple", [False, True])
def test_same_trajectory_as_torch_adopt_for_loop(decouple):
    """For tensors that all have gradients on every call, torch-adopt's for-loop path is
    right, and ours must agree with it."""
    ours_p, theirs_p = make_params(), make_params()
    kw = dict(lr=1e-2, weight_decay=0.1, decouple=decouple)
    train(ADOPT(ours_p, **kw), ours_p, 60)
    train(OfficialADOPT(theirs_p, foreach=False, **kw), theirs_p, 60)
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_official
def test_torch_adopt_state_dict_loads_and_training_continues_the_same():
    theirs_p = make_params()
    theirs = OfficialADOPT(theirs_p, lr=1e-2, foreach=False)
    train(theirs, theirs_p, 20)
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in theirs_p]
    ours = ADOPT(ours_p, lr=1e-2)
    ours.load_state_dict(roundtrip(theirs.state_dict()))  # a copy: state_dict() aliases
    assert ours.param_groups[0]["clip_exp"] == 0.25
    train(theirs, theirs_p, 20, seed=2)
    train(ours, ours_p, 20, seed=2)
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_state_dict_is_refused_with_a_pointer_to_the_conversion():
    params = make_params()
    adam = torch.optim.Adam(params)
    train(adam, params, 2)
    with pytest.raises(ValueError, match="from_adam"):
        ADOPT(params).load_state_dict(adam.state_dict())


# --- per-parameter semantics ---------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_a_tensor_that_starts_late_or_pauses_behaves_as_if_alone(foreach):
    """Tensors in one device/dtype bucket each follow their own step count (the official
    foreach path and timm take the first tensor's count for the whole bucket)."""
    shared = make_params()
    # tensor 1 gets no gradient for calls 0-6, tensor 2 none for calls 10-14
    schedule = lambda call: {1} if call < 7 else ({2} if 10 <= call < 15 else set())  # noqa: E731
    train(ADOPT(shared, lr=1e-2, foreach=foreach), shared, 40, skip=schedule)

    for i in range(len(shared)):
        alone = make_params()
        gen = torch.Generator().manual_seed(1)
        opt = ADOPT([alone[i]], lr=1e-2, foreach=foreach)
        for call in range(40):
            feed(alone, gen, schedule(call))  # same random stream as above
            opt.step()
        assert torch.equal(alone[i], shared[i]), f"tensor {i} differs from its solo run"


def test_a_frozen_tensor_keeps_its_step_count():
    params = make_params()
    opt = ADOPT(params)
    train(opt, params, 10, skip=lambda call: {0} if 3 <= call < 8 else ())
    assert opt.state[params[0]]["step"].item() == 5
    assert opt.state[params[1]]["step"].item() == 10


def test_the_first_call_only_records_v():
    (p,) = make_params(shapes=((4,),))
    before = p.detach().clone()
    opt = ADOPT([p], weight_decay=0.5, decouple=True)
    p.grad = torch.tensor([1.0, -2.0, 0.0, 3.0])
    opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(4))
    assert torch.equal(opt.state[p]["exp_avg_sq"], torch.tensor([1.0, 4.0, 0.0, 9.0]))


# --- variants and options ------------------------------------------------------------------


def test_adoptw_is_adopt_with_decoupled_decay():
    a, b = make_params(), make_params()
    train(ADOPTW(a, lr=1e-2), a, 30)
    train(ADOPT(b, lr=1e-2, weight_decay=1e-2, decouple=True), b, 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert ADOPTW(make_params()).param_groups[0]["decouple"] is True


def test_maximize_is_descent_on_the_negated_gradient():
    a, b = make_params(), make_params()
    opt_a, opt_b = ADOPT(a, lr=1e-2, maximize=True), ADOPT(b, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        feed(a, gen)
        for x, y in zip(a, b):
            y.grad = -x.grad
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_parameter_is_its_real_and_imaginary_parts(foreach):
    z = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z, opt_r = ADOPT([z], lr=1e-2, foreach=foreach), ADOPT([r], lr=1e-2, foreach=foreach)
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        z.grad = torch.randn(5, dtype=torch.complex64, generator=gen)
        r.grad = torch.view_as_real(z.grad).clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


def test_step_with_closure_returns_the_loss():
    (p,) = make_params(shapes=((2,),))
    opt = ADOPT([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))


def test_per_group_hyperparameters_and_add_param_group():
    a, b = make_params(shapes=((3,),)), make_params(shapes=((3,),))
    opt = ADOPT([{"params": a, "lr": 0.1}], lr=1e-3, clip_lambda=0.5)
    opt.add_param_group({"params": b, "betas": (0.5, 0.9)})
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["clip_exp"] == 0.5
    assert opt.param_groups[1]["betas"] == (0.5, 0.9)
    train(opt, a + b, 5)


def test_clip_off_lets_large_normalised_gradients_through():
    """With clipping the second call moves theta by at most lr*(1-beta1)*c_1 = lr*0.1."""
    moves = {}
    for clip in (0.25, None):
        (p,) = make_params(shapes=((1,),))
        start = p.item()
        opt = ADOPT([p], lr=1.0, clip_lambda=clip)
        for g in (1e-3, 1.0):  # v = 1e-6, then n = 1000
            p.grad = torch.tensor([g])
            opt.step()
        moves[clip] = abs(p.item() - start)
    assert moves[0.25] == pytest.approx(0.1)
    assert moves[None] == pytest.approx(100.0, rel=1e-3)


# --- state: checkpoints and resume ----------------------------------------------------------


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_from_state_dict_is_bit_for_bit(foreach):
    kw = dict(lr=1e-2, clip_lambda=PowerClip(0.5), weight_decay=0.1, foreach=foreach)
    straight = make_params()
    train(ADOPT(straight, **kw), straight, 30, skip=lambda c: {2} if c < 4 else ())

    first = make_params()
    opt = ADOPT(first, **kw)
    gen = torch.Generator().manual_seed(1)
    for call in range(12):
        feed(first, gen, {2} if call < 4 else ())
        opt.step()
    saved_params = [p.detach().clone() for p in first]
    saved_state = roundtrip(opt.state_dict())
    rng_state = gen.get_state()

    resumed = [torch.nn.Parameter(t) for t in saved_params]
    opt = ADOPT(resumed, foreach=foreach)  # schedule and hyperparameters come from the file
    opt.load_state_dict(saved_state)
    assert opt.param_groups[0]["clip_exp"] == 0.5
    gen.set_state(rng_state)
    for _ in range(12, 30):
        feed(resumed, gen)
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed))


def test_custom_clip_callable_is_not_saved_but_the_state_dict_still_loads():
    params = make_params()
    opt = ADOPT(params, clip_lambda=lambda t: 1.0 + t)
    train(opt, params, 3)
    saved = roundtrip(opt.state_dict())
    assert saved["param_groups"][0]["clip_exp"] is None
    fresh = ADOPT(params, clip_lambda=lambda t: 1.0 + t)
    fresh.load_state_dict(saved)
    train(fresh, params, 2)


def test_adoptw_takes_every_option_of_adopt():
    """ADOPTW is ADOPT with decouple=True: every other keyword of ADOPT, with the same default
    (weight_decay aside: AdamW's 1e-2), reaches the param groups (``seed`` was missing)."""
    import inspect

    from adoptim import ADOPT, ADOPTW

    adopt = inspect.signature(ADOPT.__init__).parameters
    adoptw = inspect.signature(ADOPTW.__init__).parameters
    assert set(adopt) - {"decouple"} == set(adoptw)
    for name, par in adopt.items():
        if name not in ("self", "params", "decouple", "weight_decay"):
            assert adoptw[name].default == par.default, name
    opt = ADOPTW([torch.zeros(3, requires_grad=True)], seed=5)
    assert opt.param_groups[0]["seed"] == 5 and opt.param_groups[0]["decouple"]
