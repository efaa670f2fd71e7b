"""A user's plugin with a typed constructor gets metahpo's checks without writing any (one test
per plugin kind), and the pre-flight memory estimate stops an impossible horizon."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytest
from omegaconf import OmegaConf

import metahpo
from metahpo.config import validate
from metahpo.core import ConfigError
from metahpo.loggers import NullLogger
from metahpo.optim import SGD
from metahpo.tasks.digits import Digits
from metahpo.validation import Fraction, Positive, PositiveInt

HERE = __name__


class MyEstimator:
    def __init__(self, window: PositiveInt = 5, mode: Literal["a", "b"] = "a") -> None:
        self.window, self.mode = window, mode


class MyTask(Digits):
    def __init__(self, *, width: PositiveInt = 8, holdout: Fraction = 0.2, **kw: Any) -> None:
        super().__init__(hidden=(width,), val_fraction=holdout, **kw)


class MyOuter:
    def __init__(self, rate: Mapping[str, Positive], momentum: float = 0.0) -> None:
        self.rate, self.momentum = rate, momentum


class MyInner(SGD):
    name = "my_sgd"

    def __init__(self, nesterov: bool = False, clip: Positive | None = None) -> None:
        super().__init__(nesterov)
        self.clip = clip


class MyLogger(NullLogger):
    def __init__(self, tags: Sequence[str] = (), every: PositiveInt = 1) -> None:
        self.tags, self.every = tags, every


def _with(node: str, value: dict[str, Any]) -> Any:
    cfg = metahpo.compose(["experiment=smoke"])
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, node, value, merge=False)
    return cfg


@pytest.mark.parametrize(
    ("node", "good", "bad", "message"),
    [
        (
            "estimator",
            {"window": 3, "mode": "b"},
            {"window": 2.5},
            "estimator.window=2.5 must be an integer >= 1",
        ),
        (
            "estimator",
            {"window": 3},
            {"mode": "c"},
            "estimator.mode='c' is unknown; allowed: a, b",
        ),
        (
            "task",
            {"width": 4, "holdout": 0.3, "_partial_": True},
            {"holdout": 1.0, "_partial_": True},
            "task.holdout=1.0 must be a number > 0 and < 1",
        ),
        (
            "outer.optimizer",
            {"rate": {"lr": 0.1}},
            {"rate": {"lr": float("inf")}},
            "outer.optimizer.rate.lr=inf must be a finite number > 0",
        ),
        (
            "optimizer",
            {"clip": 1.0},
            {"clip": -1.0},
            "optimizer.clip=-1.0 must be a number > 0 or null",
        ),
        (
            "logger",
            {"mine": {"every": 2, "tags": ["x"]}},
            {"mine": {"tags": "abc"}},
            "logger.mine.tags='abc' must be a list of strings",
        ),
        (
            "estimator",
            {},
            {"nope": 1},
            "estimator.nope is not an argument of MyEstimator; arguments: window, mode",
        ),
    ],
)
def test_a_users_typed_plugin_is_checked_for_free(
    node: str, good: dict[str, Any], bad: dict[str, Any], message: str
) -> None:
    cls = {
        "estimator": MyEstimator,
        "task": MyTask,
        "outer.optimizer": MyOuter,
        "optimizer": MyInner,
        "logger": MyLogger,
    }[node]
    target = {"_target_": f"{HERE}.{cls.__qualname__}"}

    def node_value(args: dict[str, Any]) -> dict[str, Any]:
        if node == "logger":
            return {name: {**target, **a} for name, a in args.items()}
        return {**target, **args}

    validate(_with(node, node_value(good)))  # accepted
    with pytest.raises(ConfigError) as err:
        validate(_with(node, node_value(bad)))
    assert str(err.value) == message


def test_an_impossible_horizon_stops_with_the_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    import metahpo.estimators.auto
    import metahpo.runner

    monkeypatch.setattr(metahpo.estimators.auto, "available_bytes", lambda device: 2**30)

    def trap(self: Any) -> None:
        raise AssertionError("the outer loop started")

    monkeypatch.setattr(metahpo.runner._OuterLoop, "run", trap)
    with pytest.raises(ConfigError) as err:
        metahpo.run(metahpo.compose(["experiment=smoke", "horizon=10000000000"]))
    assert str(err.value) == (
        "horizon=10000000000 needs an estimated 335.3 GiB for the per-step schedule alone "
        "(3 keys x 10000000000 steps x 12 bytes), more than the 1.0 GiB available on cpu (half "
        "the free memory); lower horizon (at most about 29826161)"
    )
