"""adoptim: the ADOPT optimizer for PyTorch (Taniguchi et al., NeurIPS 2024)."""

from adoptim.optimizer import ADOPT, ADOPTW, PowerClip, adopt

__all__ = ["ADOPT", "ADOPTW", "PowerClip", "adopt"]
# The single source of the version: pyproject.toml reads this line (without importing the
# package), so the wheel's metadata, `adoptim --version` and this attribute always agree.
__version__ = "0.2.0"
