"""Small helpers shared by the update paths; public torch APIs only."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "KERNEL_DTYPES",
    "as_scalar",
    "group_by_device_and_dtype",
    "is_compiling",
    "view_as_real_if_complex",
]


# Parameter dtypes both fused kernels (C++ and Triton) take; complex ones as real views.
KERNEL_DTYPES = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.complex64,
    torch.complex128,
)


def is_compiling() -> bool:
    """True while torch.compile/dynamo traces the caller."""
    return torch.compiler.is_compiling()


def group_by_device_and_dtype(
    *tensor_lists: list[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel tensor lists into buckets sharing the first list's device and dtype:
    ``{(device, dtype): [sublist for each input list]}``, order kept within each bucket."""
    # A plain dict, not a defaultdict: torch.compile traces this (torch 2.4's dynamo cannot
    # trace a defaultdict with a lambda factory).
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for i, key_tensor in enumerate(tensor_lists[0]):
        key = (key_tensor.device, key_tensor.dtype)
        if key not in buckets:
            buckets[key] = [[] for _ in tensor_lists]
        for sub, full in zip(buckets[key], tensor_lists):
            sub.append(full[i])
    return buckets


def view_as_real_if_complex(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Complex tensors as real views (..., 2), so real and imaginary parts are separate
    coordinates, each with its own second moment, as torch.optim.Adam treats them."""
    return tuple(torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors)


def as_scalar(value: float | Tensor, *, on_host: bool) -> float | Tensor:
    """A hyperparameter as the paths use it: a one-element tensor of any shape (``[1]``,
    ``[1, 1]``) becomes 0-dim, as torch.optim does, or a Python float when ``on_host``
    (one read, where the step may sync anyway); numbers pass through."""
    if not isinstance(value, Tensor):
        return value
    return value.item() if on_host else value.reshape(())
