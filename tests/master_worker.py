"""Worker for tests/test_fsdp_master.py: FSDP2 (``fully_shard``) with bfloat16 parameters and
the master-weight correction (``master_weight_bits``), started by torchrun (gloo):

    python -m torch.distributed.run --nproc_per_node=2 ... tests/master_worker.py MODE OUT

Every rank trains on the *whole* batch (not a slice of it), so the reduce-scattered gradient
is the full batch's exactly ((g + g) / 2 = g in any float format) and an FSDP2 run can be held
bit for bit to one process wherever the optimizer's own bits do not depend on the sharding.
The model is tests/dist_worker.py's ``make_model_8bit`` in bfloat16 (``model.to(bf16)``
before ``fully_shard``: the sharded parameters themselves are bf16): uneven shards and an
empty one on 2 ranks. MODE ``quick`` (the default test) checks, raising on any failure:

* *shards*: after every step, each rank's parameter shard, correction and state are bit for
  bit those of a plain optimizer stepping a plain bf16 tensor that holds the shard, on the
  same gradient (24 and 32 bits; float32 and 8-bit state; for-loop and foreach paths): each
  rank joins and splits its local shard, with its local element indices' random numbers;
* *one process*: 32 bits and float32 state end bit for bit where one process does
  (parameters, corrections, moments, ``get_fp32_model_state_dict``); 24 bits stay within a
  few 24-bit steps of one process (their random numbers follow the shards), with a nonzero
  correction;
* *tiny lr*: at an lr where plain bf16 stalls (its parameters do not move), the 24-bit
  master weights follow the 32-bit ones; the numerics check (on each rank's shard) warns
  for plain bf16 and not for 24 bits;
* *resume*: ``opt.state_dict()`` through torch.save (per rank) and a DCP checkpoint
  (``get_state_dict``/``set_state_dict``) continue bit for bit;
* *release*: ``enable_gradient_release`` ends bit for bit where the normal FSDP2 run does;
* *fp32 weights*: ``get_fp32_model_state_dict`` gives DTensors sharded like the parameters;
  ``set_fp32_model_state_dict`` takes those or full tensors and gives them back exactly.

MODE ``slow`` adds full (unsharded) state dicts, the release with 8-bit state on the fused
path's settings and 1-rank runs (then bit for bit with one process at 24 bits too).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import warnings

import dist_worker  # beside this file: the script's directory is on sys.path
import torch

START = time.perf_counter()

import adoptim  # noqa: E402
from adoptim import ADOPT, ADOPTW  # noqa: E402

BF16 = torch.bfloat16
STEPS = 6
SPLIT = 3
KEY = "master_correction"
_8BIT = {"state_dtype": "8bit", "min_8bit_size": 0}
#: run name -> (optimizer class, kwargs); every one is checked shard by shard. MODE quick
#: runs RUNS, slow runs SLOW_RUNS (on 2 ranks, then 1).
RUNS = {
    "32": (ADOPT, {"lr": 1e-2, "master_weight_bits": 32, "foreach": False}),
    "24-8bit": (ADOPTW, {"lr": 1e-2, "master_weight_bits": 24, "weight_decay": 0.1, **_8BIT,
                         "foreach": False}),
}  # fmt: skip
SLOW_RUNS = {
    "24": (ADOPT, {"lr": 1e-2, "master_weight_bits": 24, "foreach": False}),
    "24-foreach": (ADOPTW, {"lr": 1e-2, "master_weight_bits": 24, "foreach": True}),
    "32-8bit-foreach": (ADOPT, {"lr": 1e-2, "master_weight_bits": 32, **_8BIT,
                                "foreach": True}),
    "24-8bit-default": (ADOPT, {"lr": 1e-2, "master_weight_bits": 24, **_8BIT}),
}  # fmt: skip


def lap(what, t0, rank):
    """Print a section's time (MASTER_WORKER_TIMES=1, rank 0) and return now."""
    now = time.perf_counter()
    if os.environ.get("MASTER_WORKER_TIMES") and rank == 0:
        print(f"{what}: {now - t0:.1f} s", flush=True)
    return now


def batches():
    return [(x.to(BF16), y.to(BF16)) for x, y in dist_worker.data(1)]


def plain_model():
    return dist_worker.make_model_8bit().to(BF16)


def local(t):
    return t.to_local() if callable(getattr(t, "to_local", None)) else t


def train(model, opt, steps, shadow=None):
    for x, y in steps:
        opt.zero_grad()
        dist_worker.loss_fn(model, x, y).backward()
        grads = [local(p.grad).clone() if p.grad is not None else None
                 for p in model.parameters()]  # fmt: skip
        opt.step()
        if shadow is not None:
            check_shadow(model, opt, shadow, grads)


