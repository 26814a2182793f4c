"""The ``adoptim`` command line: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int | None``;
it is imported only when its subcommand runs, so ``adoptim --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("adoptim.experiments.toy", "the paper's convex counterexample: Adam vs ADOPT"),
    "reproduce": ("adoptim.experiments.reproduce", "run the experiments, write reports"),
    "bench": ("adoptim.tools.bench", "step time of every ADOPT path vs torch Adam and other ADOPTs"),
    "doctor": ("adoptim.tools.doctor", "why a fast path is or is not used here; --compile builds them"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adoptim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        _build_parser().parse_args(argv)  # prints usage, or help for -h, and exits
    command, module_name = argv[0], SUBCOMMANDS[argv[0]][0]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(
        prog=f"adoptim {command}", description=SUBCOMMANDS[command][1]
    )
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
