"""Soft Actor-Critic on MuJoCo (HalfCheetah-v5, Ant-v5): Adam vs ADOPT, CleanRL style.

The paper (Taniguchi et al., 2024, Sec. 5 "deep RL") trains SAC on HalfCheetah and Ant with
Adam and with ADOPT for the actor, the two critics and the entropy temperature, and reports
ADOPT's episodic return at or above Adam's. This file is CleanRL's
``sac_continuous_action.py`` (one env, one explicit loop) with the three optimizers built by
name, so the comparison is one flag.

Needs gymnasium[mujoco] and mujoco, part of the ``experiments`` extra
(``pip install 'adoptim[experiments]'``).

Examples::

    # one run (writes runs/<run id>/{config.json,metrics.jsonl,metrics.csv,result.json})
    python -m adoptim.experiments.rl_sac --env-id HalfCheetah-v5 --optimizer adopt \\
        --total-timesteps 20000 --out results/rl_sac
    # the sweep + report (Adam vs ADOPT x HalfCheetah/Ant x seeds)
    adoptim reproduce rl_sac --full
    # the paper's scale (1M steps per run; a GPU helps only a little for these small MLPs)
    python -m adoptim.experiments.rl_sac --env-id Ant-v5 --optimizer adopt \\
        --total-timesteps 1000000 --device cuda
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adoptim._extras import message, missing, require
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
)

__all__ = ["EXPERIMENT", "Actor", "Args", "SoftQNetwork", "full_sweep", "quick_sweep", "train"]


@dataclass
class Args:
    env_id: str = "HalfCheetah-v5"
    """the Gymnasium MuJoCo environment (HalfCheetah-v5, Ant-v5, Hopper-v5, ...)"""
    optimizer: str = "adam"
    """optimizer for actor, critics and temperature: a name for experiments.optimizers
    (adam, adopt, ...); each uses its own default betas/eps (Adam 0.999, ADOPT 0.9999)"""
    seed: int = 0
    """seed of the run (torch, numpy, environment)"""
    total_timesteps: int = 1_000_000
    """environment steps of the run"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (capped at total_timesteps)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    batch_size: int = 256
    """minibatch size sampled from the replay buffer"""
    learning_starts: int = 5_000
    """random-action steps before learning starts"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: float = 1e-3
    """critic (and temperature) learning rate"""
    policy_frequency: int = 2
    """actor update period in steps (delayed, TD3-style; it is then updated that many times)"""
    target_network_frequency: int = 1
    """target-network update period in steps"""
    alpha: float = 0.2
    """entropy temperature (initial value when autotune)"""
    autotune: bool = True
    """learn the temperature towards a target entropy of -dim(action)"""
    hidden: int = 256
    """width of the two hidden layers of every network"""
    eval_episodes: int = 3
    """deterministic (mean-action) episodes after training for the final score"""
    log_every: int = 1_000
    """steps between loss/throughput log rows (episode returns are logged as they end)"""
    device: str = "cpu"
    """torch device (cpu, cuda)"""
    threads: int = 0
    """torch intra-op threads (0: ADOPTIM_THREADS or 1)"""


# ----------------------------------------------------------------------------- networks
class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim + act_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)  # (B, obs+act)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (B, 1)


LOG_STD_MAX = 2
LOG_STD_MIN = -5


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy, rescaled to the action box."""

    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray,
                 hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_mean = nn.Linear(hidden, act_dim)
        self.fc_logstd = nn.Linear(hidden, act_dim)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        mean = self.fc_mean(x)
        log_std = torch.tanh(self.fc_logstd(x))
        # squash log_std into [LOG_STD_MIN, LOG_STD_MAX] smoothly (as in CleanRL / SpinningUp)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return mean, log_std

    def get_action(self, x):
        mean, log_std = self(x)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x_t = normal.rsample()  # reparameterisation trick
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        # log-density of the squashed sample: change of variables through tanh and the scale
        log_prob = normal.log_prob(x_t) - torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        log_prob = log_prob.sum(1, keepdim=True)
        mean_action = torch.tanh(mean) * self.action_scale + self.action_bias
        return action, log_prob, mean_action


