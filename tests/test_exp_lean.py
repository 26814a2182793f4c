"""The lean experiment (bf16 + correction + 8-bit state, ± gradient release, vs float32 ADOPT):
the sweeps and settings, the bf16-weight conversion, the report on synthetic results (which
must say "outside" where an arm misses the bar, and "smoke test" in the quick profile's first
line), and the skip of arms whose feature this adoptim lacks."""

from __future__ import annotations

import json

import pytest
import torch

from adoptim.experiments import REGISTRY, get_experiment, lean
from adoptim.experiments.runner import RESULT_FILE, config_dict, run_id


def test_full_sweep_is_the_issue_s_set():
    sweep = lean.full_sweep()
    assert len(sweep) == 75 and {c.size for c in sweep} == {"full"}
    assert {c.task for c in sweep} == {"mlp-mnist5k", "mlp-fashion", "gpt", "vae", "resnet"}
    for t in lean.TASKS:
        for a in lean.ARMS:
            assert sorted(c.seed for c in sweep if c.task == t and c.arm == a) == [1, 2, 3]
    # the best lr of the transfer study (docs/results/transfer/report.md) for ADOPT(W)
    assert {t: lean.TASKS[t].lr for t in lean.TASKS} == {
        "mlp-mnist5k": 3e-3, "mlp-fashion": 1e-3, "gpt": 3e-3, "vae": 1e-3, "resnet": 3e-3}
    _, gpt = lean.task_args(next(c for c in sweep if c.task == "gpt"), "adoptw-lean-fp32")
    # no global clipping in any arm (release cannot clip globally); ADOPT's beta2
    assert (gpt.grad_clip, gpt.adopt_beta2, gpt.lr, gpt.batch_size) == (0.0, 0.9999, 3e-3, 16)
    assert "lean" in REGISTRY and get_experiment("lean") is lean.EXPERIMENT


def test_bf16_weights_keeps_the_parameters_and_computes_in_float32():
    with lean._track_modules() as modules:
        emb = torch.nn.Embedding(16, 8)
        head = torch.nn.Linear(8, 16, bias=False)
        head.weight = emb.weight  # tied, as in the GPT
        model = torch.nn.Sequential(emb, torch.nn.Linear(8, 8), head)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    # one parametrization per place a parameter is held (the tied one twice); the tracker
    # still running must not make it parametrize its own ParametrizationLists forever
    with lean._track_modules() as later:
        assert lean.bf16_weights(params, modules) == 4
    assert len(later) >= 4
    assert list(model.parameters()) == params  # the same Parameter objects, now bf16
    for p, b in zip(params, before):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), b.to(torch.bfloat16))
    assert emb.weight.dtype == torch.float32  # what the module computes with
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params)


def _fake_result(out, cfg, values):
    d = out / "runs" / run_id(cfg, lean._KEYS)
    d.mkdir(parents=True)
    (d / RESULT_FILE).write_text(json.dumps({
        "config": config_dict(cfg), "seconds": 1.0, "values": values,
        "bytes_per_param": {"weights": 2.0, "grads": 2.0, "state": 2.03, "correction": 1.0,
                            "all_in": 7.03}}))


def test_report_says_outside_where_an_arm_misses_the_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(lean, "arm_status", lambda arm: (True, ""))
    monkeypatch.setattr(lean, "fashion_status", lambda: (True, ""))
    sweep = [c for c in lean.full_sweep() if c.task == "gpt"]
    for c in sweep:
        base = {1: 1.00, 2: 1.02, 3: 0.98}[c.seed]  # float32 std 0.02
        shift = {"bf16-8bit": 0.10}.get(c.arm, 0.001)  # plain bf16 is far worse
        v = base if c.arm == "fp32" else base + shift
        _fake_result(tmp_path, c, {"val_loss": [v], "train_loss": [v]})
    text = lean.report(sweep, tmp_path).read_text()
    first = text.splitlines()[0]
    assert first.startswith("# Lean training") and "15 of 15 runs finished" in text
    assert "**Outside float32 ADOPT's seed spread**: byte-level GPT, batch 16, final val loss" \
        in text
    assert "plain bf16 (round to nearest) + 8-bit (Δ +0.1000, 5 float32 std, worse)" in text
    assert "bf16 + 24-bit + 8-bit + release: within float32 ADOPT's seed spread on 2 of 2" \
        in text
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_report_says_smoke_test_first_and_missing_arms_are_skipped(tmp_path, monkeypatch,
                                                                         capsys):
    def status(arm):
        return (False, "no release here") if "release" in arm else (True, "")

    monkeypatch.setattr(lean, "arm_status", status)
    sweep = [c for c in lean.quick_sweep() if c.task == "mlp-mnist5k" and c.seed == 1
             and c.arm in ("fp32", "bf16-ecc24-8bit-release")]
    ran = []
    monkeypatch.setattr(lean, "run_sweep", lambda todo, *a, **k: ran.extend(todo))
    lean.run(sweep, tmp_path, progress=False)
    assert [c.arm for c in ran] == ["fp32"]
    assert "arm:bf16-ecc24-8bit-release: skipped, no release here" in capsys.readouterr().out
    from adoptim.experiments.runner import smoke_test

    with smoke_test("quick"):  # as `adoptim reproduce --quick` writes it
        text = lean.report(sweep, tmp_path).read_text()
    assert text.splitlines()[0].startswith("> **Smoke test (quick profile)")
    assert "**This is a smoke test**" in text and "not run: no release here" in text


def test_one_real_quick_run_per_format(tmp_path):
    from adoptim.experiments.runner import RunContext

    for arm, dtype, all_in in (("fp32", "float32", 16.0), ("bf16-sr-8bit", "bfloat16", 6.1)):
        cfg = lean.Config(task="mlp-mnist5k", arm=arm, seed=1, size="quick")
        d = tmp_path / arm
        d.mkdir()
        ctx = RunContext(d, cfg, progress=False)
        try:
            r = lean.train(cfg, ctx)
        finally:
            ctx.close()
        assert r["param_dtypes"] == [dtype]
        assert r["bytes_per_param"]["all_in"] == pytest.approx(all_in, abs=0.05)
        assert 0 < r["values"]["test_acc"][0] <= 100
