"""Same seed, same result (issue 18): the path a step takes (the for-loop path while the C++
kernel builds, the kernel afterwards, foreach, Triton) must not change the bits, and no step
may touch the caller's random stream.

* a first run (empty kernel cache: for-loop steps, then the kernel) ends with the same
  weights and optimizer state as a later run (kernel from step 1) and as a run with
  ``ADOPTIM_DISABLE_FUSED=1``: in fresh processes, and in this one;
* ``torch.get_rng_state()`` is the same before and after steps on every path and format;
* bf16 parameters with ``stochastic_rounding`` resume from a checkpoint bit for bit;
* ``torch.use_deterministic_algorithms(True)``: every path runs, warning nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import pytest
import same_seed_train
import torch
from integration_paths import fused_unavailable_reason

import adoptim.paths.forloop as forloop_module
from adoptim import ADOPT
from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.cpu import launch as _cpu_kernel

ROOT = Path(__file__).resolve().parent.parent
TRAIN = Path(same_seed_train.__file__).resolve()


def _require_kernel():
    reason = fused_unavailable_reason()  # waits for the build
    if reason is not None:
        pytest.skip(reason)


def _refuse_forloop(monkeypatch):
    """Make the for-loop path raise: what passes must have run the kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("the for-loop path ran where the fused kernel should have")

    monkeypatch.setattr(forloop_module, "single_tensor_adopt", refuse)


@contextlib.contextmanager
def _on_triton():
    """Fused steps on CPU tensors through the Triton kernels under the interpreter, the other
    paths raising: tests/test_triton_lowbit.py's ``on_triton``, at the default launch shapes
    (its small ones, which exercise tiling, make the interpreter many times slower).
    Imported here: importing it sets TRITON_INTERPRET before triton is imported, and skips
    the test where triton is missing or too old."""
    tl8 = importlib.import_module("test_triton_lowbit")
    if not tl8.INTERPRETED:
        pytest.skip("interpreter tests: run with TRITON_INTERPRET=1")
    from adoptim.kernels.triton import launch as float_launch
    from adoptim.kernels.triton import launch8

    configs = float_launch.CONFIG, launch8.CONFIG
    with tl8.on_triton() as launches:
        with mock.patch.object(float_launch, "CONFIG", configs[0]):
            with mock.patch.object(launch8, "CONFIG", configs[1]):
                yield launches


def _assert_same_run(a_params, a_state, b_params, b_state, what):
    """Weights and every optimizer state tensor equal bit for bit (state dicts' `state`)."""
    diff = [
        f"param {i}: {(x != y).sum().item()} of {x.numel()} differ"
        for i, (x, y) in enumerate(zip(a_params, b_params))
        if not torch.equal(x, y)
    ]
    assert a_state.keys() == b_state.keys()
    for k in a_state:
        for key, value in a_state[k].items():
            other = b_state[k][key]
            if isinstance(value, torch.Tensor) and not torch.equal(value, other):
                diff.append(f"state {k} {key}: {(value != other).sum().item()} differ")
    assert not diff, f"{what}: " + "; ".join(diff)


# --------------------------------------------------------------------------------------------
# First run vs later runs: the background build is invisible


def _run_children(tmp_path, modes, library=None):
    """Run same_seed_train.py once per mode, all at once, each in a fresh process; return
    {mode: saved result}. A cold mode gets its own empty TORCH_EXTENSIONS_DIR."""
    procs = {}
    cold_dirs = {}
    try:
        for mode in modes:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
            )
            env.pop("ADOPTIM_DISABLE_FUSED", None)
            if mode.startswith("cold"):
                cold_dirs[mode] = tmp_path / f"ext-{mode}"
                cold_dirs[mode].mkdir()
                env["TORCH_EXTENSIONS_DIR"] = str(cold_dirs[mode])
            if mode == "disabled":
                env["ADOPTIM_DISABLE_FUSED"] = "1"
            args = [sys.executable, str(TRAIN), str(tmp_path / f"{mode}.pt"), mode]
            if library is not None:
                args.append(library)
            procs[mode] = subprocess.Popen(
                args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        for mode, proc in procs.items():
            out, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"{mode} run failed:\n{out.decode()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for directory in cold_dirs.values():
            _stop_builder(directory)
    return {mode: torch.load(tmp_path / f"{mode}.pt") for mode in modes}


def _stop_builder(cache: Path) -> None:
    """Leave no builder running: the cold run waited for its build, whose process is then
    finishing (it removes its marker last); if the run failed early, end that build (its own
    session: its process group is the builder and its compiler)."""
    for marker in cache.glob("adoptim_fused/*/building.pid"):
        deadline = time.monotonic() + 30
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            pid = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            continue  # gone: the builder has finished
        if pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)


