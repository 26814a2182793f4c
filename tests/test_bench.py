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


# --------------------------------------------------------------------------------------------
# bf16 rows and the all-in bytes/param column (issue 19)


def _entry(name):
    return next(e for e in bench.OPTIMIZERS if e.name == name)


def test_all_in_column_is_weights_plus_grads_plus_state():
    # 20 tensors of 5,000 elements: above the 4,096-element threshold, so 8-bit state is used
    names = ["adopt-foreach", "adopt-bf16-8bit-foreach", "adopt-bf16-ecc24-8bit-foreach"]
    res = bench.run_suite("a", [bench.OPTIMIZERS[0], *map(_entry, names)], warmup=0,
                          repeats=1, scale=0.005)["results"]
    fp32, bf16 = res["adopt-foreach"], res["adopt-bf16-8bit-foreach"]
    # float32: 4 (theta) + 4 (grad) + 8 (m, v) + a float32 step counter per 5,000 elements
    assert fp32["all_in_bytes_per_param"] == pytest.approx(16 + 4 / 5000)
    assert fp32["all_in_bytes_per_param"] == pytest.approx(8 + fp32["state_bytes_per_param"])
    # bf16 params and gradients (2 + 2) and 8-bit state (1 + 1 + block scales + step)
    assert bf16["all_in_bytes_per_param"] == pytest.approx(4 + bf16["state_bytes_per_param"])
    assert 2.0 < bf16["state_bytes_per_param"] < 2.1
    assert bf16["bytes_per_param"] == bench.BYTES_PER_PARAM_BF16_8BIT
    ecc = res["adopt-bf16-ecc24-8bit-foreach"]
    if "skipped" in ecc:  # an adoptim without master_weight_bits
        assert "master_weight_bits" in ecc["skipped"]
    else:  # the int8 correction: one more byte per parameter, inside the state
        assert ecc["state_bytes_per_param"] == pytest.approx(
            bf16["state_bytes_per_param"] + 1)
        assert ecc["all_in_bytes_per_param"] == pytest.approx(
            bf16["all_in_bytes_per_param"] + 1)
        assert ecc["bytes_per_param"] == bench.BYTES_PER_PARAM_BF16_ECC24_8BIT
    table = bench.format_table({"suites": [{"suite": "a", "scale": 0.005, "tensors": 20,
                                            "params": 100_000, "results": res}]})
    assert "all-in B/param" in table and "the same values in bf16" in table
    row = next(line for line in table.splitlines() if line.startswith("| adopt-foreach "))
    assert f"{fp32['all_in_bytes_per_param']:.2f}" in row


def test_bf16_rows_step_bf16_copies_of_the_suite(monkeypatch):
    seen = {}

    def fake_time_one(entry, params, warmup, repeats):
        seen[entry.name] = params
        return {"times_s": [0.01] * repeats, "peak_mb": 1.0, "first_step_s": 0.02}

    monkeypatch.setattr(bench, "_time_one", fake_time_one)
    entries = [bench.OPTIMIZERS[0], _entry("adopt-bf16-8bit-foreach")]
    bench.run_suite("a", entries, warmup=0, repeats=1, rounds=2, scale=0.001)
    fp32, bf16 = seen["adam-fused"], seen["adopt-bf16-8bit-foreach"]
    assert {p.dtype for p in fp32} == {torch.float32}
    assert {p.dtype for p in bf16} == {torch.bfloat16}
    assert {p.grad.dtype for p in bf16} == {torch.bfloat16}
    for p, q in zip(fp32, bf16):  # the same values, rounded, and separate tensors
        assert torch.equal(q.detach(), p.detach().to(torch.bfloat16))
        assert torch.equal(q.grad, p.grad.to(torch.bfloat16))
        assert q.data_ptr() != p.data_ptr() and q.is_leaf and q.requires_grad


def test_memory_flag_dispatches_and_rejects_unknown_configs(tmp_path, monkeypatch, capsys):
    from adoptim.tools import memory

    with pytest.raises(SystemExit, match="unknown memory configuration"):
        main(["bench", "--memory", "--memory-configs", "nope", "--out", str(tmp_path)])
    fake = {"model": dict(memory.MODEL, tokens_per_step=16, batch=1), "steps": 1,
            "results": {"adopt-fp32": {
                "params": 1000, "weights_per_param": 4.0, "grad_peak_per_param": 4.0,
                "state_per_param": 8.0, "correction_per_param": 0.0, "all_in_per_param": 16.0,
                "rss_over_bare_bytes": 2**21, "rss_over_model_bytes": 2**20,
                "rss_ratio_to_fp32": 1.0, "step_seconds": [0.1]},
                "adopt-bf16-ecc24-8bit-release": {"skipped": "not here"}}}
    calls = []
    monkeypatch.setattr(memory, "run_all", lambda names, steps, progress: calls.append(
        (names, steps)) or fake)
    assert main(["bench", "--memory", "--memory-configs", "adopt-fp32,*release",
                 "--memory-steps", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls == [(["adopt-fp32", "adopt-bf16-ecc24-8bit-release"], 1)]
    out = capsys.readouterr().out
    assert "**16.00**" in out and "skipped: not here" in out
    assert json.loads((tmp_path / "memory.json").read_text())["results"]["adopt-fp32"]
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
