"""FSDP2 (``fully_shard``, bf16 DTensor parameters) with the master-weight correction
(``master_weight_bits``), on 2 gloo ranks over loopback (torchrun, started as
tests/test_distributed.py starts its runs). The worker, tests/master_worker.py, checks and
raises; its docstring lists what: every rank's shard, correction and state bit for bit a
plain tensor's after every step; 32 bits bit for bit one process; 24 bits within 24-bit
rounding's own seed-to-seed spread of one process with a nonzero correction; at a tiny lr the
24-bit master weights follow the 32-bit ones where plain bf16 stalls; state_dict and DCP
resume and gradient release bit for bit; fp32 weights out and in.
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
