"""Inner optimisers: each update written once, as a pure function of tensors.

An :class:`InnerOptimizer` declares the hyperparameters it reads (name, default value, default
search bounds, the values it accepts) and two pure functions over the flat parameter vector:

* ``init(theta) -> state``: the optimiser's state, a tuple of tensors shaped like ``theta``;
* ``step(theta, state, grad, h, count) -> (theta, state)``: one update, with ``h`` the
  hyperparameter values of this step (``{name: 0-d tensor, or [P] for per-group values}``) and
  ``count`` the 1-based number of this step (Adam's bias correction).

Every estimator differentiates this one ``step``: forward mode by ``torch.func.jvp`` (vmapped
over its tangent columns), exact reverse through ``higher``, truncated reverse and greedy
through the autograd graph of :func:`metahpo.inner.train`. A step must therefore be written
with differentiable tensor operations only (no in-place updates of its inputs, no ``.item()``,
no Python branches on tensor values). docs/extending.md shows how to add one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metahpo.core import ConfigError
from metahpo.validation import checked

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter an optimiser reads.

    Attributes:
        default: its value when the schedule does not name it (torch's default).
        bounds: default search bounds ``[min, max]`` for a learned schedule.
        low, high: the values the optimiser accepts; ``low_open`` / ``high_open``: the bound
            itself excluded.
    """

    default: float
    bounds: tuple[float, float]
    low: float = -math.inf
    high: float = math.inf
    high_open: bool = False
    low_open: bool = False

    def allows(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        return above and (v < self.high if self.high_open else v <= self.high)

    def check(self, key: str, what: str, value: float, shown: object = None) -> None:
        """Raise ConfigError ``{key}={shown}: {what} must be {domain}`` unless ``value`` is
        allowed (``shown`` defaults to ``value``)."""
        if not self.allows(value):
            shown = value if shown is None else shown
            raise ConfigError(f"{key}={shown!r}: {what} must be {self.domain()}")

    def domain(self) -> str:
        lo = "" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high == math.inf else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(p for p in (lo, hi) if p) or "any number"


class InnerOptimizer:
    """Base class: a pure update rule and the hyperparameters it reads.

    Subclasses set ``hyperparameters`` and implement :meth:`init` and :meth:`step`.
    """

    name: ClassVar[str] = "optimizer"
    hyperparameters: ClassVar[Mapping[str, Hyperparameter]] = {}

    def init(self, theta: Tensor) -> State:
        raise NotImplementedError

    def step(
        self, theta: Tensor, state: State, grad: Tensor, h: Mapping[str, Tensor], count: int
    ) -> tuple[Tensor, State]:
        raise NotImplementedError

    @classmethod
    def check_value(cls, key: str, name: str, value: float, shown: object = None) -> None:
        """Raise ConfigError naming ``key`` (set to ``shown``, default ``value``) unless
        ``value`` is allowed for ``name``."""
        cls.hyperparameters[name].check(key, f"{cls.name}'s {name}", value, shown)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_LR = Hyperparameter(1e-3, (0.0, 1.0), low=0.0)
_NONNEG = Hyperparameter(0.0, (0.0, 0.01), low=0.0)


@checked("optimizer")
class SGD(InnerOptimizer):
    """``torch.optim.SGD`` (dampening 0): lr, momentum and weight decay, optionally Nesterov.

    ``d = g + wd theta``, ``v' = mu v + d``, ``theta' = theta - lr (d + mu v')`` with Nesterov,
    else ``theta' = theta - lr v'`` (bit for bit the closed core's ``sgd_step`` without
    Nesterov, so SGD runs reproduce earlier figures exactly); ``v = 0`` before the first step
    (torch's first step sets its buffer to ``d``, the same thing). One deliberate difference:
    at a step whose momentum is exactly 0 torch leaves its buffer untouched (a later non-zero
    momentum resumes the stale buffer), which makes the update discontinuous in momentum at 0.
    Here the update is the continuous form, so the trajectories agree whenever momentum is never
    0, or always 0.

    ``average=True``: ``v' = mu v + (1 - mu) d``,
    ``theta' = theta - lr v'``. The velocity is an average of the gradients, so ``lr`` is the
    effective step and ``mu`` only smooths: at ``(lr, mu)`` the same trajectory as the plain
    form at ``(lr (1 - mu), mu)`` (for a constant ``mu``), but a move of ``mu`` alone no longer
    multiplies the step by ``1 / (1 - mu)`` (docs/outer.md: measured on the vision stand-in;
    no experiment uses it by default).
    Not with Nesterov. (torch's ``dampening = momentum`` is this form except at the first step,
    where torch sets its buffer to ``d`` undamped.)

    State: ``(velocity,)``.
    """

    name = "sgd"
    hyperparameters = {
        "lr": _LR,
        "momentum": Hyperparameter(0.0, (0.0, 0.99), low=0.0),
        "weight_decay": _NONNEG,
    }

    def __init__(self, nesterov: bool = False, average: bool = False) -> None:
        if nesterov and average:
            raise ConfigError(
                "optimizer.average=true: averaged momentum is not defined with nesterov=true"
            )
        self.nesterov = nesterov
        self.average = average

    def init(self, theta: Tensor) -> State:
        return (torch.zeros_like(theta),)

    def step(
        self, theta: Tensor, state: State, grad: Tensor, h: Mapping[str, Tensor], count: int
    ) -> tuple[Tensor, State]:
        (v,) = state
        mu, wd = h["momentum"], h["weight_decay"]
        if self.average:
            v = mu * v + (1 - mu) * (grad + wd * theta)
            return theta - h["lr"] * v, (v,)
        # mu v + g + wd theta, summed in this order (the closed core's, so runs reproduce its
        # figures bit for bit); torch sums mu v + (g + wd theta): equal to rounding (1e-16)
        v = mu * v + grad + wd * theta
        update = grad + wd * theta + mu * v if self.nesterov else v
        return theta - h["lr"] * update, (v,)

    def __repr__(self) -> str:
        if self.average:
            return "SGD(average=True)"
        return f"SGD(nesterov={self.nesterov})"


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 instead of infinite.

    The value is exactly ``torch.sqrt``'s. Where ``x == 0`` the tangent of ``sqrt`` would be
    ``inf * dx``; for Adam's second moment ``dx`` is 0 there too (a coordinate whose gradient
    has been 0 at every step so far), so ``inf * 0 = NaN`` would poison every tangent column.
    Both branches of the ``where`` are finite, so forward and reverse mode give 0 there.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


