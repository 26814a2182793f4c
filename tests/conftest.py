"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_rank_mesh():
    """A 1-rank gloo process group in this process and its device mesh: DTensors without
    torchrun (tests/test_triton.py, tests/test_fsdp_master.py)."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
