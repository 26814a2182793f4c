"""``adoptim doctor``: why a fast path is or is not used here, and (``--compile``) build every
kernel now.

Example::

    adoptim doctor             # versions, CPU, the C++ kernel's cache, GPUs, the path per device
    adoptim doctor --compile   # build the C++ kernel and compile every Triton kernel variant
                               # (for the local GPU; without one, ahead of time for sm_80, sm_90
                               # and AMD gfx942; float and 8-bit state), one line per variant
                               # and target

``--compile`` also warms the caches, e.g. in a Docker build: the C++ kernel lands in
``$TORCH_EXTENSIONS_DIR/adoptim_fused`` and Triton's kernels in Triton's cache
(``$TRITON_CACHE_DIR``, default ``~/.triton/cache``).

Exit status of ``--compile``: 0 when every kernel this machine can run built (the C++ kernel;
the Triton kernels too where a GPU is visible), 1 otherwise. Without a GPU the Triton kernels
are not applicable: without triton the line says so; with triton they are compiled ahead of
time for sm_80/sm_90/gfx942 and reported, a failure there included, without failing the command.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import torch

import adoptim
from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.cpu import launch as _cpu_kernel
from adoptim.kernels.triton import launch as _triton_kernel

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="build the C++ kernel into its cache and compile every Triton kernel variant "
        "(local GPU, else ahead of time for sm_80, sm_90 and gfx942), one line each",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the findings as one JSON object instead"
    )


# --------------------------------------------------------------------------------------------
# Findings


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(command: list[str]) -> str:
    path = shutil.which(command[0], path=_kernel_cache._build_path())
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, *command[1:]], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path}: {exc}"
    text = (out.stdout or out.stderr).strip().splitlines()
    return f"{text[0] if text else '?'} ({path})"


def versions() -> dict[str, str]:
    cxx = os.environ.get("CXX", "c++")
    return {
        # the imported package's own version and place (the installed metadata can belong to
        # another copy, e.g. an editable install shadowed by PYTHONPATH)
        "adoptim": f"{adoptim.__version__} ({os.path.dirname(adoptim.__file__)})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, ROCm {torch.version.hip})",
        "triton": _version("triton"),
        "python": f"{platform.python_version()} ({sys.executable})",
        "compiler": _first_line([cxx, "--version"]),
        "ninja": _first_line(["ninja", "--version"]),
    }


def cpu_kernel_state() -> dict[str, str]:
    """Where the C++ kernel lives and whether it is built, being built or failed."""
    path = _kernel_cache.kernel_path()
    directory = path.parent
    if _kernel_cache.is_loaded() or path.exists():
        state = "built"
    elif _kernel_cache.failure_message(directory) is not None:
        state = f"failed (log: {directory / 'build.log'})"
    elif (directory / "building.pid").exists() and _kernel_cache._builder_alive(
        directory / "building.pid"
    ):
        state = f"building (log: {directory / 'build.log'})"
    else:
        reason = _kernel_cache.build_unavailable_reason()
        state = "not built (built on first use)" if reason is None else f"cannot build: {reason}"
    return {"path": str(path), "state": state}


def gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        arch = getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}"
        out.append(f"cuda:{i} {props.name} ({arch}, {props.total_memory / 2**30:.0f} GiB)")
    return out


def paths() -> dict[str, str]:
    """For each device type, the path ``ADOPT(params)`` (fused and foreach unset) takes."""
    out = {}
    cpu = [torch.zeros(1)]
    if _triton_kernel.selected(cpu, fused=None):
        reason = _triton_kernel.unsupported_reason(cpu)
        out["cpu"] = (
            f"Triton kernel ({_triton_kernel.BACKEND_ENV}=triton)"
            if reason is None
            else f"for-loop: {_triton_kernel.BACKEND_ENV}=triton but {reason}"
        )
    elif _cpu_kernel.default_to_fused(cpu, differentiable=False):
        built = _kernel_cache.is_loaded() or _kernel_cache.kernel_path().exists()
        out["cpu"] = "fused C++ kernel" + (
            "" if built else " (built in the background on first use; the for-loop path runs "
            "until it is ready)"
        )
    else:
        why = _cpu_kernel.unsupported_reason(cpu) or "the kernel's build failed recently"
        out["cpu"] = f"for-loop: {why}"

    triton_reason = _triton_kernel.unsupported_reason([_FakeCuda()])
    if _triton_kernel.DEFAULT_ON_CUDA and triton_reason is None:
        out["cuda"] = "Triton kernel"
    else:
        why = (
            "the default on CUDA stays foreach until the Triton kernel has passed "
            "scripts/gpu_check.sh on a real GPU"
            if not _triton_kernel.DEFAULT_ON_CUDA
            else triton_reason
        )
        fused = (
            "fused=True runs the Triton kernels (float and 8-bit state)"
            if triton_reason is None
            else f"fused=True raises: {triton_reason}"
        )
        out["cuda"] = f"foreach ({why}); {fused}"
    if not torch.cuda.is_available():
        out["cuda"] += " [no GPU visible here]"
    return out


class _FakeCuda:
    """Stands in for a CUDA parameter where there is no GPU (only device and dtype are read)."""

    device = torch.device("cuda")
    dtype = torch.float32


def findings() -> dict[str, Any]:
    return {
        "versions": versions(),
        "cpu": {
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        },
        "cpu_kernel": cpu_kernel_state(),
        "gpus": gpus(),
        "paths": paths(),
    }


def _print_findings(f: dict[str, Any]) -> None:
    print("adoptim doctor")
    print("\nversions")
    for key, value in f["versions"].items():
        print(f"  {key:10s} {value}")
    cpu = f["cpu"]
    print(f"\ncpu: {cpu['capability']}, {cpu['threads']} torch threads, {cpu['cores']} cores")
    print(f"  C++ kernel: {f['cpu_kernel']['state']}")
    print(f"    cache: {f['cpu_kernel']['path']}")
    print("\ngpus: " + ("none visible" if not f["gpus"] else ""))
    for line in f["gpus"]:
        print(f"  {line}")
    print("\nADOPT(params) takes, per device type")
    for device, line in f["paths"].items():
        print(f"  {device:5s} {line}")


# --------------------------------------------------------------------------------------------
# --compile


def compile_cpu_kernel() -> dict[str, Any]:
    start = time.perf_counter()
    was_there = _kernel_cache.kernel_path().exists()
    reason = _kernel_cache.build_unavailable_reason()
    if reason is not None:
        return {"kernel": "fused_adopt_ (C++)", "target": "cpu", "ok": False, "error": reason}
    try:
        _kernel_cache.load_kernel(build=True, wait=True, timeout=900)
    except RuntimeError as exc:
        return {"kernel": "fused_adopt_ (C++)", "target": "cpu", "ok": False, "error": str(exc)}
    return {
        "kernel": "fused_adopt_ (C++)",
        "target": torch.backends.cpu.get_cpu_capability().lower(),
        "ok": True,
        "seconds": round(time.perf_counter() - start, 2),
        "note": "cached already" if was_there else f"built into {_kernel_cache.kernel_path()}",
    }


def compile_triton() -> list[dict[str, Any]]:
    """Every Triton variant for the local GPU, or ahead of time for sm_80/sm_90/gfx942; in a
    child process when this one runs Triton's interpreter (its kernels are not compilable)."""
    if not _triton_kernel.triton_installed():
        if not torch.cuda.is_available():
            # Nothing here could run them: not a failure (a CPU-only Docker build that warms
            # the C++ kernel's cache with --compile must succeed).
            return [{"kernel": "Triton kernels", "target": "-", "ok": True,
                     "not_applicable": "no GPU here and triton not installed (on a GPU "
                     f"machine: {_triton_kernel.INSTALL_HINT})"}]  # fmt: skip
        return [{"kernel": "Triton kernels", "target": "-", "ok": False,
                 "error": f"triton is not installed: {_triton_kernel.INSTALL_HINT}"}]  # fmt: skip
    if not _triton_kernel._interpreting():
        from adoptim.kernels.triton import aot as _aot

        records = _aot.compile_report()
    else:
        code = (
            "import json; from adoptim.kernels.triton import aot as tk; "
            "print(json.dumps(tk.compile_report()))"
        )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode != 0:
            return [{"kernel": "Triton kernels", "target": "-", "ok": False,
                     "error": proc.stderr.strip()[-2000:]}]  # fmt: skip
        records = json.loads(proc.stdout.strip().splitlines()[-1])
    # A target the installed Triton cannot reach offline fails every variant the same way:
    # one line for it.
    out, by_target = [], {}
    for r in records:
        by_target.setdefault(r["target"], []).append(r)
    for target, rs in by_target.items():
        if all(not r["ok"] for r in rs) and len({r["error"] for r in rs}) == 1:
            out.append({"kernel": "all variants", "target": target, "ok": False,
                        "error": rs[0]["error"]})  # fmt: skip
        else:
            out.extend(rs)
    return out


