"""torch.optim's contract, item by item, on every path: what torch.optim.Adam accepts and does,
ADOPT accepts and does too (issue 10, items 1-9).

Each test compares a path with itself under another spelling of the same input (a step stored
as a number, an lr of another shape, a float lr under torch.compile), or with the float64
reference for the new options (nesterov, caution).
"""

from __future__ import annotations

import copy

import pytest
import torch
from integration_paths import fused_unavailable_reason
from reference import Hyper, ReferenceADOPT, as_real

from adoptim import ADOPT, ADOPTW

# Every path a step can take on CPU, by the flags that select it.
PATHS = {
    "for-loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "for-loop capturable": dict(foreach=False, capturable=True),
    "foreach capturable": dict(foreach=True, capturable=True),
    "differentiable": dict(foreach=False, differentiable=True),
    "fused": dict(fused=True),
}


def need(path: str) -> dict:
    if path == "fused":
        reason = fused_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return PATHS[path]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Gradients are set by hand: no requires_grad, which differentiable mode would refuse on
    # leaf tensors updated in place.
    return [torch.randn(10, generator=gen), torch.randn(3, 4, generator=gen)]


def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)


# --- 1. a `step` stored as a number -------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("as_number", [float, int])
def test_step_stored_as_a_number_loads_and_continues(path, as_number):
    kw = need(path)
    params = make_params()
    opt = ADOPT(params, lr=1e-2, **kw)
    train(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():  # as older code and other tools write it
        entry["step"] = as_number(entry["step"].item())

    expected = [p.detach().clone() for p in params]
    ref = ADOPT(expected, lr=1e-2, **kw)
    ref.load_state_dict(opt.state_dict())
    train(ref, expected, 4, seed=2)

    resumed = [p.detach().clone() for p in params]
    new = ADOPT(resumed, lr=1e-2, **kw)
    new.load_state_dict(sd)
    for p in resumed:
        step = new.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0
        assert step.device == (p.device if kw.get("capturable") else torch.device("cpu"))
    train(new, resumed, 4, seed=2)
    assert_same(resumed, expected)
    assert [new.state[p]["step"].item() for p in resumed] == [7.0, 7.0]


# --- 2. a one-element tensor lr (and tensor betas) of any shape -----------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "[1]", "[1,1]"])
def test_one_element_tensor_lr_of_any_shape_gives_the_float_trajectory(path, shape):
    kw = need(path)
    expected = make_params()
    train(ADOPT(expected, lr=3e-2, weight_decay=0.1, **kw), expected, 6)
    params = make_params()
    lr = torch.full(shape, 3e-2, dtype=torch.float64)
    train(ADOPT(params, lr=lr, weight_decay=0.1, **kw), params, 6)
    assert_same(params, expected)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "[1]"])
def test_tensor_betas_give_the_float_trajectory(path, shape):
    kw = need(path)
    expected = make_params()
    train(ADOPT(expected, lr=1e-2, betas=(0.8, 0.99), **kw), expected, 6)
    params = make_params()
    betas = (torch.full(shape, 0.8), torch.full(shape, 0.99))
    train(ADOPT(params, lr=1e-2, betas=betas, **kw), params, 6)
    assert_same(params, expected)


# --- 3. torch.compile(opt.step) with a float lr and a scheduler ------------------------------

COMPILE_PATHS = {
    "default": {},
    "for-loop": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),  # under compile it takes the for-loop path (documented)
}


@pytest.mark.parametrize("path", list(COMPILE_PATHS))
@pytest.mark.parametrize(
    "options", [{}, dict(weight_decay=0.1, decouple=True, nesterov=True, caution=True)],
    ids=["plain", "decay+nesterov+caution"],
)
@pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5),
    reason="torch 2.4's dynamo recompiles the optimizer step once more (guard on the empty "
    "state: RecompileError on torch 2.4.1)",
)
def test_compiled_step_with_float_lr_and_scheduler_never_recompiles(path, options, recwarn):
    import torch._dynamo

    if path == "fused" and fused_unavailable_reason() is not None:
        pytest.skip(fused_unavailable_reason())
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = ADOPT(model.parameters(), lr=0.01, **COMPILE_PATHS[path], **options)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    step = torch.compile(opt.step)
    x = torch.randn(8, 6)
    eager = copy.deepcopy(model)
    eager_opt = ADOPT(eager.parameters(), lr=0.01, foreach=False, **options)
    eager_sched = torch.optim.lr_scheduler.ExponentialLR(eager_opt, 0.9)
    try:
        for i in range(7):
            # Warm-up: the first call compiles, the second (a new lr) may make lr dynamic.
            torch._dynamo.config.error_on_recompile = i >= 2
            for m, o, s, run in ((model, opt, sched, step), (eager, eager_opt, eager_sched, None)):
                m(x).pow(2).sum().backward()
                (run or o.step)()
                o.zero_grad()
                s.step()
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert_same(list(model.parameters()), list(eager.parameters()))
    assert not [w for w in recwarn if "adoptim" in str(w.filename) or "Dynamo" in str(w.message)]


# --- 4. a state dict from another model ------------------------------------------------------


