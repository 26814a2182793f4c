"""adoptim: the ADOPT optimizer for PyTorch (Taniguchi et al., NeurIPS 2024)."""

from adoptim.optimizer import ADOPT, ADOPTW, PowerClip, adopt
from adoptim.release import GradientRelease, enable_gradient_release

__all__ = ["ADOPT", "ADOPTW", "GradientRelease", "PowerClip", "adopt", "enable_gradient_release"]
__version__ = "0.1.0"
