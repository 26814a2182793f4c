"""CI smoke test of the installed wheel, run by .ci/run from a directory outside the checkout
with a fresh venv (the wheel + torch only) and an empty kernel cache (TORCH_EXTENSIONS_DIR).

    python wheel_smoke.py CHECKOUT

Checks what a user of `pip install adoptim` meets: the package imported is the installed one,
its metadata (version, license, no experiment packages among the core requirements), a fused
float32 step with the C++ kernel built from the wheel's own source, and 8-bit steps (for-loop
and fused). The CLI (`adoptim --version`, `adoptim doctor`) is run by .ci/run itself.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import time
from pathlib import Path

import torch

import adoptim
from adoptim import ADOPT
from adoptim.kernels.cpu import build

checkout = Path(sys.argv[1]).resolve()
package = Path(adoptim.__file__).resolve().parent
assert checkout not in package.parents, f"imported from the checkout: {package}"
assert md.version("adoptim") == adoptim.__version__, (md.version("adoptim"), adoptim.__version__)

meta = md.metadata("adoptim")
assert meta["License-Expression"] == "MIT", meta["License-Expression"]
assert any(f.name == "LICENSE" for f in md.files("adoptim") or []), "no LICENSE in the wheel"
core = [r for r in md.requires("adoptim") or [] if "extra ==" not in r]
assert not [r for r in core if r.split()[0].startswith(("tqdm", "matplotlib"))], core
print(f"installed: adoptim {adoptim.__version__} at {package}; core requirements: {core}")

# The kernel builds from the wheel's C++ source into the empty cache set by .ci/run.
cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])
assert cache in build.kernel_path().parents and not build.kernel_path().exists()
assert (package / "kernels" / "cpu" / "csrc" / "fused_adopt.cpp").exists()

torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(100_000))
opt = ADOPT([p], lr=1e-3, fused=True)  # starts the background build
start = time.perf_counter()
assert build.load_kernel(build=True, wait=True, timeout=900) is not None, build.failure_message()
print(f"fused kernel built from the wheel's source in {time.perf_counter() - start:.0f} s: "
      f"{build.kernel_path()}")
before = p.detach().clone()
for _ in range(3):
    p.grad = torch.randn_like(p)
    opt.step()
assert build.is_loaded() and torch.isfinite(p).all() and not torch.equal(p, before)
print("fused float32 steps: ok")

for kw in ({"foreach": False}, {"fused": True}):
    q = torch.nn.Parameter(torch.randn(100_000))
    opt8 = ADOPT([q], lr=1e-3, state_dtype="8bit", **kw)
    for _ in range(3):
        q.grad = torch.randn_like(q)
        opt8.step()
    state = opt8.state[q]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg_sq"].dtype == torch.uint8
    assert torch.isfinite(q).all()
    print(f"8-bit steps ({kw}): ok")
print("wheel smoke test passed")
