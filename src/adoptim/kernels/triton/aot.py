"""Ahead-of-time compilation of the Triton kernels (``adoptim doctor --compile``, the PTX and
AMDGCN tests): every variant worth compiling, for a GPU target, without a GPU.

Imports both launchers (for their launch shapes and constexprs); neither imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adoptim.kernels.triton import common as _common
from adoptim.kernels.triton import launch as _launch
from adoptim.kernels.triton import launch8 as _launch8

__all__ = ["Variant", "access_summary", "aot_compile", "compile_report", "default_targets",
           "variants"]  # fmt: skip

# (parameter dtype, state dtype) pairs the optimizer creates (state_dtype "auto"/"param").
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
)
# Parameter dtypes of the 8-bit kernel (complex64 runs as float32).
EIGHT_BIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SIG_NAMES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.uint8: "8bit",  # s_dtype of the 8-bit kernel's variants
}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: ``kind`` is "update", "count" (caution's first pass),
    "schedule" or "update8" (the 8-bit kernel, ``s_dtype`` uint8; "all options" there:
    coupled decay, maximize, GradScaler, nesterov); the flags are the kernel's constexprs."""

    kind: str
    p_dtype: torch.dtype = torch.float32
    s_dtype: torch.dtype = torch.float32
    options: bool = False  # coupled decay, maximize, GradScaler, tensor lr, nesterov, caution
    stochastic: bool = False
    clip: int = 1  # schedule kernel: 0 none, 1 power law, 2 given bounds
    master: int = 0  # master_weight_bits (24 or 32; bf16 parameters), 0 for none

    @property
    def master_constexpr(self) -> int:
        """The kernels' MASTER: the correction's bits (0, 8 or 16)."""
        return self.master - 16 if self.master else 0

    @property
    def name(self) -> str:
        if self.kind == "schedule":
            return f"schedule(clip={('none', 'power', 'callable')[self.clip]})"
        pair = f"{_SIG_NAMES[self.p_dtype]}/{_SIG_NAMES[self.s_dtype]}"
        flags = (("all options", self.options), ("stochastic", self.stochastic),
                 (f"master {self.master}", bool(self.master)))  # fmt: skip
        extras = [x for x, on in flags if on]
        kind = "update" if self.kind == "update8" else self.kind
        return f"{kind}({pair}{', ' + ', '.join(extras) if extras else ''})"


def variants() -> list[Variant]:
    """Every variant worth compiling ahead of time: per dtype pair the plain update, the one
    with every option on, caution's counting pass; stochastic rounding and master-weight
    corrections (24 and 32 bits; 8-bit state: 24) for bfloat16; the schedule kernel per clip
    mode."""
    out = []
    for p_dtype, s_dtype in DTYPE_PAIRS:
        out.append(Variant("update", p_dtype, s_dtype))
        out.append(Variant("update", p_dtype, s_dtype, options=True))
        out.append(Variant("count", p_dtype, s_dtype, options=True))
        if p_dtype == torch.bfloat16:
            out.append(Variant("update", p_dtype, s_dtype, stochastic=True))
            if s_dtype == torch.float32:  # master weights (the bf16 moments' kernel is alike)
                out.append(Variant("update", p_dtype, s_dtype, master=24))
                out.append(Variant("update", p_dtype, s_dtype, options=True, master=32))
    out.extend(Variant("schedule", clip=clip) for clip in (0, 1, 2))
    for p_dtype in EIGHT_BIT_DTYPES:  # the 8-bit kernel, the same choices
        out.append(Variant("update8", p_dtype, torch.uint8))
        out.append(Variant("update8", p_dtype, torch.uint8, options=True))
        if p_dtype == torch.bfloat16:
            out.append(Variant("update8", p_dtype, torch.uint8, stochastic=True))
            out.append(Variant("update8", p_dtype, torch.uint8, master=24))
    return out


