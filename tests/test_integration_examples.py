"""The snippets of docs/integrations.md live in examples/; these tests run them so they stay
correct. Optional libraries (Lightning, Hugging Face transformers) are skipped with a reason
when absent; they are not dependencies of adoptim (the ``integrations`` extra installs them)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], timeout: float = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # so a hung run is killed with all its children
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{args} timed out:\n{out.decode()[-3000:]}")
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    return text


def test_lightning_configure_optimizers_example():
    pytest.importorskip(
        "lightning", reason='Lightning is not installed (pip install "adoptim[integrations]")'
    )
    final = _load("lightning_module").main()
    assert final < 5.0  # from about 10: ADOPT trained the LightningModule


def test_hf_trainer_optimizers_example():
    pytest.importorskip(
        "transformers", reason='transformers is not installed (pip install "adoptim[integrations]")'
    )
    pytest.importorskip(
        "accelerate", reason='Trainer needs accelerate (pip install "adoptim[integrations]")'
    )
    final = _load("hf_trainer").main()
    assert final < 5.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_example(dtype):
    out = _run([str(EXAMPLES / "amp.py"), *([dtype] if dtype == "bfloat16" else [])])
    assert "final loss" in out and "nan" not in out.lower()


@pytest.mark.slow
def test_compile_example():
    out = _run([str(EXAMPLES / "compile_step.py")])
    assert "final loss" in out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_example(mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(EXAMPLES / "distributed.py"),
            mode,
        ],
        timeout=120,
    )
    assert "saved and reloaded a DCP checkpoint" in out
    # and it cleans up after itself: no checkpoint folder left in the temporary directory
    ckpt = out.split("saved and reloaded a DCP checkpoint in ", 1)[1].split()[0]
    assert f"removed {ckpt}" in out and not Path(ckpt).exists()
