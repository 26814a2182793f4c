"""Worker for tests/test_release.py's distributed tests (torchrun, 2 processes, gloo):

    python -m torch.distributed.run --nproc_per_node=2 ... tests/release_worker.py release OUT

* DDP: ``enable_gradient_release`` refuses a DDP model, and DDP's parameters passed as a
  list (plain tensors in a 2-process group), with messages that say what to do.
* FSDP2 (``fully_shard``): a run under gradient release ends, on every rank, bit for bit
  where the normal FSDP2 run (``backward(); step()``) does: the local shards of the
  parameters and of every state tensor, on the for-loop path and the fused kernel, with
  float32 and 8-bit state. Rank 0 writes the full final parameters of each release run to
  ``OUT/release-fsdp2-<run>.pt`` (the test compares them with one process).

The model, data and optimizer settings are tests/dist_worker.py's.
"""

from __future__ import annotations

import gc
import os
import sys

import dist_worker  # beside this file: the script's directory is on sys.path
import torch

import adoptim
from adoptim import ADOPT

#: run name -> (optimizer class, kwargs, 8-bit model?)
RUNS = {
    "for-loop": (*dist_worker.RUNS["for-loop"], False),
    "fused": (ADOPT, {"lr": 1e-2, "weight_decay": 0.05, "fused": True}, False),
    "8bit-for-loop": (*dist_worker.RUNS_FSDP2_8BIT["for-loop"], True),
    "8bit-fused": (*dist_worker.RUNS_FSDP2_8BIT["fused"], True),
}


def _expect_refusal(fn, *needles):
    try:
        fn()
    except RuntimeError as exc:
        for needle in needles:
            assert needle in str(exc), str(exc)
        return str(exc)
    raise AssertionError("enable_gradient_release accepted DDP")


def run_ddp(out_dir, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(dist_worker.make_model())
    opt = ADOPT(model.parameters(), lr=1e-2)
    msg = _expect_refusal(
        lambda: adoptim.enable_gradient_release(model, opt), "DistributedDataParallel", "FSDP2"
    )
    msg2 = _expect_refusal(
        lambda: adoptim.enable_gradient_release(model.parameters(), opt), "non-DTensor", "FSDP2"
    )
    # Nothing was hooked: DDP trains normally afterwards.
    x, y = dist_worker.data()[0]
    dist_worker.loss_fn(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    if rank == 0:
        with open(os.path.join(out_dir, "ddp-refusals.txt"), "w") as f:
            f.write(msg + "\n" + msg2 + "\n")


def run_fsdp2(out_dir, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def build(cls, kw, eight):
        model = dist_worker.make_model_8bit() if eight else dist_worker.make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), **kw)

    for run, (cls, kw, eight) in RUNS.items():
        batches = dist_worker.data(1 if eight else 3)
        results = []
        for release in (False, True):
            model, opt = build(cls, kw, eight)
            handle = adoptim.enable_gradient_release(model, opt) if release else None
            for x, y in batches:
                opt.zero_grad()
                xs, ys = dist_worker._shard(x, rank, world), dist_worker._shard(y, rank, world)
                dist_worker.loss_fn(model, xs, ys).backward()
                if release:  # every shard was stepped and its gradient freed in backward
                    assert all(p.grad is None for p in model.parameters()), run
                opt.step()
            params = list(model.parameters())
            local = [p.to_local().clone() for p in params]
            state = [
                {k: (v.to_local() if hasattr(v, "to_local") else v).clone()
                 for k, v in opt.state[p].items()}
                for p in params
            ]  # fmt: skip
            assert all(s["step"].item() == len(batches) for s in state), run
            results.append((local, state, [p.full_tensor() for p in params]))
            if handle is not None:
                handle.remove()
        (p0, s0, _), (p1, s1, full) = results
        for a, b in zip(p0, p1):
            assert torch.equal(a, b), f"{run}: a parameter shard differs under release"
        for a, b in zip(s0, s1):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), f"{run}: state {k!r} differs under release"
        dist_worker._save(out_dir, f"release-fsdp2-{run}", full, rank)


def main() -> None:
    import torch.distributed as dist

    mode, out_dir = sys.argv[1], sys.argv[2]
    assert mode == "release", mode
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        run_ddp(out_dir, rank, world)
        run_fsdp2(out_dir, rank, world)
        dist.barrier()
    finally:
        gc.collect()  # as dist_worker: free DDP/FSDP objects before gloo goes
        dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out_dir, f"{mode}.done"), "w") as f:
            f.write("ok\n")


if __name__ == "__main__":
    main()
