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
