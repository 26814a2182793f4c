"""What the Triton test modules share, imported before anything imports triton: the
interpreter switched on where there is no GPU, triton itself (the module skips without it,
or with a triton too old for these tests), and the two markers."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")

triton = pytest.importorskip("triton", reason="not installed (pip install 'adoptim[gpu]')")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 1):
    pytest.skip(
        f"triton {triton.__version__} (torch 2.4's pin) lacks the interpreter and compile APIs "
        "these kernels are tested with (InterpretedFunction.run, ASTSource(constexprs=))",
        allow_module_level=True,
    )

interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="interpreter tests: run with TRITON_INTERPRET=1"
)
cuda_only = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA GPU")
