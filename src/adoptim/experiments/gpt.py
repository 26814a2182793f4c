"""Byte-level GPT (nanoGPT-style) on an offline text corpus: AdamW vs ADOPTW, small vs large batch.

The paper (Taniguchi et al., 2024, Sec. 5, GPT-2 pretraining on OpenWebText with nanoGPT)
reports that with a small batch Adam's training loss spikes and ADOPT's does not, while with
a large batch both train alike. Here the same comparison runs at CPU scale on a real corpus
that needs no download:

* ``--dataset stdlib`` (default): every ``.py`` file of this Python's standard library (test
  packages and site-packages left out), concatenated in sorted path order, as bytes;
* ``--dataset kjv``: the King James Bible from Debian ``bible-kjv-text`` + ``bible-kjv``
  (``bible -f gen1:1-rev22:21``);
* or a path to any text file.

The last ``val_fraction`` of the bytes is held out for validation. The model is nanoGPT's
(pre-LayerNorm blocks, tied embeddings, GELU MLP, no bias) over a 256-symbol byte vocabulary.
Both optimizers get the same parameter groups (weight decay on >=2-D tensors only), the same
lr schedule (linear warmup, cosine decay to ``min_lr``) and gradient clipping.

**Loss spikes** (see :func:`find_spikes`): step t is a spike when its training loss exceeds
``spike_ratio`` x the median of the previous ``spike_window`` steps' losses (after warmup);
consecutive spike steps count as one spike.

Runs unchanged on one CPU, on a GPU, or under torchrun (DDP: gloo on CPU, nccl on CUDA);
``batch_size`` is the global batch in sequences, split over ranks and ``grad_accum`` steps::

    # one run on CPU
    python -m adoptim.experiments.gpt --optimizer adoptw --batch-size 8 --max-iters 600
    # 2 CPU processes (gloo)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m adoptim.experiments.gpt \\
        --optimizer adoptw --batch-size 8 --max-iters 600
    # one GPU, GPT-2-small-like shape (bf16 autocast and torch.compile on CUDA)
    python -m adoptim.experiments.gpt --device cuda --compile true --n-layer 12 --n-head 12 \\
        --n-embd 768 --block-size 1024 --batch-size 96 --grad-accum 8 --max-iters 20000 \\
        --lr 6e-4 --min-lr 6e-5 --warmup-iters 2000 --dataset kjv
    # 8 GPUs on one node (nccl)
    torchrun --standalone --nproc_per_node=8 -m adoptim.experiments.gpt --device cuda \\
        --compile true --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 \\
        --batch-size 480 --grad-accum 5 --max-iters 20000 --optimizer adoptw
    # the sweep + report (AdamW/ADOPTW x small/large batch x seeds)
    adoptim reproduce gpt --full
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
import shutil
import subprocess
import sysconfig
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

__all__ = ["EXPERIMENT", "GPT", "Args", "find_spikes", "get_lr", "load_corpus", "train",
           "centered_mean"]


@dataclass
class Args:
    optimizer: str = "adoptw"
    """adamw or adoptw (any name for experiments.optimizers works)"""
    seed: int = 0
    """seed of the run (initialisation and batch order)"""
    dataset: str = "stdlib"
    """stdlib (Python's standard-library source), kjv (Debian bible-kjv), or a text file path"""
    max_bytes: int = 4_000_000
    """use at most this many bytes of the corpus (0: all)"""
    val_fraction: float = 0.1
    """the last fraction of the bytes, held out for validation"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 3
    """attention heads"""
    n_embd: int = 96
    """embedding width"""
    block_size: int = 64
    """context length in bytes"""
    dropout: float = 0.0
    """dropout rate (0 for pretraining, as in nanoGPT)"""
    batch_size: int = 8
    """global batch in sequences per optimizer step (split over ranks and grad_accum)"""
    grad_accum: int = 1
    """micro-steps per optimizer step on each rank"""
    max_iters: int = 500
    """optimizer steps"""
    lr: float = 2e-3
    """peak learning rate (same for both optimizers)"""
    min_lr: float = 2e-4
    """learning rate at the end of the cosine decay"""
    warmup_iters: int = 50
    """linear warmup steps"""
    weight_decay: float = 0.1
    """decoupled weight decay on >=2-D tensors"""
    adam_beta2: float = 0.95
    """beta2 for adam/adamw (nanoGPT's 0.95)"""
    adopt_beta2: float = 0.9999
    """beta2 for adopt/adoptw (the paper's default)"""
    beta1: float = 0.9
    """beta1 for both"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (0: off)"""
    eval_interval: int = 50
    """steps between evaluations"""
    eval_iters: int = 10
    """batches per evaluation (the same batches every time)"""
    eval_batch_size: int = 16
    """sequences per evaluation batch"""
    spike_ratio: float = 1.3
    """a step is a loss spike when its loss > spike_ratio x the running median"""
    spike_window: int = 50
    """steps in the running median"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda:LOCAL_RANK when available, else cpu)"""
    compile: bool = False
    """torch.compile the model (useful on GPU)"""
    threads: int = 0
    """torch intra-op threads on CPU (0: ADOPTIM_THREADS or 1)"""


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(dataset: str, max_bytes: int = 0) -> bytes:
    """The corpus as bytes (deterministic for a given Python / package version)."""
    if dataset == "stdlib":
        chunks, total = [], 0
        for p in _stdlib_files():
            b = p.read_bytes() + b"\n"
            chunks.append(b)
            total += len(b)
            if max_bytes and total >= max_bytes:
                break
        data = b"".join(chunks)
    elif dataset == "kjv":
        if shutil.which("bible") is None:
            raise FileNotFoundError(
                "dataset kjv needs the Debian packages bible-kjv-text and bible-kjv "
                "(apt-get install bible-kjv-text bible-kjv)")
        data = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True,
                              check=True).stdout
    else:
        data = Path(dataset).read_bytes()
    return data[:max_bytes] if max_bytes else data


# ----------------------------------------------------------------------------- model (nanoGPT)
class CausalSelfAttention(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        assert a.n_embd % a.n_head == 0
        self.c_attn = nn.Linear(a.n_embd, 3 * a.n_embd, bias=False)
        self.c_proj = nn.Linear(a.n_embd, a.n_embd, bias=False)
        self.n_head, self.dropout = a.n_head, a.dropout
        self.resid_dropout = nn.Dropout(a.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.c_fc = nn.Linear(a.n_embd, 4 * a.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * a.n_embd, a.n_embd, bias=False)
        self.dropout = nn.Dropout(a.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.ln_1 = nn.LayerNorm(a.n_embd, bias=False)
        self.attn = CausalSelfAttention(a)
        self.ln_2 = nn.LayerNorm(a.n_embd, bias=False)
        self.mlp = MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT over bytes (vocabulary 256), tied input/output embeddings."""

    vocab_size = 256

    def __init__(self, a: Args):
        super().__init__()
        self.block_size = a.block_size
        self.wte = nn.Embedding(self.vocab_size, a.n_embd)
        self.wpe = nn.Embedding(a.block_size, a.n_embd)
        self.drop = nn.Dropout(a.dropout)
        self.h = nn.ModuleList([Block(a) for _ in range(a.n_layer)])
        self.ln_f = nn.LayerNorm(a.n_embd, bias=False)
        self.lm_head = nn.Linear(a.n_embd, self.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * a.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        _, T = idx.shape  # (B, T)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, 256)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def configure_optimizer(model: nn.Module, a: Args) -> torch.optim.Optimizer:
    """Weight decay on >=2-D tensors (matmuls, embeddings), none on the LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    beta2 = a.adopt_beta2 if a.optimizer.lower().startswith("adopt") else a.adam_beta2
    return make_optimizer(a.optimizer, groups, lr=a.lr, betas=(a.beta1, beta2))


def get_lr(it: int, a: Args) -> float:
    # 1) linear warmup for warmup_iters steps
    if it < a.warmup_iters:
        return a.lr * (it + 1) / (a.warmup_iters + 1)
    # 2) past the end of the schedule, min_lr
    if it >= a.max_iters:
        return a.min_lr
    # 3) in between, cosine decay from lr down to min_lr
    ratio = (it - a.warmup_iters) / max(1, a.max_iters - a.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return a.min_lr + coeff * (a.lr - a.min_lr)


def find_spikes(losses, ratio: float = 1.3, window: int = 50, start: int = 0) -> list[int]:
    """Indices where a loss spike starts.

    Index t (t >= max(start, window)) is a spike step when ``losses[t] > ratio * median(
    losses[t-window:t])``; a run of consecutive spike steps is one spike, reported at its
    first index.
    """
    x = np.asarray(losses, dtype=float)
    onsets, prev = [], False
    for t in range(max(start, window), len(x)):
        med = np.median(x[t - window:t])
        hit = bool(x[t] > ratio * med) or not np.isfinite(x[t])
        if hit and not prev:
            onsets.append(t)
        prev = hit
    return onsets


def max_ratio_to_median(losses, window: int = 50, start: int = 0) -> float:
    """max over t of losses[t] / median(losses[t-window:t]) (a continuous spike size)."""
    x = np.asarray(losses, dtype=float)
    r = [x[t] / np.median(x[t - window:t]) for t in range(max(start, window), len(x))]
    return float(max(r)) if r else float("nan")


# ----------------------------------------------------------------------------- one run
def _dist_setup(a: Args):
    """(rank, world_size, local_rank, device); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if a.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, local_rank, device


def train(a: Args, ctx=None) -> dict:
    """One run. Under torchrun every rank calls this; only rank 0 should pass a ``ctx``."""
    set_threads(a.threads or None)
    rank, world, _, device = _dist_setup(a)
    ddp = world > 1
    if a.batch_size % (world * a.grad_accum):
        raise ValueError(f"batch_size {a.batch_size} must be divisible by world_size x "
                         f"grad_accum = {world} x {a.grad_accum}")
    micro_bs = a.batch_size // (world * a.grad_accum)
    # ---- seeding: same init on every rank; each rank draws its own batches
    seed_everything(a.seed)
    batch_gen = torch.Generator().manual_seed(a.seed * 1000 + rank)

    data = np.frombuffer(load_corpus(a.dataset, a.max_bytes), dtype=np.uint8)
    n_val = int(len(data) * a.val_fraction)
    splits = {"train": torch.from_numpy(data[:-n_val].copy()),
              "val": torch.from_numpy(data[-n_val:].copy())}
    tokens_per_iter = a.batch_size * a.block_size

    def get_batch(split, bs, gen):
        d = splits[split]
        ix = torch.randint(len(d) - a.block_size - 1, (bs,), generator=gen)
        x = torch.stack([d[i:i + a.block_size] for i in ix]).long()  # (B, T)
        y = torch.stack([d[i + 1:i + 1 + a.block_size] for i in ix]).long()
        return x.to(device), y.to(device)

    model = GPT(a).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = configure_optimizer(model, a)
    raw_model = model
    if a.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = (torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else None)
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype
                else contextlib.nullcontext())
    if rank == 0:
        msg = (f"GPT: {n_params / 1e6:.2f}M params, {len(splits['train'])} train / "
               f"{len(splits['val'])} val bytes, {tokens_per_iter} tokens/step, world {world}, "
               f"device {device}, optimizer {type(optimizer).__name__}")
        if ctx is not None:
            ctx.write(msg)  # between the progress bars, not through them
        else:
            print(msg, flush=True)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss on the same eval_iters batches of each split every time (all ranks
        compute the same numbers, so no communication is needed)."""
        raw_model.eval()
        out = {}
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(12345)
            losses = []
            for _ in range(a.eval_iters):
                x, y = get_batch(split, a.eval_batch_size, gen)
                with autocast:
                    losses.append(raw_model(x, y)[1].item())
            out[split] = float(np.mean(losses))
        raw_model.train()
        return out

    train_losses: list[float] = []
    evals: list[dict] = []
    bar = ctx.bar(total=a.max_iters) if ctx is not None else None
    t0 = time.time()
    for it in range(a.max_iters + 1):
        lr = get_lr(it, a)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % a.eval_interval == 0 or it == a.max_iters:
            ev = estimate_loss()
            evals.append({"step": it, **ev})
            if ctx is not None:
                ctx.log(step=it, **{"val/loss": ev["val"], "eval/train_loss": ev["train"],
                                    "train/loss": train_losses[-1] if train_losses else ev["train"],
                                    "train/lr": lr, "perf/seconds": time.time() - t0})
        if it == a.max_iters:
            break
        # ---- forward/backward with gradient accumulation; DDP syncs only on the last one
        loss_sum = 0.0
        for micro in range(a.grad_accum):
            x, y = get_batch("train", micro_bs, batch_gen)
            sync = contextlib.nullcontext() if (not ddp or micro == a.grad_accum - 1) \
                else model.no_sync()
            with sync, autocast:
                _, loss = model(x, y)
                (loss / a.grad_accum).backward()
            loss_sum += loss.detach()
        loss_t = loss_sum / a.grad_accum
        if ddp:  # the global batch's loss, for spike counting (gloo had no AVG before 2.6)
            torch.distributed.all_reduce(loss_t)
            loss_t /= torch.distributed.get_world_size()
        if a.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip).item()
        else:
            grad_norm = float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_f = float(loss_t)  # a sync point on GPU; fine at this scale
        train_losses.append(loss_f)
        if ctx is not None:
            ctx.step_loss(loss_f)
            ctx.log(step=it + 1, **{"train/loss": loss_f, "train/lr": lr,
                                    "train/grad_norm": grad_norm,
                                    "perf/seconds": time.time() - t0})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    spikes = find_spikes(train_losses, a.spike_ratio, a.spike_window, start=a.warmup_iters)
    result = {
        "val/final_loss": evals[-1]["val"],
        "val/best_loss": min(e["val"] for e in evals),
        "train/final_eval_loss": evals[-1]["train"],
        "train/last50_loss": float(np.mean(train_losses[-50:])),
        "spikes/count": len(spikes),
        "spikes/steps": spikes,
        "spikes/max_ratio": max_ratio_to_median(train_losses, a.spike_window, a.warmup_iters),
        "train/finite": bool(np.all(np.isfinite(train_losses))),
        "perf/seconds": seconds,
        "perf/tokens_per_sec": tokens_per_iter * a.max_iters / seconds,
        "model/params": n_params,
        "world_size": world,
    }
    return result


# ----------------------------------------------------------------------------- sweeps, report
SMALL_BATCH, LARGE_BATCH = 4, 16


def quick_sweep() -> list[Args]:
    """The ``--quick`` profile: a smoke test (seconds), AdamW vs ADOPTW at both batch sizes."""
    base = Args(n_layer=2, n_head=2, n_embd=64, block_size=64, max_iters=60, warmup_iters=10,
                eval_interval=20, eval_iters=2, max_bytes=400_000, spike_window=20)
    return [replace(base, optimizer=o, batch_size=b) for o in ("adamw", "adoptw")
            for b in (SMALL_BATCH, LARGE_BATCH)]


def full_sweep() -> list[Args]:
    """CPU-sized full profile: AdamW (beta2 0.95) vs ADOPTW (beta2 0.9999, the paper's
    default, and 0.999) x small (4) / large (16) batch x 2 seeds, 3,000 steps of the
    default 0.36M-parameter model with a 64-byte context (about 25 min on one core); plus
    AdamW vs ADOPTW at 5x the lr (1e-2) with the small batch.

    ADOPT has no bias correction: v starts at g_1^2 and, with beta2 = 0.9999, still holds 74%
    of that first value after 3,000 steps; the 0.999 variant shows how much of a gap at this
    short horizon is that."""
    base = Args(max_iters=3000, warmup_iters=100, eval_interval=100)
    sweep = [replace(base, optimizer=o, batch_size=b, seed=s) for b in (SMALL_BATCH, LARGE_BATCH)
             for s in (1, 2) for o in ("adamw", "adoptw")]
    sweep += [replace(base, optimizer="adoptw", adopt_beta2=0.999, batch_size=b, seed=s)
              for b in (SMALL_BATCH, LARGE_BATCH) for s in (1, 2)]
    # a stress arm: 5x the peak lr at the small batch, where spikes are likeliest
    return sweep + [replace(base, optimizer=o, batch_size=SMALL_BATCH, seed=s, lr=1e-2,
                            min_lr=1e-3) for s in (1, 2) for o in ("adamw", "adoptw")]


_KEYS = ["optimizer", "batch_size", "seed", "max_iters"]


def _label(c: dict) -> str:
    adopt = c["optimizer"].lower().startswith("adopt")
    return f"{c['optimizer']} (beta2 {c['adopt_beta2'] if adopt else c['adam_beta2']})"


def run(sweep, out: Path, progress: bool = True) -> None:
    sweep = sweep if isinstance(sweep, list) else [sweep]
    run_sweep(sweep, out, train, name="gpt", keys=_KEYS, progress=progress)


MA_STEPS = 25  # moving-average window of the training-loss plot
LINESTYLES = ("-", "--", "-.", ":")  # so that curves lying on top of each other stay visible


def centered_mean(values, window: int) -> np.ndarray:
    """A moving average without lag or lost ends: at index i the mean of the values within
    ``window // 2`` of i on both sides, the half-width shrinking near either end (the first
    and last points are the raw values), so that it covers every step and follows a falling
    loss instead of trailing above it."""
    x = np.asarray(values, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(len(x))
    h = np.minimum(np.minimum(window // 2, i), len(x) - 1 - i)
    return (c[i + h + 1] - c[i - h]) / (2 * h + 1)


def report(sweep, out: Path) -> Path:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    from adoptim.experiments._part2 import curve_band

    results = load_results(out, sweep)  # only this sweep's runs
    rep = Report(out, "Byte-level GPT: AdamW vs ADOPTW, small vs large batch")
    if results:
        c0 = results[0]["config"]
        seeds = sorted({r["config"]["seed"] for r in results})
        corpus = (f"the first {c0['max_bytes']:,} bytes" if c0["max_bytes"] else "all")
        rep.text(f"Corpus `{c0['dataset']}`: {corpus} of it, the last "
                 f"{c0['val_fraction']:.0%} of those held out; {plural(len(seeds), 'seed')} "
                 f"({', '.join(map(str, seeds))}), the seeds column says how many each row "
                 f"has, and ± is the std over them; {c0['n_layer']} layers x {c0['n_embd']} "
                 f"wide, context {c0['block_size']}, {c0['max_iters']} steps, peak lr per row "
                 f"(warmup {c0['warmup_iters']}, cosine to lr/{c0['lr'] / c0['min_lr']:g}), clip "
                 f"{c0['grad_clip']}, AdamW betas ({c0['beta1']}, {c0['adam_beta2']}), "
                 f"ADOPTW betas ({c0['beta1']}, {c0['adopt_beta2']}), weight decay "
                 f"{c0['weight_decay']}. Spike: loss > {c0['spike_ratio']} x median of the "
                 f"previous {c0['spike_window']} steps, after warmup.")
    batches = sorted({(r["config"]["batch_size"], r["config"]["lr"]) for r in results})
    for r in results:
        r["label"] = _label(r["config"])
    opts = sorted({r["label"] for r in results})
    rows = []
    fig, axes = new_figure(2, max(1, len(batches)))
    for j, (b, lr) in enumerate(batches):
        for k, o in enumerate(opts):
            rs = [r for r in results if r["config"]["batch_size"] == b
                  and r["config"]["lr"] == lr and r["label"] == o]
            if not rs:
                continue
            v = summarize(r["val/final_loss"] for r in rs)
            sp = [r["spikes/count"] for r in rs]
            mr = summarize(r["spikes/max_ratio"] for r in rs)
            secs = summarize(r["seconds"] for r in rs)
            rows.append([b, lr, o, v["n"], fmt_mean_std(v, 4),
                         f"{summarize(r['train/last50_loss'] for r in rs)['mean']:.4f}",
                         f"{sum(sp)} ({', '.join(map(str, sp))})", f"{mr['max']:.2f}",
                         f"{secs['mean']:.0f}"])
            color = f"C{k}"
            tr_curves, va_curves = [], []
            for r in rs:
                m = load_metrics(r["dir"])
                tr = [(row["step"], row["train/loss"]) for row in m if "train/grad_norm" in row]
                va = [(row["step"], row["val/loss"]) for row in m if "val/loss" in row]
                tr_curves.append(([s for s, _ in tr], [x for _, x in tr]))
                va_curves.append(([s for s, _ in va], [x for _, x in va]))
                axes[0][j].plot(*tr_curves[-1], lw=0.3, alpha=0.25, color=color)
                # a centred moving average, to see the trend through the noise, from step 1
                axes[0][j].plot(tr_curves[-1][0], centered_mean(tr_curves[-1][1], MA_STEPS),
                                lw=1.0, color=color, ls=LINESTYLES[k % len(LINESTYLES)])
                for s in r["spikes/steps"]:
                    axes[0][j].axvline(s + 1, color=color, lw=0.6, ls=":")
            for curves, ax in ((va_curves, axes[1][j]),):
                band = curve_band(curves)
                if band is not None:
                    g, mean, lo, hi = band
                    ax.plot(g, mean, color=color, marker=".",
                            ls=LINESTYLES[k % len(LINESTYLES)], label=curve_label(o, len(rs)))
                    ax.fill_between(g, lo, hi, color=color, alpha=0.2)
            axes[0][j].plot([], [], color=color, ls=LINESTYLES[k % len(LINESTYLES)], label=o)
        axes[0][j].set_title(f"batch {b}, lr {lr}: training loss (dotted: spikes)", fontsize=10)
        axes[1][j].set_title(f"batch {b}, lr {lr}: validation loss", fontsize=10)
        for i in (0, 1):
            # every step from the first, on a log scale: the early drop from ln 256 = 5.5 and
            # the small late differences are both readable
            axes[i][j].set_yscale("log")
            axes[i][j].yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8)))
            axes[i][j].yaxis.set_major_formatter(FormatStrFormatter("%g"))
            axes[i][j].yaxis.set_minor_formatter(NullFormatter())
            axes[i][j].set_xlim(left=0)
            axes[i][j].set_xlabel("step")
            axes[i][j].set_ylabel("loss (nats/byte, log scale)")
            axes[i][j].legend(fontsize=8)
    steps = results[0]["config"]["max_iters"] if results else Args.max_iters
    rep.table(["batch", "peak lr", "optimizer", "seeds", "final val loss (mean ± std)",
               tail_label("train loss", steps), "spikes total (per seed)",
               "max loss / running median", "seconds/run"], rows)
    rep.figure(fig, "gpt_loss.png", "Top: training loss of every seed from step 1, raw "
                                    f"(faint) and its centred {MA_STEPS}-step moving average; "
                                    "spikes dotted. Bottom: validation loss at each evaluation "
                                    "(dots), mean and min-max over seeds. Log scale.")
    return rep.write()


EXPERIMENT = Experiment(
    name="gpt",
    description="byte-level nanoGPT on Python's stdlib source: AdamW vs ADOPTW, small/large batch",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
)


def main(argv=None) -> int:
    """One run; under torchrun rank 0 writes the run folder, the other ranks only train."""
    from adoptim.experiments._part2 import parse_args
    from adoptim.experiments.runner import RunContext, config_dict, run_id

    def extra(p):
        p.add_argument("--out", default="results/gpt", help="results folder")

    a, ns = parse_args(Args, argv, description=__doc__.splitlines()[0], extra=extra)
    rank = int(os.environ.get("RANK", "0"))
    ctx = None
    if rank == 0:
        print(dataclasses.asdict(a), flush=True)
        run_dir = Path(ns.out) / "runs" / run_id(a, _KEYS)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(__import__("json").dumps(config_dict(a), indent=1))
        ctx = RunContext(run_dir, a, progress=False)
    try:
        result = train(a, ctx)
        if ctx is not None:
            ctx.finish(result)
            print(__import__("json").dumps(result, default=float), flush=True)
            print(f"run folder: {run_dir}", flush=True)
    finally:
        if ctx is not None:
            ctx.close()
        if torch.distributed.is_initialized():
            # DDP's reference cycles go before gloo does, or gloo can abort at exit.
            gc.collect()
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
