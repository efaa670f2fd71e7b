"""Plugins that return what metahpo cannot use: the rows of docs/reliability.md name them
(``estimator._target_=tests.plugins.ReturnsDict``) and give the one-line error each gets."""

from __future__ import annotations

from typing import Any

import torch

from metahpo.core import Hypergradient


class _Estimator:
    name = "bad"

    def __init__(self, **kwargs: Any) -> None:  # whatever the estimator file passes
        pass

    def answer(self, schedule: Any) -> tuple[float, dict[str, Any]]:
        grads = {k: torch.ones(schedule.specs[k].n_segments) for k in schedule.learned}
        return 0.5, grads


class ReturnsDict(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        return {"meta_loss": loss, "grads": grads}


class ReturnsTuple(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        return self.answer(schedule)


class OneValueForTwoSegments(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        grads["lr"] = torch.ones(1)
        return Hypergradient(loss, grads)


class ListGradient(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        grads["lr"] = grads["lr"].tolist()
        return Hypergradient(loss, grads)


class MissingType(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        del grads["momentum"]
        return Hypergradient(loss, grads)


class UnknownType(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        grads["learning_rate"] = grads.pop("lr")
        return Hypergradient(loss, grads)


class TensorMetaLoss(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        return Hypergradient(torch.tensor(loss), grads)  # type: ignore[arg-type]


class NaNHypergradient(_Estimator):
    def hypergradient(self, task: Any, schedule: Any) -> Any:
        loss, grads = self.answer(schedule)
        grads["lr"] = torch.full_like(grads["lr"], float("nan"))
        return Hypergradient(loss, grads)


class _Outer:
    def __init__(self, **kwargs: Any) -> None:
        pass

    def init(self, schedule: Any) -> dict[str, Any]:
        return {}

    def step(self, schedule: Any, grads: Any, state: Any) -> Any:
        return schedule, state

    def converged(self, before: Any, after: Any, state: Any, fraction: float) -> Any:
        return False

    def backtrack(self, state: Any) -> Any:
        return state


class StepReturnsSchedule(_Outer):
    def step(self, schedule: Any, grads: Any, state: Any) -> Any:
        return schedule


class ConvergedReturnsTensor(_Outer):
    def converged(self, before: Any, after: Any, state: Any, fraction: float) -> Any:
        return torch.tensor(True)


def task_raising_a_library_error(**kwargs: object) -> object:
    """A user's task whose data library fails in its own words."""
    raise ValueError("n_samples=3 should be >= n_splits=5\nsecond line of the library's story")