class ReplayBuffer:
    """A ring buffer of (obs, next_obs, action, reward, terminated) in numpy arrays."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, act_dim), np.float32)
        self.rewards = np.zeros((capacity, 1), np.float32)
        self.dones = np.zeros((capacity, 1), np.float32)
        self.capacity, self.pos, self.full = capacity, 0, False

    def add(self, obs, next_obs, action, reward, terminated):
        i = self.pos
        self.obs[i], self.next_obs[i], self.actions[i] = obs, next_obs, action
        self.rewards[i], self.dones[i] = reward, float(terminated)
        self.pos = (i + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def sample(self, batch_size: int, rng: np.random.Generator, device: torch.device):
        idx = rng.integers(0, self.capacity if self.full else self.pos, size=batch_size)
        return [torch.as_tensor(a[idx], device=device) for a in
                (self.obs, self.next_obs, self.actions, self.rewards, self.dones)]


def _mujoco_warning(message: str) -> None:
    # Called from MuJoCo's C code: it must not raise (a "-W error" filter would make
    # warnings.warn raise), so such a filter gets the message on stderr instead.
    try:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)
    except Warning:
        print(f"MuJoCo warning: {message}", file=sys.stderr)


def route_mujoco_warnings() -> None:
    """Send MuJoCo's warnings to Python's ``warnings`` (shown once, filterable) instead of
    its default handler, which prints each one and appends it to ``MUJOCO_LOG.TXT`` in the
    current folder. Gymnasium's v5 models trigger one on every ``gym.make`` (a deprecated
    ``settotalmass`` attribute). A handler the user installed is left alone."""
    import mujoco

    get = getattr(mujoco, "get_mju_user_warning", None)
    if get is None or get() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def make_env(env_id: str, seed: int):
    require("the rl_sac experiment", RL_MODULES)
    import gymnasium as gym

    route_mujoco_warnings()
    env = gym.make(env_id)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


@torch.no_grad()
def evaluate(actor: Actor, env_id: str, episodes: int, seed: int, device) -> list[float]:
    """Returns of ``episodes`` deterministic (mean-action) episodes on a fresh env."""
    env = make_env(env_id, seed)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total = False, 0.0
        while not done:
            _, _, a = actor.get_action(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
            obs, r, terminated, truncated, _ = env.step(a[0].cpu().numpy())
            total += float(r)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


# ----------------------------------------------------------------------------- one run
def train(args: Args, ctx=None) -> dict:
    """One SAC run; ``ctx`` (a runner.RunContext, or None) receives the log rows."""
    set_threads(args.threads or None)
    # ---- seeding: one block (env seeded at its first reset)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)

    env = make_env(args.env_id, args.seed)
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    low, high = env.action_space.low, env.action_space.high

    actor = Actor(obs_dim, act_dim, low, high, args.hidden).to(device)
    qf1 = SoftQNetwork(obs_dim, act_dim, args.hidden).to(device)
    qf2 = SoftQNetwork(obs_dim, act_dim, args.hidden).to(device)
    qf1_target = SoftQNetwork(obs_dim, act_dim, args.hidden).to(device)
    qf2_target = SoftQNetwork(obs_dim, act_dim, args.hidden).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())

    # ---- ALGO LOGIC: the three optimizers, each one line (the only thing compared here)
    q_optimizer = make_optimizer(args.optimizer, list(qf1.parameters()) + list(qf2.parameters()),
                                 lr=args.q_lr)
    actor_optimizer = make_optimizer(args.optimizer, list(actor.parameters()), lr=args.policy_lr)
    if args.autotune:
        target_entropy = -float(act_dim)
        log_alpha = torch.zeros(1, requires_grad=True, device=device)
        alpha = log_alpha.exp().item()
        a_optimizer = make_optimizer(args.optimizer, [log_alpha], lr=args.q_lr)
    else:
        alpha = args.alpha

    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim)
    start = time.time()
    episodes: list[tuple[int, float]] = []  # (global step at the end, return)
    losses = {"losses/qf_loss": float("nan"), "losses/actor_loss": float("nan"),
              "losses/alpha": alpha}
    bar = ctx.bar(total=args.total_timesteps) if ctx is not None else None

    obs, _ = env.reset(seed=args.seed)
    for global_step in range(args.total_timesteps):
        # ---- act: random until learning starts, then sample the policy
        if global_step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                a, _, _ = actor.get_action(torch.as_tensor(obs, dtype=torch.float32,
                                                           device=device)[None])
            action = a[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # on truncation the returned next_obs is the real last observation: bootstrap from it
        rb.add(obs, next_obs, action, reward, terminated)
        obs = next_obs
        if terminated or truncated:
            ep_return, ep_len = float(info["episode"]["r"]), int(info["episode"]["l"])
            episodes.append((global_step + 1, ep_return))
            if ctx is not None:
                ctx.log(step=global_step + 1, **{"charts/episodic_return": ep_return,
                                                  "charts/episodic_length": ep_len}, **losses,
                        **{"charts/SPS": (global_step + 1) / (time.time() - start)})
            obs, _ = env.reset()

        # ---- ALGO LOGIC: training
        if global_step >= args.learning_starts:
            b_obs, b_next, b_act, b_rew, b_done = rb.sample(args.batch_size, rng, device)
            with torch.no_grad():
                next_a, next_logp, _ = actor.get_action(b_next)
                min_q_next = torch.min(qf1_target(b_next, next_a), qf2_target(b_next, next_a))
                min_q_next = min_q_next - alpha * next_logp
                target_q = b_rew + (1 - b_done) * args.gamma * min_q_next  # (B, 1)
            qf1_loss = F.mse_loss(qf1(b_obs, b_act), target_q)
            qf2_loss = F.mse_loss(qf2(b_obs, b_act), target_q)
            qf_loss = qf1_loss + qf2_loss
            q_optimizer.zero_grad(set_to_none=True)
            qf_loss.backward()
            q_optimizer.step()

            if global_step % args.policy_frequency == 0:  # TD3-style delayed update,
                for _ in range(args.policy_frequency):  # compensated by repeating it
                    pi, logp, _ = actor.get_action(b_obs)
                    min_q_pi = torch.min(qf1(b_obs, pi), qf2(b_obs, pi))
                    actor_loss = (alpha * logp - min_q_pi).mean()
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    actor_optimizer.step()
                    if args.autotune:
                        with torch.no_grad():
                            _, logp, _ = actor.get_action(b_obs)
                        alpha_loss = (-log_alpha.exp() * (logp + target_entropy)).mean()
                        a_optimizer.zero_grad(set_to_none=True)
                        alpha_loss.backward()
                        a_optimizer.step()
                        alpha = log_alpha.exp().item()
                losses = {"losses/qf_loss": qf_loss.item(), "losses/actor_loss": actor_loss.item(),
                          "losses/alpha": alpha}

            if global_step % args.target_network_frequency == 0:
                with torch.no_grad():
                    for net, tgt in ((qf1, qf1_target), (qf2, qf2_target)):
                        for p, tp in zip(net.parameters(), tgt.parameters()):
                            tp.lerp_(p, args.tau)  # tp = tau*p + (1-tau)*tp
        if ctx is not None and (global_step + 1) % args.log_every == 0:
            ctx.log(step=global_step + 1, **losses,
                    **{"charts/SPS": (global_step + 1) / (time.time() - start)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    env.close()
    train_seconds = time.time() - start

    eval_returns = evaluate(actor, args.env_id, args.eval_episodes, args.seed + 10_000, device)
    tail = [r for s, r in episodes if s > 0.8 * args.total_timesteps] or [r for _, r in episodes[-1:]]
    return {
        "eval/return_mean": float(np.mean(eval_returns)),
        "eval/returns": eval_returns,
        "train/last20pct_return": float(np.mean(tail)) if tail else float("nan"),
        "train/episodes": len(episodes),
        "train/finite": bool(all(np.isfinite(r) for _, r in episodes)),
        "perf/train_seconds": train_seconds,
        "perf/SPS": args.total_timesteps / train_seconds,
    }


# ----------------------------------------------------------------------------- sweeps, report
OPTIMIZERS = ("adam", "adopt")
_KEYS = ["env_id", "optimizer", "seed", "total_timesteps"]  # what names a run folder


def quick_sweep() -> list[Args]:
    """The ``--quick`` profile: a smoke test of the whole path (seconds): one 1,000-step
    HalfCheetah episode per optimizer, learning from step 200 (800 updates, so the two runs
    differ; their returns still mean nothing)."""
    return [Args(env_id="HalfCheetah-v5", optimizer=o, seed=0, total_timesteps=1_000,
                 learning_starts=200, batch_size=64, hidden=64, eval_episodes=1, log_every=100)
            for o in OPTIMIZERS]


# the part of the experiments extra this experiment needs beyond numpy/tqdm/matplotlib
RL_MODULES = ("gymnasium", "mujoco")


def _missing_rl_deps() -> list[str]:
    return missing(RL_MODULES)


def full_sweep() -> list[Args]:
    """The CPU-sized full profile: both envs x Adam/ADOPT x 2 seeds, 12k steps each with
    learning from step 2k (10k updates, about 2-4 min per run on one shared core). The
    paper's runs are 1M steps."""
    base = Args(total_timesteps=12_000, learning_starts=2_000, eval_episodes=3, log_every=1_000)
    return [replace(base, env_id=env, optimizer=o, seed=s)
            for env in ("HalfCheetah-v5", "Ant-v5") for s in (1, 2) for o in OPTIMIZERS]


