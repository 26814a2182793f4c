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
    # caution's mask mean is over the whole tensor, which one FSDP2 shard does not see
    "fused-caution": (ADOPT, {"lr": 1e-2, "caution": True, "fused": True}),
}
#: 8-bit state (every tensor quantized: the model's are small), DDP and ZeRO.
RUNS_8BIT = {
    "8bit-for-loop": (ADOPT, {"lr": 1e-2, "state_dtype": "8bit", "min_8bit_size": 0,
                              "foreach": False, "fused": False}),
    "8bit-default": (ADOPTW, {"lr": 1e-2, "state_dtype": "8bit", "min_8bit_size": 0}),
}


_8BIT = {"lr": 1e-2, "state_dtype": "8bit", "min_8bit_size": 0}
#: FSDP2 with 8-bit state (mode fsdp2-8bit, run on 1 and on 2 ranks): every path, on
#: make_model_8bit (every tensor quantized).
RUNS_FSDP2_8BIT = {
    "for-loop": (ADOPT, {**_8BIT, "foreach": False, "fused": False}),
    "foreach": (ADOPTW, {**_8BIT, "weight_decay": 0.1, "foreach": True, "fused": False,
                         "nesterov": True}),
    "fused": (ADOPTW, {**_8BIT, "weight_decay": 0.1, "fused": True}),
    "default": (ADOPT, {**_8BIT, "weight_decay": 0.05}),
    # caution's mask mean is over the whole tensor (across ranks), so on 2 ranks a shard's
    # step is not a plain tensor's: checked against the float32 for-loop update on DTensors
    "caution": (ADOPT, {**_8BIT, "caution": True, "foreach": False, "fused": False}),
    "caution-foreach": (ADOPTW, {**_8BIT, "weight_decay": 0.1, "caution": True,
                                 "nesterov": True, "foreach": True, "fused": False}),
}
STATE_KEYS_8BIT = ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale")


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def make_model_8bit() -> torch.nn.Module:
    """Shards of every kind on 2 ranks: 528 and 480 elements (3 and 2 blocks of 256, so the
    second rank leaves one of its scales unused), and an empty shard (the 1-row layer)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 48),
        torch.nn.Tanh(),
        torch.nn.Linear(48, 21),
        torch.nn.Tanh(),
        torch.nn.Linear(21, 1),
    )


def data(outputs: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, outputs, generator=g))
        for _ in range(STEPS)
    ]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def reference_params(run: str) -> list[torch.Tensor]:
    """Single process, full batch: what every distributed run must reproduce."""
    cls, kw = {**RUNS, **RUNS_8BIT}[run]
    return _train_single(make_model(), cls, kw, data())


def reference_params_8bit(run: str) -> list[torch.Tensor]:
    """Single process, full batch, of a RUNS_FSDP2_8BIT run (make_model_8bit)."""
    cls, kw = RUNS_FSDP2_8BIT[run]
    return _train_single(make_model_8bit(), cls, kw, data(1))


def _train_single(model, cls, kw, batches) -> list[torch.Tensor]:
    opt = cls(model.parameters(), **kw)
    for x, y in batches:
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if callable(getattr(t, "to_local", None)) else t


def _local_8bit(model, opt) -> list[list[torch.Tensor]]:
    """Each parameter's local shard, step and flat local 8-bit state, as plain copies."""
    out = []
    for p in model.parameters():
        state = opt.state[p]
        out.append(
            [p.to_local().detach().clone(), state["step"].clone()]
            + [_local(state[k]).reshape(-1).clone() for k in STATE_KEYS_8BIT]
        )
    return out


def _assert_equal(got, expected, what) -> None:
    names = ("param", "step", *STATE_KEYS_8BIT)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        for name, a, b in zip(names, g, e, strict=True):
            if not torch.equal(a, b):
                diff = (a.double() - b.double()).abs().max() if a.shape == b.shape else "shape"
                raise AssertionError(f"{what}: parameter {i}: {name} differs ({diff})")