def make_shadow(model, cls, kw):
    """A plain optimizer over plain bf16 copies of this rank's shards (same order, so the
    same keys for the random numbers)."""
    plain = [torch.nn.Parameter(local(p).detach().clone()) for p in model.parameters()]
    return plain, cls(plain, **kw)


def check_shadow(model, opt, shadow, grads):
    plain, popt = shadow
    for q, g in zip(plain, grads, strict=True):
        q.grad = g
    popt.step()
    for i, (p, q) in enumerate(zip(model.parameters(), plain, strict=True)):
        assert torch.equal(local(p), q), f"parameter {i}: shard differs from a plain tensor's"
        ours, theirs = opt.state[p], popt.state[q]
        assert ours.keys() == theirs.keys(), (ours.keys(), theirs.keys())
        for k in ours:
            a, b = local(ours[k]).reshape(-1), theirs[k].reshape(-1)
            if k.endswith("_scale"):  # the blocks in use (a DTensor row is the largest's)
                a = a[: b.numel()]
            assert torch.equal(a, b), f"parameter {i}: state {k!r} differs from a plain tensor's"


def shard_of(t, rank, world):
    """FSDP2's shard of ``t`` on ``rank``: torch.chunk's on dim 0 (empty past the chunks)."""
    chunks = t.chunk(world)
    return chunks[rank] if rank < len(chunks) else t[:0]


def snapshot(model, opt):
    """This rank's parameter shards and state, as plain copies."""
    out = []
    for p in model.parameters():
        state = {k: local(v).clone() for k, v in opt.state[p].items()}
        out.append((local(p).detach().clone(), state))
    return out


def assert_same(a, b, what):
    for i, ((pa, sa), (pb, sb)) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(pa, pb), f"{what}: parameter {i} differs"
        assert sa.keys() == sb.keys(), f"{what}: parameter {i}: state keys differ"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{what}: parameter {i}: state {k!r} differs"


def single_process(cls, kw, steps, seed=0):
    """One process, the same bf16 model and data: (params, state, fp32 state dict)."""
    model = plain_model()
    opt = cls(model.parameters(), **kw)
    for group in opt.param_groups:  # (set here: ADOPTW takes no seed argument)
        group["seed"] = seed
    train(model, opt, steps)
    params = [p.detach().clone() for p in model.parameters()]
    state = [dict(opt.state[p]) for p in model.parameters()]
    return params, state, opt.get_fp32_model_state_dict(model)


