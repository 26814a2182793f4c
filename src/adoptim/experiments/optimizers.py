"""Optimizers by name, so every experiment picks them the same way.

>>> opt = make_optimizer("adopt", model.parameters(), lr=1e-3, betas=(0.9, 0.9999))

``betas``/``eps``/``weight_decay`` are passed only where the optimizer takes them; anything else
in ``**kwargs`` goes straight to the constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adoptim import ADOPT, ADOPTW

__all__ = ["OPTIMIZERS", "list_optimizers", "make_optimizer"]


def _adashift(params, **kw):
    from adoptim.experiments.adashift import AdaShift

    return AdaShift(params, **kw)


def _torchao_adamw8bit(params, **kw):
    try:
        from torchao.optim import AdamW8bit
    except ImportError as exc:  # an optional peer, not a dependency
        raise ImportError(
            'adamw8bit-torchao needs torchao: pip install "adoptim[bench]" (or torchao)'
        ) from exc
    return AdamW8bit(params, **kw)


# name -> (constructor, fixed keyword arguments, description)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any], str]] = {
    "adam": (torch.optim.Adam, {}, "torch.optim.Adam"),
    "adamw": (torch.optim.AdamW, {}, "torch.optim.AdamW (decoupled weight decay)"),
    "amsgrad": (torch.optim.Adam, {"amsgrad": True}, "torch.optim.Adam(amsgrad=True)"),
    "adamax": (torch.optim.Adamax, {}, "torch.optim.Adamax"),
    "adopt": (ADOPT, {}, "adoptim.ADOPT, clipped (c_t = t^0.25), the paper's recommended form"),
    "adopt-noclip": (ADOPT, {"clip_lambda": None}, "adoptim.ADOPT without clipping"),
    "adoptw": (ADOPTW, {}, "adoptim.ADOPTW (decoupled weight decay)"),
    "adopt-8bit": (ADOPT, {"state_dtype": "8bit"},
                   "adoptim.ADOPT with 8-bit m and v (tensors of >= 4096 elements)"),
    "adopt-8bit-all": (ADOPT, {"state_dtype": "8bit", "min_8bit_size": 0},
                       "adoptim.ADOPT with 8-bit m and v for every tensor (toy problem)"),
    "adoptw-8bit": (ADOPTW, {"state_dtype": "8bit"}, "adoptim.ADOPTW with 8-bit m and v"),
    "adamw8bit-torchao": (_torchao_adamw8bit, {}, "torchao.optim.AdamW8bit (pip install torchao)"),
    "adopt-nesterov": (ADOPT, {"nesterov": True}, "adoptim.ADOPT(nesterov=True)"),
    "adopt-caution": (ADOPT, {"caution": True}, "adoptim.ADOPT(caution=True), Liang et al. 2024"),
    "adopt-nesterov-caution": (ADOPT, {"nesterov": True, "caution": True},
                               "adoptim.ADOPT(nesterov=True, caution=True)"),
    "adashift": (_adashift, {}, "AdaShift (Zhou et al., ICLR 2019), see experiments.adashift"),
    "sgd": (torch.optim.SGD, {}, "torch.optim.SGD"),
}

_NO_BETAS = {"sgd"}


def list_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def make_optimizer(
    name: str,
    params,
    lr: float,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    weight_decay: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(list_optimizers())}")
    ctor, fixed, _ = OPTIMIZERS[key]
    kw: dict[str, Any] = {"lr": lr, **fixed, **kwargs}
    if betas is not None and key not in _NO_BETAS:
        kw["betas"] = tuple(betas)
    if eps is not None and key not in _NO_BETAS:
        kw["eps"] = eps
    if weight_decay is not None:
        kw["weight_decay"] = weight_decay
    return ctor(params, **kw)