def _caution_reference(model, opt) -> list[list[torch.Tensor]]:
    """What a caution step must leave on each rank (before opt.step()): the float32 update of
    the same path (for-loop or foreach) run on DTensors of the dequantized moments (DTensor
    reduces caution's mask mean across ranks), then the moments requantized with the step's
    seed."""
    from adoptim import rng
    from adoptim.formats import blockwise8 as _quant
    from adoptim.paths import foreach as _foreach
    from adoptim.paths import forloop as _forloop

    group = opt.param_groups[0]
    update = _foreach.multi_tensor_adopt if group["foreach"] else _forloop.single_tensor_adopt
    out = []
    for key, p in enumerate(model.parameters()):  # one group: the state_dict index
        m, v = opt.moments(p)
        theta = p.detach().clone()
        step = opt.state[p]["step"].clone() if "step" in opt.state[p] else torch.zeros(())
        local_numel = p.to_local().numel()
        seed = _quant.state_seed(float(step), rng.tensor_seed(group["seed"], key))
        update(
            [theta], [p.grad.detach().clone()], [m], [v], [step],
            scalars_as_tensors=False, has_complex=False, lr=group["lr"],
            beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            clip_exp=group["clip_exp"], clip_fn=None, weight_decay=group["weight_decay"],
            decouple=group["decouple"], maximize=group["maximize"],
            nesterov=group["nesterov"], caution=group["caution"],
        )  # fmt: skip
        blocks = _quant.num_blocks(local_numel)
        codes = [torch.empty(local_numel, dtype=torch.int8), torch.empty(blocks)]
        codes += [torch.empty(local_numel, dtype=torch.uint8), torch.empty(blocks)]
        _quant.quantize_m(m.to_local().reshape(-1), seed, codes[0], codes[1])
        _quant.quantize_v(v.to_local().reshape(-1), seed, codes[2], codes[3])
        out.append([theta.to_local(), step, *codes])
    return out


def _check_against(model, opt, expected) -> None:
    """The rank's shard, step and 8-bit state (scales: the blocks in use) are ``expected``."""
    for i, (p, want) in enumerate(zip(model.parameters(), expected, strict=True)):
        state = opt.state[p]
        got = [p.to_local(), state["step"]]
        got += [_local(state[k]).reshape(-1) for k in STATE_KEYS_8BIT]
        for key, a, b in zip(("param", "step", *STATE_KEYS_8BIT), got, want, strict=True):
            if key.endswith("_scale"):
                assert not a[b.numel():].any(), f"parameter {i}: unused {key} not 0"
                a = a[: b.numel()]
            assert torch.equal(a, b), f"parameter {i}: {key} differs from the reference"


