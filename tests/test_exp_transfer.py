"""Transfer experiment: warmup hook, the two-stage sweep, the analysis and the report, on
synthetic results (plus one tiny real run)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from adoptim.experiments import transfer as tr
from adoptim.experiments.runner import config_dict, run_id, run_sweep


# ----------------------------------------------------------------------------- warmup hook
def test_linear_warmup_scales_every_optimizer_and_restores_the_lr():
    from adoptim import ADOPT

    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=1.0)
    moves = []
    with tr.linear_warmup(4) as counts:
        for _ in range(6):
            before = p.item()
            p.grad = torch.ones(1)
            sgd.step()
            moves.append(before - p.item())
            assert sgd.param_groups[0]["lr"] == 1.0  # restored after every step
    assert moves == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert counts[id(sgd)] == 6
    p.grad = torch.ones(1)
    before = p.item()
    sgd.step()  # the hooks are gone outside the block
    assert before - p.item() == pytest.approx(1.0)

    # ADOPT too (its first step only initialises v, so the first move is at t = 1)
    q = torch.nn.Parameter(torch.zeros(1))
    opt = ADOPT([q], lr=1.0, foreach=False)
    with tr.linear_warmup(4):
        for _ in range(3):
            q.grad = torch.ones(1)
            opt.step()
    # t=0: no move; t=1: lr 0.5, m = 0.1 -> 0.05; t=2: lr 0.75, m = 0.19 -> 0.1425
    assert -q.item() == pytest.approx(0.05 + 0.75 * 0.19, rel=1e-5)


def test_linear_warmup_zero_is_a_no_op():
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=0.5)
    with tr.linear_warmup(0):
        p.grad = torch.ones(1)
        sgd.step()
    assert p.item() == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- synthetic runs
TASK = "gpt-b4"  # lower is better, adamw vs adoptw
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
# mean validation loss per (optimizer, lr); seed s adds 0.01 * s
LOSS = {("adamw", 1e-3): 1.30, ("adamw", 3e-3): 1.10, ("adamw", 1e-2): 1.105,
        ("adamw", 3e-2): 1.50, ("adoptw", 1e-3): 1.40, ("adoptw", 3e-3): 1.20,
        ("adoptw", 1e-2): 1.00, ("adoptw", 3e-2): math.nan}


def _stage1(seeds=(0, 1)):
    return [tr.Config(task=TASK, optimizer=o, lr=lr, seed=s, size="quick")
            for s in seeds for lr in LRS for o in ("adamw", "adoptw")]


def _write(out, cfg, metric, early=2.0, steps=100):
    d = out / cfg.task / "runs" / run_id(cfg, tr._KEYS)
    d.mkdir(parents=True, exist_ok=True)
    result = {"config": config_dict(cfg), "seconds": 1.0, "metric": metric,
              "finite": math.isfinite(metric), "steps": steps, "early/steps": 5,
              "early/max_loss": early, "early/first_loss": 5.5, "beta2": 0.999,
              "task_args": {"max_iters": steps}, "task_result": {}}
    (d / "result.json").write_text(json.dumps(result))


def _fill(out, configs):
    for c in configs:
        base = LOSS.get((c.optimizer, c.lr), 1.25)
        _write(out, c, base + 0.01 * c.seed, early=3.0 if c.warmup_steps == 0 else 2.0)


def test_stage2_waits_for_the_pilot_grid_then_picks_the_two_best_lrs(tmp_path):
    s1 = _stage1()
    _fill(tmp_path, [c for c in s1 if c.seed == 0][:-1])  # pilot grid not finished
    assert tr.plan(list(s1), tmp_path, eight_bit=False) == s1
    _fill(tmp_path, [c for c in s1 if c.seed == 0])
    sweep = list(s1)
    assert tr.plan(sweep, tmp_path, eight_bit=True) is sweep  # extended in place
    extra = sweep[len(s1):]
    warm = [c for c in extra if c.warmup_steps]
    assert {c.warmup_steps for c in warm} == {5}  # 5 % of the pilot runs' 100 steps
    assert sorted({(c.optimizer, c.lr) for c in warm}) == [
        ("adamw", 3e-3), ("adamw", 1e-2), ("adoptw", 3e-3), ("adoptw", 1e-2)]
    (b2,) = {(c.optimizer, c.lr, c.beta2) for c in extra if c.beta2}
    assert b2 == ("adoptw", 1e-2, tr.STAGE2_BETA2)
    assert {(c.optimizer, c.lr) for c in extra if "8bit" in c.optimizer} == {
        ("adoptw-8bit", 1e-2)}
    assert {c.seed for c in extra} == {0, 1}  # every seed, pilot first
    assert [c.seed for c in extra] == sorted(c.seed for c in extra)
    assert len(extra) == 2 * (4 + 1 + 1)
    assert tr.plan(sweep, tmp_path, eight_bit=True) == sweep  # idempotent
    no8 = tr.plan(list(s1), tmp_path, eight_bit=False)
    assert not any("8bit" in c.optimizer for c in no8)


def test_analyse_best_lr_dropin_ratio_and_range(tmp_path):
    s1 = _stage1()
    _fill(tmp_path, s1)
    results = tr._results(tmp_path, TASK, s1)
    ana = tr.analyse(tr.TASKS[TASK], results, LRS)
    a, d = ana["adamw"], ana["adoptw"]
    assert a["best_lr"] == 3e-3 and d["best_lr"] == 1e-2
    assert a["best_stats"]["mean"] == pytest.approx(1.105)
    assert a["best_stats"]["n"] == 2
    # the drop-in question: ADOPTW at AdamW's best lr (3e-3)
    assert ana["dropin"]["mean"] == pytest.approx(1.205)
    assert ana["dropin_delta"] == pytest.approx(0.10)
    assert ana["ratio"] == pytest.approx(10 / 3)
    # AdamW: 1e-2 (1.11) is within 1 % of 1.105, 1e-3 and 3e-2 are not
    assert a["range"] == (1, 2) and a["width"] == pytest.approx(10 / 3)
    assert d["range"] == (2, 2) and d["width"] == 1
    # a diverged cell (ADOPTW at 3e-2) is never best and breaks the range
    assert d["cells"][3]["diverged"] == 2 and math.isnan(d["means"][3])


def test_lr_range_higher_is_better():
    lrs = [1, 2, 3, 4, 5]
    assert tr.lr_range(lrs, [80, 89.5, 90, 89.2, 70], 2, 0.9, True) == (1, 3)
    assert tr.lr_range(lrs, [89.9, 89.5, 90, math.nan, 90], 2, 0.9, True) == (0, 2)


def test_report_on_partial_results(tmp_path):
    s1 = _stage1(seeds=(0, 1, 2))
    _fill(tmp_path, [c for c in s1 if c.seed == 0])
    sweep = list(s1)
    path = tr.report(sweep, tmp_path)
    n2 = len(sweep) - len(s1)
    assert n2 > 0  # stage 2 derived from the finished pilot seed
    text = (tmp_path / TASK / "report.md").read_text()
    assert f"Progress: 8 of {len(s1) + n2} planned runs finished" in text
    assert "not run yet" in text  # the stage-2 cells
    assert "(n=1)" in text  # cells with fewer than 3 seeds say so
    assert "diverged (1 of 1)" in text
    assert "-0.1000 vs AdamW" not in text and "+0.1000 vs AdamW" in text  # drop-in
    assert (tmp_path / TASK / f"{TASK}_lr.png").exists()
    summary = path.read_text()
    assert f"[{TASK}]({TASK}/report.md)" in summary
    assert "0.003 / 0.01" in summary  # best lrs
    # finish stage 2 too: the warmup table compares the same lr with and without warmup
    _fill(tmp_path, sweep[len(s1):])
    tr.report(sweep, tmp_path)
    text = (tmp_path / TASK / "report.md").read_text()
    # AdamW at 3e-3: no warmup 1.10 (seed 0 only), with warmup 1.10/1.11/1.12 over 3 seeds;
    # largest early loss 3 without warmup, 2 with
    assert "| AdamW | 0.003 | 5 | 1.1000 (n=1) | 1.1100 ± 0.0100 | 3 | 2 (max 2) |" in text


def test_report_says_why_8bit_did_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "eight_bit_status", lambda: (False, "no 8-bit here"))
    s1 = _stage1(seeds=(0,))
    _fill(tmp_path, s1)
    tr.report(list(s1), tmp_path)
    assert "not run: no 8-bit here" in (tmp_path / TASK / "report.md").read_text()


def test_publish_writes_one_folder_per_task(tmp_path):
    from adoptim.experiments.reproduce import publish

    s1 = _stage1(seeds=(0,))
    _fill(tmp_path / "out", s1)
    sweep = list(s1)
    tr.report(sweep, tmp_path / "out")
    publish(tmp_path / "out", sweep, tmp_path / "pub")
    runs = json.loads((tmp_path / "pub" / TASK / "runs.json").read_text())
    assert len(runs) == len(s1)
    assert {"task", "optimizer", "lr", "seed"} <= set(runs[0]["config"])
    assert (tmp_path / "pub" / "report.md").exists()
    assert (tmp_path / "pub" / TASK / f"{TASK}_lr.png").exists()
    assert not (tmp_path / "pub" / "runs.json").exists()  # the runs are in the task folders


# ----------------------------------------------------------------------------- real runs
def test_tiny_real_run_records_early_losses(tmp_path):
    from adoptim.experiments.data import DataUnavailableError

    cfg = tr.Config(task="mlp-mnist5k", optimizer="adopt", lr=1e-3, warmup_steps=3,
                    size="quick")
    try:
        (d,) = run_sweep([cfg], tmp_path, tr.train, keys=tr._KEYS, progress=False)
    except DataUnavailableError as e:
        pytest.skip(f"MNIST-5k unavailable: {e}")
    r = json.loads((d / "result.json").read_text())
    assert r["steps"] == 32 and r["early/steps"] == 2
    assert r["early/max_loss"] >= r["early/first_loss"] > 2.0  # ~ln 10 at the start
    assert 0 < r["metric"] <= 100 and r["finite"]
    assert r["beta2"] == 0.9999 and r["task_args"]["hidden"] == 32
    assert r["config"]["task"] == "mlp-mnist5k"


def test_profiles_and_registration():
    from adoptim.experiments import get_experiment

    assert get_experiment("transfer") is tr.EXPERIMENT
    full = tr.full_sweep()
    assert all(tr.is_stage1(c) for c in full)
    for t in tr.TASKS:
        lrs = sorted({c.lr for c in full if c.task == t})
        assert len(lrs) >= 5 and lrs[-1] / lrs[0] >= 100  # >= 5 log-spaced lrs, 2+ decades
        assert len({c.seed for c in full if c.task == t}) >= 3
    # the pilot seed's whole grid comes first
    n_pilot = sum(c.seed == full[0].seed for c in full)
    assert {c.seed for c in full[:n_pilot]} == {full[0].seed}
    quick = tr.quick_sweep()
    assert {c.size for c in quick} == {"quick"}
    assert all(tr.SIZES["quick"][c.task].get("dataset") != "fashion-mnist" for c in quick)
    assert replace(quick[0], seed=1) != quick[0]


# ----------------------------------------------------------------------------- quick-profile reports
def _grid(task, lrs, optimizers, seeds=(0,), size="quick"):
    return [tr.Config(task=task, optimizer=o, lr=lr, seed=s, size=size)
            for s in seeds for lr in lrs for o in optimizers]


def test_a_tie_is_reported_as_a_tie_not_as_a_best_lr(tmp_path):
    """The quick ResNet ends at chance (10.00 %) at every lr: the report must say "tie",
    not pick the first lr and call it the best one at the edge of the grid."""
    lrs = (3e-4, 1e-3, 3e-3)
    s1 = _grid("resnet", lrs, ("adam", "adopt"))
    for c in s1:
        _write(tmp_path, c, 10.0, steps=16)
    ana = tr.analyse(tr.TASKS["resnet"], tr._results(tmp_path, "resnet", s1), lrs)
    assert ana["adam"]["ties"] == [0, 1, 2] and ana["adopt"]["ties"] == [0, 1, 2]
    assert "ratio" not in ana and "dropin" not in ana
    tr.report(list(s1), tmp_path)
    text = (tmp_path / "resnet" / "report.md").read_text()
    assert "edge of the grid" not in text
    assert "| best lr | tie: 0.0003, 0.001, 0.003 (every lr) |" in text
    assert "n/a: a tie" in text and "n/a: Adam's best lr is a tie" in text
    # a best lr that is one lr is still named, with the edge note
    _write(tmp_path, s1[0], 12.0, steps=16)  # adam at 3e-4
    tr.report(list(s1), tmp_path)
    text = (tmp_path / "resnet" / "report.md").read_text()
    assert "| best lr | 0.0003 (edge of the grid) | tie: 0.0003, 0.001, 0.003 (every lr) |" in text


def test_quick_resnet_title_matches_its_settings(tmp_path):
    """The quick profile's ResNet is a ResNet-8 on MNIST-5k digits; its report and plot must
    not be titled as the full profile's ResNet-20 on Fashion-MNIST."""
    assert tr.SIZES["quick"]["resnet"]["depth"] == 8
    assert tr.task_title(tr.TASKS["resnet"], "quick") == "ResNet-8 on a MNIST-5k subset"
    assert tr.task_title(tr.TASKS["resnet"], "full") == "ResNet-20 on a Fashion-MNIST subset"
    s1 = _grid("resnet", (1e-3, 3e-3), ("adam", "adopt"))
    for i, c in enumerate(s1):
        _write(tmp_path, c, 50.0 + i, steps=16)
    tr.report(list(s1), tmp_path)
    text = (tmp_path / "resnet" / "report.md").read_text()
    assert "# Switching from Adam: ResNet-8 on a MNIST-5k subset" in text
    assert "ResNet-20" not in text and "Fashion" not in text


