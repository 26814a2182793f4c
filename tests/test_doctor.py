"""``adoptim doctor``: what it reports, and ``--compile`` building every kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.triton import aot as _aot
from adoptim.kernels.triton import launch as _triton_kernel
from adoptim.tools import doctor


def test_findings_name_versions_cache_gpus_and_paths(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "python", "compiler", "ninja"):
        assert f"  {word}" in out
    assert torch.backends.cpu.get_cpu_capability() in out
    assert str(_kernel_cache.kernel_path()) in out
    assert "gpus:" in out
    # One line per device type with the path ADOPT(params) takes there, and why.
    assert "\n  cpu   " in out and "\n  cuda  " in out
    if not torch.cuda.is_available():
        assert "no GPU visible" in out and "foreach" in out


def test_paths_follow_the_environment(monkeypatch):
    monkeypatch.setenv("ADOPTIM_DISABLE_FUSED", "1")
    assert doctor.paths()["cpu"].startswith("for-loop: the fused kernel is disabled")
    monkeypatch.delenv("ADOPTIM_DISABLE_FUSED")
    monkeypatch.setenv(_triton_kernel.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert doctor.paths()["cpu"].startswith("Triton kernel")
    monkeypatch.setattr(_triton_kernel, "triton_installed", lambda: False)
    assert "adoptim[gpu]" in doctor.paths()["cuda"]


def test_cpu_kernel_state_says_failed_with_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_kernel_cache, "_op", None)
    directory = _kernel_cache.kernel_path().parent
    directory.mkdir(parents=True)
    (directory / "build.log").write_text("error: no\n")
    (directory / "build-failed").touch()
    state = doctor.cpu_kernel_state()
    assert state["state"].startswith("failed") and "build.log" in state["state"]
    assert state["path"].startswith(str(tmp_path))


def test_compile_prints_one_line_per_variant_and_target():
    """The real thing, in a child process (as a Docker build would run it): the C++ kernel
    (cached or built) and every Triton variant ahead of time for sm_80, sm_90 and gfx942."""
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 1):
        pytest.skip(f"triton {triton.__version__} lacks ASTSource(constexprs=)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "adoptim.tools.cli", "doctor", "--compile", "--json"],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    records = report["compiled"]
    assert records[0]["kernel"].startswith("fused_adopt_ (C++)")
    triton_records = records[1:]
    targets = {r["target"] for r in triton_records}
    if torch.cuda.is_available():
        assert len(targets) == 1
    else:
        assert {"sm_80", "sm_90"} <= targets
    for target in targets:
        rows = [r for r in triton_records if r["target"] == target]
        if target == "gfx942" and len(rows) == 1:  # this Triton cannot target AMD offline
            continue
        assert len(rows) == len(_aot.variants())
    ptx = [r for r in triton_records if r["target"].startswith("sm_") and "load_bits" in r]
    assert ptx and all(r["ok"] and r["load_bits"] == 128 for r in ptx)
    # the exit status counts what this machine can run: without a GPU, the C++ kernel alone
    usable = records if torch.cuda.is_available() else records[:1]
    assert proc.returncode == (0 if all(r["ok"] for r in usable) else 1)


def _compile(monkeypatch, capsys, *, cpp_ok=True, triton=None, gpu=False):
    """``doctor --compile`` with the C++ build and Triton's records stubbed (``triton``: the
    records compile_triton returns; None: run it with triton not installed)."""
    monkeypatch.setattr(doctor, "findings", lambda: {})
    monkeypatch.setattr(doctor, "_print_findings", lambda f: None)
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: gpu)
    cpp = {"kernel": "fused_adopt_ (C++)", "target": "avx2", "ok": cpp_ok, "seconds": 0.1}
    if not cpp_ok:
        cpp["error"] = "c++: not found"
    monkeypatch.setattr(doctor, "compile_cpu_kernel", lambda: cpp)
    if triton is None:
        monkeypatch.setattr(_triton_kernel, "triton_installed", lambda: False)
    else:
        monkeypatch.setattr(doctor, "compile_triton", lambda: triton)
    code = doctor.main(["--compile"])
    return code, capsys.readouterr().out


def test_compile_on_a_cpu_machine_without_triton_exits_0(monkeypatch, capsys):
    """A CPU-only Docker build warming the C++ kernel's cache with --compile must succeed:
    Triton is not applicable there (it exited 1 on 'triton is not installed' before)."""
    code, out = _compile(monkeypatch, capsys)
    assert code == 0
    assert "Triton kernels" in out and "not applicable: no GPU here" in out
    assert "FAILED" not in out and "every kernel usable here built" in out


def test_compile_fails_when_a_kernel_usable_here_fails(monkeypatch, capsys):
    code, out = _compile(monkeypatch, capsys, cpp_ok=False)
    assert code == 1 and "FAILED: c++: not found" in out and "exit status 1" in out
    # with a GPU here, triton missing is a failure: fused=True could run there
    code, out = _compile(monkeypatch, capsys, gpu=True)
    assert code == 1 and "triton is not installed" in out


def test_ahead_of_time_failures_without_a_gpu_are_reported_not_counted(monkeypatch, capsys):
    aot = [{"kernel": "adopt_kernel float32", "target": "sm_90", "ok": False, "error": "boom"}]
    code, out = _compile(monkeypatch, capsys, triton=aot)
    assert code == 0 and "FAILED: boom" in out and "not counted" in out
    code, out = _compile(monkeypatch, capsys, triton=aot, gpu=True)  # the local GPU's: counted
    assert code == 1


def test_doctor_reports_the_imported_version(capsys):
    import adoptim

    assert doctor.main([]) == 0
    assert f"  adoptim    {adoptim.__version__} (" in capsys.readouterr().out
