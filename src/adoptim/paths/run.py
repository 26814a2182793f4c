"""Running the for-loop or foreach path on tensors of any format: load, update, store.

The paths update real tensors of the compute dtype (:mod:`adoptim.update`). Each parameter's
format says how it gets there and back: a parameter or moments already of the compute dtype
are used in place; a bfloat16/float16 parameter is loaded as float32 and rounded back once
(:mod:`adoptim.formats.params`); bfloat16 moments likewise (:mod:`adoptim.formats.floating`);
8-bit moments are dequantized and requantized (:mod:`adoptim.formats.blockwise8`). This is
the one place where that happens for the unfused paths; the kernels do the same in registers.

Work copies are made a bounded chunk of tensors at a time (one tensor on the for-loop path),
so they never hold the whole model's state at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from adoptim._utils import view_as_real_if_complex
from adoptim.distributed import sharded as _sharded
from adoptim.formats import blockwise8, floating, master
from adoptim.formats.params import load_param, store_param

__all__ = ["FOREACH_CHUNK_ELEMENTS", "run_unfused"]

#: at most this many elements get work copies at once on the foreach path
FOREACH_CHUNK_ELEMENTS = 1 << 22


def _chunks(params: list[Tensor], copied: list[bool], budget: int) -> list[list[int]]:
    """Consecutive groups of tensors whose work copies fit in ``budget`` elements (a tensor
    larger than that alone); tensors updated in place cost nothing."""
    chunks: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(params):
        n = p.numel() if copied[i] else 0
        if chunks[-1] and n and size + n > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += n
    return [c for c in chunks if c]


def run_unfused(
    path: Callable,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    scales: list[tuple[Tensor, Tensor] | None] | None = None,
    corrections: list[Tensor | None] | None = None,
    budget: int = 0,
    stochastic_rounding: bool = False,
    **kwargs: Any,
) -> None:
    """Step these tensors with ``path`` (:func:`~adoptim.paths.forloop.single_tensor_adopt`
    or :func:`~adoptim.paths.foreach.multi_tensor_adopt`).

    ``scales[i]`` (m scale, v scale) marks tensor ``i`` as 8-bit: ``exp_avgs[i]`` and
    ``exp_avg_sqs[i]`` hold its codes. ``corrections[i]`` (master-weight correction) makes
    its parameter a master weight: loaded with :func:`adoptim.formats.master.load`, stored
    with :func:`adoptim.formats.master.store`. ``budget``: elements of work copies per call
    of ``path`` (0: one tensor with copies per call)."""
    scales = scales if scales is not None else [None] * len(params)
    corrections = corrections if corrections is not None else [None] * len(params)
    copied = [
        s is not None or c is not None or not (_in_place(p) and floating.load(p, m, v)[2])
        for p, m, v, s, c in zip(params, exp_avgs, exp_avg_sqs, scales, corrections)
    ]
    if not any(copied):  # every tensor updated where it lies: nothing to load or store
        path(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
        return
    for chunk in _chunks(params, copied, budget):
        _run_chunk(path, chunk, params, grads, exp_avgs, exp_avg_sqs, state_steps, scales,
                   corrections, stochastic_rounding=stochastic_rounding, **kwargs)  # fmt: skip


def _in_place(p: Tensor) -> bool:
    return p.dtype not in floating.LOW_PRECISION  # float32/64 and complex: real views


def _run_chunk(path, chunk, params, grads, exp_avgs, exp_avg_sqs, state_steps, scales,
               corrections, *, stochastic_rounding: bool, **kwargs) -> None:  # fmt: skip
    work_p, work_g, work_m, work_v, stores = [], [], [], [], []
    caution_dtensors = {}  # position in the work lists -> the DTensor parameter
    for i in chunk:
        p, g = params[i], grads[i]
        flat = scales[i] is not None  # 8-bit codes are flat: so are the work tensors
        if flat:
            local = blockwise8.local_state(p, (exp_avgs[i], scales[i][0], exp_avg_sqs[i], scales[i][1]))
            if _sharded.is_dtensor(p):
                if kwargs.get("caution"):  # the mask's mean must span the whole tensor
                    caution_dtensors[len(work_p)] = p
                p, g = p.to_local(), g.to_local()
            m, v = blockwise8.load(*local)
            moments = ("8bit", local)
            numel = local[0].numel()
        else:
            m, v, m_in_place = floating.load(p, exp_avgs[i], exp_avg_sqs[i])
            moments = ("float", m_in_place)
            numel = p.numel()
        if corrections[i] is not None:  # the float32 master weight (bf16/fp16 + correction)
            theta, p_in_place = master.load(p, corrections[i], flat=flat), False
        else:
            theta, p_in_place = load_param(p, flat=flat)
        (g_real,) = view_as_real_if_complex(g)
        g_work = g_real.reshape(-1) if flat else g_real
        work_p.append(theta)
        work_g.append(g_work.to(theta.dtype))
        work_m.append(m)
        work_v.append(v)
        # the step's rounding seed, from the call count before the step (the kernels' too)
        step = float(state_steps[i])
        seed = blockwise8.state_seed(step, numel)
        stores.append((i, p, p_in_place, moments, seed, step))
    lists = (work_p, work_g, work_m, work_v)
    if caution_dtensors:  # in place on DTensors over the same storage
        lists = tuple(
            [_sharded.as_sharded(t, caution_dtensors[k]) if k in caution_dtensors else t
             for k, t in enumerate(seq)]
            for seq in lists
        )  # fmt: skip
    kwargs = {**kwargs, "has_complex": False}  # the work tensors are real
    path(*lists, [state_steps[i] for i in chunk], **kwargs)
    for k, (i, p, p_in_place, (kind, where), seed, step) in enumerate(stores):
        if kind == "8bit":
            blockwise8.store(work_m[k], work_v[k], seed, *where)
        elif not where:  # float moments that were copies
            floating.store(exp_avgs[i], exp_avg_sqs[i], work_m[k], work_v[k])
        if corrections[i] is not None:  # rounded with the count before the step
            master.store(p, corrections[i], work_p[k], step)
        elif not p_in_place:  # (float moments: noise from torch's generator, as the C++ kernel)
            seed = seed if kind == "8bit" else None
            store_param(p, work_p[k], stochastic=stochastic_rounding, seed=seed)