def run(sweep, out: Path, progress: bool = True) -> None:
    sweep = sweep if isinstance(sweep, list) else [sweep]
    run_sweep(sweep, out, train, name="rl_sac",
              keys=_KEYS, progress=progress)


def report(sweep, out: Path) -> Path:
    from adoptim.experiments._part2 import curve_band

    results = load_results(out, sweep)  # only this sweep's runs
    rep = Report(out, "SAC on MuJoCo: Adam vs ADOPT")
    if _missing_rl_deps() and not results:
        # only with --report-only: `adoptim reproduce` refuses to run it without them
        rep.text(f"Not run: {message('rl_sac', 'experiments', _missing_rl_deps())}.")
        return rep.write()
    if results:
        c = results[0]["config"]
        seeds = sorted({r["config"]["seed"] for r in results})
        rep.text(f"{c['total_timesteps']:,} environment steps per run: random actions for the "
                 f"first {c['learning_starts']:,}, then the policy and one critic update per "
                 f"step ({c['total_timesteps'] - c['learning_starts']:,} updates), batch "
                 f"{c['batch_size']}, networks {c['hidden']} wide; "
                 f"{plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))}) per optimizer "
                 "and environment; ± is the std over seeds.")
    envs = sorted({r["config"]["env_id"] for r in results})
    rows = []
    fig, axes = new_figure(2, max(1, len(envs)))
    for j, env in enumerate(envs):
        for k, o in enumerate(sorted({r["config"]["optimizer"] for r in results
                                      if r["config"]["env_id"] == env})):
            rs = [r for r in results if r["config"]["env_id"] == env and r["config"]["optimizer"] == o]
            ev = summarize(r["eval/return_mean"] for r in rs)
            tr = summarize(r["train/last20pct_return"] for r in rs)
            secs = summarize(r["seconds"] for r in rs)
            rows.append([env, o, ev["n"], rs[0]["config"]["total_timesteps"],
                         rs[0]["config"]["eval_episodes"], fmt_mean_std(ev, 0),
                         fmt_range(ev, 0), fmt_mean_std(tr, 0), f"{secs['mean']:.0f}"])
            color = f"C{k}"
            for ax, key in ((axes[0][j], "charts/episodic_return"), (axes[1][j], "losses/qf_loss")):
                curves = []
                for r in rs:
                    m = [row for row in load_metrics(r["dir"])
                         if key in row and np.isfinite(row[key])  # no losses before learning
                         and (key == "charts/episodic_return"  # losses: the log_every rows
                              or "charts/episodic_return" not in row)]
                    curves.append(([row["step"] for row in m], [row[key] for row in m]))
                    # each seed, with a dot per point: a run may have a single episode
                    ax.plot(curves[-1][0], curves[-1][1], lw=0.6, alpha=0.5, color=color,
                            marker="o", ms=3)
                band = curve_band(curves)
                if band is not None and len(rs) > 1:
                    g, mean, lo, hi = band
                    ax.plot(g, mean, color=color, label=curve_label(o, len(rs)))
                    ax.fill_between(g, lo, hi, color=color, alpha=0.15)
                else:
                    ax.plot([], [], color=color, marker="o", ms=3, label=curve_label(o, len(rs)))
        axes[0][j].set_title(f"{env}: training episodes")
        axes[0][j].set_ylabel("episodic return")
        axes[1][j].set_title(f"{env}: critic loss")
        axes[1][j].set_ylabel("qf1 + qf2 loss (log scale)")
        axes[1][j].set_yscale("log")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("environment steps")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    rep.table(["env", "optimizer", "seeds", "steps", "eval episodes/run",
               "eval return (mean ± std)", "eval [min, max]",
               "train return, episodes ending in the last 20% of steps", "seconds/run"], rows,
              caption="Return of deterministic (mean-action) episodes after training, "
                      "averaged per run; spread over seeds.")
    rep.figure(fig, "rl_sac_returns.png",
               "Top: return of each training episode (dots) against the step it ended at. "
               "Bottom: critic loss at each log row. Thin lines are seeds; with several seeds "
               "the thick line and band are their mean and min-max.")
    return rep.write()


EXPERIMENT = Experiment(
    name="rl_sac",
    description="SAC on MuJoCo HalfCheetah-v5/Ant-v5, Adam vs ADOPT",
    quick=quick_sweep,
    full=full_sweep,
    run=run,
    report=report,
    needs=RL_MODULES,
)


def main(argv=None) -> int:
    from adoptim.experiments._part2 import main_single_run

    return main_single_run(Args, train, "rl_sac", _KEYS, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