_BETA = {"low": 0.0, "high": 1.0, "high_open": True}


@checked("optimizer")
class Adam(InnerOptimizer):
    """``torch.optim.Adam`` (no AMSGrad) with every hyperparameter learnable.

    ``g = grad + wd theta`` (L2 penalty), ``m' = m + (1 - b1)(g - m)``,
    ``v' = b2 v + (1 - b2) g^2``, ``theta' = theta - lr / (1 - b1^k) * m' / denom`` with
    ``denom = sqrt(v') / sqrt(1 - b2^k) + eps`` at step ``k`` (1-based). The square root is
    :func:`safe_sqrt`: torch's value, and finite tangents where ``v' = 0``. Bias corrections use
    the current step's betas, as torch does.

    State: ``(m, v)``.
    """

    name = "adam"
    decoupled = False
    hyperparameters = {
        "lr": _LR,
        "beta1": Hyperparameter(0.9, (0.0, 0.99), **_BETA),
        "beta2": Hyperparameter(0.999, (0.9, 0.9999), **_BETA),
        # eps > 0: at eps = 0 a coordinate whose gradient has always been 0 divides 0 by 0
        "eps": Hyperparameter(1e-8, (1e-10, 1e-4), low=0.0, low_open=True),
        "weight_decay": _NONNEG,
    }

    def init(self, theta: Tensor) -> State:
        return (torch.zeros_like(theta), torch.zeros_like(theta))

    def step(
        self, theta: Tensor, state: State, grad: Tensor, h: Mapping[str, Tensor], count: int
    ) -> tuple[Tensor, State]:
        m, v = state
        lr, b1, b2, wd = h["lr"], h["beta1"], h["beta2"], h["weight_decay"]
        if self.decoupled:
            theta = theta * (1 - lr * wd)
        else:
            grad = grad + wd * theta
        m = m + (1 - b1) * (grad - m)
        v = b2 * v + (1 - b2) * (grad * grad)
        step_size = lr / (1 - b1**count)
        denom = safe_sqrt(v) / torch.sqrt(1 - b2**count) + h["eps"]
        return theta - step_size * (m / denom), (m, v)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay ``theta <- theta (1 - lr wd)``
    before the Adam step (torch's default weight decay 0.01)."""

    name = "adamw"
    decoupled = True
    hyperparameters = {
        **Adam.hyperparameters,
        "weight_decay": Hyperparameter(1e-2, (0.0, 0.1), low=0.0),
    }


class Recorded(InnerOptimizer):
    """Stands in for the optimiser of a schedule read back from ``results.json``: it knows the
    hyperparameter names (for plots and tables) and cannot step."""

    name = "recorded"

    def __init__(self, names: Iterable[str]) -> None:
        free = Hyperparameter(math.nan, (-math.inf, math.inf))
        self.hyperparameters = {n: free for n in names}  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Recorded({list(self.hyperparameters)})"


#: SGD's hyperparameter names (the closed core's three), for scripts and tests written for SGD.
SGD_NAMES: tuple[str, ...] = tuple(SGD.hyperparameters)
