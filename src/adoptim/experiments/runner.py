"""The small shared runner under every experiment in :mod:`adoptim.experiments`.

What it gives an experiment module (and nothing more):

* **Config handling**: configs are ``@dataclass`` objects; :func:`config_dict` turns one into a
  JSON-able dict and :func:`run_id` into a stable folder name.
* **Seeding** (:func:`seed_everything`) and a **deterministic data order**
  (:func:`batch_indices`: the permutation for (seed, epoch) is always the same).
* **Metrics per run**: :class:`RunContext.log` appends a row to ``metrics.jsonl`` and
  ``metrics.csv`` in the run's folder; :meth:`RunContext.finish` writes ``result.json``.
* **Resume**: :func:`run_sweep` skips a run whose ``result.json`` exists (the run finished),
  says how many it reused, and restarts from scratch a run that was cut off (its folder is
  cleared first).
* **Progress**: on a terminal, one tqdm bar per sweep and one per run (:meth:`RunContext.bar`);
  when stderr is not a terminal (a log file, CI), no bars but one line per finished run.
* **Reports**: :func:`load_results`, :func:`summarize` (mean, spread), :func:`fmt_mean_std` /
  :func:`fmt_range` (which say "1 seed" rather than a spread of one value), :func:`tail_label`,
  :func:`markdown_table`, :func:`new_figure`/:func:`save_figure` (matplotlib, Agg backend) and
  :class:`Report`, which collects markdown and PNGs into ``report.md``.

How an experiment plugs in (one file, e.g. ``adoptim/experiments/myexp.py``)::

    from dataclasses import dataclass, replace
    from adoptim.experiments.runner import Experiment, Report, run_sweep, load_results

    @dataclass
    class Config:
        optimizer: str = "adopt"   # name for adoptim.experiments.optimizers.make_optimizer
        seed: int = 0              # one run per seed
        steps: int = 100           # training steps

    def train(cfg: Config, ctx) -> dict:          # one run: an explicit loop
        torch.manual_seed(cfg.seed) ...
        for step in ctx.bar(range(cfg.steps)):
            ...
            ctx.log(step=step, **{"train/loss": loss})
        return {"final_loss": loss}               # written to result.json

    def run(sweep: list[Config], out: Path, progress: bool = True) -> None:
        run_sweep(sweep, out, train, name="myexp", progress=progress)

    def report(sweep: list[Config], out: Path) -> Path:
        results = load_results(out, sweep)        # this sweep's finished runs
        rep = Report(out, "My experiment")
        rep.table(["optimizer", "loss"], rows)    # rows built with summarize()
        rep.figure(fig, "curves.png", "caption")
        return rep.write()                        # out/report.md

    EXPERIMENT = Experiment(
        name="myexp", description="one line",
        quick=lambda: [Config(seed=s, steps=50) for s in range(2)],
        full=lambda: [Config(seed=s) for s in range(5)],
        run=run, report=report)

and one line in ``adoptim.experiments.REGISTRY`` (``"myexp": "adoptim.experiments.myexp"``)
makes ``adoptim reproduce myexp`` (and ``adoptim reproduce --quick``) run it. A "sweep" is any
list of config dataclasses; ``run`` may also ignore :func:`run_sweep` and do its own thing (the
toy experiment runs all seeds in one tensor), as long as ``report`` writes ``report.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Experiment",
    "Report",
    "RunContext",
    "add_config_arguments",
    "batch_indices",
    "config_dict",
    "config_from_args",
    "curve_label",
    "fmt",
    "fmt_mean_std",
    "fmt_range",
    "load_metrics",
    "load_results",
    "markdown_table",
    "new_figure",
    "plural",
    "progress_bars",
    "run_id",
    "run_sweep",
    "save_figure",
    "seed_everything",
    "smoke_test",
    "set_threads",
    "summarize",
    "tail_label",
]

RESULT_FILE = "result.json"  # its presence means "this run finished"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- registry entry
@dataclasses.dataclass(frozen=True)
class Experiment:
    """What ``adoptim reproduce`` needs to know about one experiment.

    ``quick()``/``full()`` return the sweep (a config or a list of configs) for each profile;
    ``run(sweep, out_dir, progress)`` runs it (resuming), ``report(sweep, out_dir)`` writes
    ``out_dir/report.md`` and returns its path.
    """

    name: str
    description: str
    quick: Callable[[], Any]
    full: Callable[[], Any]
    run: Callable[..., None]
    report: Callable[[Any, Path], Path]


# ----------------------------------------------------------------------------- configs, seeds
def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    return json.loads(json.dumps(cfg, default=str))


def run_id(cfg: Any, keys: Sequence[str] | None = None) -> str:
    """A stable, readable folder name for a run: ``key=value`` pairs for ``keys`` (default:
    every field) joined by ``_``, plus a short hash of the whole config so that two configs
    differing in a field not named still get different folders."""
    d = config_dict(cfg)
    keys = list(d) if keys is None else list(keys)
    parts = []
    for k in keys:
        v = d[k]
        v = "-".join(map(str, v)) if isinstance(v, list) else str(v)
        parts.append(f"{k}={v}")
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
    name = "_".join(parts).replace("/", "-").replace(" ", "")
    return f"{name}_{digest}" if len(name) < 150 else f"run_{digest}"


def add_config_arguments(parser, cls: type) -> None:
    """One ``--field-name`` option per field of the dataclass ``cls`` (default: its default)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda x: x.lower() in ("1", "true", "yes"),
                                default=default, help=f"(default {default})")
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, type=kind, nargs="+", default=default,
                                help=f"(default {' '.join(map(str, default))})")
        else:
            kind = type(default) if default is not None else _none_or_number
            parser.add_argument(flag, type=kind, default=default, help=f"(default {default})")


