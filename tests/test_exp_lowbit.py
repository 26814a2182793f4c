"""The lowbit experiment (8-bit ADOPT vs float32 ADOPT): the sweeps, the within-spread
verdicts, the report on synthetic results that must say "outside", the torchao and
Fashion-MNIST skips, and the quick profile for real through ``adoptim reproduce``."""

from __future__ import annotations

import json
import math

import pytest

from adoptim.experiments import REGISTRY, get_experiment
from adoptim.experiments import lowbit as lb
from adoptim.experiments.reproduce import reproduce
from adoptim.experiments.runner import config_dict, run_id


# ----------------------------------------------------------------------------- sweeps
def test_full_sweep_is_the_issue_s_set():
    sweep = lb.full_sweep()
    assert len(sweep) == 32 and all(c.size == "full" for c in sweep)
    arms = {t: {c.optimizer for c in sweep if c.task == t} for t in lb.RUN_ORDER}
    assert arms == {"toy": {"adopt", "adopt-8bit-all"},
                    "mlp-mnist5k": {"adopt", "adopt-8bit", "adamw8bit-torchao"},
                    "mlp-fashion": {"adopt", "adopt-8bit", "adamw8bit-torchao"},
                    "vae": {"adopt", "adopt-8bit"}, "gpt": {"adoptw", "adoptw-8bit"}}
    for t in ("mlp-mnist5k", "mlp-fashion", "vae", "gpt"):  # every arm, seeds 1-3
        for o in arms[t]:
            assert sorted(c.seed for c in sweep if c.task == t and c.optimizer == o) == [1, 2, 3]
    # the settings of the script it replaces (and of each experiment's full profile)
    _, toy = lb.task_args(next(c for c in sweep if c.task == "toy"))
    assert (toy.ks, toy.beta2s, toy.steps, toy.n_seeds) == ((10,), (0.1, 0.5, 0.999), 100_000, 256)
    _, mlp = lb.task_args(next(c for c in sweep if c.task == "mlp-mnist5k"))
    _, fashion = lb.task_args(next(c for c in sweep if c.task == "mlp-fashion"))
    assert (mlp.epochs, fashion.epochs, mlp.hidden) == (30, 10, 784)
    _, vae = lb.task_args(next(c for c in sweep if c.task == "vae"))
    assert (vae.epochs, vae.iw_samples) == (15, 64)
    _, gpt = lb.task_args(next(c for c in sweep if c.task == "gpt" and c.seed == 2))
    assert (gpt.batch_size, gpt.max_iters, gpt.seed, gpt.optimizer) == (16, 3000, 2, "adoptw")


def test_quick_sweep_is_small_and_registered(capsys):
    sweep = lb.quick_sweep()
    assert {c.size for c in sweep} == {"quick"}
    assert not any(c.optimizer == lb.TORCHAO_ARM for c in sweep)  # compiles for 10-30 s
    assert {c.seed for c in sweep if c.task != "toy"} == set(lb.QUICK_SEEDS)
    assert "lowbit" in REGISTRY and get_experiment("lowbit") is lb.EXPERIMENT
    from adoptim.tools.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "lowbit" in capsys.readouterr().out


# ----------------------------------------------------------------------------- verdicts
def test_compare_within_outside_and_no_verdict():
    base = [1.0, 1.1, 0.9]  # std 0.1
    c = lb.compare(base, [1.05, 1.15, 0.95], higher_is_better=False)
    assert c["status"] == "within" and c["delta"] == pytest.approx(0.05)
    assert c["spread"] == pytest.approx(0.1) and c["ratio"] == pytest.approx(0.5)
    assert "within" in lb.verdict_text(c)

    c = lb.compare(base, [1.4, 1.5, 1.6], higher_is_better=False)  # loss 0.5 higher: worse
    assert c["status"] == "outside" and c["worse"] and c["delta"] == pytest.approx(0.5)
    assert c["ratio"] == pytest.approx(5.0)
    text = lb.verdict_text(c, "adopt-8bit")
    assert "**outside**" in text and "worse by 5" in text
    c = lb.compare(base, [1.4, 1.5, 1.6], higher_is_better=True)  # accuracy higher: better
    assert c["status"] == "outside" and not c["worse"] and "better" in lb.verdict_text(c)
    c = lb.compare(base, [0.5, 0.6, 0.4], higher_is_better=False)
    assert c["delta"] == pytest.approx(-0.5) and not c["worse"]

    # the bar itself: |Δ| equal to the float32 std is within, a hair more is not
    assert lb.compare([0.0, 2.0], [1.0 + math.sqrt(2), 1.0 + math.sqrt(2)], False)["status"] \
        == "within"
    assert lb.compare([0.0, 2.0], [1.0 + 1.001 * math.sqrt(2)] * 2, False)["status"] == "outside"
    # the float32 spread is the bar, not the 8-bit arm's (a wide 8-bit spread does not help)
    assert lb.compare([1.0, 1.0, 1.0], [1.0, 3.0, 5.0], False)["status"] == "outside"

    assert lb.compare([1.0], [1.0], False)["status"] == "no spread"
    assert lb.compare(base, [math.nan, 1.0, 1.0], False)["status"] == "non-finite"
    assert lb.compare(base, [], False)["status"] == "not run"
    assert "no verdict" in lb.verdict_text(lb.compare([1.0], [2.0], False))


