"""SAC experiment: a tiny run on HalfCheetah-v5 (skipped without the rl extra)."""

from __future__ import annotations

import importlib.util
import math

import pytest

_MISSING = [m for m in ("gymnasium", "mujoco") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs the rl extra (missing {', '.join(_MISSING)}): pip install 'adoptim[rl]'")


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