def _none_or_number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text.lower() == "none" else text


def config_from_args(cls: type, args) -> Any:
    """The dataclass ``cls`` filled from parsed :func:`add_config_arguments` options."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh ``torch.Generator`` seeded with ``seed``
    (use it for anything whose order must not depend on other random calls)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False):
    """The minibatches (index tensors) of one epoch, always the same for (seed, epoch), and
    independent of any other random number drawn during training."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if drop_last else n
    return [perm[i : i + batch_size] for i in range(0, stop, batch_size)]


def progress_bars(progress: bool = True) -> bool:
    """Whether to draw tqdm bars: only when asked for and stderr is a terminal. In a log file
    (or a CI job) the carriage returns of nested bars garble the output; there the runner
    prints one line per finished run instead."""
    return bool(progress) and sys.stderr.isatty()


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: ``ADOPTIM_THREADS`` or 1; the experiments here
    are small, and the machine is shared) and return the number used."""
    n = n or int(os.environ.get("ADOPTIM_THREADS", "1"))
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- one run
class RunContext:
    """Handed to an experiment's per-run function: where to write, how to log, a progress bar.

    ``log(**metrics)`` appends one row to ``metrics.jsonl`` (always) and ``metrics.csv`` (the
    CSV's columns are fixed by the first row; later keys not in it go only to the JSONL).
    """

    def __init__(self, run_dir: Path, config: Any, progress: bool = True, position: int = 1):
        self.dir = Path(run_dir)
        self.config = config
        self.progress = progress
        self.bars = progress_bars(progress)  # only on a terminal
        self.position = position
        self._jsonl = open(self.dir / "metrics.jsonl", "w")  # noqa: SIM115 (closed in finish/close)
        self._csv_file = open(self.dir / "metrics.csv", "w", newline="")  # noqa: SIM115
        self._csv: csv.DictWriter | None = None
        self.step_losses: list[float] = []
        self.start = time.time()

    def log(self, **metrics: Any) -> None:
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._csv is None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(row), extrasaction="ignore")
            self._csv.writeheader()
        self._csv.writerow(row)
        self._csv_file.flush()

    def step_loss(self, loss: float) -> None:
        """Record one optimizer step's training loss in memory (``self.step_losses``, not
        written to disk), for experiments that look at early training (``transfer``)."""
        self.step_losses.append(float(loss))

    def bar(self, iterable: Iterable | None = None, total: int | None = None, desc: str = ""):
        """A tqdm bar for this run (below the sweep's bar; disappears when done). Disabled
        (it only passes ``iterable`` through) unless progress was asked for and stderr is a
        terminal."""
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc or self.dir.name[:40],
            position=self.position,
            leave=False,
            disable=not self.bars,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bars (``tqdm.write`` while they show)."""
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(message)
        else:
            print(message, flush=True)

    def finish(self, result: dict[str, Any]) -> None:
        """Close the metric files and write ``result.json`` atomically (marks the run done)."""
        self._jsonl.close()
        self._csv_file.close()
        result = {"config": config_dict(self.config), "seconds": time.time() - self.start,
                  **result}
        tmp = self.dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        os.replace(tmp, self.dir / RESULT_FILE)

    def close(self) -> None:
        for f in (self._jsonl, self._csv_file):
            if not f.closed:
                f.close()


def run_sweep(
    configs: Sequence[Any],
    out_dir: str | Path,
    run_fn: Callable[[Any, RunContext], dict[str, Any] | None],
    name: str = "sweep",
    keys: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run ``run_fn(cfg, ctx)`` for every config, each in ``out_dir/runs/<run_id>/``.

    A run whose ``result.json`` exists is skipped (resume), and the number skipped is printed
    ("reused N finished runs"); a run folder without it (cut off mid-run) is cleared and the
    run restarts. ``run_fn`` returns the run's summary dict (goes into ``result.json`` with the
    config and wall time). Progress: bars on a terminal, otherwise (with ``progress``) one line
    per finished run. Returns the run folders, in order.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    dirs = [out_dir / "runs" / run_id(c, keys) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two configs in the sweep map to the same run folder")
    todo = [(c, d) for c, d in zip(configs, dirs) if not (d / RESULT_FILE).exists()]
    reused = len(configs) - len(todo)
    if reused:  # say so: a second invocation that only rereads results should not look new
        left = f", {len(todo)} to run" if todo else ""
        print(f"[{name}] reused {plural(reused, 'finished run')}{left} "
              f"(delete {out_dir} to rerun)", flush=True)
    bars = progress_bars(progress)
    with tqdm(total=len(configs), initial=reused, desc=name, position=0,
              disable=not bars, dynamic_ncols=True) as bar:
        for i, (cfg, d) in enumerate(todo, start=reused + 1):
            if d.exists():
                shutil.rmtree(d)  # a partial run: start it again
            d.mkdir(parents=True)
            (d / CONFIG_FILE).write_text(json.dumps(config_dict(cfg), indent=1))
            ctx = RunContext(d, cfg, progress=progress)
            t0 = time.time()
            try:
                result = run_fn(cfg, ctx) or {}
                ctx.finish(result)
            finally:
                ctx.close()
            bar.update(1)
            if progress and not bars:  # a log, not a terminal: one line per finished run
                print(f"[{name}] run {i}/{len(configs)} done in {time.time() - t0:.1f} s: "
                      f"{d.name}", flush=True)
    return dirs


# ----------------------------------------------------------------------------- reading back
def load_results(out_dir: str | Path, sweep: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Every finished run under ``out_dir/runs``: its ``result.json`` (which holds ``config``)
    plus ``dir``, sorted by folder name. With ``sweep``, only runs whose config is one of the
    sweep's (a folder may also hold runs of another profile or an older sweep)."""
    wanted = None
    if sweep is not None:
        sweep = sweep if isinstance(sweep, (list, tuple)) else [sweep]
        wanted = {json.dumps(config_dict(c), sort_keys=True) for c in sweep}
    out = []
    for f in sorted(Path(out_dir).glob(f"runs/*/{RESULT_FILE}")):
        r = json.loads(f.read_text())
        if wanted is not None and json.dumps(r["config"], sort_keys=True) not in wanted:
            continue
        r["dir"] = str(f.parent)
        out.append(r)
    return out


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(values: Iterable[float]) -> dict[str, float]:
    """mean, std (sample, 0 for one value), median, q25, q75, min, max and n of ``values``."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return {k: math.nan for k in ("mean", "std", "median", "q25", "q75", "min", "max")} | {
            "n": 0}
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "median": float(med), "q25": float(q25), "q75": float(q75),
        "min": float(a.min()), "max": float(a.max()), "n": int(a.size),
    }


def fmt(x: float, digits: int = 3) -> str:
    """A number for a markdown table."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(x)
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"


def plural(n: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt_mean_std(s: dict[str, float], digits: int = 2, unit: str = "seed") -> str:
    """``"mean ± std"`` of a :func:`summarize` dict; with one value ``"mean (1 seed)"``, since
    the spread of a single run is unknown, not zero."""
    if s["n"] == 0:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 {unit})"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def curve_label(name: str, n: int, unit: str = "seed") -> str:
    """A legend entry for a curve averaged over ``n`` runs: ``"adam (mean of 3 seeds)"``, or
    ``"adam (1 seed)"``."""
    return f"{name} (1 {unit})" if n == 1 else f"{name} (mean of {plural(n, unit)})"


def fmt_range(s: dict[str, float], digits: int = 2, unit: str = "seed") -> str:
    """``"[min, max]"`` of a :func:`summarize` dict, or ``"1 seed"`` when there is one value."""
    if s["n"] == 0:
        return "n/a"
    if s["n"] == 1:
        return f"1 {unit}"
    return f"[{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def tail_label(what: str, steps: int, window: int = 50) -> str:
    """A column header for the mean of the last ``window`` steps of a ``steps``-step run:
    ``"train loss, last 50 steps"``, or ``"train loss, mean of all 30 steps"`` when the run is
    no longer than the window."""
    if steps <= window:
        return f"{what}, mean of all {steps:,} steps"
    return f"{what}, last {window:,} steps"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells are str()-ed; floats via :func:`fmt`)."""
    def cell(v: Any) -> str:
        return fmt(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.6, **kw):
    """``plt.subplots`` on the Agg backend (no display needed), sized per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                        **kw)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG and close it (laid out tightly, unless it has its own layout
    engine, e.g. ``new_figure(..., layout="constrained")``)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# Set by `adoptim reproduce --quick` while the reports are written (see smoke_test).
_SMOKE_TEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("smoke_test",
                                                                        default=None)
SMOKE_TEST_LINE = (
    "> **Smoke test ({profile} profile): these numbers say nothing about the optimizers' "
    "quality.** Tiny models, a few steps and seeds, to check that the experiment runs end to "
    "end and writes its report; the results are the full profile's (`adoptim reproduce "
    "--full`, published in docs/results).")


@contextlib.contextmanager
def smoke_test(profile: str = "quick"):
    """While active, every :class:`Report` created starts with :data:`SMOKE_TEST_LINE` as its
    first line: ``adoptim reproduce --quick`` writes its reports inside it, so that no quick
    report can be read as a result, whichever experiment wrote it."""
    token = _SMOKE_TEST.set(profile)
    try:
        yield
    finally:
        _SMOKE_TEST.reset(token)


def in_smoke_test() -> bool:
    """Whether the report being written is a smoke test's (see :func:`smoke_test`)."""
    return _SMOKE_TEST.get() is not None


class Report:
    """Collects markdown (text, tables, figures) and writes ``out_dir/report.md``. Inside
    :func:`smoke_test` its first line says that it is a smoke test, before the title."""

    def __init__(self, out_dir: str | Path, title: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = [f"# {title}\n"]
        profile = _SMOKE_TEST.get()
        if profile is not None:
            self.parts.insert(0, SMOKE_TEST_LINE.format(profile=profile) + "\n")

    def text(self, md: str) -> None:
        self.parts.append(md.strip() + "\n")

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = ""):
        if caption:
            self.parts.append(caption.strip() + "\n")
        self.parts.append(markdown_table(headers, rows) + "\n")

    def figure(self, fig, filename: str, caption: str = "") -> Path:
        """Save ``fig`` next to the report and link it."""
        path = save_figure(fig, self.out_dir / filename)
        self.parts.append(f"![{caption or filename}]({filename})\n")
        if caption:
            self.parts.append(f"*{caption}*\n")
        return path

    def write(self, filename: str = "report.md") -> Path:
        path = self.out_dir / filename
        footer = (f"\n---\nGenerated by `adoptim` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                  f", torch {torch.__version__}, python {sys.version.split()[0]}.\n")
        path.write_text("\n".join(self.parts) + footer)
        return path
