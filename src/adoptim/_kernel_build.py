"""Builder process for the fused kernel: ``python -m adoptim._kernel_build DIRECTORY``.

Started detached by :mod:`adoptim._kernel_cache`; a module of its own so that running it does not
re-execute a module the package has already imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adoptim._kernel_cache import _build_main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m adoptim._kernel_build DIRECTORY", file=sys.stderr)
        sys.exit(2)
    sys.exit(_build_main(Path(sys.argv[1])))
