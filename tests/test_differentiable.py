"""differentiable=True: autograd runs through one and several ADOPT steps (float64
gradcheck) w.r.t. the parameters, the gradients and hyperparameters given as tensors."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from adoptim import ADOPT

_F64 = {"dtype": torch.float64, "requires_grad": True}


def _unroll(p, grads, lr, beta1, beta2, eps, weight_decay, decouple, maximize=False):
    """Run len(grads) steps from p; return the parameter and both moments."""
    p = p.clone()  # a non-leaf, so the in-place update is recorded by autograd
    opt = ADOPT(
        [p],
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        decouple=decouple,
        maximize=maximize,
        differentiable=True,
    )
    for g in grads:
        p.grad = g
        opt.step()
    state = opt.state[p]
    return p, state["exp_avg"], state["exp_avg_sq"]


def _inputs(seed=0, n=6):
    torch.manual_seed(seed)
    p = torch.randn(n, **_F64)
    grads = [torch.randn(n, **_F64) for _ in range(3)]
    return p, grads


@pytest.mark.parametrize("steps", [1, 2, 3], ids=["1-step", "2-steps", "3-steps"])
@pytest.mark.parametrize(
    ("weight_decay", "decouple", "maximize"),
    [(0.0, False, False), (0.1, False, True), (0.1, True, False)],
    ids=["plain", "l2-maximize", "decoupled"],
)
def test_gradcheck_params_grads_and_tensor_hyperparameters(steps, weight_decay, decouple, maximize):
    p, grads = _inputs()
    lr = torch.tensor(0.1, **_F64)
    beta1 = torch.tensor(0.9, **_F64)
    beta2 = torch.tensor(0.99, **_F64)

    def fn(p, lr, beta1, beta2, *gs):
        return _unroll(p, gs, lr, beta1, beta2, 1e-6, weight_decay, decouple, maximize)

    assert gradcheck(fn, (p, lr, beta1, beta2, *grads[:steps]))


def test_gradcheck_tensor_eps_and_weight_decay():
    # eps large enough that the floor max(sqrt(v), eps) is active on some coordinates.
    p, grads = _inputs(seed=1)
    eps = torch.tensor(0.5, **_F64)
    wd = torch.tensor(0.1, **_F64)
    lr = torch.tensor(0.1, **_F64)

    def coupled(p, lr, eps, wd, *gs):
        return _unroll(p, gs, lr, 0.9, 0.99, eps, wd, False)

    def decoupled(p, lr, eps, wd, *gs):
        return _unroll(p, gs, lr, 0.9, 0.99, eps, wd, True)

    assert gradcheck(coupled, (p, lr, eps, wd, *grads))
    assert gradcheck(decoupled, (p, lr, eps, wd, *grads))


def test_hypergradient_of_lr_is_nonzero_and_matches_finite_difference():
    # A meta-learning use: d(loss after 3 steps)/d(lr), against a central difference.
    p0, grads = _inputs(seed=2)
    p0 = p0.detach()
    grads = [g.detach() for g in grads]

    def final_loss(lr):
        p, _, _ = _unroll(p0, grads, lr, 0.9, 0.99, 1e-6, 0.0, False)
        return (p**2).sum()

    lr = torch.tensor(0.05, **_F64)
    (hyper,) = torch.autograd.grad(final_loss(lr), lr)
    h = 1e-6
    with torch.no_grad():
        fd = (final_loss(lr + h) - final_loss(lr - h)) / (2 * h)
    assert hyper.abs() > 1e-6
    torch.testing.assert_close(hyper, fd, rtol=1e-6, atol=1e-9)


def test_not_differentiable_by_default():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    ADOPT([p]).step()
    p.grad = torch.randn(3)
    ADOPT([p]).step()
    assert p.grad_fn is None  # the default step runs without recording autograd history