def aot_compile(variant: Variant, target, cfg: _launch.LaunchConfig | None = None):
    """Compile ``variant`` for ``target`` (a ``triton.backends.compiler.GPUTarget``) without a
    GPU; returns Triton's compiled kernel (``.asm`` holds ``ttir``, ``ptx``/``amdgcn``...)."""
    import triton
    import triton.language as tl

    if variant.kind == "update8":
        return _aot_compile_8bit(variant, target)
    jit = _common.jit()
    cfg = cfg or _launch.CONFIG
    if variant.kind == "schedule":
        signature = {
            "steps_ptr": "*i64",
            "n_tensors": "i32",
            "scalars_ptr": "*fp64",
            "counts_ptr": "*i32",
            "bounds_ptr": "*fp64",
            "found_inf_ptr": "*fp32",
            "clip_exp": "fp64",
            "beta2": "fp64",
        }
        constexprs = dict(CLIP=variant.clip, HAS_INF=True, CAUTION=True, BLOCK=cfg.schedule_block)
        fn, num_warps = jit.schedule_kernel, 4
    else:
        on = variant.options
        c_dtype = tl.float64 if torch.float64 in (variant.p_dtype, variant.s_dtype) else tl.float32
        signature = {
            "table_ptr": "*i64",
            "n_tensors": "i32",
            "scalars_ptr": "*fp64",
            "counts_ptr": "*i32",
            "lr_ptr": "*fp32",
            "lr": "fp64",
            "beta1": "fp64",
            "beta2": "fp64",
            "eps": "fp64",
            "weight_decay": "fp64",
            "decoupled_wd": "fp64",
            "grad_scale_ptr": "*fp32",
            "found_inf_ptr": "*fp32",
        }
        constexprs = dict(
            P_DTYPE=_common.tl_dtype(tl, variant.p_dtype),
            S_DTYPE=_common.tl_dtype(tl, variant.s_dtype),
            C_DTYPE=c_dtype,
            ALIGNED=True,
            COUPLED=on,
            MAXIMIZE=on,
            HAS_SCALE=on,
            HAS_INF=on,
            LR_ON_DEVICE=on,
            NESTEROV=on,
            CAUTION=on or variant.kind == "count",
            COUNT_ONLY=variant.kind == "count",
            STOCHASTIC=variant.stochastic,
            MASTER=variant.master_constexpr,
            BLOCK=cfg.block,
            CHUNK=cfg.chunk,
        )
        fn, num_warps = jit.adopt_kernel, cfg.num_warps
        if target.backend == "hip":
            num_warps = cfg.num_warps_amd
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, **_common.COMPILE_OPTIONS})  # fmt: skip


def _global_accesses(
    asm: str, isa: str, element_bytes: int
) -> tuple[list[tuple[int, bool]], list[tuple[int, bool]]]:
    """(bytes, is_vector) of each global load and store instruction in PTX or AMDGCN: PTX
    vectors are ``.v2``/``.v4``; on AMD, accesses wider than the widest element (uniform
    table reads are scalar ``s_load`` there)."""
    import re

    if isa == "ptx":
        sizes = {"8": 1, "16": 2, "32": 4, "64": 8}
        pattern = r"\b{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b"
        found = {}
        for op in ("ld", "st"):
            found[op] = [
                (int(v or 1) * sizes[b], bool(v))
                for v, b in re.findall(pattern.format(op=op), asm)
            ]
        return found["ld"], found["st"]
    sizes = {"dwordx4": 16, "dwordx3": 12, "dwordx2": 8, "dword": 4, "short": 2, "ushort": 2,
             "short_d16": 2, "short_d16_hi": 2, "b128": 16, "b96": 12, "b64": 8, "b32": 4,
             "b16": 2, "u16": 2}  # fmt: skip
    found = {}
    for op in ("load", "store"):
        names = re.findall(rf"\b(?:global|buffer)_{op}_(\w+)", asm)
        found[op] = [(sizes[n], sizes[n] > element_bytes) for n in names if n in sizes]
    return found["load"], found["store"]


