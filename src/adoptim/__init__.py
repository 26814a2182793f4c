"""adoptim: the ADOPT optimizer for PyTorch (Taniguchi et al., NeurIPS 2024)."""

from adoptim.optimizer import ADOPT, ADOPTW, PowerClip, adopt

__all__ = ["ADOPT", "ADOPTW", "PowerClip", "adopt"]
__version__ = "0.1.0"
