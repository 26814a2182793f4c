"""The 8-bit paths keep every tensor on the parameter's device (no GPU needed).

A step on a CUDA parameter must not mix in CPU tensors: an op taking a CUDA tensor and a
CPU tensor with more than one element raises, and host-side tables copied over per step
would cost transfers. Without a GPU the ``meta`` device plays CUDA's part: it computes
nothing, but mixing a meta tensor with a non-scalar CPU tensor raises as CUDA would (the
random numbers of ``_quant`` were once built on the CPU, and these tests failed there with
"Tensor on device cpu is not on the expected device meta!"). On top of that, a dispatch
mode records every op of the step and checks that the only CPU tensors any op sees are
0-dim (the host-side step counts, as on CUDA).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adoptim import ADOPT
from adoptim.formats import blockwise8 as _quant
from adoptim.functional import adopt

PATHS = {
    "for-loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "default": dict(),  # the for-loop path on meta (as foreach on CUDA: not a fused kernel)
}


class HostTensors(TorchDispatchMode):
    """Records the ops that move or mix a CPU tensor (not 0-dim) with a tensor on another
    device, and host-side work of a block's size or more. (The schedule's scalars are
    computed on the host from the host-side step counts, one element per tensor, as on
    CUDA: those ops pass.)"""

    def __init__(self):
        super().__init__()
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen, _ = tree_flatten((args, kwargs, out))
        tensors = [t for t in seen if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        elsewhere = any(t.device.type != "cpu" for t in tensors)
        big = [t for t in host if t.numel() >= _quant.BLOCK]
        if host and (elsewhere or big):
            t = (big or host)[0]
            self.offenders.append(f"{func}: {tuple(t.shape)} {t.dtype} on cpu")
        return out


def _params(dtype):
    shapes = [(5000,), (37, 300), (300,)]  # the last under min_8bit_size: float32 state
    return [torch.empty(s, device="meta", dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.complex64])  # fmt: skip
@pytest.mark.parametrize(
    "kw",
    [{}, dict(weight_decay=0.1, maximize=True, nesterov=True),
     dict(weight_decay=0.1, decouple=True, caution=True, clip_lambda=None)],  # fmt: skip
    ids=["defaults", "coupled,maximize,nesterov", "decoupled,caution,noclip"],
)
def test_8bit_step_keeps_every_tensor_on_the_parameters_device(path, dtype, kw):
    params = _params(dtype)
    opt = ADOPT(params, state_dtype="8bit", min_8bit_size=1000,
                stochastic_rounding=dtype == torch.bfloat16, **PATHS[path], **kw)  # fmt: skip
    _quant.weyl("meta")  # the Weyl table is copied to a device once, on its first step
    mode = HostTensors()
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p)
        with mode:
            opt.step()
    assert not mode.offenders, mode.offenders[:5]
    big = opt.state[params[0]]
    assert big["exp_avg"].dtype == torch.int8 and big["exp_avg"].device.type == "meta"
    blocks = _quant.num_blocks(5000 * (2 if dtype.is_complex else 1))
    assert big["exp_avg_scale"].shape == (blocks,) and big["exp_avg_sq_scale"].is_meta
    assert "exp_avg_scale" not in opt.state[params[2]]  # float state under min_8bit_size
    assert big["step"].device.type == "cpu" and big["step"].item() == 3  # host-side count
    with mode:
        m, v = opt.moments(params[0])
    assert m.is_meta and v.is_meta and not mode.offenders


def test_format_functions_on_the_tensors_device():
    n = 3 * _quant.BLOCK + 5
    _quant.weyl("meta")
    mode = HostTensors()
    m = torch.empty(n, device="meta")
    codes_m = torch.empty(n, dtype=torch.int8, device="meta")
    codes_v = torch.empty(n, dtype=torch.uint8, device="meta")
    scales = [torch.empty(4, device="meta") for _ in range(2)]
    with mode:
        u = _quant.dither(7, _quant.STREAM_M, n, device="meta")
        _quant.quantize_m(m, 7, codes_m, scales[0])
        _quant.quantize_v(m, 7, codes_v, scales[1])
        _quant.dequantize_m(codes_m, scales[0])
        _quant.dequantize_v(codes_v, scales[1])
    assert u.is_meta and u.shape == (n,) and not mode.offenders
    # the CPU numbers are those of the device-free calls (which the CPU paths use)
    assert torch.equal(_quant.dither(7, 1, n, device="cpu"), _quant.dither(7, 1, n))
    assert _quant.weyl("meta").is_meta and _quant.weyl() is _quant.WEYL


def test_8bit_step_on_meta_fails_on_a_host_side_table(monkeypatch):
    """The check has teeth: a CPU table mixed into the update raises on meta (as on CUDA)."""
    p = torch.empty(5000, device="meta", requires_grad=True)
    opt = ADOPT([p], state_dtype="8bit", foreach=False, fused=False)
    p.grad = torch.empty_like(p)
    monkeypatch.setattr(_quant, "weyl", lambda device=None: _quant.WEYL)  # the old CPU table
    with pytest.raises(RuntimeError, match="not on the expected device meta"):
        opt.step()


def test_fused_8bit_refuses_tensors_the_cpu_kernel_cannot_take():
    """fused=True with 8-bit state on a device that is neither CPU (C++ kernel) nor CUDA
    (Triton): refused at construction, and with a clear error on the functional form
    (the C++ op would fail in the dispatcher: it has a CPU implementation only)."""
    with pytest.raises(RuntimeError, match="fused=True cannot be used: .*CPU tensors only"):
        ADOPT([torch.empty(5000, device="meta", requires_grad=True)], fused=True,
              state_dtype="8bit")  # fmt: skip
    from integration_paths import fused_unavailable_reason

    if fused_unavailable_reason() is not None:
        pytest.skip(fused_unavailable_reason())
    p = torch.empty(5000, device="meta")
    codes = [torch.empty(5000, dtype=torch.int8, device="meta"),
             torch.empty(5000, dtype=torch.uint8, device="meta")]  # fmt: skip
    scales = [torch.empty(20, device="meta") for _ in range(2)]
    with pytest.raises(RuntimeError, match="8-bit kernel runs on CPU tensors"):
        adopt([p], [torch.empty_like(p)], [codes[0]], [codes[1]], [torch.zeros(())],
              fused=True, lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, clip_exp=0.25,
              weight_decay=0.0, decouple=False, maximize=False,
              exp_avg_scales=[scales[0]], exp_avg_sq_scales=[scales[1]])  # fmt: skip
