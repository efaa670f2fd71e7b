"""Learning-rate-free optimisers, retrained beside the baseline (``final.lr_free``): baselines that
need no search at all (docs/baselines.md).

- ``schedulefree_sgd``: ``schedulefree.SGDScheduleFree`` (Defazio et al. 2024) with the
  baseline's learning rate, momentum and weight decay: it removes the schedule, not the learning
  rate; the model is evaluated at its averaged iterate (``eval()``).
- ``prodigy``: ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2024) at ``lr=1`` (it estimates the
  step size itself) with the baseline's weight decay.

Each trains through the one inner loop (:func:`metahpo.inner.fit`, same batches, buffers and
divergence check as every other run): the flat parameter vector is one leaf tensor that the
torch.optim optimiser updates, as ``train``'s ``step_fn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metahpo.core import ConfigError, Task
from metahpo.inner import FlatTask, InnerState, fit
from metahpo.optim import State
from metahpo.schedule import HyperSchedule

NAMES = ("schedulefree_sgd", "prodigy")


def _value(baseline: HyperSchedule, key: str, default: float) -> float:
    """The baseline's first value of ``key`` (``default`` when it has none)."""
    v = baseline.values.get(key)
    return default if v is None else float(v[0])


def make(name: str, param: Tensor, baseline: HyperSchedule) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``param``, set from the ``baseline`` schedule."""
    weight_decay = _value(baseline, "weight_decay", 0.0)
    if name == "schedulefree_sgd":
        import schedulefree

        return schedulefree.SGDScheduleFree(
            [param],
            lr=_value(baseline, "lr", 0.1),
            momentum=_value(baseline, "momentum", 0.9),
            weight_decay=weight_decay,
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy([param], lr=1.0, weight_decay=weight_decay)
    raise ConfigError(f"final.lr_free={name!r} is unknown; allowed: {', '.join(NAMES)}")


class _TorchStep:
    """A torch.optim optimiser as :func:`metahpo.inner.train`'s ``step_fn``."""

    def __init__(self, name: str, baseline: HyperSchedule) -> None:
        self.name, self.baseline = name, baseline
        self.param: Tensor | None = None
        self.optimizer: Any = None

    def __call__(self, t: int, state: InnerState, grad: Tensor) -> tuple[Tensor, State]:
        if self.param is None:  # the first step: the run's initial parameters
            self.param = state.theta.detach().clone()
            self.optimizer = make(self.name, self.param, self.baseline)
            if hasattr(self.optimizer, "train"):
                self.optimizer.train()
        self.param.grad = grad.detach()
        self.optimizer.step()
        return self.param.detach().clone(), state.opt_state

    def evaluated(self, state: InnerState) -> InnerState:
        """The state to evaluate: schedule-free's averaged iterate, otherwise ``state``."""
        if self.param is None or not hasattr(self.optimizer, "eval"):
            return state
        self.optimizer.eval()
        return InnerState(self.param.detach().clone(), state.opt_state, state.buffers, state.step)


def fit_lr_free(task: Task, name: str, baseline: HyperSchedule) -> tuple[FlatTask, InnerState]:
    """Train ``task`` from its initial parameters with the optimiser ``name`` over the
    baseline's horizon (its schedule only sets the optimiser's values, :func:`make`)."""
    step = _TorchStep(name, baseline)
    flat, state = fit(task, baseline, step_fn=step)
    return flat, step.evaluated(state)