def test_warmup_is_long_enough_to_act_on_adopt(tmp_path):
    """ADOPT's first step does not move the parameters, so a 1-2 step warmup leaves its
    runs unchanged: the stage-2 warmup lasts at least 3 steps (5 % of 20 steps rounds to 1)."""
    s1 = _stage1(seeds=(0,))
    for c in s1:
        _write(tmp_path, c, LOSS.get((c.optimizer, c.lr), 1.25), steps=20)
    sweep = tr.plan(list(s1), tmp_path, eight_bit=False)
    assert {c.warmup_steps for c in sweep if c.warmup_steps} == {tr.MIN_WARMUP_STEPS} == {3}
    # with 3 steps, ADOPT's second step (its first update) runs at 2/3 of the lr
    p = torch.nn.Parameter(torch.ones(3))
    from adoptim import ADOPT

    moved = []
    for warmup in (0, 2, 3):
        p.data.fill_(1.0)
        opt = ADOPT([p], lr=0.1, foreach=False)
        with tr.linear_warmup(warmup):
            for _ in range(2):
                p.grad = torch.ones(3)
                opt.step()
        moved.append(1.0 - float(p.detach()[0]))
    assert moved[0] == pytest.approx(moved[1])  # 2 steps of warmup: no effect on ADOPT
    assert moved[2] == pytest.approx(moved[0] * 2 / 3)


