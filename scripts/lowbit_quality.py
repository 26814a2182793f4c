"""8-bit ADOPT next to float32 ADOPT (and torchao's AdamW8bit on the MLP) on the project's
experiments, same seeds and settings; results to JSON, report and plot.

    python scripts/lowbit_quality.py toy mlp vae gpt --out runs/lowbit_quality
    python scripts/lowbit_quality.py --report-only --out runs/lowbit_quality --publish docs/results/lowbit

Each experiment's own ``train``/``simulate`` runs (the code ``adoptim reproduce`` runs), with
the optimizer picked by registry name (``adopt`` vs ``adopt-8bit`` etc., see
``adoptim.experiments.optimizers``). Runs already in OUT/runs.json are skipped (resumable).

* toy: the convex counterexample at k = 10, beta2 in {0.1, 0.5, 0.999}, 256 seeds as one
  tensor per beta2 (so the seeds share 8-bit blocks), ``adopt-8bit-all`` (every tensor 8-bit:
  the 256-element tensors are under the 4,096 threshold), ``--toy-steps`` steps;
* mlp: MNIST-5k (30 epochs) and Fashion-MNIST (10 epochs), the full profile's settings,
  seeds 1-3: adopt, adopt-8bit, adamw8bit-torchao;
* vae: the full profile (15 epochs, K = 64), seeds 1-3: adopt, adopt-8bit;
* gpt: the full profile's large-batch arm (batch 16, 3,000 steps), seeds 1-3: adoptw,
  adoptw-8bit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

ARMS = {
    "toy": ("adopt", "adopt-8bit-all"),
    "mlp": ("adopt", "adopt-8bit", "adamw8bit-torchao"),
    "vae": ("adopt", "adopt-8bit"),
    "gpt": ("adoptw", "adoptw-8bit"),
}
SEEDS = (1, 2, 3)
# (metric, lower is better)
METRICS = {
    "toy": [("final theta, median over seeds", True)],
    "mlp": [("test/acc", False), ("train/loss", True)],
    "vae": [("test/iw_nll", True), ("test/nelbo", True)],
    "gpt": [("val/final_loss", True), ("val/best_loss", True)],
}


def _runs(out: Path) -> list[dict]:
    path = out / "runs.json"
    return json.loads(path.read_text()) if path.exists() else []


def _save(out: Path, runs: list[dict]) -> None:
    (out / "runs.json").write_text(json.dumps(runs, indent=1))


def _done(runs, **key) -> bool:
    return any(all(r.get(k) == v for k, v in key.items()) for r in runs)


def run_toy(out, runs, steps):
    from adoptim.experiments.toy import ToyConfig, simulate

    for opt in ARMS["toy"]:
        if _done(runs, experiment="toy", optimizer=opt, steps=steps):
            continue
        cfg = ToyConfig(optimizer=opt, ks=(10,), beta2s=(0.1, 0.5, 0.999), steps=steps,
                        n_seeds=256, seed=0)
        t0 = time.time()
        theta = simulate(cfg)  # (beta2, k, seeds)
        for bi, b2 in enumerate(cfg.beta2s):
            th = theta[bi, 0]
            runs.append({
                "experiment": "toy", "optimizer": opt, "steps": steps, "beta2": b2,
                "final theta, median over seeds": th.median().item(),
                "q25": th.quantile(0.25).item(), "q75": th.quantile(0.75).item(),
                "seconds": time.time() - t0,
            })  # fmt: skip
        _save(out, runs)
        print(f"toy {opt}: {time.time() - t0:.0f} s", flush=True)


def run_mlp(out, runs):
    from adoptim.experiments.mlp import MLPConfig, train

    for dataset, epochs in (("mnist5k", 30), ("fashion-mnist", 10)):
        for seed in SEEDS:
            for opt in ARMS["mlp"]:
                key = dict(experiment="mlp", dataset=dataset, optimizer=opt, seed=seed)
                if _done(runs, **key):
                    continue
                t0 = time.time()
                res = train(MLPConfig(dataset=dataset, optimizer=opt, epochs=epochs, seed=seed))
                runs.append({**key, "epochs": epochs, **res["final"],
                             "seconds": time.time() - t0})
                _save(out, runs)
                print(f"mlp {dataset} {opt} s{seed}: {res['final']['test/acc']:.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)


def run_vae(out, runs):
    from adoptim.experiments.vae import Args, train

    base = Args(epochs=15, iw_samples=64, eval_every=3)
    for seed in SEEDS:
        for opt in ARMS["vae"]:
            key = dict(experiment="vae", optimizer=opt, seed=seed)
            if _done(runs, **key):
                continue
            t0 = time.time()
            res = train(replace(base, optimizer=opt, seed=seed))
            runs.append({**key, **{k: v for k, v in res.items() if isinstance(v, (int, float))},
                         "seconds": time.time() - t0})
            _save(out, runs)
            print(f"vae {opt} s{seed}: {res['test/iw_nll']:.2f} ({time.time() - t0:.0f} s)",
                  flush=True)


def run_gpt(out, runs, steps):
    from adoptim.experiments.gpt import Args, train

    base = Args(max_iters=steps, warmup_iters=100, eval_interval=100, batch_size=16)
    for seed in SEEDS:
        for opt in ARMS["gpt"]:
            key = dict(experiment="gpt", optimizer=opt, seed=seed, steps=steps)
            if _done(runs, **key):
                continue
            t0 = time.time()
            res = train(replace(base, optimizer=opt, seed=seed))
            runs.append({**key, **{k: v for k, v in res.items() if isinstance(v, (int, float))},
                         "seconds": time.time() - t0})
            _save(out, runs)
            print(f"gpt {opt} s{seed}: {res['val/final_loss']:.4f} ({time.time() - t0:.0f} s)",
                  flush=True)


def _stats(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def report(out: Path) -> str:
    runs = _runs(out)
    lines = ["# 8-bit ADOPT vs float32 ADOPT: quality", "",
             "From `python scripts/lowbit_quality.py toy mlp vae gpt` (machine shared, 2 "
             "cores). Mean ± standard deviation over seeds; **Δ** is 8-bit minus float32; the "
             "bar is |Δ| within the float32 arm's seed spread (its standard deviation, or "
             "the spread of the two arms' seeds together where that is wider).", ""]
    for exp in ("mlp", "vae", "gpt"):
        sub = [r for r in runs if r["experiment"] == exp]
        if not sub:
            continue
        groups = sorted({r.get("dataset", "") for r in sub})
        for ds in groups:
            rows = [r for r in sub if r.get("dataset", "") == ds]
            title = f"## {exp}" + (f", {ds}" if ds else "")
            lines += [title, ""]
            header = "| optimizer | seeds | " + " | ".join(m for m, _ in METRICS[exp]) + " |"
            lines += [header, "|" + "---|" * (2 + len(METRICS[exp]))]
            base_arm = ARMS[exp][0]
            stats = {}
            for opt in ARMS[exp]:
                arm = [r for r in rows if r["optimizer"] == opt]
                if not arm:
                    continue
                cells = []
                for metric, _ in METRICS[exp]:
                    vals = [r[metric] for r in arm if metric in r]
                    stats[(opt, metric)] = (*_stats(vals), vals)
                    m, s = stats[(opt, metric)][:2]
                    cells.append(f"{m:.4f} ± {s:.4f}")
                lines.append(f"| {opt} | {len(arm)} | " + " | ".join(cells) + " |")
            lines.append("")
            for opt in ARMS[exp][1:]:
                for metric, _ in METRICS[exp]:
                    if (opt, metric) not in stats or (base_arm, metric) not in stats:
                        continue
                    m8, s8, _ = stats[(opt, metric)]
                    m32, s32, _ = stats[(base_arm, metric)]
                    verdict = "within" if abs(m8 - m32) <= max(s32, s8) else "**outside**"
                    lines.append(f"- {opt} vs {base_arm}, {metric}: Δ = {m8 - m32:+.4f} "
                                 f"(float32 std {s32:.4f}): {verdict} the seed spread")
            lines.append("")
    toy = [r for r in runs if r["experiment"] == "toy"]
    if toy:
        lines += ["## toy (k = 10, 256 seeds)", "",
                  "| optimizer | steps | β2 | final θ, median [25 %, 75 %] |", "|---|---|---|---|"]
        for r in sorted(toy, key=lambda r: (r["beta2"], r["optimizer"])):
            lines.append(f"| {r['optimizer']} | {r['steps']:,} | {r['beta2']} | "
                         f"{r['final theta, median over seeds']:+.2f} "
                         f"[{r['q25']:+.2f}, {r['q75']:+.2f}] |")
        lines.append("")
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    _plot(runs, out / "quality.png")
    return text


def _plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mlp", "mnist5k", "test/acc"), ("mlp", "fashion-mnist", "test/acc"),
              ("vae", "", "test/iw_nll"), ("gpt", "", "val/final_loss")]
    panels = [p for p in panels
              if any(r["experiment"] == p[0] and r.get("dataset", "") == p[1] for r in runs)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (exp, ds, metric) in zip(axes[0], panels):
        for i, opt in enumerate(ARMS[exp]):
            vals = [r[metric] for r in runs if r["experiment"] == exp
                    and r.get("dataset", "") == ds and r["optimizer"] == opt]
            if vals:
                ax.scatter([i] * len(vals), vals, color="k", s=14, zorder=3)
                ax.bar(i, statistics.fmean(vals), color="tab:orange" if "8bit" in opt
                       else "tab:blue", alpha=0.6)
        ax.set_xticks(range(len(ARMS[exp])), ARMS[exp], rotation=15, fontsize=8)
        ax.set_title(f"{exp} {ds}".strip() + f": {metric}", fontsize=9)
        vals = [r[metric] for r in runs if r["experiment"] == exp and r.get("dataset", "") == ds]
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.5 + 1e-6
        ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle("8-bit vs float32 state: seeds (dots) and means (bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiments", nargs="*", default=[], help=f"any of {', '.join(ARMS)}")
    ap.add_argument("--out", type=Path, default=Path("runs/lowbit_quality"))
    ap.add_argument("--toy-steps", type=int, default=100_000)
    ap.add_argument("--gpt-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--publish", type=Path, default=None, help="copy report, runs, plot here")
    args = ap.parse_args()
    unknown = [e for e in args.experiments if e not in ARMS]
    if unknown:
        ap.error(f"unknown experiment(s) {unknown}; choose from {', '.join(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        runs = _runs(args.out)
        for exp in args.experiments:
            if exp == "toy":
                run_toy(args.out, runs, args.toy_steps)
            elif exp == "mlp":
                run_mlp(args.out, runs)
            elif exp == "vae":
                run_vae(args.out, runs)
            elif exp == "gpt":
                run_gpt(args.out, runs, args.gpt_steps)
    print(report(args.out))
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "runs.json", "quality.png"):
            if (args.out / name).exists():
                shutil.copy2(args.out / name, args.publish / name)


if __name__ == "__main__":
    main()
