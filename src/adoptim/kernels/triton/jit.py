"""The Triton kernels of the fused GPU path; :mod:`adoptim.kernels.triton.launch` launches them.

Imported only when a Triton step (or ``adoptim doctor --compile``) asks for them, so that
importing adoptim never imports triton.

Two kernels, each launched once per group of tensors that share a device and dtypes:

* :func:`schedule_kernel`, one lane per tensor: reads each tensor's call count ``s`` on the
  device and writes the per-tensor scalars of :func:`adoptim.schedule.call_scalars` (clip
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

The operations follow the for-loop path (``adoptim.paths.forloop``) in its order, as the CPU
kernel (``csrc/fused_adopt.cpp``) does: see the comments there for the choices (NaN-passing
clamps written as selects, torch.lerp's two formulas).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["adopt_8bit_kernel", "adopt_kernel", "schedule_kernel"]

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


# --------------------------------------------------------------------------------------------
# 8-bit state (state_dtype="8bit"; format: adoptim.formats.blockwise8; launcher: adoptim.kernels.triton.launch8)
#
# adopt_8bit_kernel: one program per tile of ROWS blocks of 256 elements (the format's block)
# of one tensor, as a (ROWS, 256) tile: theta and g, the int8 m codes and uint8 v codes and
# the two scales per block are read once, the float32 update runs on the tile in registers,
# each row's new scales are a max reduction along the row, and theta and the requantized
# codes and scales are written once: 16 bytes of traffic per float32 parameter (plus 8 per
# 256). The operations are those of the C++ 8-bit kernel (csrc/fused_adopt_8bit.cpp) and of
# the for-loop path it reproduces (dequantize, _forloop.single_tensor_adopt, quantize), in
# the same order: fused multiply-adds written out (tl.fma) exactly where torch's vectorised
# CPU kernels use them (lerp, add with alpha, addcmul), and the kernel is compiled with
# enable_fp_fusion=False so that no other product is contracted into an add (m * 127/A + u
# must round twice, as in _quant.quantize_m). Division and square roots are the IEEE ones
# (div_rn, sqrt_rn), as torch's and the C++ kernel's. The random numbers are _quant's: one
# lowbias32 hash per (seed, block, stream), then a Weyl sequence over the block (_quant.WEYL:
# frac(j * phi) in float64, rounded once to float32, computed once per program: exact in
# float64, so the same table bit for bit), with the seed computed on the host from the
# tensor's call count and size (_quant.state_seed).

N_COLUMNS_8BIT = 4  # bound, sq_weight, decay, seed (a uint32, exact in float64)


@triton.jit
def _block_offsets(seed, block, stream):
    """_quant.block_offsets: a uniform float32 in [0, 1) (24 bits) per block (uint32s)."""
    golden = tl.full((), 0x9E3779B9, tl.uint32)  # typed constants: numpy (the interpreter)
    k1 = tl.full((), 0x7FEB352D, tl.uint32)  # will not mix uint32 with int64
    k2 = tl.full((), 0x846CA68B, tl.uint32)
    three = tl.full((), 3, tl.uint32)
    x = seed + (three * block + stream) * golden
    x = x ^ (x >> 16)
    x = x * k1
    x = x ^ (x >> 15)
    x = x * k2
    x = x ^ (x >> 16)
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _param_out(theta, up, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """theta (float32) in the parameter's dtype: bfloat16 rounded to nearest even, or
    stochastically with the 16 bits of the dither ``up`` (_lowbit.stochastic_round_bf16),
    written out on the bits (the interpreter's float32 -> bfloat16 cast truncates); NaN
    stays NaN. float16: the cast (round to nearest even)."""
    if P_DTYPE == tl.bfloat16:
        bits = theta.to(tl.uint32, bitcast=True)
        exp_mask = tl.full((), 0x7F800000, tl.uint32)
        quiet = tl.full((), 0x0040, tl.uint32)
        if STOCHASTIC:
            rounded = bits + (up * 65536.0).to(tl.uint32)
            # next to the largest finite bf16 a round-up could reach inf: truncate instead
            overflow = ((rounded & exp_mask) == exp_mask) & ((bits & exp_mask) != exp_mask)
            rounded = tl.where(overflow, bits, rounded)
        else:
            lsb = (bits >> 16) & tl.full((), 1, tl.uint32)
            rounded = bits + tl.full((), 0x7FFF, tl.uint32) + lsb
        top = tl.where(theta != theta, (bits >> 16) | quiet, rounded >> 16)
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return theta.to(P_DTYPE)


@triton.jit
def _update_tile_8bit(p_ptr, g_ptr, qm_ptr, sm_ptr, qv_ptr, sv_ptr, offs, blk, mask,
                      row_mask, w, seed, g_scale, wd, decay, bound, sq_weight, neg_lr, w1,
                      beta2, eps,
                      P_DTYPE: tl.constexpr, COUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                      HAS_SCALE: tl.constexpr, SMALL_WEIGHT: tl.constexpr,
                      NESTEROV: tl.constexpr, STOCHASTIC: tl.constexpr):
    """One tile: ``mask`` None for a tile inside the tensor (unmasked, so that aligned
    accesses are 128 bits wide); otherwise lanes past the end read 0 and write nothing."""
    if mask is None:
        g = tl.load(g_ptr + offs).to(tl.float32)
        theta = tl.load(p_ptr + offs).to(tl.float32)
        qm = tl.load(qm_ptr + offs).to(tl.float32)
        qv = tl.load(qv_ptr + offs).to(tl.float32)
        sm = tl.load(sm_ptr + blk)
        sv = tl.load(sv_ptr + blk)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        qm = tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.float32)
        qv = tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.float32)
        sm = tl.load(sm_ptr + blk, mask=row_mask, other=0.0)
        sv = tl.load(sv_ptr + blk, mask=row_mask, other=0.0)
    # dequantize (_quant.dequantize_m / dequantize_v)
    m_step = tl.div_rn(sm, tl.full((), 127.0, tl.float32))[:, None]
    s_step = tl.div_rn(sv, tl.full((), 65025.0, tl.float32))[:, None]
    s = (qv * qv) * s_step
    v = s * s
    # the float32 update (_forloop.single_tensor_adopt, in its order)
    if HAS_SCALE:
        g = tl.div_rn(g, g_scale)  # GradScaler: g / scale, as run_dequantized divides
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = tl.fma(theta, wd, g)  # g + wd * theta, as add(alpha=wd): enters v too
    theta = theta * decay  # decoupled decay; exactly 1 when off or on the first call
    denom = tl.sqrt_rn(v)
    denom = tl.where(denom < eps, eps, denom)  # clamp(min=eps) as a select: NaN passes
    n = tl.div_rn(g, denom)
    n = tl.where(n < -bound, -bound, n)  # clip to [-c_t, c_t]; c_t = 0 on the first call
    n = tl.where(n > bound, bound, n)
    m = qm * m_step
    # m = lerp(m, n, 1 - beta1), as torch's vectorised lerp computes it (one fma)
    if SMALL_WEIGHT:
        m = tl.fma(w1, n - m, m)
    else:
        m = tl.fma(w1 - 1.0, n - m, n)
    u = m
    if NESTEROV:  # u = lerp(m, n, 1 - beta1) with the new m: one momentum step ahead
        if SMALL_WEIGHT:
            u = tl.fma(w1, n - m, m)
        else:
            u = tl.fma(w1 - 1.0, n - m, n)
    theta = tl.fma(u, neg_lr, theta)  # theta - lr * u, as add_(u, alpha=-lr)
    v = tl.fma(sq_weight * g, g, v * beta2)  # beta2 * v + w * g * g, as mul_ + addcmul_
    if mask is not None:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    # the new scales: largest |m| and largest sqrt(v) per block (NaN-ignoring max; the
    # interpreter reduces with numpy for this combine function, not element by element)
    amax = tl.reduce(tl.abs(m), 1, tl.standard._elementwise_max)
    smax = tl.sqrt_rn(tl.reduce(v, 1, tl.standard._elementwise_max))
    if mask is None:
        tl.store(sm_ptr + blk, amax)
        tl.store(sv_ptr + blk, smax)
    else:
        tl.store(sm_ptr + blk, amax, mask=row_mask)
        tl.store(sv_ptr + blk, smax, mask=row_mask)
    # requantize (_quant.quantize_m / quantize_v): divisions by a nonzero divisor only
    m_inv = tl.where(amax > 0, tl.div_rn(tl.full((), 127.0, tl.float32),
                                         tl.where(amax > 0, amax, 1.0)), 0.0)[:, None]
    v_inv = tl.where(smax > 0, tl.div_rn(tl.full((), 65025.0, tl.float32),
                                         tl.where(smax > 0, smax, 1.0)), 0.0)[:, None]
    v_step = tl.div_rn(smax, tl.full((), 65025.0, tl.float32))[:, None]
    block = blk.to(tl.uint32)
    um = _block_offsets(seed, block, tl.full((), 0, tl.uint32))[:, None] + w
    um = tl.where(um >= 1.0, um - 1.0, um)  # frac: both terms are in [0, 1)
    ym = tl.floor(m * m_inv + um)  # rounded product, then + u: no fma (fp fusion off)
    ym = tl.where(ym < -127.0, -127.0, ym)
    ym = tl.where(ym > 127.0, 127.0, ym)
    lo = tl.floor(tl.sqrt_rn(tl.sqrt_rn(v) * v_inv))  # 255 * sqrt(sqrt(v) / S)
    lo = tl.where(lo > 254.0, 254.0, lo)
    hi = lo + 1.0
    s_lo = (lo * lo) * v_step
    s_hi = (hi * hi) * v_step
    v_lo = s_lo * s_lo
    v_hi = s_hi * s_hi
    uv = _block_offsets(seed, block, tl.full((), 1, tl.uint32))[:, None] + w
    uv = tl.where(uv >= 1.0, uv - 1.0, uv)
    # up with probability (v - v_lo) / (v_hi - v_lo): unbiased in v
    qf = tl.where(uv * (v_hi - v_lo) < v - v_lo, hi, lo)
    qf = tl.where((v > 0) & (qf < 1.0), 1.0, qf)  # no zero code for a nonzero v
    up = w
    if STOCHASTIC:
        up = _block_offsets(seed, block, tl.full((), 2, tl.uint32))[:, None] + w
        up = tl.where(up >= 1.0, up - 1.0, up)
    theta_out = _param_out(theta, up, P_DTYPE, STOCHASTIC)
    if mask is None:
        tl.store(p_ptr + offs, theta_out)
        tl.store(qm_ptr + offs, ym.to(tl.int8))
        tl.store(qv_ptr + offs, qf.to(tl.uint8))
    else:
        tl.store(p_ptr + offs, theta_out, mask=mask)
        tl.store(qm_ptr + offs, ym.to(tl.int8), mask=mask)
        tl.store(qv_ptr + offs, qf.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["n_tensors"])
def adopt_8bit_kernel(
    table_ptr,  # int64: p, g, m codes, m scales, v codes, v scales data_ptrs, numel
    #             (n_tensors each), then the work items (tensor << 32 | tile)
    n_tensors,
    scalars_ptr,  # float64 (n_tensors, N_COLUMNS_8BIT): bound, sq_weight, decay, seed
    grad_scale_ptr,  # GradScaler's scale (HAS_SCALE; float32)
    lr: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,  # coupled decay (used when COUPLED)
    P_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    COUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    NESTEROV: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ROWS: tl.constexpr,  # blocks of 256 per program
):
    pid = tl.program_id(0)
    item = tl.load(table_ptr + 7 * n_tensors + pid)
    tid = item >> 32
    tile = item & 0xFFFFFFFF
    numel = tl.load(table_ptr + 6 * n_tensors + tid)
    p_ptr = tl.load(table_ptr + tid).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table_ptr + n_tensors + tid).to(tl.pointer_type(P_DTYPE))
    qm_ptr = tl.load(table_ptr + 2 * n_tensors + tid).to(tl.pointer_type(tl.int8))
    sm_ptr = tl.load(table_ptr + 3 * n_tensors + tid).to(tl.pointer_type(tl.float32))
    qv_ptr = tl.load(table_ptr + 4 * n_tensors + tid).to(tl.pointer_type(tl.uint8))
    sv_ptr = tl.load(table_ptr + 5 * n_tensors + tid).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every tensor of the group starts on 16 bytes: allows 128-bit accesses
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        qm_ptr = tl.multiple_of(qm_ptr, 16)
        qv_ptr = tl.multiple_of(qv_ptr, 16)

    # Per-tensor scalars, float64 on the host, rounded once to float32 here (as the
    # for-loop path's ops and the C++ kernel receive them).
    row = scalars_ptr + tid * 4
    bound = tl.load(row).to(tl.float32)
    sq_weight = tl.load(row + 1).to(tl.float32)
    decay = tl.load(row + 2).to(tl.float32)
    seed = tl.load(row + 3).to(tl.int64).to(tl.uint32)
    g_scale = 1.0  # GradScaler's scale: g is divided by it
    if HAS_SCALE:
        g_scale = tl.load(grad_scale_ptr).to(tl.float32)
    # Scalar arguments cast here, not in a helper: the interpreter passes them as Python
    # floats, which a helper's call would round to float32 (full rounds once, from float64).
    wd = tl.full((), weight_decay, tl.float32)
    w1 = tl.full((), 1.0 - beta1, tl.float32)
    neg_lr = -tl.full((), lr, tl.float32)
    beta2_c = tl.full((), beta2, tl.float32)
    eps_c = tl.full((), eps, tl.float32)

    # _quant.WEYL: frac(j * phi), phi = (sqrt(5) - 1) / 2, in float64 (a product and a
    # subtraction, both exact to the float64 result Python computes), rounded once
    jphi = tl.arange(0, 256).to(tl.float64) * tl.full((), 0.6180339887498949, tl.float64)
    w = (jphi - tl.floor(jphi)).to(tl.float32)[None, :]
    blk = tile * ROWS + tl.arange(0, ROWS)
    offs = blk[:, None] * 256 + tl.arange(0, 256)[None, :]
    if (tile + 1) * (ROWS * 256) <= numel:
        _update_tile_8bit(p_ptr, g_ptr, qm_ptr, sm_ptr, qv_ptr, sv_ptr, offs, blk, None, None,
                          w, seed, g_scale, wd, decay, bound, sq_weight, neg_lr, w1, beta2_c,
                          eps_c, P_DTYPE, COUPLED, MAXIMIZE, HAS_SCALE, SMALL_WEIGHT,
                          NESTEROV, STOCHASTIC)
    else:
        _update_tile_8bit(p_ptr, g_ptr, qm_ptr, sm_ptr, qv_ptr, sv_ptr, offs, blk,
                          offs < numel, blk * 256 < numel, w, seed, g_scale, wd, decay,
                          bound, sq_weight, neg_lr, w1, beta2_c, eps_c, P_DTYPE, COUPLED,
                          MAXIMIZE, HAS_SCALE, SMALL_WEIGHT, NESTEROV, STOCHASTIC)
