"""Data-parallel training with ADOPT: DDP or FSDP2 (fully_shard), checkpointed with
torch.distributed.checkpoint (DCP).

    python -m torch.distributed.run --nproc_per_node=2 examples/distributed.py ddp
    python -m torch.distributed.run --nproc_per_node=2 examples/distributed.py fsdp2

Uses gloo on CPU and nccl on CUDA (one GPU per process). ADOPT's state is elementwise, so with
FSDP2 each rank keeps the moments of its own shard (as DTensors) and nothing else changes.
The checkpoint goes to a temporary folder that is deleted at the end; a real job would pass
a lasting one as ``checkpoint_id``.
"""

import gc
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from adoptim import ADOPTW


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "ddp"
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)
    ).to(device)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # With FSDP2, create the optimizer after fully_shard: it sees the DTensor shards.
    opt = ADOPTW(model.parameters(), lr=3e-3)

    g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(20):
        x = torch.randn(64, 16, generator=g).to(device)
        y = x.sum(dim=1, keepdim=True)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if step % 5 == 0 and rank == 0:
            print(f"[{mode}] step {step:2d}  loss {loss.item():.4f}")

    # Sharded checkpoint of model and optimizer (each rank writes its part), in one folder
    # that rank 0 creates and names for everyone.
    ckpt = [tempfile.mkdtemp(prefix=f"adoptim_example_{mode}_") if rank == 0 else None]
    dist.broadcast_object_list(ckpt, src=0)
    ckpt = ckpt[0]
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    # ... and back (here into the same objects; a resumed job would build fresh ones).
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rank == 0:
        print(f"[{mode}] saved and reloaded a DCP checkpoint in {ckpt}")
    dist.barrier()  # every rank has read it back: now it can go
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
        print(f"[{mode}] removed {ckpt}")
    del model, opt  # before the process group: gloo can abort at exit while they linger
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
