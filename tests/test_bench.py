"""``adoptim bench`` at a tiny size: it runs, reports ratios, and writes JSON and a PNG."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from adoptim.tools import bench
from adoptim.tools.cli import SUBCOMMANDS, main


def test_gpt2_small_shapes():
    shapes = bench.suite_shapes("b")
    numel = sum(torch.Size(s).numel() for s in shapes)
    assert len(shapes) == 148
    assert 124.3e6 < numel < 124.5e6
    assert len(bench.suite_shapes("c")) == 2000
    assert sum(torch.Size(s).numel() for s in bench.suite_shapes("a")) == 20_000_000
    # Scaled suites keep the tensor count and shrink every tensor.
    small = bench.suite_shapes("b", 0.001)
    assert len(small) == 148 and sum(torch.Size(s).numel() for s in small) < 200_000


def test_bench_cli_tiny_run(tmp_path, capsys):
    assert "bench" in SUBCOMMANDS
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--suites",
            "a,c",
            "--optimizers",
            "adam-foreach,adopt-forloop,adopt-foreach",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--rounds",
            "3",
            "--scale",
            "0.001",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "adopt-forloop" in printed and "x adam-fused" in printed
    report = json.loads((out / "bench.json").read_text())
    assert [s["suite"] for s in report["suites"]] == ["a", "c"]
    for suite in report["suites"]:
        results = suite["results"]
        # adam-fused is the baseline even when not asked for; order is the registry's.
        assert list(results) == ["adam-fused", "adam-foreach", "adopt-foreach", "adopt-forloop"]
        assert results["adam-fused"]["ratio_to_adam_fused"] == pytest.approx(1.0)
        for r in results.values():
            # 3 interleaved rounds of 2 timed steps; the median is over all 6
            assert r["median_s"] > 0 and len(r["times_s"]) == 6
            assert len(r["round_medians_s"]) == 3
            assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
            assert r["gb_per_s"] == pytest.approx(28 * suite["params"] / r["median_s"] / 1e9)
            assert r["ratio_to_adam_fused"] == pytest.approx(
                r["median_s"] / results["adam-fused"]["median_s"]
            )
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bench_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown optimizer"):
        main(["bench", "--optimizers", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown suite"):
        main(["bench", "--suites", "z", "--out", str(tmp_path)])


def test_rounds_are_interleaved(monkeypatch):
    order = []

    def fake_time_one(entry, params, warmup, repeats):
        order.append(entry.name)
        return {"times_s": [0.01] * repeats, "peak_mb": 1.0, "first_step_s": 0.02}

    monkeypatch.setattr(bench, "_time_one", fake_time_one)
    entries = [bench.OPTIMIZERS[0], bench.OPTIMIZERS[1]]
    bench.run_suite("c", entries, warmup=0, repeats=2, rounds=3, scale=0.001)
    # every round visits every optimizer before the next round starts, each round starting
    # one optimizer later
    assert order == ["adam-fused", "adam-foreach", "adam-foreach", "adam-fused",
                     "adam-fused", "adam-foreach"]


def test_a_peer_that_fails_is_skipped_not_fatal():
    def broken(params):
        raise RuntimeError("peer exploded")

    res = bench.run_suite("c", [bench.OPTIMIZERS[0], bench.Entry("broken", broken)],
                          warmup=0, repeats=1, rounds=2, scale=0.001)
    assert res["results"]["broken"]["skipped"].startswith("failed: RuntimeError('peer exploded'")
    assert len(res["results"]["adam-fused"]["times_s"]) == 2


def test_missing_peer_is_skipped_not_fatal(monkeypatch):
    entry = bench.Entry("ghost", lambda p: None, lambda: "ghost is not installed")
    res = bench.run_suite("c", [bench.OPTIMIZERS[0], entry], warmup=0, repeats=1, scale=0.001)
    assert res["results"]["ghost"] == {"skipped": "ghost is not installed"}
    assert "median_s" in res["results"]["adam-fused"]


@pytest.mark.parametrize("scale", ["0", "-0.5", "nan"])
def test_scale_must_be_positive(scale, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--scale", scale, "--suites", ""])
    assert exc.value.code == 2 and "--scale: must be > 0" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: a,b,c)", "(default: 5)", "(default: 2)", "(default: 3)",
                    "(default: 1.0)", "(default: runs/bench)"):
        assert default in text


def test_skip_messages_name_the_package_to_install(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    peers = ("torch-adopt-foreach", "pytorch_optimizer", "timm-forloop")
    reasons = {e.name: e.available() for e in bench.OPTIMIZERS if e.name in peers}
    # the official ADOPT imports as `adopt`, but pip knows it as torch-adopt
    assert reasons["torch-adopt-foreach"] == (
        'torch-adopt is not installed (pip install "adoptim[bench]")')
    assert reasons["pytorch_optimizer"].endswith('(pip install "adoptim[bench]")')
    assert reasons["timm-forloop"] == "timm is not installed (pip install --no-deps timm)"


def test_plot_titles_say_the_scale_and_fit_in_the_figure(monkeypatch):
    def fake_time_one(entry, params, warmup, repeats):
        return {"times_s": [0.01] * repeats, "peak_mb": 1.0, "first_step_s": 0.02}

    monkeypatch.setattr(bench, "_time_one", fake_time_one)
    suite = bench.run_suite("a", bench.OPTIMIZERS[:2], warmup=0, repeats=1, scale=0.001)
    assert suite["title"] == "20 x 1M at scale 0.001: 20 tensors, 20.0k params"
    machine = "2 CPU cores, 2 torch threads, torch 2.13.0+cpu, CPU capability AVX512"
    fig = bench.figure({"machine": machine, "suites": [suite]})  # one panel: the narrowest
    fig.canvas.draw()
    width = fig.bbox.width
    ax = fig.axes[0]
    assert "scale 0.001" in ax.get_title()
    for text in (fig._suptitle, ax.title):
        box = text.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= width, text.get_text()  # nothing cut off
    assert "(a) 20 x 1M at scale 0.001" in bench.format_table({"suites": [suite]})


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(["bench", "--suites", "c", "--optimizers", "adam-foreach", "--repeats", "1",
                 "--warmup", "0", "--rounds", "1", "--scale", "0.001",
                 "--out", str(tmp_path)]) == 0
    assert "\r" not in capsys.readouterr().err  # pytest's capture is not a terminal


def test_too_small_runs_say_so(tmp_path, capsys):
    """One timed step at scale 0.001 printed ratios like 0.01x without a word before: the run
    still happens (tiny runs are how a first try checks the command) but warns, in the output,
    the JSON and the plot's title."""
    assert main(["bench", "--suites", "c", "--optimizers", "adam-foreach", "--repeats", "1",
                 "--warmup", "0", "--rounds", "1", "--scale", "0.001",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING: this run is too small for its ratios to mean anything") == 2
    assert "only 1 timed step(s)" in out and "--scale 0.001" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["warnings"]) >= 2
    # the defaults at full size raise nothing before the run
    assert bench.settings_warnings(5, 3, 1.0) == []
    assert bench.settings_warnings(5, 1, 1.0) and bench.settings_warnings(5, 3, 0.5)


def test_a_baseline_step_too_short_to_time_is_flagged():
    def report(median_s):
        return {"suites": [{"suite": "c", "title": "2000 x 1k",
                            "results": {"adam-fused": {"median_s": median_s}}}]}

    assert "0.50 ms" in bench.result_warnings(report(5e-4))[0]
    assert bench.result_warnings(report(0.05)) == []


def test_without_matplotlib_the_table_is_written_and_the_plot_named(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(bench, "missing", lambda modules: list(modules))  # nor tqdm
    assert main(["bench", "--suites", "c", "--optimizers", "adam-foreach", "--repeats", "1",
                 "--warmup", "0", "--rounds", "1", "--scale", "0.001",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no plot: matplotlib is not installed" in out
    assert "pip install 'adoptim[experiments]'" in out
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()
