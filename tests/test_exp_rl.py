"""SAC experiment: a tiny run on HalfCheetah-v5 (skipped without MuJoCo, part of the experiments extra)."""

from __future__ import annotations

import importlib.util
import math

import pytest

_MISSING = [m for m in ("gymnasium", "mujoco") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs MuJoCo (missing {', '.join(_MISSING)}): pip install 'adoptim[experiments]'")


@pytest.mark.parametrize("optimizer", ["adam", "adopt"])
def test_tiny_sac_run(optimizer, tmp_path):
    from adoptim.experiments import rl_sac
    from adoptim.experiments.runner import RunContext, load_metrics

    a = rl_sac.Args(env_id="HalfCheetah-v5", optimizer=optimizer, total_timesteps=1_200,
                    learning_starts=1_000, batch_size=32, hidden=32, eval_episodes=1)
    ctx = RunContext(tmp_path, a, progress=False)
    out = rl_sac.train(a, ctx)
    ctx.finish(out)
    assert out["train/episodes"] == 1 and out["train/finite"]
    assert math.isfinite(out["eval/return_mean"])
    rows = load_metrics(tmp_path)
    assert rows[0]["step"] == 1000 and "charts/episodic_return" in rows[0]


def test_registered():
    from adoptim.experiments import get_experiment

    exp = get_experiment("rl_sac")
    full = exp.full()
    assert {c.env_id for c in full} == {"HalfCheetah-v5", "Ant-v5"}
    assert {c.optimizer for c in full} == {"adam", "adopt"}


def test_quick_profile_learns_before_its_first_episode_ends():
    import gymnasium as gym

    from adoptim.experiments import rl_sac

    for a in rl_sac.quick_sweep():
        episode = gym.spec(a.env_id).max_episode_steps  # HalfCheetah: 1,000 steps
        # updates start inside the first episode, so its return depends on the optimizer
        assert a.learning_starts < min(a.total_timesteps, episode)
        assert a.log_every < a.total_timesteps - a.learning_starts  # losses are logged


def test_make_env_leaves_no_mujoco_log_in_the_working_folder(tmp_path, monkeypatch):
    import warnings

    from adoptim.experiments import rl_sac

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rl_sac.make_env("HalfCheetah-v5", 0).close()  # MuJoCo 4 warns: settotalmass
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    # what MuJoCo had to say arrives as a Python warning (shown once, filterable) instead
    assert all(issubclass(w.category, RuntimeWarning) for w in caught
               if str(w.message).startswith("MuJoCo:"))


def test_report_of_one_seed(tmp_path):
    import json

    from adoptim.experiments import rl_sac
    from adoptim.experiments.runner import RESULT_FILE, config_dict

    sweep = rl_sac.quick_sweep()
    for i, a in enumerate(sweep):  # finished runs, written by hand: the report reads these
        d = tmp_path / "runs" / f"run{i}"
        d.mkdir(parents=True)
        rows = [{"step": s, "losses/qf_loss": float("nan") if s <= a.learning_starts else
                 1.0 / s, "losses/actor_loss": 0.0, "losses/alpha": 0.2} for s in (100, 200, 300)]
        rows.append({"step": 1000, "charts/episodic_return": -200.0 - i, "losses/qf_loss": 0.1})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / RESULT_FILE).write_text(json.dumps({
            "config": config_dict(a), "seconds": 1.0, "eval/return_mean": -5.0 - i,
            "train/last20pct_return": -200.0 - i}))
    text = rl_sac.report(sweep, tmp_path).read_text()
    assert "± 0" not in text and "(1 seed)" in text and "800 updates" in text
    assert (tmp_path / "rl_sac_returns.png").exists()
