"""Distributed training on CPU with gloo, 2 processes on loopback (started with torchrun from
the test, killed on timeout or failure): DistributedDataParallel, ZeroRedundancyOptimizer and
FSDP2 (fully_shard, DTensor parameters; with a torch.distributed.checkpoint save and load in
the middle) each reproduce the single-process run on the full batch, within float32 rounding.
FSDP2 with 8-bit state runs on 1 and on 2 processes: each rank's state is that of its shard,
bit for bit, one rank reproduces one process bit for bit, and DCP (sharded and full state
dicts) and plain state dicts resume bit for bit. The worker is tests/dist_worker.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

_TIMEOUT_S = 120  # each launch takes ~20 s on 2 busy cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(mode: str, out_dir: Path, nproc: int = 2, worker: str | None = None) -> None:
    """Run ``worker`` (a file beside this one; default dist_worker.py) MODE OUT_DIR."""
    script = Path(dist_worker.__file__)
    script = script.with_name(worker) if worker else script
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(script), mode, str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Own process group, so that a timeout or failure kills torchrun and both workers.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {mode} timed out after {_TIMEOUT_S}s:\n{out.decode()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"torchrun {mode} failed:\n{out.decode()[-4000:]}"
    assert (out_dir / f"{mode}.done").exists()


def _check(out_dir: Path, name: str, run: str, atol: float = 1e-6) -> None:
    got = torch.load(out_dir / f"{name}.pt", weights_only=True)
    expected = dist_worker.reference_params(run)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=atol)
    # The runs trained: parameters moved away from their initial values.
    initial = [p.detach() for p in dist_worker.make_model().parameters()]
    assert not torch.allclose(got[0], initial[0])


def test_ddp_and_zero_match_single_process(tmp_path):
    _torchrun("ddp", tmp_path)
    for run in {**dist_worker.RUNS, **dist_worker.RUNS_8BIT}:
        _check(tmp_path, f"ddp-{run}", run)
        # ZeRO: each rank's optimizer holds a partition of the parameters, so a tensor's key
        # for its random numbers (adoptim.rng: its index in that optimizer) differs from one
        # process's, and 8-bit codes round with other (equally unbiased) random numbers: the
        # same run up to code steps here and there (measured: at most 7 of 256 elements,
        # up to 1.9e-4). Float state has no randomness: as close as DDP.
        _check(tmp_path, f"zero-{run}", run, atol=1e-3 if run in dist_worker.RUNS_8BIT else 1e-6)


def _has_public_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _has_public_fully_shard(),
    reason="FSDP2's public torch.distributed.fsdp.fully_shard needs torch >= 2.6",
)
def test_fsdp2_matches_single_process_and_resumes_through_dcp(tmp_path):
    _torchrun("fsdp2", tmp_path)
    for run in dist_worker.RUNS:
        _check(tmp_path, f"fsdp2-{run}", run)
        _check(tmp_path, f"fsdp2-dcp-{run}", run)
        assert (tmp_path / f"dcp-{run}").is_dir()  # the DCP checkpoint was written


@pytest.mark.skipif(
    not _has_public_fully_shard(),
    reason="FSDP2's public torch.distributed.fsdp.fully_shard needs torch >= 2.6",
)
def test_fsdp2_8bit_shards_match_plain_and_resume_bit_for_bit(tmp_path):
    """state_dtype="8bit" under FSDP2 (once refused at construction). The worker itself
    checks, on every path (for-loop, foreach, fused kernel, default, caution on the for-loop
    and the foreach path) and on 1 and 2
    ranks, after every step: each rank's shard and its codes and scales are bit for bit those
    of a plain tensor holding the shard, stepped by a plain 8-bit optimizer on the same
    gradient (with caution on 2 ranks, whose mask mean spans the ranks: the float32 for-loop
    update on DTensors of the dequantized moments, requantized); and that resuming after
    SPLIT steps from a DCP checkpoint (get/set_optimizer_state_dict), from full state dicts
    and from opt.state_dict() through torch.save ends bit for bit where the uninterrupted run
    does. A 2-rank checkpoint is refused on 1 rank (the scales' global shape differs)."""
    from adoptim.kernels.cpu import build as _kernel_cache
    from adoptim.kernels.cpu import launch as _cpu_kernel

    kernel = _cpu_kernel.unsupported_reason() is None
    if kernel:  # built once here, not by both workers at once
        assert _kernel_cache.load_kernel(build=True, wait=True) is not None
    _torchrun("fsdp2-8bit", tmp_path, nproc=2)
    _torchrun("fsdp2-8bit", tmp_path, nproc=1)
    assert (tmp_path / "fsdp2-8bit-w1-refused-w2.done").exists()
    initial = [p.detach() for p in dist_worker.make_model_8bit().parameters()]
    for run in dist_worker.RUNS_FSDP2_8BIT:
        if run == "fused" and not kernel:
            continue  # the worker skipped it: no compiler here
        expected = dist_worker.reference_params_8bit(run)
        one = torch.load(tmp_path / f"fsdp2-8bit-w1-{run}.pt", weights_only=True)
        two = torch.load(tmp_path / f"fsdp2-8bit-w2-{run}.pt", weights_only=True)
        for got1, got2, e in zip(one, two, expected, strict=True):
            # one rank: one shard per tensor, the plain tensor's blocks and seeds
            assert torch.equal(got1, e), run
            # two ranks: other blocks and seeds (the shards'), so other rounding; within the
            # 8-bit noise of this run (8-bit vs float32 state in one process: up to 1.1e-3)
            torch.testing.assert_close(got2, e, rtol=0, atol=3e-3)
        assert not torch.allclose(one[0], initial[0])  # trained
