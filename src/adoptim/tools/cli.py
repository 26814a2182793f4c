"""The ``adoptim`` command line: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``;
it is imported only when its subcommand runs, so ``adoptim --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from adoptim._extras import MissingExtraError

__all__ = ["main"]

# what `adoptim --help` says at the top (the module docstring above is reST, for the API docs;
# a terminal would show its backticks)
DESCRIPTION = "adoptim: the ADOPT optimizer for PyTorch. One subcommand per task:"

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("adoptim.experiments.toy", "the paper's convex counterexample: Adam vs ADOPT"),
    "reproduce": ("adoptim.experiments.reproduce", "run the experiments, write reports"),
    "bench": ("adoptim.tools.bench", "step time of every ADOPT path vs torch Adam and other ADOPTs"),
    "doctor": ("adoptim.tools.doctor", "why a fast path is or is not used here; --compile builds them"),
}


def version_line() -> str:
    """``adoptim 0.2.0 (torch 2.13.0+cpu)``: the torch version too, since it decides which
    paths exist (the C++ kernel is built against it)."""
    import adoptim  # the package, for __version__ (imports torch, as any subcommand does)

    torch = sys.modules["torch"]
    return f"adoptim {adoptim.__version__} (torch {torch.__version__})"


class _VersionAction(argparse.Action):
    """``--version``, with the line computed only when asked (``--help`` imports no torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print adoptim's and torch's versions and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adoptim", description=DESCRIPTION)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        _build_parser().parse_args(argv)  # prints usage, help or the version, and exits
    command, module_name = argv[0], SUBCOMMANDS[argv[0]][0]
    try:
        module = importlib.import_module(module_name)
        sub_parser = argparse.ArgumentParser(
            prog=f"adoptim {command}", description=SUBCOMMANDS[command][1]
        )
        module.add_arguments(sub_parser)
        return int(module.run(sub_parser.parse_args(argv[1:])) or 0)
    except MissingExtraError as exc:
        # one line naming the extra to install, not a traceback
        print(f"adoptim {command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