def run_fsdp2_8bit(out_dir, rank, world):
    """FSDP2 with state_dtype="8bit", on every path: each step checked against a plain
    optimizer on the rank's shard (bit for bit), then three interrupted runs (DCP with
    sharded and with full state dicts, plain state_dict/load_state_dict) that must resume to
    the uninterrupted run's parameters and state, bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from adoptim.kernels.cpu import build as _kernel_cache
    from adoptim.kernels.cpu import launch as _cpu_kernel
    from adoptim.paths import forloop as _forloop

    mesh = init_device_mesh("cpu", (world,))
    batches = data(1)
    tag = f"w{world}"

    def build(cls, kw):
        model = make_model_8bit()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), **kw)

    def train(model, opt, steps, check=None, kw=None):
        """``check``: "shadow" (each rank's shard and 8-bit state after every step are those
        of a plain tensor holding the shard, stepped by a plain optimizer on the same
        gradient: blocks of 256 over the local shard) or "caution" (_caution_reference)."""
        shadow = None
        if check == "shadow":
            plain = [torch.nn.Parameter(p.to_local().detach().clone()) for p in model.parameters()]
            shadow = (plain, type(opt)(plain, **kw))  # the same class and options
        for x, y in steps:
            opt.zero_grad()
            loss_fn(model, _shard(x, rank, world), _shard(y, rank, world)).backward()
            expected = _caution_reference(model, opt) if check == "caution" else None
            opt.step()
            if shadow is not None:
                for p, q in zip(model.parameters(), shadow[0]):
                    q.grad = p.grad.to_local().clone()
                shadow[1].step()
                expected = []
                for q in shadow[0]:
                    state = shadow[1].state[q]
                    expected.append([q, state["step"], *(state[k] for k in STATE_KEYS_8BIT)])
            if expected is not None:
                _check_against(model, opt, expected)

    for run, (cls, kw) in RUNS_FSDP2_8BIT.items():
        forloop = _forloop.single_tensor_adopt
        if run == "fused":
            if _cpu_kernel.unsupported_reason() is not None:
                continue  # no compiler here: the test skips this run
            assert _kernel_cache.load_kernel(build=True, wait=True) is not None
            # a fallback to the for-loop path must not pass for the kernel
            def refuse(*args, **kwargs):
                raise AssertionError("the for-loop path ran where the kernel should have")

            _forloop.single_tensor_adopt = refuse
        try:
            model, opt = build(cls, kw)
            check = "caution" if world > 1 and kw.get("caution") else "shadow"
            train(model, opt, batches, check, kw)
            params = list(model.parameters())
            assert all(isinstance(p, DTensor) for p in params)
            state = opt.state[params[2]]  # the 21 x 48 weight
            for key in STATE_KEYS_8BIT:
                assert isinstance(state[key], DTensor), key
            assert state["exp_avg"].dtype == torch.int8
            assert state["exp_avg"].placements == params[2].placements
            assert state["exp_avg"].to_local().shape == params[2].to_local().shape
            assert tuple(state["exp_avg_scale"].shape) == (world, 3 if world == 2 else 4)
            final = _local_8bit(model, opt)
            _save(out_dir, f"fsdp2-8bit-{tag}-{run}", [p.full_tensor() for p in params], rank)

            # DCP, sharded state dicts (the default), saved after SPLIT steps
            model, opt = build(cls, kw)
            train(model, opt, batches[:SPLIT])
            ckpt = os.path.join(out_dir, f"dcp-8bit-{tag}-{run}")
            dcp.save(
                {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                checkpoint_id=ckpt,
            )
            full = StateDictOptions(full_state_dict=True)
            full_sd = (
                get_model_state_dict(model, options=full),
                get_optimizer_state_dict(model, opt, options=full),
            )
            plain_sd = ([p.to_local().detach().clone() for p in model.parameters()], opt.state_dict())
            path = os.path.join(out_dir, f"plain-8bit-{tag}-{run}-rank{rank}.pt")
            torch.save(plain_sd, path)
            del model, opt

            model, opt = build(cls, kw)
            loaded = {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, opt),
            }
            dcp.load(loaded, checkpoint_id=ckpt)
            set_model_state_dict(model, loaded["model"])
            set_optimizer_state_dict(model, opt, loaded["optim"])
            assert float(opt.state[next(iter(model.parameters()))]["step"]) == SPLIT
            train(model, opt, batches[SPLIT:])
            _assert_equal(_local_8bit(model, opt), final, f"{run}: DCP resume")

            # full (unsharded) state dicts: codes gathered and scales stacked, then scattered
            model, opt = build(cls, kw)
            set_model_state_dict(model, full_sd[0], options=full)
            set_optimizer_state_dict(model, opt, full_sd[1], options=full)
            train(model, opt, batches[SPLIT:])
            _assert_equal(_local_8bit(model, opt), final, f"{run}: full state dict resume")

            # plain state_dict() through torch.save, on the same world size
            model, opt = build(cls, kw)
            locals_, osd = torch.load(path, weights_only=False)
            with torch.no_grad():
                for p, value in zip(model.parameters(), locals_):
                    p.to_local().copy_(value)
            opt.load_state_dict(osd)
            train(model, opt, batches[SPLIT:])
            _assert_equal(_local_8bit(model, opt), final, f"{run}: state_dict resume")
        finally:
            _forloop.single_tensor_adopt = forloop

    # Conversions on this mesh, the way to another sharding (docs/lowbit.md): 8-bit state
    # loaded into a float-state optimizer is dequantized into DTensor moments, and back.
    cls, kw = RUNS_FSDP2_8BIT["default"]
    model, opt = build(cls, kw)
    train(model, opt, batches[:SPLIT])
    as_float = cls(model.parameters(), **{**kw, "state_dtype": "auto"})
    as_float.load_state_dict(opt.state_dict())
    back = cls(model.parameters(), **kw)
    back.load_state_dict(as_float.state_dict())
    for p in model.parameters():
        state = as_float.state[p]
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].dtype == torch.float32
        assert "exp_avg_scale" not in state
        for a, b, c in zip(opt.moments(p), as_float.moments(p), back.moments(p), strict=True):
            assert torch.equal(a.to_local(), b.to_local())  # dequantized exactly
            # requantized: a value on a code stays on it up to float32 rounding
            torch.testing.assert_close(c.to_local(), a.to_local(), rtol=1e-5, atol=1e-12)
    # A plain (unsharded) 8-bit state dict does not load into FSDP2: its blocks are others.
    plain_model = make_model_8bit()
    plain = cls(plain_model.parameters(), **kw)
    loss_fn(plain_model, *batches[0]).backward()
    plain.step()
    try:
        cls(model.parameters(), **kw).load_state_dict(plain.state_dict())
    except ValueError as exc:
        assert "follow the sharding" in str(exc), exc
    else:
        raise AssertionError("a plain 8-bit state dict loaded into FSDP2")

    # A checkpoint from 2 ranks does not load on 1: the scales' global shape differs.
    other = os.path.join(out_dir, "dcp-8bit-w2-default")
    if world == 1 and os.path.isdir(other):
        model, opt = build(*RUNS_FSDP2_8BIT["default"])
        loaded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        try:
            dcp.load(loaded, checkpoint_id=other)
        except dcp.CheckpointException as exc:  # holding the planner's ValueError
            text = str(exc)  # "Size mismatch between saved ... and current: ... for ..._scale"
            assert "Size mismatch" in text and "_scale" in text, text
        else:
            raise AssertionError("a 2-rank 8-bit checkpoint loaded on 1 rank")
        if rank == 0:
            with open(os.path.join(out_dir, "fsdp2-8bit-w1-refused-w2.done"), "w") as f:
                f.write("ok\n")


def main() -> None:
    import torch.distributed as dist

    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        {"ddp": run_ddp, "fsdp2": run_fsdp2, "fsdp2-8bit": run_fsdp2_8bit}[mode](
            out_dir, rank, world
        )
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