def access_summary(asm: dict, variant: Variant, cfg: _launch.LaunchConfig | None = None) -> dict:
    """Global memory accesses of a compiled update/count kernel (``asm``: Triton's
    ``compiled.asm``, PTX or AMDGCN): the widest load and store (bits) and, in the unmasked
    full-block loop, loads and stores per element (1.0: each input element read once, each
    output written once). Counted from the vector accesses' bytes (the masked tail and the
    table reads are scalar) against one thread's share of a block of theta, g, m, v (theta,
    m, v written)."""
    cfg = cfg or _launch.CONFIG
    block, warps, warps_amd = cfg.block, cfg.num_warps, cfg.num_warps_amd
    if variant.kind == "update8":  # theta, g, m codes, v codes (the scales are per 256)
        cfg8 = _launch8.CONFIG
        block, warps, warps_amd = cfg8.rows * 256, cfg8.num_warps, cfg8.num_warps_amd
    if "ptx" in asm:
        isa, warp = "ptx", 32
    else:
        isa, warp, warps = "amdgcn", 64, warps_amd
    p_size = torch.empty((), dtype=variant.p_dtype).element_size()
    s_size = torch.empty((), dtype=variant.s_dtype).element_size()
    # (AMD: a vector is wider than the widest element, and the 8-bit kernel reads float32
    # scales per block)
    widest = max(p_size, 4 if variant.kind == "update8" else s_size)
    loads, stores = _global_accesses(asm[isa], isa, widest)
    per_thread = block // (warp * warps)
    c_size = {0: 0, 24: 1, 32: 2}[variant.master]  # the master-weight correction
    want_loaded = per_thread * (2 * p_size + 2 * s_size + c_size)
    writes = variant.kind in ("update", "update8")
    want_stored = per_thread * (p_size + 2 * s_size + c_size) if writes else 0
    vec_loads = [b for b, vector in loads if vector]
    vec_stores = [b for b, vector in stores if vector]
    return {
        "isa": isa,
        "load_bits": 8 * max(vec_loads or [b for b, _ in loads] or [0]),
        "store_bits": 8 * max(vec_stores or [b for b, _ in stores] or [0]),
        "loads_per_element": sum(vec_loads) / want_loaded,
        "stores_per_element": sum(vec_stores) / want_stored if want_stored else 0.0,
        "vector_loads": len(vec_loads),
        "vector_stores": len(vec_stores),
    }


def default_targets() -> list[tuple[str, Any]]:
    """What ``adoptim doctor --compile`` compiles for: the local GPU, or without one sm_80,
    sm_90 and AMD gfx942 (``(label, GPUTarget)`` pairs)."""
    from triton.backends.compiler import GPUTarget

    if torch.cuda.is_available():
        import triton

        target = triton.runtime.driver.active.get_current_target()
        label = f"sm_{target.arch}" if target.backend == "cuda" else str(target.arch)
        return [(label, target)]
    return [
        ("sm_80", GPUTarget("cuda", 80, 32)),
        ("sm_90", GPUTarget("cuda", 90, 32)),
        ("gfx942", GPUTarget("hip", "gfx942", 64)),
    ]


def compile_report(targets: list[tuple[str, Any]] | None = None) -> list[dict]:
    """Compile every variant for every target; one record per (variant, target): outcome,
    seconds, and for PTX the access summary. Needs a process where triton is not in
    interpreter mode (the kernels are then compiled functions)."""
    import time

    records = []
    for label, target in targets or default_targets():
        for variant in variants():
            record: dict[str, Any] = {"kernel": variant.name, "target": label}
            start = time.perf_counter()
            try:
                compiled = aot_compile(variant, target)
            except Exception as exc:  # noqa: BLE001 - reported per variant
                record.update(ok=False, error=f"{type(exc).__name__}: {exc}".strip())
            else:
                record["ok"] = True
                if variant.kind != "schedule":
                    record.update(access_summary(compiled.asm, variant))
            record["seconds"] = round(time.perf_counter() - start, 2)
            records.append(record)
    return records


def _aot_compile_8bit(variant, target, cfg=None):
    """Compile an ``update8`` :class:`Variant` for ``target`` without a GPU."""
    import triton
    import triton.language as tl

    jit = _common.jit()
    cfg = cfg or _launch8.CONFIG
    on = variant.options
    signature = {
        "table_ptr": "*i64",
        "n_tensors": "i32",
        "scalars_ptr": "*fp64",
        "grad_scale_ptr": "*fp32",
        "lr": "fp64",
        "beta1": "fp64",
        "beta2": "fp64",
        "eps": "fp64",
        "weight_decay": "fp64",
    }
    constexprs = _launch8._constexprs(
        tl, variant.p_dtype, aligned=True, coupled=on, maximize=on, has_scale=on, nesterov=on,
        stochastic=variant.stochastic, rows=cfg.rows, master=variant.master_constexpr,
    )  # fmt: skip
    signature.update({name: "constexpr" for name in constexprs})
    num_warps = cfg.num_warps_amd if target.backend == "hip" else cfg.num_warps
    source = triton.compiler.ASTSource(fn=jit.adopt_8bit_kernel, signature=signature,
                                       constexprs=constexprs)  # fmt: skip
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, **_common.COMPILE_OPTIONS})  # fmt: skip
