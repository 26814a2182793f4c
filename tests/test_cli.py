"""The ``adoptim`` command line as a user meets it: ``--version``, help text without reST
markup, and the one rule for a missing extra (name it, exit 1, run nothing)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adoptim
from adoptim.experiments import reproduce
from adoptim.tools.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
EXTRA_HINT = "pip install 'adoptim[experiments]'"


def test_version_prints_adoptim_and_torch(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"adoptim {adoptim.__version__} (torch {torch.__version__})\n"


def test_the_version_has_one_source():
    """pyproject.toml reads adoptim.__version__ (no second copy to forget), and the changelog's
    newest release is that version."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    if not (ROOT / "CHANGELOG.md").exists():  # an installed copy of the tests
        pytest.skip("not a source checkout")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "adoptim.__version__" }' in pyproject
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert released and released[0] == adoptim.__version__


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_shows_no_rest_markup(command, capsys):
    with pytest.raises(SystemExit):
        main(["--help"] if command is None else [command, "--help"])
    text = capsys.readouterr().out
    assert "usage: adoptim" in text
    for markup in ("``", ":func:", ":class:", ":data:", ":mod:"):
        assert markup not in text, (command, markup)


def _refusal(err: str) -> None:
    assert EXTRA_HINT in err
    assert "Traceback" not in err


def test_reproduce_refuses_up_front_when_part_of_the_extra_is_missing(tmp_path, monkeypatch,
                                                                       capsys):
    """One rule for every experiment and for all of them: without the part of the experiments
    extra an experiment needs, nothing runs, the message names the extra, the status is 1.
    (Before: rl_sac wrote a 'Skipped' report and exited 0, the MLP exited 1 naming mlxtend.)"""
    monkeypatch.setattr(reproduce, "missing",
                        lambda modules: [m for m in modules if m in ("gymnasium", "mujoco")])
    assert main(["reproduce", "rl_sac", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    _refusal(err)
    assert "rl_sac needs gymnasium, mujoco" in err
    assert not (tmp_path / "quick" / "rl_sac").exists()

    monkeypatch.setattr(reproduce, "missing",
                        lambda modules: [m for m in modules if m == "mlxtend"])
    monkeypatch.delenv("ADOPTIM_MNIST5K", raising=False)
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    _refusal(err)
    assert "mlp needs mlxtend" in err and "toy" not in err.split("Install it")[0]
    # what can run is named, so that a user can go on without the extra
    assert "adoptim reproduce --quick toy gpt rl_sac" in err
    assert not (tmp_path / "quick").exists()  # nothing ran


def test_core_and_tools_work_without_the_experiments_extra(tmp_path):
    """With numpy, tqdm, matplotlib, mlxtend, gymnasium and mujoco unimportable (as after
    `pip install adoptim`): the optimizer steps on every path, doctor and bench run (bench
    without its plot, saying which extra draws it), and toy/reproduce exit 1 naming the extra."""
    script = textwrap.dedent(f"""
        import sys
        for m in ("numpy", "tqdm", "matplotlib", "mlxtend", "gymnasium", "mujoco"):
            sys.modules[m] = None  # import fails; importlib.util.find_spec returns None
        import torch
        from adoptim import ADOPT
        for kw in ({{"foreach": False}}, {{"foreach": True}}, {{"fused": True}},
                   {{"state_dtype": "8bit", "foreach": False}},
                   {{"state_dtype": "8bit", "foreach": True}}):
            p = torch.nn.Parameter(torch.ones(5000))
            opt = ADOPT([p], lr=0.1, **kw)
            for _ in range(2):
                p.grad = torch.ones_like(p)
                opt.step()
            assert (p < 1).all(), kw
        from adoptim.tools.cli import main
        codes = [main(["doctor"]),
                 main(["bench", "--suites", "c", "--optimizers", "adam-foreach", "--repeats",
                       "1", "--rounds", "1", "--warmup", "0", "--scale", "0.001",
                       "--out", {str(tmp_path / "bench")!r}]),
                 main(["toy"]), main(["reproduce", "toy", "--out", {str(tmp_path)!r}])]
        print("codes", codes)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "codes [0, 0, 1, 1]" in proc.stdout
    assert "no plot: matplotlib is not installed" in proc.stdout and EXTRA_HINT in proc.stdout
    assert not (tmp_path / "bench" / "bench.png").exists()
    for command in ("toy", "reproduce"):
        assert (f"adoptim {command}: adoptim.experiments needs numpy, tqdm, matplotlib "
                f"(the 'experiments' extra): {EXTRA_HINT}") in proc.stderr
    assert proc.stderr.count(EXTRA_HINT) == 2 and "Traceback" not in proc.stderr


def test_every_experiment_declares_the_extra_modules_it_uses():
    """reproduce's up-front check is only as good as Experiment.needs: an experiment whose
    module reads MNIST-5k must name mlxtend, one that builds MuJoCo envs gymnasium and mujoco
    (a new experiment that forgets would fail half-way through a profile instead)."""
    import importlib.util

    from adoptim.experiments import REGISTRY, get_experiment

    for name, module in REGISTRY.items():
        source = Path(importlib.util.find_spec(module).origin).read_text()
        needs = set(get_experiment(name).needs)
        if "mnist5k" in source:
            assert "mlxtend" in needs, name
        if "import gymnasium" in source:
            assert {"gymnasium", "mujoco"} <= needs, name
