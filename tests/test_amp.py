"""Mixed precision: torch.autocast (bfloat16; float16 with a GradScaler) drives ADOPT without
NaN on a small model whose last layer starts at zero (so the first gradients of the other
layers are exactly 0 and v starts at 0 there), and a GradScaler skips overflowing steps."""

from __future__ import annotations

import math

import pytest
import torch
from integration_paths import batches, make_model, path_params, require_path

from adoptim import ADOPT, ADOPTW

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast(_DEVICE, dtype=dtype):
            torch.nn.functional.linear(
                torch.ones(2, 2, device=_DEVICE), torch.ones(2, 2, device=_DEVICE)
            )
    except RuntimeError:
        return False
    return True


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y)


@pytest.mark.parametrize("clip", [True, False], ids=["clipped", "unclipped"])
@pytest.mark.parametrize(("path", "kw"), path_params())
def test_bf16_autocast_zero_init_last_layer_no_nan(path, kw, clip):
    require_path(path)
    model = make_model(zero_last=True).to(_DEVICE)
    extra = {} if clip else {"clip_lambda": None}
    opt = ADOPTW(model.parameters(), lr=1e-2, **kw, **extra)
    data = batches(1, batch=32) * 15  # one fixed batch: its loss must go down
    losses = []
    for x, y in data:
        x, y = x.to(_DEVICE), y.to(_DEVICE)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(_DEVICE, dtype=torch.bfloat16):
            loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    for p in model.parameters():
        assert torch.isfinite(p).all()
        assert torch.isfinite(opt.state[p]["exp_avg"]).all()
    # The first gradient of the first layer was exactly zero (zero last layer) ...
    assert losses[-1] < losses[0]  # ... and training still makes progress.


@pytest.mark.skipif(
    not _autocast_supports(torch.float16), reason=f"no float16 autocast on {_DEVICE}"
)
@pytest.mark.parametrize("cls", [ADOPT, ADOPTW])
@pytest.mark.parametrize(("path", "kw"), path_params())
def test_fp16_autocast_with_grad_scaler_no_nan(path, kw, cls):
    require_path(path)
    model = make_model(zero_last=True).to(_DEVICE)
    opt = cls(model.parameters(), lr=1e-2, **kw)
    scaler = torch.amp.GradScaler(_DEVICE, init_scale=2.0**16)
    losses = []
    for x, y in batches(1, batch=32) * 15:
        x, y = x.to(_DEVICE), y.to(_DEVICE)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(_DEVICE, dtype=torch.float16):
            loss = _loss(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    assert scaler.get_scale() > 0


@pytest.mark.parametrize(("path", "kw"), path_params())
def test_grad_scaler_skips_inf_steps_and_matches_unscaled_run(path, kw):
    """A scaled run equals the unscaled one (scales are powers of two), and a step whose
    gradients overflow changes nothing: not the parameters, the moments, nor the step count."""
    require_path(path)
    data = batches(4)

    def run(scaled, poison_step=None):
        model = make_model()
        opt = ADOPT(model.parameters(), lr=1e-2, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        for i, (x, y) in enumerate(data):
            opt.zero_grad(set_to_none=True)
            scaler.scale(_loss(model, x, y)).backward()
            if i == poison_step:
                next(model.parameters()).grad[0, 0] = float("inf")
                before = [t.clone() for p in model.parameters() for t in opt.state[p].values()]
            scaler.step(opt)
            scaler.update()
            if i == poison_step:
                after = [t for p in model.parameters() for t in opt.state[p].values()]
                assert all(torch.equal(a, b) for a, b in zip(before, after)), "step not skipped"
                assert scaler.get_scale() == 512.0
        return model, opt

    plain, _ = run(False)
    scaled, _ = run(True)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    skipped, opt = run(True, poison_step=2)
    assert float(opt.state[next(skipped.parameters())]["step"]) == len(data) - 1
    assert all(torch.isfinite(p).all() for p in skipped.parameters())
