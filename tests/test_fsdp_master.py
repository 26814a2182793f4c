"""FSDP2 (``fully_shard``, bf16 DTensor parameters) with the master-weight correction
(``master_weight_bits``), on 2 gloo ranks over loopback (torchrun, started as
tests/test_distributed.py starts its runs). The worker, tests/master_worker.py, checks and
raises; its docstring lists what: every rank's shard, correction and state bit for bit a
plain tensor's after every step; 32 bits bit for bit one process; 24 bits within 24-bit
rounding's own seed-to-seed spread of one process with a nonzero correction; at a tiny lr the
24-bit master weights follow the 32-bit ones where plain bf16 stalls; state_dict and DCP
resume and gradient release bit for bit; fp32 weights out and in; the numerics check warns
from each rank's shard. In process, on a 1-rank gloo group: a DTensor steps bit for bit as a
plain tensor, and what cannot work (a Partial placement, a plain correction loaded for a
DTensor parameter) is refused.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from test_distributed import _has_public_fully_shard, _torchrun

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and _has_public_fully_shard()),
    reason="needs torch.distributed with gloo and FSDP2's fully_shard",
)


def test_fsdp2_master_weights_quick(tmp_path):
    """32 bits with float32 state (for-loop path), 24 bits with 8-bit state (ADOPTW), plus
    the tiny-lr and fp32-weights checks."""
    _torchrun("quick", tmp_path, worker="master_worker.py")
    assert (tmp_path / "quick-w2.done").exists()


@pytest.mark.slow
def test_fsdp2_master_weights_more_paths_full_state_dicts_and_one_rank(tmp_path):
    """24 bits with float32 state (for-loop, foreach), 32 bits with 8-bit state (foreach),
    24 bits with 8-bit state (default path); full state dicts (24 bits); on 2 ranks, then on
    1, where every run is bit for bit one process (one shard per tensor)."""
    _torchrun("slow", tmp_path, worker="master_worker.py")
    assert (tmp_path / "slow-w2.done").exists()
    _torchrun("slow", tmp_path, nproc=1, worker="master_worker.py")
    assert (tmp_path / "slow-w1.done").exists()


def _plain_and_sharded(mesh, seed: int, steps: int, kw: dict):
    """A 6 x 5 bf16 tensor stepped ``steps`` times by ADOPT(**kw) as a plain parameter and as
    a Shard(0) DTensor on ``mesh``, with the same gradients: (init, plain, its optimizer,
    sharded, its optimizer)."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from adoptim import ADOPT

    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(6, 5, generator=gen).to(torch.bfloat16) for _ in range(steps)]
    plain = torch.nn.Parameter(init.clone())
    sharded = torch.nn.Parameter(distribute_tensor(init.clone(), mesh, [Shard(0)]))
    opt_plain, opt_sharded = ADOPT([plain], **kw), ADOPT([sharded], **kw)
    for g in grads:
        plain.grad = g.clone()
        sharded.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt_plain.step()
        opt_sharded.step()
    return init, plain, opt_plain, sharded, opt_sharded


def test_dtensor_parameters_take_a_correction_and_partial_ones_are_refused(one_rank_mesh):
    """In process: a Shard(0) bf16 DTensor steps bit for bit as the plain tensor (the
    correction a DTensor placed like it); a Partial one is refused at construction, and so
    is a plain correction loaded for a DTensor parameter."""
    import torch
    from torch.distributed.tensor import DTensor, Partial

    from adoptim import ADOPT

    kw = dict(lr=1e-3, master_weight_bits=24, foreach=False)
    init, plain, opt_plain, sharded, opt_sharded = _plain_and_sharded(one_rank_mesh, 0, 4, kw)
    corr = opt_sharded.state[sharded]["master_correction"]
    assert isinstance(corr, DTensor) and corr.placements == sharded.placements
    assert torch.equal(sharded.to_local(), plain.detach())
    assert torch.equal(corr.to_local(), opt_plain.state[plain]["master_correction"])
    assert corr.to_local().any()

    with pytest.raises(ValueError, match="Partial placement"):
        partial = DTensor.from_local(init.clone(), one_rank_mesh, [Partial()])
        ADOPT([torch.nn.Parameter(partial)], **kw)
    with pytest.raises(ValueError, match="a plain tensor.*get_optimizer_state_dict"):
        ADOPT([sharded], **kw).load_state_dict(opt_plain.state_dict())


def test_dtensor_bf16_stochastic_rounding_rounds_the_local_shard(one_rank_mesh):
    """Plain bf16 with stochastic_rounding=True (no correction) on a DTensor: rounded on the
    local shard with its local indices' random numbers, bit for bit the plain tensor's (it
    raised "got mixed torch.Tensor and DTensor" before)."""
    import torch


    for foreach in (False, True):
        kw = dict(lr=1e-3, stochastic_rounding=True, foreach=foreach)
        init, plain, _, sharded, _ = _plain_and_sharded(one_rank_mesh, 1, 3, kw)
        assert torch.equal(sharded.to_local(), plain.detach()), foreach
        assert not torch.equal(plain.detach(), init)
