"""How many bytes a tensor, or an optimizer's state, really holds (shared by the bench, the
memory measurement and the experiments' reports)."""

from __future__ import annotations

import torch

__all__ = ["state_bytes", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor, seen: set) -> int:
    """Bytes held by ``t``: its storage, or for a tensor subclass (torchao's 8-bit state) the
    tensors it is made of; a storage shared by several entries counts once."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, name), seen) for name in names)
    key = (t.device, t.untyped_storage().data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return t.untyped_storage().nbytes()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (every tensor in ``opt.state``, step counters included)."""
    seen: set = set()
    return sum(
        tensor_bytes(value, seen)
        for state in opt.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
