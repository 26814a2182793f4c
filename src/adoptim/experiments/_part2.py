"""Small helpers shared by the part-2 experiments (resnet, vae, gpt, rl_sac).

* :func:`parse_args`: a typed command line from an ``Args`` dataclass, with each field's
  docstring (the string literal under it, CleanRL/tyro style) as its ``--help`` text.
* :func:`main_single_run`: ``python -m adoptim.experiments.<name> --flags``: parse one config
  from the command line, run it through the shared runner and print its result.
* :func:`curve_band`: mean and min/max of several runs' curves on a common x grid (plots).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["curve_band", "field_docs", "main_single_run", "parse_args"]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (``name: type = default`` followed
    by a string literal), read from the source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per field of ``cls``, typed by its default."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"default": default, "help": f"{docs.get(f.name, '')} (default: {default})"}
        if isinstance(default, bool):
            kw.update(type=_bool, metavar="BOOL")
        elif isinstance(default, (tuple, list)):
            kw.update(type=type(default[0]) if default else str, nargs="+")
        elif default is None:
            kw.update(type=str)
        else:
            kw.update(type=type(default))
        parser.add_argument(flag, dest=f.name, **kw)


def parse_args(cls: type, argv: Sequence[str] | None = None, description: str = "",
               extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse ``argv`` into an instance of dataclass ``cls`` (and the extra options' namespace).

    Returns ``(args, namespace)``: the dataclass, and the full argparse namespace (for options
    added by ``extra``)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(parser, cls)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    for f in dataclasses.fields(cls):  # nargs="+" gives lists; keep tuples where declared
        if isinstance(f.default, tuple):
            values[f.name] = tuple(values[f.name])
    return cls(**values), ns


def main_single_run(cls: type, train: Callable, name: str, keys: Sequence[str],
                    description: str, argv: Sequence[str] | None = None) -> int:
    """Parse an ``Args`` dataclass ``cls`` from ``argv`` (plus ``--out``), run that one config
    with the shared runner (a resumable folder under ``--out``) and print its result."""
    import dataclasses

    from adoptim.experiments.runner import RESULT_FILE, run_sweep

    def out_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", default=f"results/{name}", help="results folder")

    args, ns = parse_args(cls, argv, description=description, extra=out_option)
    print(dataclasses.asdict(args), flush=True)
    (run_dir,) = run_sweep([args], ns.out, train, name=name, keys=keys)
    result = json.loads((run_dir / RESULT_FILE).read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1, default=str))
    print(f"run folder: {run_dir}")
    return 0


def curve_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], n: int = 200):
    """Several (x, y) curves on a common grid: their own x when they all share it (runs
    evaluated at the same steps: every point is a measurement), otherwise ``n`` points over
    their shared x range, interpolated.

    Returns ``(grid, mean, lo, hi)`` (lo/hi are the min/max over curves), or None if no curve
    has two points."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x) >= 2]
    if not curves:
        return None
    x0 = curves[0][0]
    if all(len(x) == len(x0) and np.array_equal(x, x0) for x, _ in curves):
        ys = np.stack([y for _, y in curves])
        return x0, ys.mean(0), ys.min(0), ys.max(0)
    lo_x = max(x[0] for x, _ in curves)
    hi_x = min(x[-1] for x, _ in curves)
    if hi_x <= lo_x:
        hi_x = max(x[-1] for x, _ in curves)
    grid = np.linspace(lo_x, hi_x, n)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)
