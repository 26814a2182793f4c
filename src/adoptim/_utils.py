"""Small helpers shared by the update paths; public torch APIs only."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["group_by_device_and_dtype", "is_compiling", "view_as_real_if_complex"]


def is_compiling() -> bool:
    """True while torch.compile/dynamo traces the caller."""
    return torch.compiler.is_compiling()


def group_by_device_and_dtype(
    *tensor_lists: list[Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel tensor lists into buckets sharing the first list's device and dtype:
    ``{(device, dtype): [sublist for each input list]}``, order kept within each bucket."""
    buckets: dict = defaultdict(lambda: [[] for _ in tensor_lists])
    for i, key_tensor in enumerate(tensor_lists[0]):
        for sub, full in zip(buckets[(key_tensor.device, key_tensor.dtype)], tensor_lists):
            sub.append(full[i])
    return dict(buckets)


def view_as_real_if_complex(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Complex tensors as real views (..., 2), so real and imaginary parts are separate
    coordinates, each with its own second moment, as torch.optim.Adam treats them."""
    return tuple(torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors)
