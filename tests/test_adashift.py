"""AdaShift against trajectories worked out by hand from the paper's Algorithm 3."""

from __future__ import annotations

import math

import pytest
import torch

from adoptim.experiments.adashift import AdaShift


def _run(grads, **kw):
    p = torch.zeros(len(grads[0]), dtype=torch.float64, requires_grad=True)
    opt = AdaShift([p], **kw)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().clone())
    return out


def test_scalar_trajectory_n2():
    # n = 2, beta1 = beta2 = 0.5, lr = 0.1, eps = 0; gradients 1, 2, 3, 4, 5
    traj = [x.item() for x in _run([[1.0], [2.0], [3.0], [4.0], [5.0]], lr=0.1,
                                   betas=(0.5, 0.5), n=2, eps=0.0)]
    # t = 1, 2: only fill the window
    assert traj[:2] == [0.0, 0.0]
    # t = 3: m = (3 + .5*2)/1.5 = 8/3; v = .5*g1^2 = .5; v_hat = .5/(1-.5) = 1
    t3 = -0.1 * (8 / 3)
    # t = 4: m = (4 + .5*3)/1.5 = 11/3; v = .25 + .5*4 = 2.25; v_hat = 2.25/.75 = 3
    t4 = t3 - 0.1 * (11 / 3) / math.sqrt(3)
    # t = 5: m = (5 + .5*4)/1.5 = 14/3; v = 1.125 + .5*9 = 5.625; v_hat = 5.625/.875
    t5 = t4 - 0.1 * (14 / 3) / math.sqrt(5.625 / 0.875)
    assert traj[2:] == pytest.approx([t3, t4, t5], rel=1e-12)


def test_spatial_max_uses_one_denominator_per_tensor():
    grads = [[1.0, -3.0], [2.0, 1.0], [0.5, 0.5]]
    # n = 1, beta1 irrelevant (window of 1), beta2 = 0.9, lr = 1
    (x1, x2, x3) = _run(grads, lr=1.0, betas=(0.9, 0.9), n=1, phi="max", eps=0.0)
    assert torch.equal(x1, torch.zeros(2))
    # t = 2: m = g2; v = .1 * max(g1^2) = .9; v_hat = .9/.1 = 9 -> denom 3
    torch.testing.assert_close(x2, -torch.tensor([2.0, 1.0], dtype=torch.float64) / 3)
    # t = 3: m = g3; v = .9*.9 + .1*max(g2^2)= .81 + .4 = 1.21; v_hat = 1.21/.19
    d = math.sqrt(1.21 / 0.19)
    torch.testing.assert_close(x3, x2 - torch.tensor([0.5, 0.5], dtype=torch.float64) / d)
    # element-wise (phi=None): each coordinate has its own v
    (_, y2, _) = _run(grads, lr=1.0, betas=(0.9, 0.9), n=1, phi=None, eps=0.0)
    torch.testing.assert_close(y2, -torch.tensor([2.0 / 1.0, 1.0 / 3.0], dtype=torch.float64))


def test_window_longer_than_history_and_ring_buffer_wraps():
    # n = 3 over 8 steps: compare with a direct computation from the gradient list
    gen = torch.Generator().manual_seed(0)
    gs = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    b1, b2, lr, n = 0.8, 0.7, 0.05, 3
    traj = _run(gs.tolist(), lr=lr, betas=(b1, b2), n=n, phi="max", eps=1e-10)
    theta, v = torch.zeros(3, dtype=torch.float64), 0.0
    w = torch.tensor([b1**i for i in range(n)], dtype=torch.float64)
    for t in range(1, 9):  # t is 1-based; gs[t-1] is g_t
        if t > n:
            m = sum(w[i] * gs[t - 1 - i] for i in range(n)) / w.sum()
            v = b2 * v + (1 - b2) * (gs[t - 1 - n] ** 2).max().item()
            theta = theta - lr * m / (math.sqrt(v / (1 - b2 ** (t - n))) + 1e-10)
        torch.testing.assert_close(traj[t - 1], theta)


def test_converges_on_a_quadratic():
    x = torch.tensor([2.0, -3.0], requires_grad=True)
    opt = AdaShift([x], lr=0.05, n=3, phi=None)
    for _ in range(600):
        opt.zero_grad()
        (x**2).sum().backward()
        opt.step()
    assert x.abs().max() < 0.1


def test_invalid_arguments():
    p = [torch.zeros(1, requires_grad=True)]
    for kw in ({"lr": -1}, {"betas": (1.0, 0.9)}, {"n": 0}, {"phi": "min"}, {"eps": -1}):
        with pytest.raises(ValueError):
            AdaShift(p, **kw)