def _check_first_and_later_runs(results):
    half = same_seed_train.STEPS // 2
    cold_mode = next(m for m in results if m.startswith("cold"))
    cold, warm, disabled = results[cold_mode], results["warm"], results["disabled"]
    # The premise: the first run stepped on the for-loop path, then on the kernel.
    assert not any(cold["ran_kernel"][:half]) and all(cold["ran_kernel"][half:]), cold["ran_kernel"]
    assert all(warm["ran_kernel"]), "the later run should have had the kernel from step 1"
    assert not any(disabled["ran_kernel"])
    for name, other in ((cold_mode, cold), ("disabled", disabled)):
        _assert_same_run(
            warm["params"], warm["optimizer"]["state"], other["params"],
            other["optimizer"]["state"], f"{name} run vs the warm-cache run",
        )  # fmt: skip


def test_first_run_equals_later_runs_in_fresh_processes(tmp_path):
    """Three fresh processes: an empty kernel cache whose kernel arrives halfway (copied in
    from the built one, as the background builder would publish it), the built kernel from
    step 1, and ADOPTIM_DISABLE_FUSED=1; final weights and state equal bit for bit."""
    _require_kernel()
    library = str(_kernel_cache.kernel_path())
    results = _run_children(tmp_path, ["cold-copy", "warm", "disabled"], library)
    _check_first_and_later_runs(results)


@pytest.mark.slow
def test_first_run_with_a_real_background_build_equals_later_runs(tmp_path):
    """As above, with nothing faked: the first process builds the kernel in the background
    from an empty cache (40-90 s here), stepping on the for-loop path meanwhile."""
    _require_kernel()
    results = _run_children(tmp_path, ["cold", "warm", "disabled"])
    _check_first_and_later_runs(results)


def test_kernel_arriving_mid_run_changes_nothing_in_process(monkeypatch):
    """The same three runs in this process (cheap): the kernel is withheld for the first
    half (as while it builds), present throughout, or disabled."""
    _require_kernel()
    half = same_seed_train.STEPS // 2

    def params_and_state(model, opt):
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()["state"]

    warm_model, warm_opt, _ = same_seed_train.train()
    warm = params_and_state(warm_model, warm_opt)

    real_load = _cpu_kernel.load_kernel
    withheld = []

    def before_step(i):
        monkeypatch.setattr(
            _cpu_kernel, "load_kernel", (lambda **kw: withheld.append(i)) if i < half else real_load
        )

    mixed_model, mixed_opt, _ = same_seed_train.train(before_step=before_step)
    assert sorted(set(withheld)) == list(range(half))  # the first half ran the for-loop path
    monkeypatch.setattr(_cpu_kernel, "load_kernel", real_load)
    _assert_same_run(*warm, *params_and_state(mixed_model, mixed_opt), "kernel from halfway")

    monkeypatch.setenv("ADOPTIM_DISABLE_FUSED", "1")
    loop_model, loop_opt, _ = same_seed_train.train()
    _assert_same_run(*warm, *params_and_state(loop_model, loop_opt), "ADOPTIM_DISABLE_FUSED=1")


# --------------------------------------------------------------------------------------------
# Every path and format: the caller's random stream, deterministic algorithms

#: state formats: name -> (parameter dtype, constructor flags)
FORMATS = {
    "float32": (torch.float32, {}),
    "8bit": (torch.float32, dict(state_dtype="8bit")),
    "bf16-sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "bf16-sr-bf16-state": (torch.bfloat16, dict(stochastic_rounding=True, state_dtype="param")),
    "bf16-sr-8bit": (torch.bfloat16, dict(stochastic_rounding=True, state_dtype="8bit")),
}
PATHS = ["for-loop", "foreach", "fused", "triton"]


def _path(path, monkeypatch):
    """(constructor flags, context to build and step in) for a path; the fused and Triton
    paths make the others raise."""
    if path == "for-loop":
        return dict(foreach=False, fused=False), contextlib.nullcontext()
    if path == "foreach":
        return dict(foreach=True, fused=False), contextlib.nullcontext()
    if path == "fused":
        _require_kernel()
        _refuse_forloop(monkeypatch)
        return dict(fused=True), contextlib.nullcontext()
    return dict(fused=True), _on_triton()