def main() -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = batches()

    def build(cls, kw):
        model = plain_model()  # bf16 before fully_shard: the shards are bf16 DTensors
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, cls(model.parameters(), **kw)

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    t0 = lap("start", START, rank)
    try:
        runs = RUNS if mode == "quick" else SLOW_RUNS
        for run, (cls, kw) in runs.items():
            # shards: every step against a plain optimizer on this rank's shard
            model, opt = build(cls, kw)
            train(model, opt, data, shadow=make_shadow(model, cls, kw))
            params = list(model.parameters())
            assert all(isinstance(p, DTensor) and p.dtype == BF16 for p in params)
            corr = opt.state[params[2]][KEY]  # the 21 x 48 weight: 11 and 10 rows
            assert isinstance(corr, DTensor) and corr.placements == params[2].placements
            assert corr.to_local().shape == params[2].to_local().shape
            assert corr.dtype == (torch.int8 if kw["master_weight_bits"] == 24 else torch.int16)
            final = snapshot(model, opt)
            t0 = lap(f"{run} shards", t0, rank)

            # one process
            # 32 bits round nothing; on one rank a shard is the whole tensor (the same
            # random numbers and 8-bit blocks); 8-bit blocks follow the shards on two
            exact = world == 1 or (kw["master_weight_bits"] == 32 and "state_dtype" not in kw)
            sp, sstate, sfp32 = single_process(cls, kw, data)
            if not exact:  # 24 bits' own noise: one process with other seeds, (max, mean)
                spread = {k: (0.0, 0.0) for k in sfp32}
                for seed in (1, 2):
                    other = single_process(cls, kw, data, seed)[2]
                    for k, v in other.items():
                        d = (v - sfp32[k]).abs()
                        spread[k] = (max(spread[k][0], d.max()), max(spread[k][1], d.mean()))
            fp32 = opt.get_fp32_model_state_dict(model)
            got = [full(p) for p in params]
            # (gloo cannot gather int16, 32 bits' corrections: each rank checks its own rows,
            # FSDP2's shard being torch.chunk's on dim 0)
            got_corr = [local(opt.state[p][KEY]) for p in params]
            sstate = [{**s, KEY: shard_of(s[KEY], rank, world)} for s in sstate]
            for i, (p, c, sp_i, ss_i) in enumerate(zip(got, got_corr, sp, sstate, strict=True)):
                if exact:
                    assert torch.equal(p, sp_i), f"{run}: parameter {i} differs from one process"
                    assert torch.equal(c, ss_i[KEY]), f"{run}: correction {i} differs"
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k + "_scale" not in ss_i:
                            assert torch.equal(full(opt.state[params[i]][k]), ss_i[k]), (run, k)
            for key, value in fp32.items():
                assert isinstance(value, DTensor) and value.dtype == torch.float32, key
                master = value.full_tensor()
                if exact:
                    assert torch.equal(master, sfp32[key]), f"{run}: fp32 {key} differs"
                else:  # 24 bits: other random numbers on rank 1's shards
                    diff = (master - sfp32[key]).abs()
                    assert diff.max() <= 2 * spread[key][0], (run, key, float(diff.max()))
                    assert diff.mean() <= 2 * spread[key][1], (run, key, float(diff.mean()))
            if kw["master_weight_bits"] == 24:  # the correction holds something
                assert any(c.any() for c in got_corr), f"{run}: all corrections are zero"

            t0 = lap(f"{run} one process", t0, rank)
            # resume: opt.state_dict() through torch.save, per rank (same world size)
            model, opt = build(cls, kw)
            train(model, opt, data[:SPLIT])
            path = os.path.join(out_dir, f"{mode}-w{world}-{run}-rank{rank}.pt")
            torch.save(([local(p).detach().clone() for p in model.parameters()],
                        opt.state_dict()), path)  # fmt: skip
            # DCP: quick on 32 bits only (the same code for 24: a DTensor of int8 instead)
            use_dcp = mode == "slow" or kw["master_weight_bits"] == 32
            if use_dcp:
                model_sd, optim_sd = get_state_dict(model, opt)
                ckpt = os.path.join(out_dir, f"dcp-{mode}-w{world}-{run}")
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
            # full state dicts gather the corrections: gloo has no int16 (32 bits')
            gather = mode == "slow" and kw["master_weight_bits"] == 24
            if gather:
                opts = StateDictOptions(full_state_dict=True)
                full_sd = get_state_dict(model, opt, options=opts)
            del model, opt
            model, opt = build(cls, kw)
            shards, osd = torch.load(path, weights_only=False)
            with torch.no_grad():
                for p, value in zip(model.parameters(), shards, strict=True):
                    local(p).copy_(value)
            opt.load_state_dict(osd)
            train(model, opt, data[SPLIT:])
            assert_same(snapshot(model, opt), final, f"{run}: state_dict resume")
            if use_dcp:
                model, opt = build(cls, kw)
                model_sd, optim_sd = get_state_dict(model, opt)
                loaded = {"model": model_sd, "optim": optim_sd}
                dcp.load(loaded, checkpoint_id=ckpt)
                set_state_dict(model, opt, model_state_dict=loaded["model"],
                               optim_state_dict=loaded["optim"])  # fmt: skip
                train(model, opt, data[SPLIT:])
                assert_same(snapshot(model, opt), final, f"{run}: DCP resume")
            if gather:
                model, opt = build(cls, kw)
                set_state_dict(model, opt, model_state_dict=full_sd[0],
                               optim_state_dict=full_sd[1], options=opts)  # fmt: skip
                train(model, opt, data[SPLIT:])
                assert_same(snapshot(model, opt), final, f"{run}: full state dict resume")

            t0 = lap(f"{run} resume", t0, rank)
            # release: bit for bit the normal run
            model, opt = build(cls, kw)
            handle = adoptim.enable_gradient_release(model, opt)
            for x, y in data:
                opt.zero_grad()
                dist_worker.loss_fn(model, x, y).backward()
                assert all(p.grad is None for p in model.parameters()), run
                opt.step()
            handle.remove()
            assert_same(snapshot(model, opt), final, f"{run}: gradient release")
            t0 = lap(f"{run} release", t0, rank)

        if mode == "quick":
            check_tiny_lr(build, data)
            t0 = lap("tiny lr", t0, rank)
            check_fp32_weights(build, full, data)
            t0 = lap("fp32 weights", t0, rank)
        dist.barrier()
    finally:
        gc.collect()  # as dist_worker: free FSDP objects before gloo goes
        dist.destroy_process_group()
    lap("end", START, rank)
    if rank == 0:
        for name in (f"{mode}.done", f"{mode}-w{world}.done"):
            with open(os.path.join(out_dir, name), "w") as f:
                f.write("ok\n")


