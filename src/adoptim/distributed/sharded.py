"""8-bit state (``state_dtype="8bit"``) for DTensor parameters: FSDP2 (``fully_shard``) and
other meshes whose placements are ``Shard(dim)`` (torch.chunk sharding) or ``Replicate()``.

Each rank quantizes its local shard: the local shard's real elements, flattened, are cut into
blocks (of the format's size, ``block``) exactly as a plain tensor's are, and every update path
(for-loop, foreach, fused kernel) runs on the local tensors (:func:`local_views`). The step's
rounding seed is the plain tensor's (:func:`adoptim.formats.blockwise8.state_seed`: the seed,
the parameter's key, its call count), used for the local shard's blocks, so with one rank the
state is bit-for-bit that of a plain tensor; with several, the blocks (and so the codes) follow
the sharding, and the rounding depends on the world size.

The state entries are DTensors, so that ``torch.distributed.checkpoint`` (DCP) saves each
rank's part and loads it back in place, and ``state_dict()`` is what
``get_optimizer_state_dict`` expects (plain tensors there are treated as replicated: DCP
saves one rank's copy and loads it on every rank):

* ``exp_avg`` (int8) and ``exp_avg_sq`` (uint8): the codes, one per real element, shaped and
  sharded like the parameter (``(*shape, 2)`` for complex ones; the last dim is not sharded).
  Their local tensor, flattened, is the shard's code array.
* ``exp_avg_scale`` and ``exp_avg_sq_scale`` (float32): the block scales, whose number
  depends on the shard's size, which is uneven across ranks. They are a DTensor of global
  shape ``(k_0, ..., k_{n-1}, B)`` for an n-dim mesh, with ``k_i = mesh.size(i)`` and placement
  ``Shard(i)`` where the parameter is sharded on mesh dim i, ``k_i = 1`` and ``Replicate()``
  where it is replicated; every rank holds one row of ``B`` scales, ``B`` being the number of
  blocks of the largest shard (the one at mesh coordinate 0 under torch.chunk's sizes), and
  a smaller shard uses the first ``num_blocks(local size)`` of them (the rest stay 0). The
  global shape is the same on every rank and computable without communication, which DCP
  requires.

Scales are tied to the sharding: a checkpoint loads into the same mesh and the same parameter
shapes (DCP refuses another world size, as the scales' global shape differs: "Size mismatch
between saved ... and current"; ``load_state_dict`` refuses it in :func:`check_sharded_state`).
To change the sharding, go through float32 moments (docs/lowbit.md, "FSDP2").

The master-weight correction (``master_weight_bits``) is elementwise: a DTensor shaped, placed
and sharded like its parameter (:func:`like_param`), joined and split on the local shard with
the random numbers of the local element indices, as the codes above
(:mod:`adoptim.formats.master`, "FSDP2"). It follows no blocks, but its 24-bit rounding
depends on the world size as the codes' does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "as_sharded",
    "check_sharded_state",
    "is_dtensor",
    "like_param",
    "local",
    "local_flat",
    "local_views",
    "new_sharded_state",
    "refusal",
    "shaped_like",
]


def is_dtensor(t: Any) -> bool:
    """A DTensor (by duck typing, so that torch.distributed is imported only when needed)."""
    if type(t) in (Tensor, torch.nn.Parameter):
        return False
    return callable(getattr(t, "to_local", None)) and hasattr(t, "placements")


def local(t: Tensor) -> Tensor:
    """A DTensor's local tensor (this rank's elements), a plain tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def like_param(local_t: Tensor, p: Tensor) -> Tensor:
    """``local_t``, shaped like the DTensor ``p``'s local tensor, as a DTensor over the same
    storage with ``p``'s mesh, placements and global shape (the dtype is ``local_t``'s):
    the form of elementwise state such as the master-weight correction, which DCP and
    ``get_optimizer_state_dict`` then save and load per shard."""
    return _from_local(local_t, p, p.placements, tuple(p.shape))


