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

The update is written once, :func:`_adopt_element`, for both state formats (float moments:
:func:`adopt_kernel`; 8-bit codes: :func:`adopt_8bit_kernel`), with the reference's
operations in its order, each rounded once, as the CPU kernel (``csrc/fused_adopt.cpp``)
does: see the comments there. The kernels are compiled with ``enable_fp_fusion=False``.

Master-weight corrections (``master_weight_bits``, bfloat16 parameters): with the constexpr
``MASTER`` (the correction's bits, 8 or 16) both kernels read the parameter as its bf16 bits
and its correction, join them into the float32 master weight in registers
(:func:`_master_join`), run the same update on it, and split the result back
(:func:`_master_split`: 24-bit masters rounded with the dither of ``STREAM_MASTER`` from the
tensor's step seed, as :func:`adoptim.formats.master.store` rounds them): one pass, 2 + 1 (or
2) bytes of parameter read and written per element.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["adopt_8bit_kernel", "adopt_kernel", "schedule_kernel"]

# Columns of the per-tensor scalar table (float64, one row per tensor).
N_COLUMNS = 4  # bound, sq_weight, started (0 or 1), s (count before this call)


# Few helper functions on purpose: under the interpreter each call of one costs about a
# millisecond (it patches triton.language), which is most of an interpreted step. Scalar
# arguments are cast to the compute dtype in the kernels' bodies, not in a helper: the
# interpreter passes them as Python floats, which a helper's call would round to float32
# (tl.full rounds once, from float64).

# --------------------------------------------------------------------------------------------
# The update, written once for every format (csrc/fused_adopt.cpp's adopt_element)


@triton.jit
def _adopt_element(g, theta, m, v, g_scale, wd, decay, bound, eps, beta1, w1, beta2,
                   sq_weight, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                   COUPLED: tl.constexpr, NESTEROV: tl.constexpr):
    """The reference's operations on one tile, in its order, each rounded once (compiled with
    enable_fp_fusion=False: no product is contracted into an add); IEEE division and
    correctly rounded sqrt (tl's ``/`` and sqrt may be approximate in float32). Returns
    (g, theta after decay, m, v, u before caution). Selects let NaN pass, as torch.clamp."""
    if HAS_SCALE:  # GradScaler: g / scale
        if g.dtype == tl.float64:
            g = g / g_scale
        else:
            g = tl.div_rn(g, g_scale)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = g + theta * wd  # coupled (L2) decay: enters v too
    theta = theta * decay  # decoupled decay; exactly 1 when off and on the first call
    if g.dtype == tl.float64:
        d = tl.sqrt(v)
    else:
        d = tl.sqrt_rn(v)
    d = tl.where(d < eps, eps, d)
    if g.dtype == tl.float64:
        n = g / d
    else:
        n = tl.div_rn(g, d)
    n = tl.where(n < -bound, -bound, n)  # clip to [-c_t, c_t]; c_t = 0 on the first call
    n = tl.where(n > bound, bound, n)
    m = m * beta1 + n * w1
    u = m
    if NESTEROV:  # one momentum step ahead, with the new m
        u = m * beta1 + n * w1
    v = v * beta2 + (g * g) * sq_weight
    return g, theta, m, v, u


@triton.jit
def _round_to(x, up, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """float32 ``x`` in ``DTYPE``: bfloat16 rounded to nearest even, or stochastically with
    16 bits of the dither ``up`` (formats/blockwise8.stochastic_round_bf16), written out on
    the bits (the interpreter's float32 -> bfloat16 cast truncates); NaN stays NaN. Other
    dtypes: the cast (round to nearest even)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
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
        top = tl.where(x != x, (bits >> 16) | quiet, rounded >> 16)
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


# --------------------------------------------------------------------------------------------
# Counter-based random numbers (adoptim.rng, formats/blockwise8.dither)


@triton.jit
def _hash32(x):
    """lowbias32 (C. Wellons) on uint32."""
    k1 = tl.full((), 0x7FEB352D, tl.uint32)  # typed constants: numpy (the interpreter)
    k2 = tl.full((), 0x846CA68B, tl.uint32)  # will not mix uint32 with int64
    x = x ^ (x >> 16)
    x = x * k1
    x = x ^ (x >> 15)
    x = x * k2
    return x ^ (x >> 16)


@triton.jit
def _block_offsets(seed, block, stream):
    """blockwise8.block_offsets: a uniform float32 in [0, 1) (24 bits) per block (uint32s)."""
    golden = tl.full((), 0x9E3779B9, tl.uint32)
    three = tl.full((), 3, tl.uint32)
    x = _hash32(seed + (three * block + stream) * golden)
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _weyl(j):
    """blockwise8.WEYL[j]: frac(j * phi), phi = (sqrt(5) - 1) / 2, in float64 (a product and
    a subtraction, both exact to the float64 result Python computes), rounded once."""
    jphi = j.to(tl.float64) * tl.full((), 0.6180339887498949, tl.float64)
    return (jphi - tl.floor(jphi)).to(tl.float32)


# --------------------------------------------------------------------------------------------
# Master-weight correction (formats/master.py, bfloat16): the parameter's bits and the
# correction joined into a float32 master weight in registers, and split back, with the
# integer arithmetic of master._bf16_join/_bf16_split on the float32 bit pattern. Done on
# uint32 (wrapping, as torch's int32 does): what torch computes on sign-extended int32 is
# the same pattern modulo 2**32, and the pieces taken from it (the low 16 bits of the
# parameter, the low S bits of the correction) are the same.


@triton.jit
def _master_join(pbits, c, S: tl.constexpr):
    """master._bf16_join: ``pbits`` the bf16 patterns (uint16), ``c`` the corrections
    (int8 for S = 8, int16 for S = 16) -> the float32 master weights."""
    p = pbits.to(tl.uint32)
    ci = c.to(tl.int32)
    mag = p & tl.full((), 0x7FFF, tl.uint32)
    # never made by split (a zero with c < 0 would wrap into a NaN pattern, an infinity with
    # c > 0 into a NaN): read as c = 0
    zero_c = ((mag == 0) & (ci < 0)) | ((mag == tl.full((), 0x7F80, tl.uint32)) & (ci > 0))
    ci = tl.where(zero_c, tl.full((), 0, tl.int32), ci)
    bits = (p << 16) + (ci.to(tl.uint32, bitcast=True) << (16 - S))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _master_split(x, up, S: tl.constexpr):
    """master._bf16_split: the float32 ``x`` -> (bf16 patterns as uint16, corrections). With
    S = 8 (24 bits) the master is rounded up with probability (dropped bits) / 2**8, from the
    dither ``up`` (uniform in [0, 1), master.step_dither's numbers); S = 16 keeps ``x``."""
    bits = x.to(tl.uint32, bitcast=True)
    q = bits
    if S == 8:
        q = (bits + (up * 256.0).to(tl.uint32)) >> 8  # the top 24 bits, rounded
        # next to the largest finite value a round-up could reach inf: truncate those
        exp_mask = tl.full((), 0x7F800000, tl.uint32)
        over = ((q & tl.full((), 0x7FFFFF, tl.uint32)) == tl.full((), 0x7F8000, tl.uint32)) & (
            (bits & exp_mask) != exp_mask)
        q = tl.where(over, bits >> 8, q)
    low = q & tl.full((), (1 << S) - 1, tl.uint32)
    half = low >> (S - 1)  # 1 where the low S bits read as signed are negative
    # the low S bits as a signed integer; the parameter rounds up (in magnitude) where < 0
    c = low.to(tl.int32) - (half.to(tl.int32) << S)
    pbits = ((q >> S) + half) & tl.full((), 0xFFFF, tl.uint32)
    nan = x != x  # (NaN patterns may have wrapped above): the quiet NaN, correction 0
    pbits = tl.where(nan, tl.full((), 0x7FC0, tl.uint32), pbits)
    c = tl.where(nan, tl.full((), 0, tl.int32), c)
    if S == 8:
        return pbits.to(tl.uint16), c.to(tl.int8)
    else:
        return pbits.to(tl.uint16), c.to(tl.int16)


# --------------------------------------------------------------------------------------------
# Format 1: float moments (state dtype S_DTYPE), walked in 1-D chunks


@triton.jit
def _float_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, mask, g_scale, wd, decay, bound,
                 eps, beta1, w1, beta2, sq_weight, lr, kept, seed,
                 P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                 HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr,
                 NESTEROV: tl.constexpr, CAUTION: tl.constexpr, COUNT_ONLY: tl.constexpr,
                 STOCHASTIC: tl.constexpr, MASTER: tl.constexpr):
    """One block of a float-state tensor: load, update, store (or with COUNT_ONLY, return how
    many coordinates have u * g > 0). ``mask`` is None for full blocks (unmasked, so aligned
    loads are 128-bit); lanes past the end of the tensor read as 0 and write nothing. With
    MASTER (8 or 16: the correction's bits), ``p_ptr`` points at the bf16 parameter's bits
    (uint16) and ``c_ptr`` at its correction: theta is their float32 master weight."""
    if mask is None:
        g = tl.load(g_ptr + offs).to(C_DTYPE)
        if MASTER:
            theta = _master_join(tl.load(p_ptr + offs), tl.load(c_ptr + offs), MASTER)
        else:
            theta = tl.load(p_ptr + offs).to(C_DTYPE)
        m = tl.load(m_ptr + offs).to(C_DTYPE)
        v = tl.load(v_ptr + offs).to(C_DTYPE)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        if MASTER:
            theta = _master_join(tl.load(p_ptr + offs, mask=mask, other=0),
                                 tl.load(c_ptr + offs, mask=mask, other=0), MASTER)
        else:
            theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(C_DTYPE)
    g, theta, m, v, u = _adopt_element(g, theta, m, v, g_scale, wd, decay, bound, eps, beta1,
                                       w1, beta2, sq_weight, HAS_SCALE, MAXIMIZE, COUPLED,
                                       NESTEROV)
    kept_here = tl.full((), 0, tl.int32)
    if COUNT_ONLY:  # lanes past the end have g = 0 (tl.sum: see the module's note)
        kept_here = tl.reduce((u * g > 0).to(tl.int32), 0, _add)
    else:
        if CAUTION:  # u * mask / kept, mask 0 or 1 (NaN stays NaN, as in the reference)
            caution_mask = tl.where(u * g > 0, 1.0, 0.0).to(C_DTYPE)
            if g.dtype == tl.float64:
                u = (u * caution_mask) / kept
            else:
                u = tl.div_rn(u * caution_mask, kept)
        theta = theta - lr * u
        # (tl.full, not tl.zeros_like: a triton.language @jit helper, which the
        # interpreter cannot run once Inductor has imported triton in the process)
        up = tl.full(theta.shape, 0.0, tl.float32)
        if STOCHASTIC or MASTER == 8:
            # the dither of stream 2, the parameter's (stochastic rounding or 24-bit master
            # weights, which exclude each other): frac(block_offsets(seed, j // 256, 2) + weyl[j % 256])
            stream = tl.full((), 2, tl.uint32)
            up = _block_offsets(seed, (offs // 256).to(tl.uint32), stream)
            up = up + _weyl(offs % 256)
            up = tl.where(up >= 1.0, up - 1.0, up)
        tl.store(m_ptr + offs, _round_to(m, up, S_DTYPE, False), mask=mask)
        tl.store(v_ptr + offs, _round_to(v, up, S_DTYPE, False), mask=mask)
        if MASTER:
            pbits, corr = _master_split(theta, up, MASTER)
            tl.store(p_ptr + offs, pbits, mask=mask)
            tl.store(c_ptr + offs, corr, mask=mask)
        else:
            tl.store(p_ptr + offs, _round_to(theta, up, P_DTYPE, STOCHASTIC), mask=mask)
    return kept_here


@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["n_tensors"])
def adopt_kernel(
    table_ptr,  # int64: p, g, m, v data_ptrs, numel, tensor seed, correction data_ptr
    #             (n_tensors each), then the work items (tensor << 32 | chunk)
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
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    COUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    NESTEROV: tl.constexpr,
    CAUTION: tl.constexpr,
    COUNT_ONLY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    MASTER: tl.constexpr,  # 0, or the correction's bits (8: 24-bit, 16: 32-bit master weights)
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    item = tl.load(table_ptr + 7 * n_tensors + pid)
    tid = item >> 32
    start = (item & 0xFFFFFFFF) * CHUNK
    numel = tl.load(table_ptr + 4 * n_tensors + tid)
    p_ptr = tl.load(table_ptr + tid).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table_ptr + n_tensors + tid).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(table_ptr + 2 * n_tensors + tid).to(tl.pointer_type(S_DTYPE))
    v_ptr = tl.load(table_ptr + 3 * n_tensors + tid).to(tl.pointer_type(S_DTYPE))
    c_ptr = p_ptr
    if MASTER:  # the bf16 parameter as its bits, and the correction
        p_ptr = tl.load(table_ptr + tid).to(tl.pointer_type(tl.uint16))
        if MASTER == 8:
            c_ptr = tl.load(table_ptr + 6 * n_tensors + tid).to(tl.pointer_type(tl.int8))
        else:
            c_ptr = tl.load(table_ptr + 6 * n_tensors + tid).to(tl.pointer_type(tl.int16))
    if ALIGNED:  # every tensor of the group starts on 16 bytes: allows 128-bit accesses
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)

    # Per-tensor scalars, held in float64 and rounded once to the compute dtype.
    row = scalars_ptr + tid * 4
    bound = tl.load(row).to(C_DTYPE)
    sq_weight = tl.load(row + 1).to(C_DTYPE)
    started = tl.load(row + 2)
    # Python floats are not assigned inside branches: the interpreter would make them float32.
    lr64 = tl.full((), lr, tl.float64)
    if LR_ON_DEVICE:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    decay = (1.0 - started * (lr64 * decoupled_wd)).to(C_DTYPE)  # call_scalars' decay
    g_scale = tl.full((), 1.0, C_DTYPE)
    if HAS_SCALE:
        g_scale = tl.load(grad_scale_ptr).to(C_DTYPE)
    wd = tl.full((), weight_decay, C_DTYPE)
    w1 = tl.full((), 1.0 - beta1, C_DTYPE)
    b1 = tl.full((), beta1, C_DTYPE)
    lr_c = lr64.to(C_DTYPE)
    beta2_c = tl.full((), beta2, C_DTYPE)
    eps_c = tl.full((), eps, C_DTYPE)

    n_here = tl.minimum(numel - start, CHUNK)
    if HAS_INF:  # a skipped step touches nothing
        n_here = tl.where(tl.load(found_inf_ptr) != 0, 0, n_here)
    n_full = n_here // BLOCK
    has_tail = n_full * BLOCK < n_here

    kept = tl.full((), 1.0, C_DTYPE)
    if CAUTION and not COUNT_ONLY:  # max(count / numel, 1e-3) over the whole tensor
        kept = tl.load(counts_ptr + tid).to(C_DTYPE) / numel.to(C_DTYPE)
        kept = tl.where(kept < 1e-3, tl.full((), 1e-3, C_DTYPE), kept)
    # This step's seed (adoptim.rng.step_seed): the tensor's seed and its call count.
    step_seed = tl.full((), 0, tl.uint32)
    if STOCHASTIC or MASTER == 8:
        tseed = tl.load(table_ptr + 5 * n_tensors + tid).to(tl.uint32)
        count_bits = tl.load(row + 3).to(tl.float32).to(tl.uint32, bitcast=True)
        step_seed = _hash32(tseed ^ _hash32(count_bits ^ tl.full((), 0x85EBCA6B, tl.uint32)))
    count = tl.full((), 0, tl.int32)
    for i in range(0, n_full):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        count += _float_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, None, g_scale, wd,
                              decay, bound, eps_c, b1, w1, beta2_c, sq_weight, lr_c, kept,
                              step_seed, P_DTYPE, S_DTYPE, C_DTYPE, HAS_SCALE, MAXIMIZE,
                              COUPLED, NESTEROV, CAUTION, COUNT_ONLY, STOCHASTIC, MASTER)
    if has_tail:
        offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
        count += _float_block(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, offs < numel, g_scale,
                              wd, decay, bound, eps_c, b1, w1, beta2_c, sq_weight, lr_c, kept,
                              step_seed, P_DTYPE, S_DTYPE, C_DTYPE, HAS_SCALE, MAXIMIZE,
                              COUPLED, NESTEROV, CAUTION, COUNT_ONLY, STOCHASTIC, MASTER)
    if COUNT_ONLY:
        if n_here > 0:
            tl.atomic_add(counts_ptr + tid, count)


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
# Format 2: block-wise 8-bit moments (formats/blockwise8.py)
#
# adopt_8bit_kernel: one program per tile of ROWS blocks of 256 elements (the format's block)
# of one tensor, as a (ROWS, 256) tile: theta and g, the int8 m codes and uint8 v codes and
# the two scales per block are read once, _adopt_element runs on the tile in registers, each
# row's new scales are a max reduction along the row, and theta and the requantized codes and
# scales are written once: 16 bytes of traffic per float32 parameter (plus 8 per 256). The
# format's load (dequantize) and store (requantize) are blockwise8's operations in its order
# (m * 127/A + u must round twice: enable_fp_fusion=False), with IEEE division and square
# roots (div_rn, sqrt_rn), and its random numbers (one lowbias32 hash per (seed, block,
# stream), then the Weyl sequence over the block), the seed computed on the host by
# adoptim.rng's rule. The float format's kernel walks 1-D chunks instead (its caution needs a
# counting pass over the whole tensor, the 8-bit format a per-block reduction before it can
# store), so the two formats have their own entry kernels around the one update.

N_COLUMNS_8BIT = 4  # bound, sq_weight, decay, seed (a uint32, exact in float64)


@triton.jit
def _update_tile_8bit(p_ptr, g_ptr, qm_ptr, sm_ptr, qv_ptr, sv_ptr, c_ptr, offs, blk, mask,
                      row_mask, w, seed, g_scale, wd, decay, bound, sq_weight, lr, beta1, w1,
                      beta2, eps,
                      P_DTYPE: tl.constexpr, COUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                      HAS_SCALE: tl.constexpr, NESTEROV: tl.constexpr,
                      STOCHASTIC: tl.constexpr, MASTER: tl.constexpr):
    """One tile: ``mask`` None for a tile inside the tensor (unmasked, so that aligned
    accesses are 128 bits wide); otherwise lanes past the end read 0 and write nothing.
    MASTER: as in _float_block (theta is the master weight of the bf16 bits and ``c_ptr``)."""
    if mask is None:
        g = tl.load(g_ptr + offs).to(tl.float32)
        if MASTER:
            theta = _master_join(tl.load(p_ptr + offs), tl.load(c_ptr + offs), MASTER)
        else:
            theta = tl.load(p_ptr + offs).to(tl.float32)
        qm = tl.load(qm_ptr + offs).to(tl.float32)
        qv = tl.load(qv_ptr + offs).to(tl.float32)
        sm = tl.load(sm_ptr + blk)
        sv = tl.load(sv_ptr + blk)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MASTER:
            theta = _master_join(tl.load(p_ptr + offs, mask=mask, other=0),
                                 tl.load(c_ptr + offs, mask=mask, other=0), MASTER)
        else:
            theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        qm = tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.float32)
        qv = tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.float32)
        sm = tl.load(sm_ptr + blk, mask=row_mask, other=0.0)
        sv = tl.load(sv_ptr + blk, mask=row_mask, other=0.0)
    # dequantize (blockwise8.dequantize_m / dequantize_v)
    m_step = tl.div_rn(sm, tl.full((), 127.0, tl.float32))[:, None]
    s_step = tl.div_rn(sv, tl.full((), 65025.0, tl.float32))[:, None]
    s = (qv * qv) * s_step
    g, theta, m, v, u = _adopt_element(g, theta, qm * m_step, s * s, g_scale, wd, decay, bound,
                                       eps, beta1, w1, beta2, sq_weight, HAS_SCALE, MAXIMIZE,
                                       COUPLED, NESTEROV)
    theta = theta - lr * u
    if mask is not None:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    # the new scales: largest |m| and largest sqrt(v) per block, NaN propagating as torch's
    # amax on the other paths (the interpreter reduces with numpy for this combine function,
    # not element by element, and that max skips NaN: NaNs are counted apart)
    amax = tl.reduce(tl.abs(m), 1, tl.standard._elementwise_max)
    vmax = tl.reduce(v, 1, tl.standard._elementwise_max)
    nan_m = tl.reduce((m != m).to(tl.int32), 1, tl.standard._elementwise_max)
    nan_v = tl.reduce((v != v).to(tl.int32), 1, tl.standard._elementwise_max)
    amax = tl.where(nan_m > 0, float("nan"), amax)
    smax = tl.sqrt_rn(tl.where(nan_v > 0, float("nan"), vmax))
    if mask is None:
        tl.store(sm_ptr + blk, amax)
        tl.store(sv_ptr + blk, smax)
    else:
        tl.store(sm_ptr + blk, amax, mask=row_mask)
        tl.store(sv_ptr + blk, smax, mask=row_mask)
    # requantize (blockwise8.quantize_m / quantize_v): divisions by a nonzero divisor only
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
    ym = tl.where(ym != ym, 0.0, ym)  # NaN (its block's scale is NaN): code 0
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
    qf = tl.where(qf != qf, 0.0, qf)  # NaN: code 0
    up = w
    if STOCHASTIC or MASTER == 8:  # stream 2: the parameter's (rounding or 24-bit master)
        stream = tl.full((), 2, tl.uint32)
        up = _block_offsets(seed, block, stream)[:, None] + w
        up = tl.where(up >= 1.0, up - 1.0, up)
    if MASTER:
        theta_out, corr = _master_split(theta, up, MASTER)
    else:
        theta_out = _round_to(theta, up, P_DTYPE, STOCHASTIC)
    if mask is None:
        tl.store(p_ptr + offs, theta_out)
        tl.store(qm_ptr + offs, ym.to(tl.int8))
        tl.store(qv_ptr + offs, qf.to(tl.uint8))
        if MASTER:
            tl.store(c_ptr + offs, corr)
    else:
        tl.store(p_ptr + offs, theta_out, mask=mask)
        tl.store(qm_ptr + offs, ym.to(tl.int8), mask=mask)
        tl.store(qv_ptr + offs, qf.to(tl.uint8), mask=mask)
        if MASTER:
            tl.store(c_ptr + offs, corr, mask=mask)


