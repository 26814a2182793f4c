"""A short training run that tests/test_same_seed.py runs in fresh processes (and in its own).

Not a test module (no ``test_`` prefix). As a script::

    python tests/same_seed_train.py OUT MODE [LIBRARY]

trains a small MLP on fixed data with ``torch.manual_seed(0)`` and default ``ADOPT`` (on CPU:
the C++ kernel once it is built, the for-loop path until then), and saves the final weights,
the optimizer's state dict and, per step, whether the kernel was loaded when it ran, to OUT.
MODE says how the kernel arrives:

* ``warm``: as the environment has it (a built kernel in the cache: from the first step);
* ``cold``: the cache (``TORCH_EXTENSIONS_DIR``, set by the caller) is empty, so the first
  step starts the background build and the first steps take the for-loop path; halfway the
  run waits for the build, so that the second half runs the kernel (a real first run
  reaches the switch at a step that depends on the machine);
* ``cold-copy``: as ``cold``, except that no compiler runs: the build is not started, and
  halfway the already built LIBRARY is published into the empty cache, as the builder would
  (the same switch from the for-loop path to the kernel, in seconds instead of a minute);
* ``disabled``: as the environment has it (the caller sets ``ADOPTIM_DISABLE_FUSED=1``).
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

from adoptim import ADOPT
from adoptim.kernels.cpu import build

STEPS = 60


def train(steps: int = STEPS, before_step=None):
    """The run; ``before_step(i)`` is called before step i. Returns (model, optimizer,
    per-step flags: was the kernel loaded once step i had run)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=gen)
    y = torch.randn(256, 8, generator=gen)
    # decoupled decay: the float32 kernel's arithmetic differed most from the for-loop's there
    opt = ADOPT(model.parameters(), lr=1e-2, weight_decay=1e-2, decouple=True)
    ran_kernel = []
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        # a step loads a kernel that has become ready before it runs, and then runs it
        ran_kernel.append(build.is_loaded())
    return model, opt, ran_kernel


def main(out: str, mode: str, library: str | None = None) -> None:
    halfway = STEPS // 2
    if mode == "cold-copy":
        build._start_build = lambda directory: None  # the "build" is the copy below

    def before_step(i: int) -> None:
        if i != halfway or mode not in ("cold", "cold-copy"):
            return
        if mode == "cold-copy":
            target = build.kernel_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copy2(library, staged)
            os.replace(staged, target)  # atomic, as the builder publishes it
        build.load_kernel(build=True, wait=True, timeout=900)

    model, opt, ran_kernel = train(before_step=before_step)
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "optimizer": opt.state_dict(),
            "ran_kernel": ran_kernel,
            "kernel_path": str(build.kernel_path()),
        },
        out,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
