"""Plugin results at the boundary (metahpo/plugins.py) and the runner's own metering."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import metahpo
from metahpo.core import Hypergradient
from metahpo.plugins import PluginError, check_hypergradient
from tests.conftest import make_schedule

QUICK = ["task=quadratic", "experiment=smoke", "progress=false"]


class Sleepy:
    """Reports no cost of its own; sleeps 50 ms and holds a 64 MiB tensor while it works."""

    name = "sleepy"

    def __init__(self, **kwargs: Any) -> None:
        pass

    def hypergradient(self, task: Any, schedule: Any) -> Hypergradient:
        block = torch.ones(8 * 2**20, dtype=torch.float64)  # 64 MiB
        time.sleep(0.05)
        grads = {k: torch.zeros(schedule.specs[k].n_segments) for k in schedule.learned}
        return Hypergradient(meta_loss=float(block[0]), grads=grads)


def test_the_runner_meters_seconds_and_memory_of_every_estimator_call() -> None:
    out = metahpo.run(
        metahpo.compose([*QUICK, "estimator._target_=tests.test_plugins.Sleepy", "outer.steps=2"])
    )
    steps = [h for h in out["history"] if h.get("hypergradient")]
    assert len(steps) == 2
    for h in steps:
        assert 0.05 <= h["seconds"] < 5.0
        assert h["peak_memory_mb"] >= 60  # sampled every millisecond while the block lives
    assert out["estimator_seconds"] == pytest.approx(sum(h["seconds"] for h in steps))


def test_checked_grads_are_float64_cpu_for_every_key_with_zeros_for_fixed_ones() -> None:
    schedule = make_schedule(6, 3, learn=("lr",))
    result = Hypergradient(0.25, {"lr": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)})
    checked = check_hypergradient(result, schedule, object())
    assert list(checked.grads) == list(schedule.keys)
    assert checked.grads["lr"].dtype == torch.float64
    assert checked.grads["lr"].tolist() == [1.0, 2.0, 3.0]
    assert checked.grads["momentum"].tolist() == [0.0, 0.0, 0.0]
    bad = Hypergradient(0.25, {"lr": torch.tensor([1, 2, 3])})
    with pytest.raises(PluginError, match=r"grads\['lr'\] has dtype torch.int64; expected a float"):
        check_hypergradient(bad, schedule, object())


class Noisy:
    """Forward mode plus noise from its own generator, seeded from the global one at build time
    (so from ``seed``), with its state exposed for checkpoints."""

    name = "noisy"

    def __init__(self, **kwargs: Any) -> None:
        from metahpo.estimators.forward import ForwardMode

        self.inner = ForwardMode()
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**31, ())))

    def hypergradient(self, task: Any, schedule: Any) -> Hypergradient:
        hg = self.inner.hypergradient(task, schedule)
        for k, g in hg.grads.items():
            hg.grads[k] = g + 0.1 * g.abs().max() * torch.randn(g.shape, generator=self.generator)
        return hg

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def test_a_stochastic_estimator_is_seeded_and_resumes_with_its_state(tmp_path: Any) -> None:
    noisy = [*QUICK, "estimator._target_=tests.test_plugins.Noisy", "outer=sgd"]
    whole = metahpo.run(metahpo.compose([*noisy, "outer.steps=4"]))
    again = metahpo.run(metahpo.compose([*noisy, "outer.steps=4"]))
    grads = [h["hypergradient"] for h in whole["history"]]
    assert grads == [h["hypergradient"] for h in again["history"]]  # seeded from ``seed``
    other = metahpo.run(metahpo.compose([*noisy, "outer.steps=4", "seed=1"]))
    assert other["history"][0]["hypergradient"] != grads[0]
    # two steps, then resumed for the other two: the estimator's generator continues
    metahpo.run(metahpo.compose([*noisy, "outer.steps=2"]), tmp_path / "first")
    resumed = metahpo.run(
        metahpo.compose([*noisy, "outer.steps=4", f"resume={tmp_path / 'first'}"])
    )
    assert [h["hypergradient"] for h in resumed["history"]] == grads
    assert resumed["outer_loop"]["inner_runs"] == whole["outer_loop"]["inner_runs"]
    assert [h["outer_step"] for h in resumed["history"]] == [0, 1, 2, 3, 4]  # one score