# ----------------------------------------------------------------------------- synthetic report
def _write(out, cfg, values, seconds=1.0, bpp=8.0):
    d = out / "runs" / run_id(cfg, lb._KEYS)
    d.mkdir(parents=True, exist_ok=True)
    result = {"config": config_dict(cfg), "seconds": seconds, "values": values,
              "state_bytes_per_param": bpp, "task_args": {}, "task_result": {}}
    (d / "result.json").write_text(json.dumps(result))


def test_report_says_outside_plainly_and_publishes(tmp_path, monkeypatch):
    """VAE 8-bit 10 nats worse (outside), GPT 8-bit level (within), one torchao run missing."""
    monkeypatch.setattr(lb, "torchao_installed", lambda: True)
    sweep = [c for c in lb.full_sweep() if c.task in ("vae", "gpt", "mlp-mnist5k")]
    out = tmp_path / "runs" / "full" / "lowbit"
    for c in sweep:
        s = c.seed - 2  # -1, 0, 1
        if c.task == "vae":
            worse = 10.0 if c.optimizer == "adopt-8bit" else 0.0
            _write(out, c, {"test/iw_nll": [110.0 + s + worse], "test/nelbo": [115.0 + s]},
                   bpp=2.1 if "8bit" in c.optimizer else 8.0)
        elif c.task == "gpt":
            _write(out, c, {"val/final_loss": [0.76 + 0.01 * s], "val/best_loss": [0.75 + 0.01 * s]})
        elif not (c.optimizer == lb.TORCHAO_ARM and c.seed == 3):  # one run not finished
            acc = 0.94 + 0.003 * s - (0.01 if c.optimizer == lb.TORCHAO_ARM else 0.0)
            _write(out, c, {"test/acc": [acc], "train/loss": [0.0015 + 0.0001 * s]})
    md = lb.report(sweep, out).read_text()
    assert "**Profile `full`**" in md and "3 seeds (1, 2, 3)" in md
    assert f"**{len(sweep) - 1} of {len(sweep)} runs finished**" in md
    # the VAE: Δ = +10.00 nats, 10 float32 std, 8-bit worse, said in the summary's words too
    assert ("adopt-8bit vs adopt, held-out IW-NLL (nats): Δ = +10.00 (float32 std 1.00; "
            "per-seed Δ 10.00 ± 0.00): **outside** the float32 seed spread: adopt-8bit is "
            "worse by 10 float32 std") in md
    assert "**Not within the seed spread** (8-bit ADOPT): conv VAE on MNIST-5k, held-out " \
           "IW-NLL (nats) (adopt-8bit: Δ +10.00, 10 float32 std, worse)" in md
    assert "every metric here" not in md
    assert "8-bit ADOPT is within the seed spread of float32 ADOPT on 5 of 6 comparisons" in md
    # the GPT: within; the torchao arm: outside on accuracy, with two seeds
    assert "adoptw-8bit vs adoptw, final val loss (nats/byte): Δ = +0.0000" in md
    assert "| adamw8bit-torchao | 2 | 0.9285 ± 0.0021 |" in md
    assert "torchao's AdamW8bit is a different optimizer" in md
    assert "**outside** on MLP on MNIST-5k, test accuracy (adamw8bit-torchao: Δ -0.0115" in md
    assert "| adopt-8bit | 3 | 120.00 ± 1.00 | 115.00 ± 1.00 | 2.10 | 1 |" in md
    assert (out / "quality.png").stat().st_size > 10_000

    # through `adoptim reproduce --report-only --publish`: report, plot and runs copied out
    index, skipped = reproduce(["lowbit"], "full", tmp_path / "runs", progress=False,
                               report_only=True, publish_to=tmp_path / "pub")
    assert not skipped and "[lowbit](lowbit/report.md)" in index.read_text()
    pub = tmp_path / "pub" / "lowbit"
    assert sorted(p.name for p in pub.iterdir()) == ["quality.png", "report.md", "runs.json"]
    runs = json.loads((pub / "runs.json").read_text())
    assert len(runs) == len(sweep) - 1 and all("dir" not in r for r in runs)
    assert "**outside**" in (pub / "report.md").read_text()