@triton.jit(do_not_specialize=["n_tensors"])
def adopt_8bit_kernel(
    table_ptr,  # int64: p, g, m codes, m scales, v codes, v scales data_ptrs, numel,
    #             correction data_ptr (n_tensors each), then the work items (tensor << 32 | tile)
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
    NESTEROV: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    MASTER: tl.constexpr,  # 0, or the correction's bits (8: 24-bit, 16: 32-bit master weights)
    ROWS: tl.constexpr,  # blocks of 256 per program
):
    pid = tl.program_id(0)
    item = tl.load(table_ptr + 8 * n_tensors + pid)
    tid = item >> 32
    tile = item & 0xFFFFFFFF
    numel = tl.load(table_ptr + 6 * n_tensors + tid)
    p_ptr = tl.load(table_ptr + tid).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table_ptr + n_tensors + tid).to(tl.pointer_type(P_DTYPE))
    qm_ptr = tl.load(table_ptr + 2 * n_tensors + tid).to(tl.pointer_type(tl.int8))
    sm_ptr = tl.load(table_ptr + 3 * n_tensors + tid).to(tl.pointer_type(tl.float32))
    qv_ptr = tl.load(table_ptr + 4 * n_tensors + tid).to(tl.pointer_type(tl.uint8))
    sv_ptr = tl.load(table_ptr + 5 * n_tensors + tid).to(tl.pointer_type(tl.float32))
    c_ptr = p_ptr
    if MASTER:  # the bf16 parameter as its bits, and the correction
        p_ptr = tl.load(table_ptr + tid).to(tl.pointer_type(tl.uint16))
        if MASTER == 8:
            c_ptr = tl.load(table_ptr + 7 * n_tensors + tid).to(tl.pointer_type(tl.int8))
        else:
            c_ptr = tl.load(table_ptr + 7 * n_tensors + tid).to(tl.pointer_type(tl.int16))
    if ALIGNED:  # every tensor of the group starts on 16 bytes: allows 128-bit accesses
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        qm_ptr = tl.multiple_of(qm_ptr, 16)
        qv_ptr = tl.multiple_of(qv_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)

    # Per-tensor scalars, float64 on the host, rounded once to float32 here (as the
    # for-loop path's ops and the C++ kernel receive them).
    row = scalars_ptr + tid * 4
    bound = tl.load(row).to(tl.float32)
    sq_weight = tl.load(row + 1).to(tl.float32)
    decay = tl.load(row + 2).to(tl.float32)
    seed = tl.load(row + 3).to(tl.int64).to(tl.uint32)
    g_scale = tl.full((), 1.0, tl.float32)  # GradScaler's scale: g is divided by it
    if HAS_SCALE:
        g_scale = tl.load(grad_scale_ptr).to(tl.float32)
    # Scalar arguments cast here, not in a helper: the interpreter passes them as Python
    # floats, which a helper's call would round to float32 (full rounds once, from float64).
    wd = tl.full((), weight_decay, tl.float32)
    b1 = tl.full((), beta1, tl.float32)
    w1 = tl.full((), 1.0 - beta1, tl.float32)
    lr_c = tl.full((), lr, tl.float32)
    beta2_c = tl.full((), beta2, tl.float32)
    eps_c = tl.full((), eps, tl.float32)

    w = _weyl(tl.arange(0, 256))[None, :]
    blk = tile * ROWS + tl.arange(0, ROWS)
    offs = blk[:, None] * 256 + tl.arange(0, 256)[None, :]
    if (tile + 1) * (ROWS * 256) <= numel:
        _update_tile_8bit(p_ptr, g_ptr, qm_ptr, sm_ptr, qv_ptr, sv_ptr, c_ptr, offs, blk, None,
                          None, w, seed, g_scale, wd, decay, bound, sq_weight, lr_c, b1, w1,
                          beta2_c, eps_c, P_DTYPE, COUPLED, MAXIMIZE, HAS_SCALE, NESTEROV,
                          STOCHASTIC, MASTER)
    else:
        _update_tile_8bit(p_ptr, g_ptr, qm_ptr, sm_ptr, qv_ptr, sv_ptr, c_ptr, offs, blk,
                          offs < numel, blk * 256 < numel, w, seed, g_scale, wd, decay,
                          bound, sq_weight, lr_c, b1, w1, beta2_c, eps_c, P_DTYPE, COUPLED,
                          MAXIMIZE, HAS_SCALE, NESTEROV, STOCHASTIC, MASTER)
