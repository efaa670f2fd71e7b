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
