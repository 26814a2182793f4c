"""The Triton kernels of the fused GPU path; :mod:`adoptim._triton_kernel` launches them.

Imported only when a Triton step (or ``adoptim doctor --compile``) asks for them, so that
importing adoptim never imports triton.

Two kernels, each launched once per group of tensors that share a device and dtypes:

* :func:`schedule_kernel`, one lane per tensor: reads each tensor's call count ``s`` on the
  device and writes the per-tensor scalars of :func:`adoptim._schedule.call_scalars` (clip
  bound, weight of ``g*g``, whether the tensor has started) into a small table, zeroes the
  caution counters, and advances ``s`` unless GradScaler's ``found_inf`` is set. Nothing is
  read on the host, so a step can be captured in a CUDA graph.
* :func:`adopt_kernel`, one program per chunk of ``CHUNK`` elements of one tensor (a table
  of work items maps program ids to (tensor, chunk)): the update, reading theta, g, m, v once
  and writing theta, m, v once per element. Pointers come from a table of ``data_ptr``
  values; full blocks are loaded without a mask, so that with 16-byte-aligned tensors the
  loads are 128 bits wide, and the last partial block of each tensor is masked. With
  ``caution`` it runs twice: ``COUNT_ONLY`` counts the coordinates where ``u * g > 0`` (atomic
  add per tensor), then the update divides by that tensor's mean.

The operations follow the for-loop path (``adoptim._forloop``) in its order, as the CPU
kernel (``csrc/fused_adopt.cpp``) does: see the comments there for the choices (NaN-passing
clamps written as selects, torch.lerp's two formulas).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["adopt_kernel", "schedule_kernel"]

# Columns of the per-tensor scalar table (float64, one row per tensor).
N_COLUMNS = 4  # bound, sq_weight, started (0 or 1), s (count before this call)


# Few helper functions on purpose: under the interpreter each call of one costs about a
# millisecond (it patches triton.language), which is most of an interpreted step.


@triton.jit
def _inputs(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, gmul, wd,
            C_DTYPE: tl.constexpr, SCALE_G: tl.constexpr, COUPLED: tl.constexpr):
    """theta, g (unscaled, signed, with coupled decay), m, v in the compute dtype; ``mask``
    is None for full blocks (unmasked, so aligned loads are 128-bit), lanes past the end of
    the tensor read as 0 otherwise."""
    if mask is None:
        g = tl.load(g_ptr + offs).to(C_DTYPE)
        theta = tl.load(p_ptr + offs).to(C_DTYPE)
        m = tl.load(m_ptr + offs).to(C_DTYPE)
        v = tl.load(v_ptr + offs).to(C_DTYPE)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
    if SCALE_G:
        g = g * gmul  # 1/grad_scale (GradScaler) and the sign of maximize
    if COUPLED:
        g = g + wd * theta  # coupled (L2) decay: enters v too
    # n = g / max(sqrt(v), eps), IEEE sqrt and division as torch's (tl.sqrt and ``/`` may be
    # approximate in float32); max as a select, so that NaN passes, as in torch.clamp
    if g.dtype == tl.float64:
        denom = tl.sqrt(v)
    else:
        denom = tl.sqrt_rn(v)
    return theta, g, m, v, denom


@triton.jit
def _direction(g, m, denom, bound, eps, w1, b1,
               SMALL_WEIGHT: tl.constexpr, NESTEROV: tl.constexpr):
    """The new m and the update direction u (before caution)."""
    denom = tl.where(denom < eps, eps, denom)
    if g.dtype == tl.float64:
        n = g / denom
    else:
        n = tl.div_rn(g, denom)
    n = tl.where(n < -bound, -bound, n)  # clip to [-c_t, c_t]; c_t = 0 on the first call
    n = tl.where(n > bound, bound, n)
    # m = beta1*m + (1-beta1)*n, with torch.lerp's formula for the weight w1 = 1 - beta1
    if SMALL_WEIGHT:
        m = m + w1 * (n - m)
    else:
        m = n - (n - m) * (1.0 - w1)
    u = m
    if NESTEROV:
        u = b1 * m + w1 * n  # one momentum step ahead
    return m, u


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _hash_bits(seed, offs):
    """32 well-mixed random bits per element from (seed, element index): the lowbias32 hash
    (C. Wellons) of the index mixed with both halves of the seed. Written out rather than
    tl.randint: the interpreter cannot run triton.language's own @jit helpers once Inductor
    has imported triton in the same process."""
    k1 = tl.full((), 0x7FEB352D, tl.uint32)  # typed constants: numpy (the interpreter)
    k2 = tl.full((), 0x846CA68B, tl.uint32)  # will not mix uint32 with int64
    golden = tl.full((), 0x9E3779B9, tl.uint32)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x = offs.to(tl.uint32) * golden ^ lo
    x = x ^ (x >> 16)
    x = x * k1
    x = x ^ (x >> 15) ^ hi
    x = x * k2
    return x ^ (x >> 16)


@triton.jit
def _round_stochastic(x, seed, offs):
    """float32 -> bfloat16, rounding up with probability equal to the discarded fraction."""
    bits = x.to(tl.uint32, bitcast=True)
    low_bits = tl.full((), 0xFFFF, tl.uint32)  # typed constants: numpy (the interpreter)
    exp_mask = tl.full((), 0x7F800000, tl.uint32)  # will not mix uint32 with int64
    noise = _hash_bits(seed, offs) & low_bits
    rounded = bits + noise
    # A value next to the largest finite bf16 would round up to inf: truncate it instead.
    overflow = ((rounded & exp_mask) == exp_mask) & ((bits & exp_mask) != exp_mask)
    rounded = tl.where(overflow, bits, rounded)
    out = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), out)  # NaN stays NaN


@triton.jit
def _update_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, gmul, wd, decay, bound,
                  sq_weight, lr, w1, b1, beta2, eps, caution_denom, seed,
                  P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                  SCALE_G: tl.constexpr, COUPLED: tl.constexpr, SMALL_WEIGHT: tl.constexpr,
                  NESTEROV: tl.constexpr, CAUTION: tl.constexpr, STOCHASTIC: tl.constexpr):
    theta, g, m, v, denom = _inputs(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, gmul, wd,
                                    C_DTYPE, SCALE_G, COUPLED)
    m, u = _direction(g, m, denom, bound, eps, w1, b1, SMALL_WEIGHT, NESTEROV)
    if CAUTION:  # keep coordinates where u and g agree, rescaled by the tensor's mean
        if g.dtype == tl.float64:
            u = tl.where(u * g > 0, u / caution_denom, 0.0)
        else:
            u = tl.where(u * g > 0, tl.div_rn(u, caution_denom), 0.0)
    theta = theta * decay  # decoupled decay; exactly 1 when off and on the first call
    theta = theta - lr * u
    # v = beta2*v + w*g*g, w = 1 - beta2 (1 on the first call, where v is 0)
    v = v * beta2 + sq_weight * g * g
    if STOCHASTIC:
        theta_out = _round_stochastic(theta, seed, offs)
    else:
        theta_out = theta.to(P_DTYPE)  # round to nearest even
    tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(S_DTYPE), mask=mask)
    tl.store(p_ptr + offs, theta_out, mask=mask)


@triton.jit
def _count_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, gmul, wd, bound, w1, b1, eps,
                 C_DTYPE: tl.constexpr, SCALE_G: tl.constexpr, COUPLED: tl.constexpr,
                 SMALL_WEIGHT: tl.constexpr, NESTEROV: tl.constexpr):
    """How many coordinates of the block have u * g > 0 (lanes past the end have g = 0)."""
    theta, g, m, v, denom = _inputs(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, gmul, wd,
                                    C_DTYPE, SCALE_G, COUPLED)
    m, u = _direction(g, m, denom, bound, eps, w1, b1, SMALL_WEIGHT, NESTEROV)
    return tl.reduce((u * g > 0).to(tl.int32), 0, _add)  # tl.sum: see _hash_bits


@triton.jit(do_not_specialize=["n_tensors", "seed"])
def adopt_kernel(
    table_ptr,  # int64: p, g, m, v data_ptrs, numel (n_tensors each), then the work items
    n_tensors,
    scalars_ptr,  # float64 (n_tensors, N_COLUMNS): bound, sq_weight, started, s
    counts_ptr,  # int32 (n_tensors,): caution's count of u * g > 0
    lr_ptr,  # the learning rate when it is a tensor on this device (LR_ON_DEVICE)
    lr: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,  # coupled decay (used when COUPLED)
    decoupled_wd: tl.float64,  # decoupled decay (0 when off)
    grad_scale_ptr,  # GradScaler's scale (HAS_SCALE)
    found_inf_ptr,  # GradScaler's inf flag (HAS_INF): nonzero skips the step
    seed,  # stochastic rounding
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    COUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SCALE_G: tl.constexpr,  # MAXIMIZE or HAS_SCALE
    HAS_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    NESTEROV: tl.constexpr,
    CAUTION: tl.constexpr,
    COUNT_ONLY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    item = tl.load(table_ptr + 5 * n_tensors + pid)
    tid = item >> 32
    start = (item & 0xFFFFFFFF) * CHUNK
    numel = tl.load(table_ptr + 4 * n_tensors + tid)
    p_ptr = tl.load(table_ptr + tid).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table_ptr + n_tensors + tid).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(table_ptr + 2 * n_tensors + tid).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(table_ptr + 3 * n_tensors + tid).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:  # every tensor of the group starts on 16 bytes: allows 128-bit accesses
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)

    # Per-tensor scalars, held in float64 and cast to the compute dtype where used.
    row = scalars_ptr + tid * 4
    bound = tl.load(row).to(C_DTYPE)
    sq_weight = tl.load(row + 1).to(C_DTYPE)
    started = tl.load(row + 2)
    # Python floats are not assigned inside branches: the interpreter would make them float32.
    lr64 = tl.full((), lr, tl.float64)
    if LR_ON_DEVICE:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    decay = (1.0 - started * (lr64 * decoupled_wd)).to(C_DTYPE)
    gmul = 1.0  # what g is multiplied by: 1/grad_scale, negated for maximize
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(grad_scale_ptr).to(tl.float64)
        if MAXIMIZE:
            inv_scale = -inv_scale
        gmul = inv_scale.to(C_DTYPE)
    elif MAXIMIZE:
        gmul = -1.0
    # Scalar arguments cast here, not in a helper: the interpreter passes them as Python
    # floats, which a helper's call would round to float32 (full rounds once, from float64).
    wd = tl.full((), weight_decay, C_DTYPE)
    w1 = tl.full((), 1.0 - beta1, C_DTYPE)
    b1 = tl.full((), beta1, C_DTYPE)
    lr_c = tl.full((), lr64, C_DTYPE)
    beta2_c = tl.full((), beta2, C_DTYPE)
    eps_c = tl.full((), eps, C_DTYPE)

    n_here = tl.minimum(numel - start, CHUNK)
    if HAS_INF:  # a skipped step touches nothing
        n_here = tl.where(tl.load(found_inf_ptr) != 0, 0, n_here)
    n_full = n_here // BLOCK
    has_tail = n_full * BLOCK < n_here

    if COUNT_ONLY:
        count = tl.full((), 0, tl.int32)
        for i in range(0, n_full):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            count += _count_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, gmul, wd, bound,
                                  w1, b1, eps_c, C_DTYPE, SCALE_G, COUPLED, SMALL_WEIGHT,
                                  NESTEROV)
        if has_tail:
            offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
            count += _count_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < numel, gmul, wd,
                                  bound, w1, b1, eps_c, C_DTYPE, SCALE_G, COUPLED,
                                  SMALL_WEIGHT, NESTEROV)
        if n_here > 0:
            tl.atomic_add(counts_ptr + tid, count)
    else:
        caution_denom = 1.0
        if CAUTION:  # max(mean(mask), 1e-3) over the whole tensor
            frac = tl.load(counts_ptr + tid).to(C_DTYPE) / numel.to(C_DTYPE)
            caution_denom = tl.maximum(frac, 1e-3)
        # Seeded per tensor and call, so that each replay of a captured graph draws anew.
        step_seed = seed + tid * 1000003 + tl.load(row + 3).to(tl.int64) * 7919
        for i in range(0, n_full):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            _update_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, gmul, wd, decay, bound,
                          sq_weight, lr_c, w1, b1, beta2_c, eps_c, caution_denom, step_seed,
                          P_DTYPE, S_DTYPE, C_DTYPE, SCALE_G, COUPLED, SMALL_WEIGHT,
                          NESTEROV, CAUTION, STOCHASTIC)
        if has_tail:
            offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
            _update_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < numel, gmul, wd, decay,
                          bound, sq_weight, lr_c, w1, b1, beta2_c, eps_c, caution_denom,
                          step_seed, P_DTYPE, S_DTYPE, C_DTYPE, SCALE_G, COUPLED,
                          SMALL_WEIGHT, NESTEROV, CAUTION, STOCHASTIC)


@triton.jit(do_not_specialize=["n_tensors"])
def schedule_kernel(
    steps_ptr,  # int64 (n_tensors,): data_ptrs of the float32 step counts
    n_tensors,
    scalars_ptr,  # float64 (n_tensors, N_COLUMNS), written
    counts_ptr,  # int32 (n_tensors,): zeroed when CAUTION
    bounds_ptr,  # float64 (n_tensors,): clip bounds from a custom callable (CLIP == 2)
    found_inf_ptr,
    clip_exp: tl.float64,
    beta2: tl.float64,
    CLIP: tl.constexpr,  # 0: no clipping, 1: s ** clip_exp, 2: bounds_ptr
    HAS_INF: tl.constexpr,
    CAUTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``call_scalars`` on the device, then ``s += 1`` (unless found_inf is set)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n_tensors
    step_ptrs = tl.load(steps_ptr + k, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    s32 = tl.load(step_ptrs, mask=mask, other=0.0)
    s = s32.to(tl.float64)
    first = s == 0.0
    if CLIP == 1:
        # s ** clip_exp for s >= 1 (log of the clamped s keeps the unused lanes finite)
        bound = tl.where(first, 0.0, tl.exp(clip_exp * tl.log(tl.maximum(s, 1.0))))
    elif CLIP == 2:
        bound = tl.load(bounds_ptr + k, mask=mask, other=0.0)
    else:
        bound = tl.where(first, 0.0, float("inf")).to(tl.float64)
    started = tl.where(first, 0.0, 1.0).to(tl.float64)  # (two literals would make float32)
    sq_weight = 1.0 - started * beta2
    row = scalars_ptr + k * 4
    tl.store(row, bound, mask=mask)
    tl.store(row + 1, sq_weight, mask=mask)
    tl.store(row + 2, started, mask=mask)
    tl.store(row + 3, s, mask=mask)
    if CAUTION:
        tl.store(counts_ptr + k, tl.full((BLOCK,), 0, tl.int32), mask=mask)
    advanced = s32 + 1.0
    if HAS_INF:  # a skipped step keeps its count
        advanced = tl.where(tl.load(found_inf_ptr) != 0, s32, advanced)
    tl.store(step_ptrs, advanced, mask=mask)
