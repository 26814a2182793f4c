"""Worker for tests/test_distributed.py, started by torchrun (2 processes, gloo, loopback).

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \
        --master_port=PORT tests/dist_worker.py MODE OUT_DIR

MODE is ``ddp`` (DistributedDataParallel, then ZeroRedundancyOptimizer) or ``fsdp2``
(fully_shard with DTensor parameters, then a torch.distributed.checkpoint save/load in the
middle of training). Rank 0 writes the full final parameters of every run to
``OUT_DIR/<run>.pt``; the test compares them with a single-process run of
:func:`reference_params` on the full batch. The model, data and optimizer settings live here so
that both sides build exactly the same thing.
"""

from __future__ import annotations

import gc
import os
import sys

import torch

from adoptim import ADOPT, ADOPTW

STEPS = 6
SPLIT = 3  # the fsdp2 checkpoint run saves after this many steps
BATCH = 8  # per step, split evenly across the 2 ranks
#: run name -> (optimizer class, kwargs), for the paths each mode runs.
RUNS = {
    "for-loop": (ADOPT, {"lr": 1e-2, "foreach": False, "fused": False}),
    "foreach": (ADOPTW, {"lr": 1e-2, "weight_decay": 0.1, "foreach": True, "fused": False}),
    "default": (ADOPT, {"lr": 1e-2, "weight_decay": 0.05}),
}
#: 8-bit state (every tensor quantized: the model's are small), DDP and ZeRO only: FSDP2
#: refuses it at construction (checked in run_fsdp2).
RUNS_8BIT = {
    "8bit-for-loop": (ADOPT, {"lr": 1e-2, "state_dtype": "8bit", "min_8bit_size": 0,
                              "foreach": False, "fused": False}),
    "8bit-default": (ADOPTW, {"lr": 1e-2, "state_dtype": "8bit", "min_8bit_size": 0}),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g))
        for _ in range(STEPS)
    ]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def reference_params(run: str) -> list[torch.Tensor]:
    """Single process, full batch: what every distributed run must reproduce."""
    cls, kw = {**RUNS, **RUNS_8BIT}[run]
    model = make_model()
    opt = cls(model.parameters(), **kw)
    for x, y in data():
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _shard(x, rank, world):
    return x.chunk(world)[rank]


def _save(out_dir, name, params, rank):
    if rank == 0:
        torch.save([p.detach().clone() for p in params], os.path.join(out_dir, f"{name}.pt"))


def run_ddp(out_dir, rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    for run, (cls, kw) in {**RUNS, **RUNS_8BIT}.items():
        model = DDP(make_model())
        opt = cls(model.parameters(), **kw)
        for x, y in data():
            opt.zero_grad()
            loss_fn(model, _shard(x, rank, world), _shard(y, rank, world)).backward()
            opt.step()
        _save(out_dir, f"ddp-{run}", model.module.parameters(), rank)

        model = DDP(make_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw)
        for x, y in data():
            opt.zero_grad()
            loss_fn(model, _shard(x, rank, world), _shard(y, rank, world)).backward()
            opt.step()
        opt.consolidate_state_dict(to=0)
        if rank == 0:  # the consolidated state dict loads into a plain ADOPT
            plain = cls(make_model().parameters(), **kw)
            plain.load_state_dict(opt.state_dict())
            assert len(plain.state) == len(list(model.parameters()))
        _save(out_dir, f"zero-{run}", model.module.parameters(), rank)


def run_fsdp2(out_dir, rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))

    def build(cls, kw):
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), **kw)

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model, _shard(x, rank, world), _shard(y, rank, world)).backward()
            opt.step()

    cls, kw = RUNS_8BIT["8bit-default"]
    try:
        build(cls, kw)
    except ValueError as exc:
        assert "FSDP2" in str(exc), exc
    else:
        raise AssertionError("state_dtype='8bit' with FSDP2 should be refused at construction")

    for run, (cls, kw) in RUNS.items():
        model, opt = build(cls, kw)
        train(model, opt, data())
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) for p in params)
        state = opt.state[params[0]]
        # Per-shard elementwise state: moments are DTensors sharded like their parameter.
        assert isinstance(state["exp_avg_sq"], DTensor)
        assert state["exp_avg_sq"].placements == params[0].placements
        assert state["exp_avg_sq"].to_local().shape == params[0].to_local().shape
        _save(out_dir, f"fsdp2-{run}", [p.full_tensor() for p in params], rank)

        # Interrupted run: save with DCP after SPLIT steps, load into fresh objects, go on.
        model, opt = build(cls, kw)
        train(model, opt, data()[:SPLIT])
        model_sd, optim_sd = get_state_dict(model, opt)
        ckpt = os.path.join(out_dir, f"dcp-{run}")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        del model, opt
        model, opt = build(cls, kw)
        model_sd, optim_sd = get_state_dict(model, opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=ckpt)
        set_state_dict(
            model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        first = next(iter(model.parameters()))
        assert float(opt.state[first]["step"]) == SPLIT
        train(model, opt, data()[SPLIT:])
        _save(out_dir, f"fsdp2-dcp-{run}", [p.full_tensor() for p in model.parameters()], rank)


def main() -> None:
    import torch.distributed as dist

    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        {"ddp": run_ddp, "fsdp2": run_fsdp2}[mode](out_dir, rank, world)
        dist.barrier()  # nobody tears gloo down while the other rank still talks
    finally:
        # Free the DDP/ZeRO/FSDP objects (reference cycles) before gloo goes: otherwise torch
        # 2.13's gloo sometimes aborts the process at exit ("terminate called without an
        # active exception"), seen in 1 of 10 plain-DDP runs with no adoptim code involved.
        gc.collect()
        dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out_dir, f"{mode}.done"), "w") as f:
            f.write("ok\n")


if __name__ == "__main__":
    main()