def test_report_all_within_says_so(tmp_path):
    sweep = [c for c in lb.full_sweep() if c.task == "gpt"]
    for c in sweep:
        v = 0.76 + 0.01 * (c.seed - 2)
        _write(tmp_path, c, {"val/final_loss": [v], "val/best_loss": [v - 0.01]})
    md = lb.report(sweep, tmp_path).read_text()
    assert "**8-bit ADOPT is within the seed spread of float32 ADOPT on every metric here** " \
           "(2 comparisons)" in md
    assert "**outside**" not in md and "quick profile" not in md


# ----------------------------------------------------------------------------- skips
def test_missing_torchao_and_fashion_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lb, "torchao_installed", lambda: False)
    monkeypatch.setenv("ADOPTIM_FASHION_MNIST", str(tmp_path / "no-fashion"))
    quick = lb.Config(task="mlp-mnist5k", optimizer="adopt", seed=1, size="quick")
    sweep = [quick, lb.Config(task="mlp-mnist5k", optimizer=lb.TORCHAO_ARM, seed=1, size="quick"),
             lb.Config(task="mlp-fashion", optimizer="adopt", seed=1, size="full")]
    lb.run(sweep, tmp_path, progress=False)  # does not crash; runs what it can
    log = capsys.readouterr().out
    assert ("[lowbit] mlp-mnist5k/adamw8bit-torchao: skipped, torchao is not installed: "
            'pip install "adoptim[bench]" (or pip install torchao)') in log
    assert "[lowbit] mlp-fashion: skipped, Fashion-MNIST is not installed" in log
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [run_id(quick, lb._KEYS)]
    md = lb.report(sweep, tmp_path).read_text()
    assert "**1 of 1 runs finished** (2 not runnable here, see below)" in md
    assert '| adamw8bit-torchao | 0 | not run: torchao is not installed: pip install ' \
           '"adoptim[bench]"' in md
    assert "Not run here: mlp-fashion: Fashion-MNIST is not installed" in md
    assert "no verdict: one float32 seed" not in md  # nothing to compare with: no row at all


# ----------------------------------------------------------------------------- for real
def test_quick_profile_runs_for_real_and_resumes(tmp_path, capsys):
    """The quick profile as `adoptim reproduce --quick lowbit` runs it (a few seconds)."""
    index, skipped = reproduce(["lowbit"], "quick", tmp_path, progress=False)
    assert not skipped
    out = tmp_path / "quick" / "lowbit"
    md = (out / "report.md").read_text()
    n = len(lb.quick_sweep())
    assert "**Profile `quick`**" in md and "**This is the quick profile**" in md
    assert "2 seeds (1, 2) per arm" in md and f"**{n} of {n} runs finished**" in md
    assert md.count("within the float32 seed spread") + md.count("**outside**") >= 9
    assert (out / "quality.png").exists()
    results = [json.loads(p.read_text()) for p in out.glob("runs/*/result.json")]
    assert len(results) == n
    for r in results:  # the 8-bit arms really ran with 8-bit state, the float32 ones not
        bpp, name = r["state_bytes_per_param"], r["config"]["optimizer"]
        assert (bpp < 3.6) if "8bit" in name else (bpp >= 8.0), (name, bpp)
        assert all(math.isfinite(v) for vals in r["values"].values() for v in vals)
    toy = next(r for r in results if r["config"]["task"] == "toy")
    assert len(toy["values"]["beta2=0.1"]) == lb.SIZES["quick"]["toy"]["n_seeds"]
    capsys.readouterr()
    reproduce(["lowbit"], "quick", tmp_path, progress=False)  # again: nothing reruns
    assert f"[lowbit] reused {n} finished runs" in capsys.readouterr().out