@pytest.mark.parametrize("path", ["for-loop", "fused"])
def test_state_dict_of_other_shapes_is_refused_naming_the_parameter(path):
    kw = need(path)
    other = [torch.randn(10), torch.randn(4, 3)]
    src = ADOPT(other, **kw)
    train(src, other, 2)
    params = make_params()
    opt = ADOPT(params, **kw)
    with pytest.raises(ValueError, match=r"group 0, parameter 1 has shape \(3, 4\).*\(4, 3\)"):
        opt.load_state_dict(src.state_dict())
    assert not opt.state  # nothing half-loaded


# --- 5. a custom clip schedule ---------------------------------------------------------------


def affine_clip(t):
    return 0.5 + 0.25 * t


def test_custom_clip_checkpoint_is_refused_without_the_callable_and_loads_with_it():
    params = make_params()
    opt = ADOPT(params, clip_lambda=affine_clip)
    train(opt, params, 3)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["clip_custom"].endswith("affine_clip")
    with pytest.raises(ValueError, match=r"custom clip schedule.*affine_clip.*unclipped"):
        ADOPT(make_params()).load_state_dict(sd)
    with pytest.raises(ValueError, match="custom clip schedule"):
        ADOPT(make_params(), clip_lambda=None).load_state_dict(sd)
    same = make_params()
    restored = ADOPT(same, clip_lambda=affine_clip)
    restored.load_state_dict(sd)  # the same callable again: fine
    assert restored.param_groups[0]["clip_custom"] == sd["param_groups"][0]["clip_custom"]
    # A power-law schedule is data and loads anywhere.
    plain = ADOPT(make_params(), clip_lambda=0.5)
    train(plain, plain.param_groups[0]["params"], 2)
    ADOPT(make_params()).load_state_dict(plain.state_dict())


# --- 6, 7. messages ----------------------------------------------------------------------


def test_betas_that_are_not_a_pair_name_the_argument():
    with pytest.raises(TypeError, match=r"Invalid betas: expected a pair \(beta1, beta2\)"):
        ADOPT(make_params(), betas=0.9)
    with pytest.raises(TypeError, match="betas"):
        ADOPT(make_params(), betas="0.9")


def test_multi_element_tensor_lr_reads_like_torch():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element") as info:
        ADOPT(make_params(), lr=torch.tensor([1e-3, 1e-3]))
    assert "shape (2,)" in str(info.value)  # and says what it got
    with pytest.raises(ValueError, match="Tensor beta1 must be 1-element"):
        ADOPT(make_params(), betas=(torch.tensor([0.9, 0.9]), 0.999))


# --- 8, 9. nesterov and caution against the float64 reference --------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "options",
    [
        dict(nesterov=True),
        dict(caution=True),
        dict(nesterov=True, caution=True, weight_decay=0.1),
        dict(caution=True, weight_decay=0.05, decouple=True, maximize=True),
    ],
    ids=["nesterov", "caution", "both+coupled", "caution+decoupled+maximize"],
)
def test_nesterov_and_caution_match_the_float64_reference(path, options):
    kw = need(path)
    gen = torch.Generator().manual_seed(4)
    params = [
        torch.randn(6, 5, dtype=torch.float64, generator=gen),
        torch.randn(7, dtype=torch.complex128, generator=gen),
        torch.randn((), dtype=torch.float64, generator=gen),
    ]
    hyper = Hyper(lr=0.05, **options)
    ref = ReferenceADOPT(params, [hyper] * len(params))
    opt = ADOPT(params, lr=0.05, **options, **kw)
    for call in range(25):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        grads[1] = grads[1] if call >= 3 else None  # starts late
        grads[2] = None if call % 4 == 1 else grads[2]  # frozen now and then
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(grads)
    for p, theta in zip(params, ref.theta):
        torch.testing.assert_close(as_real(p.detach()), theta, rtol=1e-10, atol=1e-12)


def test_nesterov_and_caution_change_the_step_and_are_saved():
    base = make_params()
    train(ADOPT(base, lr=1e-2), base, 5)
    for option in ("nesterov", "caution"):
        params = make_params()
        opt = ADOPTW(params, lr=1e-2, **{option: True})
        train(opt, params, 5)
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(params, base)), option
        sd = opt.state_dict()
        assert sd["param_groups"][0][option] is True
        fresh = ADOPTW(make_params())
        fresh.load_state_dict(sd)
        assert fresh.param_groups[0][option] is True


def test_caution_drops_the_coordinates_that_disagree_with_the_gradient():
    # Second call: m = 0.1 * n with n = clip(g / |g_prev|, 1) = sign agreement with g_prev.
    p = torch.zeros(4)
    opt = ADOPT([p], lr=1.0, caution=True)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    opt.step()  # v = g*g
    p.grad = torch.tensor([1.0, -1.0, 2.0, -3.0])
    opt.step()  # u = m = 0.1 * clip(g, 1): signs agree with g everywhere
    m = opt.state[p]["exp_avg"].clone()
    before = p.detach().clone()
    # small enough that m keeps its sign: m disagrees with g on coordinates 1 and 2
    p.grad = torch.tensor([0.1, 0.1, -0.1, -0.1])
    opt.step()
    m_new = opt.state[p]["exp_avg"]
    mask = (m_new * p.grad) > 0
    assert mask.tolist() == [True, False, False, True]
    u = m_new * mask / 0.5  # half the coordinates kept
    torch.testing.assert_close(before - p.detach(), u)
    assert m.ne(m_new).any()  # the stored m is the unmasked EMA
