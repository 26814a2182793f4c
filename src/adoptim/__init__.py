"""adoptim: the ADOPT optimizer for PyTorch (Taniguchi et al., NeurIPS 2024)."""

from adoptim.optimizer import ADOPT, ADOPTW, PowerClip, adopt
from adoptim.release import GradientRelease, enable_gradient_release

__all__ = ["ADOPT", "ADOPTW", "GradientRelease", "PowerClip", "adopt", "enable_gradient_release"]
# The single source of the version: pyproject.toml reads this line (without importing the
# package), so the wheel's metadata, `adoptim --version` and this attribute always agree.
__version__ = "0.2.0"