def _tensors(dtype, seed=0, steps=3):
    """A 64x80 tensor (8-bit under state_dtype='8bit') and a small one (float state), and
    gradients for ``steps`` calls, from a generator of their own."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(64, 80, generator=gen).to(dtype), torch.randn(100, generator=gen).to(dtype)]
    grads = [[torch.randn(x.shape, generator=gen).to(dtype) for x in init] for _ in range(steps)]
    return init, grads


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("path", PATHS)
def test_steps_leave_the_global_rng_untouched(path, fmt, monkeypatch):
    dtype, fmt_kw = FORMATS[fmt]
    path_kw, context = _path(path, monkeypatch)
    init, grads = _tensors(dtype)
    params = [x.clone().requires_grad_() for x in init]
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    with context:
        opt = ADOPT(params, lr=1e-3, **path_kw, **fmt_kw)
        for w in grads:
            for p, g in zip(params, w):
                p.grad = g.clone()
            opt.step()
    untouched = torch.equal(torch.get_rng_state(), before)
    assert untouched, f"{path}/{fmt}: a step drew from torch's global generator"


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("path", PATHS)
def test_deterministic_algorithms_run_without_warnings(path, fmt, monkeypatch):
    dtype, fmt_kw = FORMATS[fmt]
    path_kw, context = _path(path, monkeypatch)
    init, grads = _tensors(dtype)
    params = [x.clone().requires_grad_() for x in init]
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with context, warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = ADOPT(params, lr=1e-3, **path_kw, **fmt_kw)
            for w in grads:
                for p, g in zip(params, w):
                    p.grad = g.clone()
                opt.step()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    assert all(torch.isfinite(p.float()).all() for p in params)


# --------------------------------------------------------------------------------------------
# bf16 + stochastic rounding: resuming replays the rounding


@pytest.mark.parametrize("fmt", ["bf16-sr", "bf16-sr-8bit"])
@pytest.mark.parametrize("path", PATHS)
def test_bf16_stochastic_rounding_resumes_bit_for_bit(path, fmt, monkeypatch):
    """Eight steps in one go equal four, a checkpoint (weights and state dict through
    torch.save), a fresh optimizer and four more, bit for bit. The script seeds torch at the
    start of each process (as training scripts do), so a rounding drawn from torch's
    generator would replay the first process's draws, not continue them. lr = 1e-3 keeps
    the updates below half a bf16 ulp of most weights: the rounding decides them."""
    dtype, fmt_kw = FORMATS[fmt]
    path_kw, context = _path(path, monkeypatch)
    init, grads = _tensors(dtype, seed=3, steps=8)

    def fresh(params):
        return ADOPT(params, lr=1e-3, **path_kw, **fmt_kw)

    def steps(params, opt, gradients):
        for w in gradients:
            for p, g in zip(params, w):
                p.grad = g.clone()
            opt.step()

    with context:
        torch.manual_seed(0)
        whole = [x.clone().requires_grad_() for x in init]
        whole_opt = fresh(whole)
        steps(whole, whole_opt, grads)

        torch.manual_seed(0)
        first = [x.clone().requires_grad_() for x in init]
        first_opt = fresh(first)
        steps(first, first_opt, grads[:4])
        buf = io.BytesIO()
        torch.save(
            {"params": [p.detach() for p in first], "optimizer": first_opt.state_dict()}, buf
        )
        buf.seek(0)
        ckpt = torch.load(buf)

        torch.manual_seed(0)  # the resuming process starts as the first one did
        resumed = [x.clone().requires_grad_() for x in ckpt["params"]]
        resumed_opt = fresh(resumed)
        resumed_opt.load_state_dict(ckpt["optimizer"])
        steps(resumed, resumed_opt, grads[4:])

    moved = sum((a.detach() != b).sum().item() for a, b in zip(whole, init))
    assert moved > 0
    _assert_same_run(
        [p.detach() for p in whole], whole_opt.state_dict()["state"],
        [p.detach() for p in resumed], resumed_opt.state_dict()["state"],
        f"{path}/{fmt}: resumed vs uninterrupted",
    )  # fmt: skip


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (the CUDA generator; torch flags nondeterministic ops on CUDA only)",
)
@pytest.mark.parametrize("fmt", ["float32", "8bit", "bf16-sr", "bf16-sr-8bit"])
@pytest.mark.parametrize("path", ["for-loop", "foreach", "fused"])
def test_cuda_steps_are_deterministic_and_leave_both_generators_untouched(path, fmt):
    """On CUDA: torch raises for nondeterministic ops only there, and a step must not draw
    from the CPU generator nor the CUDA one."""
    if path == "fused":
        pytest.importorskip("triton", reason="fused=True on CUDA takes the Triton kernel")
    dtype, fmt_kw = FORMATS[fmt]
    path_kw = {
        "for-loop": dict(foreach=False, fused=False),
        "foreach": dict(foreach=True, fused=False),
        "fused": dict(fused=True),
    }[path]
    init, grads = _tensors(dtype)
    params = [x.cuda().requires_grad_() for x in init]
    torch.manual_seed(1234)
    cpu_before, cuda_before = torch.get_rng_state(), torch.cuda.get_rng_state()
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = ADOPT(params, lr=1e-3, **path_kw, **fmt_kw)
            for w in grads:
                for p, g in zip(params, w):
                    p.grad = g.cuda()
                opt.step()
            torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    assert all(torch.isfinite(p.float()).all() for p in params)
    assert torch.equal(torch.get_rng_state(), cpu_before), "a step drew from the CPU generator"
    assert torch.equal(torch.cuda.get_rng_state(), cuda_before), "a step drew from CUDA's"