def test_plot_y_range_holds_every_plotted_value(tmp_path):
    """No plotted point may fall outside the axes (the MNIST-5k plot cut off the cells below
    53 %): here one lr ends at 40 % and one at chance, far below the best cell's 95 %."""
    task = tr.TASKS["mlp-mnist5k"]
    lrs = (1e-4, 1e-3, 1e-2, 3e-2)
    acc = {1e-4: 80.0, 1e-3: 95.0, 1e-2: 40.0, 3e-2: 10.0}
    s1 = _grid(task.name, lrs, ("adam", "adopt"), seeds=(0, 1))
    for c in s1:
        _write(tmp_path, c, acc[c.lr] + c.seed - (5 if c.optimizer == "adopt" else 0))
    results = tr._results(tmp_path, task.name, s1)
    ana = tr.analyse(task, results, lrs)

    class Capture:
        def figure(self, fig, filename, caption=""):
            self.fig = fig

    cap = Capture()
    tr._plot(task, task.title, results, ana, tmp_path, cap)
    ax = cap.fig.axes[0]
    lo, hi = ax.get_ylim()
    from matplotlib.collections import LineCollection, PathCollection

    ys = [y for line in ax.get_lines() for y in line.get_ydata()]  # means, caps
    ys += [y for col in ax.collections if isinstance(col, PathCollection)  # scatter
           for _, y in col.get_offsets()]
    ys += [y for col in ax.collections if isinstance(col, LineCollection)  # error bars
           for seg in col.get_segments() for _, y in seg]
    ys = [float(y) for y in ys if math.isfinite(float(y))]
    assert min(ys) <= 6.0  # the chance-level points were drawn
    assert all(lo <= y <= hi for y in ys), (lo, hi, sorted(ys)[:5])