def _format(record: dict[str, Any]) -> str:
    head = f"  {record['kernel']:44s} {record['target']:8s}"
    if record.get("not_applicable"):
        return f"{head} not applicable: {record['not_applicable']}"
    if not record["ok"]:
        error = record.get("error", "").strip().splitlines()
        return f"{head} FAILED: {error[-1] if error else '?'}"
    line = f"{head} ok  {record.get('seconds', 0):5.1f} s"
    if "load_bits" in record:
        line += (
            f"  loads {record['load_bits']}-bit, {record['loads_per_element']:.2f}/element"
        )
        if record["stores_per_element"]:
            line += (
                f"; stores {record['store_bits']}-bit, "
                f"{record['stores_per_element']:.2f}/element"
            )
    if record.get("note"):
        line += f"  ({record['note']})"
    return line


def run(args: argparse.Namespace) -> int:
    f = findings()
    records: list[dict[str, Any]] = []
    if args.compile:
        if not args.json:
            _print_findings(f)
            print("\ncompiling (one line per kernel variant and target)")
        record = compile_cpu_kernel()
        records.append(record)
        if not args.json:
            print(_format(record), flush=True)
        for record in compile_triton():
            records.append(record)
            if not args.json:
                print(_format(record), flush=True)
    elif not args.json:
        _print_findings(f)
    failed = [r for r in records if not r["ok"] and usable_here(r)]
    if args.json:
        print(json.dumps({**f, "compiled": records}, indent=2))
    elif args.compile:
        aot = [r for r in records if not r["ok"] and not usable_here(r)]
        print("\n" + ("every kernel usable here built" if not failed else
                      f"{len(failed)} kernel(s) usable here failed: exit status 1")
              + (f"; {len(aot)} ahead-of-time Triton line(s) failed, for GPUs this machine "
                 "does not have (not counted)" if aot else ""))
    return 1 if failed else 0


def usable_here(record: dict[str, Any]) -> bool:
    """Whether a --compile record is for a kernel this machine can run, so that its failure
    sets the exit status: the C++ kernel, and the Triton kernels for a GPU that is here.
    Without a GPU, Triton compiles ahead of time for sm_80/sm_90/gfx942: those lines are
    reported (a broken Triton shows there) but do not fail the command, which exits 0 when
    everything usable here built."""
    if record["target"] == "cpu" or record["kernel"].startswith("fused_adopt_ (C++)"):
        return True
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adoptim doctor", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
