"""capturable=True: step count and lr live on the parameter's device, the step never reads a
tensor back to the host (no device sync), the trajectory is the eager one, and on CUDA the
step can be captured in a CUDA graph and replayed."""

from __future__ import annotations

import pytest
import torch
from integration_paths import make_model, path_params, require_path, set_random_grads
from torch.utils._python_dispatch import TorchDispatchMode

from adoptim import ADOPT, ADOPTW

# Reading a tensor's value on the host (item(), tolist(), float(), bool(), Python branches on
# tensors) goes through this op; on CUDA it is a device->host sync.
_HOST_READ = torch.ops.aten._local_scalar_dense.default


class NoHostReads(TorchDispatchMode):
    """Raise on any read of a tensor value by the host while active."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _HOST_READ:
            raise AssertionError("host read of a tensor value (a device sync on CUDA)")
        return func(*args, **(kwargs or {}))


def _run(cls, kw, steps=5, seed=0):
    model = make_model()
    opt = cls(model.parameters(), **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_random_grads(model.parameters(), g)
        opt.step()
    return model, opt


@pytest.mark.parametrize("lr", [2e-2, torch.tensor(2e-2)], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("cls", [ADOPT, ADOPTW])
@pytest.mark.parametrize(("path", "kw"), path_params())
def test_capturable_matches_eager_trajectory(path, kw, cls, lr):
    require_path(path)
    ref_model, ref_opt = _run(cls, {**kw, "lr": 2e-2, "weight_decay": 0.1})
    model, opt = _run(cls, {**kw, "lr": lr, "weight_decay": 0.1, "capturable": True})
    for p, rp in zip(model.parameters(), ref_model.parameters()):
        # Scalars are float32 tensors instead of Python floats: equal up to rounding.
        torch.testing.assert_close(p, rp, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[rp][key])
        assert opt.state[p]["step"].device == p.device
        assert float(opt.state[p]["step"]) == 5


# The paths a capturable CUDA step takes (fused is a CPU kernel, where a host read is no sync).
@pytest.mark.parametrize(("path", "kw"), path_params(include_fused=False, include_default=False))
def test_capturable_step_never_reads_the_device(path, kw):
    model = make_model()
    params = list(model.parameters())
    opt = ADOPTW(params, lr=torch.tensor(1e-2), weight_decay=0.1, capturable=True, **kw)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in params]
    for _ in range(3):  # the first call (state creation, v only) and later ones
        set_random_grads(params, g)
        with NoHostReads():
            opt.step()
        sched.step()
    assert not torch.equal(before[0], params[0].detach())


def test_host_read_detector_catches_the_non_capturable_path():
    # The detector is not vacuous: the default eager path reads step counts on the host.
    model = make_model()
    opt = ADOPT(model.parameters(), foreach=False)
    set_random_grads(model.parameters(), torch.Generator().manual_seed(0))
    opt.step()
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_cuda_graph_capture_and_replay_matches_eager(foreach):
    device = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (4, 16)]
    params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2, device=device)
    opt = ADOPT(params, lr=lr, capturable=True, foreach=foreach, fused=False)
    ref_opt = ADOPT(ref, lr=1e-2, foreach=foreach, fused=False)
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    grads = [[torch.randn(s, device=device) for s in shapes] for _ in range(6)]

    # Warm up on a side stream (creates state), as the CUDA-graph docs recommend.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for sg, g in zip(static_grads, grads[0]):
            sg.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    for r, g in zip(ref, grads[0]):
        r.grad = g.clone()
    ref_opt.step()

    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")  # any device->host sync in the step raises
    try:
        with torch.cuda.graph(graph):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Capture does not run the step; replay does, once per batch of gradients.
    for gs in grads[1:]:
        for sg, g in zip(static_grads, gs):
            sg.copy_(g)
        graph.replay()
        for r, g in zip(ref, gs):
            r.grad = g.clone()
        ref_opt.step()
    torch.cuda.synchronize()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert float(opt.state[params[0]]["step"]) == len(grads)
