"""The toy counterexample: the paper's claim, the ablation code, and the experiment at tiny size."""

from __future__ import annotations

import torch

from adoptim.experiments import toy
from adoptim.experiments.toy import ABLATIONS, ToyConfig, simulate, toy_gradient


def _median(theta: torch.Tensor) -> list[float]:
    """theta (B, K, S) -> median over seeds per beta2 (first k only)."""
    return theta[:, 0].median(-1).values.tolist()


def test_gradient_distribution():
    ks = torch.tensor([[10.0], [50.0]])
    g = toy_gradient(ks, torch.rand(2, 200_000, generator=torch.Generator().manual_seed(0)))
    assert set(g[0].unique().tolist()) == {100.0, -10.0}
    assert set(g[1].unique().tolist()) == {2500.0, -50.0}
    # E[g] = k^2/k - k(1 - 1/k) = 1 > 0: minimiser at -1
    assert abs(g[0].mean().item() - 1.0) < 0.15
    assert abs((g[0] == 100).float().mean().item() - 0.1) < 0.005


def test_claim_adam_fails_adopt_converges_k10():
    """k = 10: Adam with beta2 = 0.1 ends near +1; ADOPT ends near -1 for beta2 in {0.1, 0.5,
    0.999}, clipped (the default) and unclipped."""
    common = dict(ks=(10,), n_seeds=64, alpha=0.5)
    adam = simulate(ToyConfig(optimizer="adam", beta2s=(0.1,), steps=3000, **common))
    assert _median(adam)[0] > 0.5
    assert (adam[0, 0] > 0).float().mean() > 0.8
    betas = (0.1, 0.5, 0.999)
    noclip = simulate(ToyConfig(optimizer="adopt-noclip", beta2s=betas, steps=3000, **common))
    assert max(_median(noclip)) < -0.5
    # clipped ADOPT needs c_t = t^0.25 above the normalised spike k^2/|k| = 10, i.e. t > 1e4
    clipped = simulate(ToyConfig(optimizer="adopt", beta2s=betas, steps=12_000, **common))
    assert max(_median(clipped)) < -0.5
    assert (clipped < 0).float().mean() > 0.8


def test_theta_stays_in_the_box_and_seeds_differ():
    th = simulate(ToyConfig(optimizer="adam", ks=(10, 50), steps=200, n_seeds=32))
    assert th.shape == (3, 2, 32)
    assert th.min() >= -1 and th.max() <= 1
    assert th[0, 0].unique().numel() > 1  # elements are independent runs
    again = simulate(ToyConfig(optimizer="adam", ks=(10, 50), steps=200, n_seeds=32))
    assert torch.equal(th, again)


def test_handwritten_both_changes_equals_real_unclipped_adopt():
    """The ablation's 'both changes' update is unclipped ADOPT; the real optimizer must agree."""
    cfg = ToyConfig(ks=(10, 50), steps=500, n_seeds=16)
    real = simulate(ToyConfig(**{**cfg.__dict__, "optimizer": "adopt-noclip"}))
    hand = simulate(ToyConfig(**{**cfg.__dict__, "optimizer": "abl-both"}))
    torch.testing.assert_close(real, hand, rtol=1e-5, atol=1e-5)
    # and the variants differ from each other
    finals = {n: simulate(ToyConfig(**{**cfg.__dict__, "optimizer": n})) for n in ABLATIONS}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(finals[a], finals[b]), (a, b)


def test_ablation_step_by_hand():
    """Two calls of each variant on one scalar, against numbers worked out by hand."""
    b1, b2, lr = 0.5, 0.5, 1.0
    g0, g1 = torch.tensor([2.0]), torch.tensor([4.0])
    expected = {
        # v0 = 4. neither: v1 = .5*4 + .5*16 = 10, m = .5*4 = 2, step = 2/sqrt(10)
        (False, False): -2 / 10**0.5,
        # prev_v: m = 2, step = 2/sqrt(4) = 1
        (True, False): -1.0,
        # norm_first: v1 = 10, m = .5 * 4/sqrt(10)
        (False, True): -0.5 * 4 / 10**0.5,
        # both: m = .5 * 4/2 = 1
        (True, True): -1.0,
    }
    for (prev_v, norm_first), want in expected.items():
        theta, m, v = torch.zeros(1), torch.zeros(1), torch.zeros(1)
        for t, g in enumerate((g0, g1)):
            toy.ablation_step(theta, m, v, g, t, lr, b1, b2, 0.0, prev_v, norm_first)
        assert abs(theta.item() - want) < 1e-6, (prev_v, norm_first, theta.item(), want)


def test_experiment_tiny(tmp_path):
    sweep = toy.sweep_configs(steps=300, n_seeds=8, n_records=20)
    toy.EXPERIMENT.run(sweep, tmp_path, progress=False)
    path = toy.EXPERIMENT.report(sweep, tmp_path)
    text = path.read_text()
    for name in (*toy.OPTIMIZERS, *ABLATIONS):
        assert f"| {toy.LABELS[name]} |" in text
    assert "α_t = α/√t" in text and "300" in text
    assert (tmp_path / "toy_theta.png").exists() and (tmp_path / "toy_ablation.png").exists()
    # rerun resumes: nothing runs again, the files stay
    mtimes = {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/result.json")}
    toy.EXPERIMENT.run(sweep, tmp_path, progress=False)
    assert {p: p.stat().st_mtime for p in tmp_path.glob("runs/*/result.json")} == mtimes


def test_toy_cli_prints_table(capsys, tmp_path):
    from adoptim.tools.cli import main

    out_json = tmp_path / "t.json"
    rc = main(["toy", "--steps", "200", "--seeds", "8", "--no-progress", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("adam", "amsgrad", "adopt", "adopt-noclip"):
        assert f"| {name} | 10 |" in out and f"| {name} | 50 |" in out
    assert "beta2=0.1" in out and "beta2=0.999" in out
    table = __import__("json").loads(out_json.read_text())
    assert len(table) == 4 * 2 * 3
