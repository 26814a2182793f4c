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
    assert proc.returncode == (0 if all(r["ok"] for r in records if r["target"] != "gfx942")
                               else 1)  # fmt: skip