def refusal(p: Tensor) -> str | None:
    """Why 8-bit state cannot be kept for the DTensor ``p``, or None if it can."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if type(placement) not in (Shard, Replicate):
            return (
                f"a DTensor parameter has placements {tuple(p.placements)}: 8-bit state "
                "supports Shard(dim) and Replicate() (FSDP2's fully_shard, HSDP), whose local "
                "shards have sizes every rank can compute, not "
                f"{type(placement).__name__} (e.g. FSDP2 on top of tensor parallelism on "
                "the same dim); use state_dtype='auto' for these parameters"
            )
    return None


def _real_shape(t: Tensor) -> tuple[int, ...]:
    return (*t.shape, 2) if t.is_complex() else tuple(t.shape)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _largest_local_numel(p: Tensor) -> int:
    """Real elements of the largest local shard: torch.chunk gives the first chunk
    ceil(n / k) elements, so mesh coordinate 0 has the largest size along every dim."""
    shape = list(_real_shape(p))
    mesh = p.device_mesh
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_shard():
            dim = placement.dim % p.ndim
            shape[dim] = -(-shape[dim] // mesh.size(mesh_dim))
    return math.prod(shape)


def _scale_layout(p: Tensor, block: int) -> tuple[list[Any], tuple[int, ...]]:
    """(placements, global shape) of the block scales of the DTensor ``p``."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    placements: list[Any] = []
    shape: list[int] = []
    for mesh_dim, placement in enumerate(p.placements):
        sharded = placement.is_shard()
        placements.append(Shard(mesh_dim) if sharded else Replicate())
        shape.append(mesh.size(mesh_dim) if sharded else 1)
    shape.append(-(-_largest_local_numel(p) // block))
    return placements, tuple(shape)


def _from_local(local: Tensor, p: Tensor, placements: Any, shape: tuple[int, ...]) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, p.device_mesh, placements, run_check=False,
        shape=torch.Size(shape), stride=_contiguous_stride(shape),
    )  # fmt: skip


def new_sharded_state(p: Tensor, block: int) -> dict[str, Tensor]:
    """Zero 8-bit state for the DTensor ``p`` (layout: module docstring)."""
    local = p.to_local()
    device = local.device
    real_local = _real_shape(local)
    real_global = _real_shape(p)
    scale_placements, scale_shape = _scale_layout(p, block)
    scale_local = (1,) * len(p.placements) + (scale_shape[-1],)
    state = {}
    for key, dtype in (("exp_avg", torch.int8), ("exp_avg_sq", torch.uint8)):
        codes = torch.zeros(real_local, dtype=dtype, device=device)
        state[key] = _from_local(codes, p, p.placements, real_global)
        scales = torch.zeros(scale_local, dtype=torch.float32, device=device)
        state[key + "_scale"] = _from_local(scales, p, scale_placements, scale_shape)
    return state


def local_flat(t: Tensor) -> Tensor:
    """A tensor's local shard (the tensor itself when plain) as one flat view of its storage;
    8-bit state is created contiguous, and a layout that cannot be viewed is refused."""
    local = t.to_local() if is_dtensor(t) else t
    if not local.is_contiguous():
        raise RuntimeError(
            f"8-bit state tensor of shape {tuple(local.shape)} is not contiguous, so it cannot "
            "be updated in place; was it loaded from another layout?"
        )
    return local.view(-1)


def local_views(
    p: Tensor, g: Tensor | None, state: tuple[Tensor, Tensor, Tensor, Tensor], block: int
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The local parameter and gradient and the flat local (m codes, m scales, v codes,
    v scales) of a parameter with 8-bit state, all sharing the storage: the update paths step
    these as they step a plain tensor (a plain parameter's own tensors)."""
    m_codes, m_scales, v_codes, v_scales = (local_flat(t) for t in state)
    blocks = -(-m_codes.numel() // block)
    local_p = p.to_local() if is_dtensor(p) else p
    local_g = g.to_local() if g is not None and is_dtensor(g) else g
    return local_p, local_g, (m_codes, m_scales[:blocks], v_codes, v_scales[:blocks])


def check_sharded_state(p: Tensor, state: dict[str, Any], block: int) -> None:
    """Refuse 8-bit state of the DTensor ``p`` whose layout is not the one it would create
    (e.g. plain tensors from an unsharded run, or another sharding)."""
    _, scale_shape = _scale_layout(p, block)
    want = {
        "exp_avg": (_real_shape(p), torch.int8),
        "exp_avg_sq": (_real_shape(p), torch.uint8),
        "exp_avg_scale": (scale_shape, torch.float32),
        "exp_avg_sq_scale": (scale_shape, torch.float32),
    }
    for key, (shape, dtype) in want.items():
        value = state[key]
        if not is_dtensor(value) or tuple(value.shape) != shape or value.dtype != dtype:
            got = f"{type(value).__name__} of shape {tuple(value.shape)} and {value.dtype}"
            raise ValueError(
                f"8-bit state {key!r} of a DTensor parameter of shape {tuple(p.shape)} on a "
                f"mesh of shape {tuple(p.device_mesh.shape)} must be a {dtype} DTensor of "
                f"global shape {shape}, got a {got}: 8-bit codes and scales follow the "
                "sharding they were saved with (a plain 8-bit state dict, or one from another "
                "mesh, does not load into FSDP2). Convert through float32 moments instead "
                "(docs/lowbit.md, 'FSDP2')"
            )
        if key in ("exp_avg", "exp_avg_sq") and value.placements != p.placements:
            raise ValueError(
                f"8-bit state {key!r} has placements {tuple(value.placements)}, its parameter "
                f"{tuple(p.placements)}"
            )


def as_sharded(flat_local: Tensor, p: Tensor) -> Tensor:
    """A flat tensor of the local shard's real elements as a DTensor over the same storage,
    shaped and sharded like ``p``'s real view."""
    real_local = _real_shape(p.to_local())
    return _from_local(flat_local.view(real_local), p, p.placements, _real_shape(p))


def shaped_like(flat_local: Tensor, p: Tensor) -> Tensor:
    """A flat float32 tensor of the local shard's real elements as a DTensor shaped and
    sharded like ``p`` (complex64 for complex parameters)."""
    local = p.to_local()
    if p.is_complex():
        value = torch.view_as_complex(flat_local.view(*local.shape, 2))
    else:
        value = flat_local.view(local.shape)
    return _from_local(value, p, p.placements, tuple(p.shape))
