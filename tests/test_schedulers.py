"""Every scheduler in torch.optim.lr_scheduler drives ADOPT and ADOPTW, with a float or a
tensor lr, exactly as it drives torch.optim.Adam, and the optimizer follows the values it
sets (lr, and beta1 for the schedulers that cycle momentum)."""

from __future__ import annotations

import inspect

import pytest
import torch
from integration_paths import make_model, set_random_grads
from torch.optim import lr_scheduler as L

from adoptim import ADOPT, ADOPTW

STEPS = 8


def _sequential(opt):
    return L.SequentialLR(
        opt, [L.ConstantLR(opt, factor=0.5, total_iters=2), L.ExponentialLR(opt, 0.9)], [3]
    )


def _chained(opt):
    return L.ChainedScheduler(
        [L.ConstantLR(opt, factor=0.5, total_iters=3), L.ExponentialLR(opt, 0.9)]
    )


#: One factory per scheduler class; the test below checks that none is missing.
FACTORIES = {
    "LambdaLR": lambda o: L.LambdaLR(o, lambda e: 1.0 / (e + 1)),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.25, total_iters=3),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.1, total_iters=4),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.8),
    "SequentialLR": _sequential,
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=5, eta_min=1e-4),
    "ChainedScheduler": _chained,
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=2e-2, step_size_up=3),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=5e-2, total_steps=STEPS + 1),
}


def test_every_torch_scheduler_is_covered():
    found = {
        name
        for name, obj in vars(L).items()
        if inspect.isclass(obj)
        and not name.startswith("_")
        and name != "LRScheduler"
        and (issubclass(obj, L.LRScheduler) or obj is L.ReduceLROnPlateau)
    }
    assert found - set(FACTORIES) == set(), "add a factory for the new scheduler(s)"


def _scheduled_run(cls, make_sched, lr):
    """Train STEPS steps under the scheduler; return the model and the (lr, beta1) used."""
    model = make_model()
    opt = cls(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.05)
    sched = make_sched(opt)
    g = torch.Generator().manual_seed(0)
    used = []
    for i in range(STEPS):
        set_random_grads(model.parameters(), g)
        group = opt.param_groups[0]
        used.append((float(group["lr"]), float(group["betas"][0])))
        opt.step()
        if isinstance(sched, L.ReduceLROnPlateau):
            sched.step(1.0 + (i % 2))  # a loss that stops improving
        else:
            sched.step()
    return model, opt, used


def _replayed_run(cls, used):
    """The same training with lr and beta1 set by hand to the values the scheduler used."""
    model = make_model()
    opt = cls(model.parameters(), lr=used[0][0], betas=(0.9, 0.999), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for lr, beta1 in used:
        set_random_grads(model.parameters(), g)
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["betas"] = (beta1, 0.999)
        opt.step()
    return model


def _adam_schedule(make_sched, lr):
    """The (lr, beta1) sequence the scheduler gives torch.optim.Adam, and whether Adam's lr
    is still a tensor at the end (torch < 2.5's ReduceLROnPlateau writes floats)."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = make_sched(opt)
    out = []
    for i in range(STEPS):
        out.append((float(opt.param_groups[0]["lr"]), float(opt.param_groups[0]["betas"][0])))
        opt.step()
        if isinstance(sched, L.ReduceLROnPlateau):
            sched.step(1.0 + (i % 2))
        else:
            sched.step()
    return out, isinstance(opt.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("cls", [ADOPT, ADOPTW])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_scheduler_drives_adopt_like_adam(name, cls, tensor_lr):
    make_sched = FACTORIES[name]
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    model, opt, used = _scheduled_run(cls, make_sched, lr)
    # The scheduler produces the same lr (and beta1) sequence for ADOPT as for Adam ...
    expected, adam_keeps_tensor = _adam_schedule(
        make_sched, torch.tensor(1e-2) if tensor_lr else 1e-2
    )
    torch.testing.assert_close(torch.tensor(used), torch.tensor(expected), rtol=1e-6, atol=0)
    assert len({lr for lr, _ in used}) > 1, "the schedule should change lr"
    if tensor_lr:  # ... keeps a tensor lr a tensor where it does so for Adam (no recompiles
        # under torch.compile; every scheduler on torch >= 2.5) ...
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == adam_keeps_tensor
        if name != "ReduceLROnPlateau":
            assert adam_keeps_tensor
    # ... and ADOPT really uses the scheduled values.
    replay = _replayed_run(cls, used)
    for p, q in zip(model.parameters(), replay.parameters()):
        if tensor_lr:  # the lr tensor is float32; the replay uses Python floats
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [ADOPT, ADOPTW])
def test_one_cycle_cycles_beta1(cls):
    model, opt, used = _scheduled_run(cls, FACTORIES["OneCycleLR"], 1e-2)
    beta1s = [b for _, b in used]
    # Momentum runs opposite to lr: from max (0.95) down towards base (0.85) and back.
    assert beta1s[0] == pytest.approx(0.95)
    assert min(beta1s) < 0.86 and beta1s[-1] > min(beta1s)
    # beta2 is left alone.
    assert opt.param_groups[0]["betas"][1] == 0.999
    # Replaying with beta1 frozen at 0.9 gives a different trajectory: beta1 is used.
    frozen = _replayed_run(cls, [(lr, 0.9) for lr, _ in used])
    assert not torch.equal(next(model.parameters()), next(frozen.parameters()))