def check_tiny_lr(build, data):
    """lr = 1e-4: under half a bf16 step for all but the smallest weights, so plain bf16
    stalls; 24-bit master weights move with float32 (32-bit) ones, which move as one
    process's (bit for bit: the "32" run)."""
    kw = {"lr": 1e-4, "foreach": False}
    start = plain_model().state_dict()
    moved = {32: torch.cat([(v - start[k].float()).reshape(-1)
                            for k, v in single_process(ADOPT, {**kw, "master_weight_bits": 32},
                                                       data)[2].items()])}  # fmt: skip
    from adoptim.formats import master

    every, master.CHECK_EVERY = master.CHECK_EVERY, 5  # the numerics check on call 6
    try:
        for bits in (None, 24):
            model, opt = build(ADOPT, {**kw, "master_weight_bits": bits})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(model, opt, data)
            stalls = [str(w.message) for w in caught
                      if issubclass(w.category, master.UpdateStallWarning)]  # fmt: skip
            # each rank samples its own shard (no communication) and names the tensor
            assert bool(stalls) == (bits is None), (bits, stalls)
            if bits is None:
                assert "plain bfloat16" in stalls[0] and "param_groups[0]" in stalls[0]
            end = opt.get_fp32_model_state_dict(model)
            moved[bits] = torch.cat([(end[k].full_tensor() - start[k].float()).reshape(-1)
                                     for k in start])  # fmt: skip
    finally:
        master.CHECK_EVERY = every
    travel = moved[32].norm()
    assert travel > 0
    # plain bf16: most elements never move (a few tiny weights have a small enough ulp)
    assert (moved[None] == 0).float().mean() > 0.8, (moved[None] == 0).float().mean()
    err24 = (moved[24] - moved[32]).norm() / travel
    errnone = (moved[None] - moved[32]).norm() / travel
    if os.environ.get("MASTER_WORKER_TIMES"):
        print(f"tiny lr: {float(err24)=:.3f} {float(errnone)=:.3f}", flush=True)
    assert err24 < 0.2 and errnone > 0.5, (float(err24), float(errnone))


def check_fp32_weights(build, full, data):
    """get_fp32_model_state_dict: DTensors sharded like the parameters, each the master
    weight; set_fp32_model_state_dict takes those or full tensors (every rank holding the
    same) and gives them back exactly (32 bits: float32 values exactly)."""
    from torch.distributed.tensor import DTensor

    model, opt = build(ADOPT, {"lr": 1e-2, "master_weight_bits": 32, "foreach": False})
    train(model, opt, data[:2])
    sd = opt.get_fp32_model_state_dict(model)
    for name, p in model.named_parameters():
        assert isinstance(sd[name], DTensor) and sd[name].placements == p.placements, name
    torch.manual_seed(5)  # the same float32 weights on every rank
    new = {k: torch.randn(v.shape) for k, v in sd.items()}
    for given in (new, {k: v.full_tensor() for k, v in sd.items()}):
        fresh, fopt = build(ADOPT, {"lr": 1e-2, "master_weight_bits": 32, "foreach": False})
        fopt.set_fp32_model_state_dict(fresh, given)
        back = fopt.get_fp32_model_state_dict(fresh)
        for k, v in given.items():
            assert torch.equal(back[k].full_tensor(), full(v)), f"fp32 round trip: {k}"
    # a plain (one-process) correction does not load into FSDP2: refused, saying what to use
    plain = plain_model()
    popt = ADOPT(plain.parameters(), lr=1e-2, master_weight_bits=32, foreach=False)
    dist_worker.loss_fn(plain, *data[0]).backward()
    popt.step()
    try:
        fopt.load_state_dict(popt.state_dict())
    except ValueError as exc:
        assert "get_optimizer_state_dict" in str(exc) and "a plain tensor" in str(exc), exc
    else:
        raise AssertionError("a plain correction loaded into FSDP2")
    # sharded input (DTensors placed as the model's)
    fresh, fopt = build(ADOPT, {"lr": 1e-2, "master_weight_bits": 24, "foreach": False})
    fopt.set_fp32_model_state_dict(fresh, sd)
    back = fopt.get_fp32_model_state_dict(fresh)
    for k, v in sd.items():  # 24 bits: rounded to nearest on the 24-bit grid
        torch.testing.assert_close(back[k].full_tensor(), v.full_tensor(), rtol=2**-16, atol=0)


if __name__ == "__main__":
    main()
