"""Implementation paths and tiny training setups shared by the integration tests.

Not a test module (no ``test_`` prefix): ``from integration_paths import ...`` works because
pytest puts ``tests/`` on ``sys.path`` for these rootdir-less test files.
"""

from __future__ import annotations

import functools

import pytest
import torch

from adoptim import ADOPT

#: Constructor flags that select each update path.
PATHS: dict[str, dict] = {
    "for-loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "default": {},
}


@functools.cache
def fused_unavailable_reason() -> str | None:
    """None when ``ADOPT(..., fused=True)`` can be built here, else why not."""
    try:
        ADOPT([torch.zeros(2, requires_grad=True)], fused=True)
        # The kernel is built in the background on first use and the for-loop code runs
        # until it is ready; wait, so that a "fused" test runs the kernel from start to end.
        from adoptim.kernels.cpu import build as _kernel_cache

        load = getattr(_kernel_cache, "load_kernel", None)
        if load is not None:
            load(build=True, wait=True, timeout=600)
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"fused=True unavailable here: {exc}"
    return None


def path_params(include_fused: bool = True, include_default: bool = True) -> list:
    """pytest params ``(name, constructor kwargs)`` for every path; call
    :func:`require_path` in the test so that fused skips, with the reason, where it cannot be
    used (and runs once it lands)."""
    names = [n for n in PATHS if include_default or n != "default"]
    out = [pytest.param(n, PATHS[n], id=n) for n in names]
    if include_fused:
        out.append(pytest.param("fused", {"fused": True}, id="fused"))
    return out


def require_path(name: str) -> None:
    """Skip a fused test where fused cannot run; for fused and default (which takes the
    kernel on CPU when it can be built), first let the kernel finish building, so that the
    path does not change half-way through a test."""
    if name in ("fused", "default"):
        reason = fused_unavailable_reason()
        if name == "fused" and reason is not None:
            pytest.skip(reason)


def make_model(seed: int = 0, zero_last: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=True)
    )
    if zero_last:
        torch.nn.init.zeros_(model[2].weight)
        torch.nn.init.zeros_(model[2].bias)
    return model


def batches(n: int, seed: int = 1, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 6, generator=g), torch.randn(batch, 3, generator=g)) for _ in range(n)
    ]


def set_random_grads(params, generator: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters and every state tensor, detached copies, in a fixed order."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        st = opt.state.get(p, {})
        out += [st[k].detach().clone() for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out
