"""GPT experiment: corpus, schedule, spike counting, a tiny run, and a 2-process DDP run
(gloo on CPU, started and stopped by the test)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from adoptim.experiments import gpt

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--max-bytes", "200000", "--max-iters", "6", "--warmup-iters", "2",
        "--eval-interval", "3", "--eval-iters", "2", "--eval-batch-size", "4",
        "--spike-window", "2"]


def test_stdlib_corpus_is_deterministic_python_source():
    a = gpt.load_corpus("stdlib", 100_000)
    b = gpt.load_corpus("stdlib", 100_000)
    assert a == b and len(a) == 100_000
    assert b"def " in a and b"import " in a


def test_text_file_corpus(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"hello world\n" * 10)
    assert gpt.load_corpus(str(p), 20) == b"hello world\nhello wo"


def test_lr_schedule():
    a = gpt.Args(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert gpt.get_lr(0, a) == pytest.approx(1 / 11)
    assert gpt.get_lr(10, a) == pytest.approx(1.0)
    assert gpt.get_lr(60, a) == pytest.approx(0.55)
    assert gpt.get_lr(110, a) == pytest.approx(0.1)


def test_find_spikes():
    losses = [2.0] * 30 + [3.0, 3.1, 2.0] + [2.0] * 10 + [2.7] + [2.0] * 5 + [float("nan")]
    assert gpt.find_spikes(losses, ratio=1.3, window=10) == [30, 43, 49]
    assert gpt.find_spikes(losses, ratio=1.3, window=10, start=35) == [43, 49]
    assert gpt.find_spikes([2.0] * 100, ratio=1.3, window=10) == []
    assert gpt.max_ratio_to_median(losses[:40], window=10) == pytest.approx(1.55)


def test_model_shapes_and_tied_embeddings():
    a = gpt.Args(n_layer=1, n_head=2, n_embd=16, block_size=8)
    model = gpt.GPT(a)
    assert model.lm_head.weight is model.wte.weight
    logits, loss = model(torch.randint(0, 256, (3, 8)), torch.randint(0, 256, (3, 8)))
    assert logits.shape == (3, 8, 256)
    assert loss.item() == pytest.approx(math.log(256), rel=0.05)  # near-uniform at init


@pytest.mark.parametrize("optimizer", ["adamw", "adoptw"])
def test_tiny_run_single_process(optimizer):
    from adoptim.experiments._part2 import parse_args

    a, _ = parse_args(gpt.Args, TINY + ["--optimizer", optimizer, "--batch-size", "4"])
    out = gpt.train(a)
    assert out["train/finite"] and out["world_size"] == 1
    assert math.isfinite(out["val/final_loss"])
    assert out["val/final_loss"] < math.log(256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tmp_path):
    """`torchrun --nproc_per_node=2` on loopback: both ranks train in sync, rank 0 writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "adoptim.experiments.gpt", *TINY, "--batch-size", "4", "--device", "cpu",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # clean up the whole process group on timeout/failure
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    (result_file,) = tmp_path.glob("runs/*/result.json")
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 2 and result["train/finite"]
    assert "world 2" in output


def test_registered():
    from adoptim.experiments import get_experiment

    full = get_experiment("gpt").full()
    assert {(c.optimizer, c.batch_size) for c in full} == {
        (o, b) for o in ("adamw", "adoptw") for b in (gpt.SMALL_BATCH, gpt.LARGE_BATCH)}


def test_centered_mean_has_no_lag_and_no_lost_ends():
    line = [float(i) for i in range(40)]
    assert gpt.centered_mean(line, 25).tolist() == line  # a straight line stays put
    noisy = [5.0, 1.0, 5.0, 1.0, 5.0]
    smooth = gpt.centered_mean(noisy, 3)
    assert len(smooth) == 5 and smooth[0] == 5.0 and smooth[-1] == 5.0  # ends: raw values
    assert smooth[1:4].tolist() == pytest.approx([11 / 3, 7 / 3, 11 / 3])


def test_loss_plot_shows_every_step_from_the_first(tmp_path, monkeypatch):
    from adoptim.experiments.runner import RESULT_FILE, Report, config_dict

    figures = {}
    original = Report.figure

    def keep(self, fig, filename, caption=""):
        figures[filename] = fig
        return original(self, fig, filename, caption)

    monkeypatch.setattr(Report, "figure", keep)
    sweep = [gpt.Args(optimizer=o, max_iters=60, warmup_iters=10) for o in ("adamw", "adoptw")]
    for i, a in enumerate(sweep):  # finished runs, written by hand: losses from ln 256 down
        d = tmp_path / "runs" / f"run{i}"
        d.mkdir(parents=True)
        rows = [{"step": 0, "val/loss": 5.55}]
        rows += [{"step": s, "train/loss": 5.55 - s / 30, "train/grad_norm": 1.0}
                 for s in range(1, 61)]
        rows += [{"step": 60, "val/loss": 3.5}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / RESULT_FILE).write_text(json.dumps({
            "config": config_dict(a), "seconds": 1.0, "val/final_loss": 3.5,
            "train/last50_loss": 4.0, "spikes/count": 0, "spikes/steps": [],
            "spikes/max_ratio": 1.0}))
    text = gpt.report(sweep, tmp_path).read_text()
    assert "(1 seed)" in text and "± 0.0000" not in text
    ax = figures["gpt_loss.png"].axes[0]  # batch 8: training loss
    for line in ax.get_lines():
        x = line.get_xdata()
        if len(x):  # the raw curve and its moving average: steps 1..60, none cut off
            assert list(x) == list(range(1, 61))
    lo, hi = ax.get_ylim()
    assert hi >= 5.5 and lo <= 3.6  # the whole curve is inside the axes
