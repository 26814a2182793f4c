"""torch.compile (for-loop, foreach and default paths): ADOPT's step traces as one graph with no breaks (as torch.optim.Adam's does),
does not recompile from step to step (the first step included, and with a scheduler changing a
tensor lr), and compiled steps follow the eager trajectory."""

from __future__ import annotations

import functools

import pytest
import torch
from integration_paths import batches, make_model, path_params, set_random_grads
from torch._dynamo.testing import CompileCounter

from adoptim import ADOPT, ADOPTW

old_dynamo = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5),
    reason="torch 2.4's dynamo recompiles the optimizer step once more (guard on the empty "
    "state: RecompileError on torch 2.4.1)",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _explain_two_steps(opt, params) -> list:
    """explain() on the first call (state creation, v = g*g only) and on the second."""
    g = torch.Generator().manual_seed(0)
    reports = []
    for _ in range(2):
        set_random_grads(params, g)
        reports.append(torch._dynamo.explain(opt.step)())
    return reports


@functools.cache
def _adam_counts() -> list[tuple[int, int]]:
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    reports = _explain_two_steps(adam, list(model.parameters()))
    torch._dynamo.reset()
    return [(r.graph_count, r.graph_break_count) for r in reports]


_EXTRAS = {
    "plain": {},
    "tensor-lr": {"lr": torch.tensor(1e-2)},
    "capturable": {"capturable": True},
    "decay-maximize": {"weight_decay": 0.1, "decouple": True, "maximize": True},
    "no-clip-l2": {"clip_lambda": None, "weight_decay": 0.1},
}
# Every path with plain and tensor lr; the option variants on the for-loop and foreach paths.
_EXPLAIN_CASES = [
    pytest.param(path, kw, extra, id=f"{path}-{extra}")
    for path, kw in (p.values for p in path_params(include_fused=False))
    for extra in _EXTRAS
    if path != "default" or extra in ("plain", "tensor-lr")
]


@pytest.mark.parametrize(("path", "kw", "extra"), _EXPLAIN_CASES)
def test_explain_one_graph_no_breaks_like_adam(path, kw, extra):
    # What torch.optim.Adam reports on torch 2.13: one graph, no breaks, on both calls.
    assert _adam_counts() == [(1, 0), (1, 0)]

    model = make_model()
    opt = ADOPT(model.parameters(), **{"lr": 1e-2, **kw, **_EXTRAS[extra]})
    ours = _explain_two_steps(opt, list(model.parameters()))
    for report in ours:
        assert report.graph_break_count == 0, [str(b.reason) for b in report.break_reasons]
        assert report.graph_count == 1
    # explain() ran the traced step twice: the update really happened.
    assert all(float(opt.state[p]["step"]) == 2 for p in model.parameters())


def _count_compiles(cls, path_kw, lr, steps=5, scheduler=True):
    model = make_model()
    opt = cls(model.parameters(), lr=lr, **path_kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7) if scheduler else None
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        set_random_grads(model.parameters(), g)
        step()
        if sched is not None:
            sched.step()
    return counter.frame_count


@old_dynamo
@pytest.mark.parametrize("cls", [ADOPT, ADOPTW])
@pytest.mark.parametrize(("path", "kw"), path_params(include_fused=False))
def test_no_recompile_across_steps_with_tensor_lr_scheduler(path, kw, cls):
    # One compiled frame for five steps: the first call (state creation, v only) and the
    # later ones share it, and a scheduler writing a tensor lr does not invalidate it.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert _count_compiles(cls, kw, torch.tensor(1e-2)) == 1
        torch._dynamo.reset()
        assert _count_compiles(cls, kw, 1e-2, scheduler=False) == 1


def test_float_lr_scheduler_recompiles_like_adam():
    # A Python-float lr is a constant to dynamo: when a scheduler changes it, Adam recompiles
    # (once, then the value is treated as dynamic), and so does ADOPT. Use a tensor lr.
    adam = _count_compiles(torch.optim.Adam, {}, 1e-2)
    torch._dynamo.reset()
    ours = _count_compiles(ADOPT, {"foreach": False}, 1e-2)
    assert adam > 1
    assert ours == adam


def _trajectory(path_kw, compiled, backend="inductor", steps=4):
    model = make_model()
    opt = ADOPTW(model.parameters(), lr=torch.tensor(2e-2), weight_decay=0.1, **path_kw)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    step = torch.compile(opt.step, backend=backend) if compiled else opt.step
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        set_random_grads(model.parameters(), g)
        step()
        sched.step()
    return [p.detach() for p in model.parameters()] + [
        opt.state[p][k] for p in model.parameters() for k in ("exp_avg", "exp_avg_sq", "step")
    ]


@pytest.mark.parametrize(("path", "kw"), path_params(include_fused=False, include_default=False))
def test_compiled_step_matches_eager_inductor(path, kw):
    eager = _trajectory(kw, compiled=False)
    compiled = _trajectory(kw, compiled=True)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # Moved: the test compares a real trajectory, not the initial values.
    assert not torch.equal(eager[0], make_model()[0].weight.detach())


def test_compiled_training_step_matches_eager():
    """A compiled training step that calls opt.step() (the backward is a graph break, as it is
    for Adam without compiled autograd; the optimizer part is compiled)."""

    def run(compiled):
        model = make_model()
        opt = ADOPT(model.parameters(), lr=torch.tensor(1e-2), foreach=True)

        def train_step(x, y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        losses = [fn(x, y) for x, y in batches(4)]
        return losses, [p.detach() for p in model.parameters()]

    eager_losses, eager_params = run(False)
    comp_losses, comp_params = run(True)
    torch.testing.assert_close(comp_losses, eager_losses)
    torch.testing.assert_close(comp_params, eager_params)


def test_scheduler_wrapped_step_still_one_graph_like_adam():
    # An lr scheduler wraps opt.step in a helper that dynamo skips (fullgraph=True on
    # opt.step then fails, for torch.optim.Adam too); the step inside is one graph.
    counts = []
    for cls in (torch.optim.Adam, ADOPT):
        model = make_model()
        opt = cls(model.parameters(), lr=torch.tensor(1e-2))
        torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        set_random_grads(model.parameters(), torch.Generator().manual_seed(0))
        torch._dynamo.reset()
        report = torch._dynamo.explain(opt.step)()
        counts.append((report.graph_count, report.graph_break_count))
    assert counts[1] == counts[0] == (1, 0)
