"""Distributed training on CPU with gloo, 2 processes on loopback (started with torchrun from
the test, killed on timeout or failure): DistributedDataParallel, ZeroRedundancyOptimizer and
FSDP2 (fully_shard, DTensor parameters; with a torch.distributed.checkpoint save and load in
the middle) each reproduce the single-process run on the full batch, within float32 rounding.
The worker is tests/dist_worker.py."""

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


def _torchrun(mode: str, out_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(Path(dist_worker.__file__)), mode, str(out_dir),
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


def _check(out_dir: Path, name: str, run: str) -> None:
    got = torch.load(out_dir / f"{name}.pt", weights_only=True)
    expected = dist_worker.reference_params(run)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # The runs trained: parameters moved away from their initial values.
    initial = [p.detach() for p in dist_worker.make_model().parameters()]
    assert not torch.allclose(got[0], initial[0])


def test_ddp_and_zero_match_single_process(tmp_path):
    _torchrun("ddp", tmp_path)
    for run in {**dist_worker.RUNS, **dist_worker.RUNS_8BIT}:
        _check(tmp_path, f"ddp-{run}", run)
        _check(tmp_path, f"zero-{run}", run)


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
