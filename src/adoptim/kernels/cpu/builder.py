"""Builder process for the fused kernel: ``python -m adoptim.kernels.cpu.builder DIRECTORY``.

Started detached by :mod:`adoptim.kernels.cpu.build`; a module of its own so that running it does not
re-execute a module the package has already imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adoptim.kernels.cpu.build import _build_main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m adoptim.kernels.cpu.builder DIRECTORY", file=sys.stderr)
        sys.exit(2)
    sys.exit(_build_main(Path(sys.argv[1])))
