"""Experiments that reproduce the ADOPT paper's results, one readable module each.

``REGISTRY`` maps an experiment name to the module that defines it; each module exposes
``EXPERIMENT`` (an :class:`adoptim.experiments.runner.Experiment`). Modules are imported only
when used, so adding an experiment is one line here (see ``runner``'s docstring for the rest).
"""

from __future__ import annotations

import importlib

from adoptim._extras import EXPERIMENTS_BASE, require

# Before anything imports numpy: without the extra, `import adoptim.experiments.<anything>`
# (and `adoptim reproduce`/`adoptim toy`) fails with one message naming the extra.
require("adoptim.experiments", EXPERIMENTS_BASE)

from adoptim.experiments.runner import Experiment  # noqa: E402

__all__ = ["REGISTRY", "Experiment", "get_experiment"]

# name -> module defining EXPERIMENT (run order of `adoptim reproduce`)
REGISTRY: dict[str, str] = {
    "toy": "adoptim.experiments.toy",
    "mlp": "adoptim.experiments.mlp",
    "lr_sweep": "adoptim.experiments.lr_sweep",
    "resnet": "adoptim.experiments.resnet",
    "vae": "adoptim.experiments.vae",
    "gpt": "adoptim.experiments.gpt",
    "rl_sac": "adoptim.experiments.rl_sac",
    "options": "adoptim.experiments.options",
    "transfer": "adoptim.experiments.transfer",
    "lowbit": "adoptim.experiments.lowbit",
    "lean": "adoptim.experiments.lean",
}


def get_experiment(name: str) -> Experiment:
    """The registered experiment called ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).EXPERIMENT
