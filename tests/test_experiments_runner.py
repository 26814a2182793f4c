"""The shared experiment runner: seeds, data order, metrics, resume, reports, reproduce."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

import pytest
import torch

from adoptim.experiments import REGISTRY, get_experiment
from adoptim.experiments import reproduce as reproduce_mod
from adoptim.experiments.optimizers import OPTIMIZERS, make_optimizer
from adoptim.experiments.runner import (
    Experiment,
    Report,
    batch_indices,
    load_metrics,
    load_results,
    markdown_table,
    new_figure,
    run_id,
    run_sweep,
    seed_everything,
    summarize,
)


@dataclass
class Cfg:
    seed: int = 0
    steps: int = 3
    lr: float = 0.1


def _train(cfg: Cfg, ctx) -> dict:
    torch.manual_seed(cfg.seed)
    x = 0.0
    for step in ctx.bar(range(cfg.steps)):
        x += torch.randn(()).item() * cfg.lr
        ctx.log(step=step, x=x)
    return {"final_x": x}


def test_sweep_writes_metrics_and_results(tmp_path):
    dirs = run_sweep([Cfg(seed=0), Cfg(seed=1)], tmp_path, _train, progress=False)
    assert len(dirs) == 2 and len(set(dirs)) == 2
    for d in dirs:
        assert (d / "result.json").exists() and (d / "config.json").exists()
        rows = load_metrics(d)
        assert [r["step"] for r in rows] == [0, 1, 2]
        csv_lines = (d / "metrics.csv").read_text().splitlines()
        assert csv_lines[0] == "step,x" and len(csv_lines) == 4
    results = load_results(tmp_path)
    assert sorted(r["config"]["seed"] for r in results) == [0, 1]
    assert all(r["final_x"] == load_metrics(r["dir"])[-1]["x"] for r in results)


def test_same_seed_same_result_different_seed_different(tmp_path):
    run_sweep([Cfg(seed=3)], tmp_path / "a", _train, progress=False)
    run_sweep([Cfg(seed=3)], tmp_path / "b", _train, progress=False)
    run_sweep([Cfg(seed=4)], tmp_path / "c", _train, progress=False)
    a, b, c = (load_results(tmp_path / n)[0]["final_x"] for n in "abc")
    assert a == b and a != c


def test_resume_skips_finished_and_restarts_partial(tmp_path):
    calls = []

    def counting(cfg, ctx):
        calls.append(cfg.seed)
        return _train(cfg, ctx)

    sweep = [Cfg(seed=s) for s in range(3)]
    dirs = run_sweep(sweep, tmp_path, counting, progress=False)
    assert calls == [0, 1, 2]
    # simulate a run cut off mid-way: result.json missing, a stale metrics file left behind
    (dirs[1] / "result.json").unlink()
    (dirs[1] / "metrics.jsonl").write_text('{"step": 99, "x": 1.0}\n')
    calls.clear()
    run_sweep(sweep, tmp_path, counting, progress=False)
    assert calls == [1]  # only the unfinished run ran again
    assert [r["step"] for r in load_metrics(dirs[1])] == [0, 1, 2]  # stale rows gone
    calls.clear()
    run_sweep(sweep + [Cfg(seed=7)], tmp_path, counting, progress=False)
    assert calls == [7]


def test_failed_run_is_not_marked_done(tmp_path):
    def boom(cfg, ctx):
        ctx.log(step=0)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_sweep([Cfg()], tmp_path, boom, progress=False)
    assert load_results(tmp_path) == []


def test_run_id_stable_and_distinct():
    assert run_id(Cfg(seed=1)) == run_id(Cfg(seed=1))
    assert run_id(Cfg(seed=1), ["seed"]) != run_id(Cfg(seed=1, lr=0.2), ["seed"])
    assert run_id(Cfg(seed=1), ["seed"]).startswith("seed=1_")
    with pytest.raises(ValueError):
        run_sweep([Cfg(), Cfg()], "/tmp/unused-adoptim", _train, progress=False)


def test_seeding_and_data_order():
    seed_everything(5)
    a = torch.randn(4)
    seed_everything(5)
    assert torch.equal(a, torch.randn(4))
    e1 = batch_indices(10, 4, seed=0, epoch=1)
    assert [len(b) for b in e1] == [4, 4, 2]
    assert sorted(torch.cat(e1).tolist()) == list(range(10))
    torch.randn(100)  # other random draws must not change the data order
    assert all(torch.equal(x, y) for x, y in zip(e1, batch_indices(10, 4, seed=0, epoch=1)))
    assert not torch.equal(torch.cat(e1), torch.cat(batch_indices(10, 4, seed=0, epoch=2)))
    assert not torch.equal(torch.cat(e1), torch.cat(batch_indices(10, 4, seed=1, epoch=1)))
    assert [len(b) for b in batch_indices(10, 4, 0, 1, drop_last=True)] == [4, 4]


def test_summarize_and_table():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["median"] == 2.5
    assert s["std"] == pytest.approx(1.2909944, rel=1e-6)
    assert summarize([7.0])["std"] == 0.0
    t = markdown_table(["a", "b"], [[1, 0.5], ["x", 2.0]]).splitlines()
    assert t[0] == "| a | b |" and t[2] == "| 1 | 0.500 |" and len(t) == 4


def test_report_writes_markdown_and_png(tmp_path):
    rep = Report(tmp_path, "Title")
    rep.text("Some text.")
    rep.table(["opt", "acc"], [["adam", 0.9], ["adopt", 0.91]], "caption")
    fig, axes = new_figure()
    axes[0][0].plot([0, 1], [0, 1])
    rep.figure(fig, "plot.png", "a plot")
    path = rep.write()
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert text.startswith("# Title") and "| adam | 0.900 |" in text and "| adopt |" in text
    assert "![a plot](plot.png)" in text
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimizer_by_name():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name in OPTIMIZERS:
        if name == "adamw8bit-torchao" and importlib.util.find_spec("torchao") is None:
            with pytest.raises(ImportError, match=r"adoptim\[bench\]"):  # says what to install
                make_optimizer(name, p, lr=1e-3)
            continue
        opt = make_optimizer(name, p, lr=1e-3, betas=(0.9, 0.99))
        assert isinstance(opt, torch.optim.Optimizer)
    assert make_optimizer("amsgrad", p, lr=1e-3).defaults["amsgrad"] is True
    assert make_optimizer("adopt-noclip", p, lr=1e-3).defaults["clip_exp"] is None
    assert make_optimizer("ADOPT", p, lr=1e-3).defaults["clip_exp"] == 0.25
    with pytest.raises(KeyError, match="unknown optimizer"):
        make_optimizer("nope", p, lr=1.0)


def test_registry_entries_are_experiments():
    for name in ("toy", "mlp", "lr_sweep"):
        assert name in REGISTRY
        exp = get_experiment(name)
        assert isinstance(exp, Experiment) and exp.name == name
        assert exp.quick() and exp.full()
    with pytest.raises(KeyError):
        get_experiment("nope")


def test_reproduce_runs_a_registered_experiment(tmp_path, monkeypatch, capsys):
    seen = {}

    def run(sweep, out, progress=True):
        seen["profile"] = sweep
        run_sweep(sweep, out, _train, progress=progress)

    def report(sweep, out):
        rep = Report(out, "fake")
        rep.table(["seed", "x"], [[r["config"]["seed"], r["final_x"]] for r in load_results(out)])
        return rep.write()

    fake = Experiment("fake", "a fake experiment", lambda: [Cfg(steps=1)], lambda: [Cfg(steps=2)], run,
                      report)
    monkeypatch.setitem(REGISTRY, "fake", "unused.module")
    monkeypatch.setattr(reproduce_mod, "get_experiment", lambda name: fake)
    from adoptim.tools.cli import main

    assert main(["reproduce", "fake", "--full", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert seen["profile"] == [Cfg(steps=2)]  # --full picked the full profile
    report_path = tmp_path / "full" / "fake" / "report.md"
    assert str(report_path) in out and report_path.exists()
    assert "| 0 |" in report_path.read_text()
    index = (tmp_path / "full" / "README.md").read_text()
    assert "[fake](fake/report.md)" in index
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    # --publish copies the report and every finished run's config and result
    pub = tmp_path / "published"
    assert main(["reproduce", "fake", "--full", "--out", str(tmp_path), "--report-only",
                 "--publish", str(pub)]) == 0
    assert (pub / "fake" / "report.md").read_text() == report_path.read_text()
    (run,) = json.loads((pub / "fake" / "runs.json").read_text())
    assert run["config"]["steps"] == 2 and "final_x" in run and "dir" not in run


def test_reproduce_skips_an_experiment_whose_data_is_missing(tmp_path, monkeypatch, capsys):
    from adoptim.experiments.data import DataUnavailableError

    def run_missing(sweep, out, progress=True):
        raise DataUnavailableError("no such dataset here: install it with apt")

    def run_ok(sweep, out, progress=True):
        run_sweep([Cfg(steps=2)], out, _train, progress=progress)

    def report(sweep, out):
        return Report(out, "ok").write()

    experiments = {
        "missing": Experiment("missing", "needs data", lambda: "q", lambda: "f", run_missing,
                              report),
        "ok": Experiment("ok", "needs nothing", lambda: "q", lambda: "f", run_ok, report),
    }
    for name in experiments:
        monkeypatch.setitem(REGISTRY, name, "unused.module")
    monkeypatch.setattr(reproduce_mod, "get_experiment", experiments.__getitem__)
    from adoptim.tools.cli import main

    assert main(["reproduce", "missing", "ok", "--out", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "[missing] SKIPPED, data missing: no such dataset here" in out
    assert (tmp_path / "quick" / "ok" / "report.md").exists()  # the others still ran
    assert not (tmp_path / "quick" / "missing" / "report.md").exists()
    index = (tmp_path / "quick" / "README.md").read_text()
    assert "- missing: skipped, data missing: no such dataset here" in index


def test_reproduce_help_lists_profiles(capsys):
    from adoptim.tools.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--full" in out and "--out" in out


def test_config_arguments_roundtrip():
    import argparse

    from adoptim.experiments.runner import add_config_arguments, config_from_args

    @dataclass
    class C:
        name: str = "a"
        lr: float = 0.1
        ks: tuple[int, ...] = (1, 2)
        beta2: float | None = None
        flag: bool = False

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, C)
    assert config_from_args(C, parser.parse_args([])) == C()
    got = config_from_args(C, parser.parse_args(
        ["--lr", "0.5", "--ks", "3", "4", "--beta2", "0.9", "--flag", "true", "--name", "b"]))
    assert got == C(name="b", lr=0.5, ks=(3, 4), beta2=0.9, flag=True)


def test_load_results_filters_by_sweep(tmp_path):
    run_sweep([Cfg(seed=0), Cfg(seed=1, steps=2)], tmp_path, _train, progress=False)
    assert len(load_results(tmp_path)) == 2
    only = load_results(tmp_path, [Cfg(seed=1, steps=2)])
    assert [r["config"]["seed"] for r in only] == [1]
    assert load_results(tmp_path, [Cfg(seed=1)]) == []  # same seed, other config


# ----------------------------------------------------------------------------- saying what happened
def test_a_second_sweep_says_it_reused_the_finished_runs(tmp_path, capsys):
    sweep = [Cfg(seed=0), Cfg(seed=1)]
    run_sweep(sweep, tmp_path, _train, name="exp", progress=False)
    assert "reused" not in capsys.readouterr().out  # nothing to reuse the first time
    run_sweep(sweep, tmp_path, _train, name="exp", progress=False)
    assert f"[exp] reused 2 finished runs (delete {tmp_path} to rerun)" in capsys.readouterr().out
    run_sweep([*sweep, Cfg(seed=2)], tmp_path, _train, name="exp", progress=False)
    assert "[exp] reused 2 finished runs, 1 to run" in capsys.readouterr().out
    run_sweep([Cfg(seed=2)], tmp_path, _train, name="exp", progress=False)
    assert "[exp] reused 1 finished run (" in capsys.readouterr().out


def test_reproduce_twice_says_the_second_reused_the_runs(tmp_path, monkeypatch, capsys):
    def run(sweep, out, progress=True):
        run_sweep(sweep, out, _train, name="fake", progress=progress)

    def report(sweep, out):
        return Report(out, "fake").write()

    fake = Experiment("fake", "a fake experiment", lambda: [Cfg(steps=1), Cfg(seed=1)],
                      lambda: [Cfg(steps=2)], run, report)
    monkeypatch.setitem(REGISTRY, "fake", "unused.module")
    monkeypatch.setattr(reproduce_mod, "get_experiment", lambda name: fake)
    from adoptim.tools.cli import main

    args = ["reproduce", "fake", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert "reused" not in capsys.readouterr().out
    assert main(args) == 0
    assert (f"[fake] reused 2 finished runs (delete {tmp_path / 'quick' / 'fake'} to rerun)"
            in capsys.readouterr().out)


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys):
    # under pytest's capture stderr is not a terminal, as in a log file or CI
    run_sweep([Cfg(seed=0, steps=50), Cfg(seed=1, steps=50)], tmp_path, _train, name="exp",
              progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err  # no bar redrawn in place
    lines = captured.out.splitlines()
    assert [line.split(" done")[0] for line in lines] == ["[exp] run 1/2", "[exp] run 2/2"]


def test_progress_bars_on_a_terminal(tmp_path, monkeypatch):
    from adoptim.experiments import runner

    monkeypatch.setattr(runner.sys.stderr, "isatty", lambda: True, raising=False)
    assert runner.progress_bars(True) and not runner.progress_bars(False)
    monkeypatch.setattr(runner.sys.stderr, "isatty", lambda: False, raising=False)
    assert not runner.progress_bars(True)


def test_one_seed_shows_no_spread():
    from adoptim.experiments.runner import curve_label, fmt_mean_std, fmt_range, plural, tail_label

    one, two = summarize([36.0]), summarize([36.0, 38.0])
    assert fmt_mean_std(one) == "36.00 (1 seed)" and "±" not in fmt_mean_std(one)
    assert fmt_mean_std(two) == "37.00 ± 1.41"
    assert fmt_range(one) == "1 seed" and fmt_range(two, 1) == "[36.0, 38.0]"
    assert fmt_mean_std(summarize([]), 2) == "n/a"
    assert curve_label("adam", 1) == "adam (1 seed)"
    assert curve_label("adam", 3) == "adam (mean of 3 seeds)"
    assert plural(1, "seed") == "1 seed" and plural(2, "seed") == "2 seeds"
    assert tail_label("train loss", 30) == "train loss, mean of all 30 steps"
    assert tail_label("train loss", 3000) == "train loss, last 50 steps"


def test_reproduce_help_and_readme_give_the_same_times(capsys):
    from pathlib import Path

    from adoptim.tools.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    for profile, time_text in reproduce_mod.PROFILE_TIMES.items():
        assert time_text in help_text, profile
        assert f"--{profile}" in readme and time_text in readme, profile
    assert "a few minutes" not in help_text and "one CPU core" not in help_text


def test_quick_reports_say_in_their_first_line_that_they_are_smoke_tests(tmp_path,
                                                                          monkeypatch):
    """Every report written by `adoptim reproduce --quick` (an experiment may write several)
    opens with the smoke-test line, so that its numbers are not read as results; --full
    reports do not."""
    def run(sweep, out, progress=True):
        run_sweep(sweep, out, _train, name="fake", progress=progress)

    def report(sweep, out):
        Report(out / "part", "a part").write()  # a second report, as transfer writes
        return Report(out, "fake").write()

    fake = Experiment("fake", "a fake experiment", lambda: [Cfg(steps=1)],
                      lambda: [Cfg(steps=2)], run, report)
    monkeypatch.setitem(REGISTRY, "fake", "unused.module")
    monkeypatch.setattr(reproduce_mod, "get_experiment", lambda name: fake)
    from adoptim.tools.cli import main

    for profile in ("quick", "full"):
        assert main(["reproduce", "fake", f"--{profile}", "--out", str(tmp_path),
                     "--no-progress"]) == 0
        root = tmp_path / profile
        for path in (root / "fake" / "report.md", root / "fake" / "part" / "report.md",
                     root / "README.md"):
            first = path.read_text().splitlines()[0]
            if profile == "quick":
                assert "Smoke test" in first and "say nothing about" in first, (path, first)
            else:
                assert "Smoke test" not in path.read_text(), path
    # outside reproduce --quick (a module's own CLI, --full) a report starts with its title
    assert Report(tmp_path / "x", "T").write().read_text().startswith("# T\n")
