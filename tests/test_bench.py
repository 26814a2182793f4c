"""``adoptim bench`` at a tiny size: it runs, reports ratios, and writes JSON and a PNG."""

from __future__ import annotations

import json

import pytest
import torch

from adoptim import bench
from adoptim.cli import SUBCOMMANDS, main


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
            assert r["median_s"] > 0 and len(r["times_s"]) == 2
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


def test_missing_peer_is_skipped_not_fatal(monkeypatch):
    entry = bench.Entry("ghost", lambda p: None, lambda: "ghost is not installed")
    res = bench.run_suite("c", [bench.OPTIMIZERS[0], entry], warmup=0, repeats=1, scale=0.001)
    assert res["results"]["ghost"] == {"skipped": "ghost is not installed"}
    assert "median_s" in res["results"]["adam-fused"]
