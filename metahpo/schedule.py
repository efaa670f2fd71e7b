"""Piecewise-constant hyperparameter schedules with contiguous sharing.

Each type (lr, momentum, weight_decay) has ``n`` values over a horizon of ``T`` inner steps;
step ``t`` uses value ``floor(n * t / T)``. The gradient with respect to a shared value is the
sum of the per-step hypergradients over its block of steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metahpo.core import ConfigError

HYPERPARAMETERS: tuple[str, ...] = ("lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class HyperSpec:
    """How one hyperparameter type is parameterised: segments, bounds, learned or fixed."""

    n_segments: int
    bounds: tuple[float, float]
    learn: bool = True


class HyperSchedule:
    """Values of every hyperparameter type, shared over contiguous blocks of inner steps.

    Values are float64 CPU tensors (the outer loop's currency); estimators move them to the
    task's device and dtype with :meth:`per_step`. Instances are immutable: :meth:`replace`
    and :meth:`project` return new ones.
    """

    def __init__(
        self,
        horizon: int,
        specs: Mapping[str, HyperSpec],
        values: Mapping[str, Tensor | Sequence[float] | float],
    ) -> None:
        self.horizon = int(horizon)
        self.specs = {name: specs[name] for name in HYPERPARAMETERS}
        self.values: dict[str, Tensor] = {}
        for name in HYPERPARAMETERS:
            n = self.specs[name].n_segments
            v = torch.as_tensor(values[name], dtype=torch.float64).detach().clone()
            self.values[name] = v.expand(n).clone() if v.ndim == 0 else v.reshape(n)

    # -- structure -------------------------------------------------------------------------
    @property
    def learned(self) -> tuple[str, ...]:
        return tuple(n for n in HYPERPARAMETERS if self.specs[n].learn)

    def segment_index(self, name: str) -> Tensor:
        """LongTensor [T]: the segment in force at every step (``floor(n t / T)``)."""
        n = self.specs[name].n_segments
        return torch.arange(self.horizon, dtype=torch.long) * n // self.horizon

    def segment_at(self, name: str, step: int) -> int:
        """The segment in force at ``step`` (one entry of :meth:`segment_index`, no tensor)."""
        return step * self.specs[name].n_segments // self.horizon

    def segment_starts(self, name: str) -> list[int]:
        """First step of every segment (``ceil(k T / n)``)."""
        n = self.specs[name].n_segments
        return [-(-k * self.horizon // n) for k in range(n)]

    # -- values ------------------------------------------------------------------------------
    def per_step(
        self,
        name: str,
        values: Tensor | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Tensor [T] of the value in force at each step; differentiable in ``values``."""
        v = self.values[name] if values is None else values
        v = v.to(device=device or v.device, dtype=dtype or v.dtype)
        return v[self.segment_index(name).to(v.device)]

    def table(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        values: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-step values of every type: ``{name: Tensor[T]}`` (what the inner loop reads)."""
        values = values or {}
        return {
            n: self.per_step(n, values.get(n), device=device, dtype=dtype) for n in HYPERPARAMETERS
        }

    def replace(self, values: Mapping[str, Tensor]) -> HyperSchedule:
        return HyperSchedule(self.horizon, self.specs, {**self.values, **values})

    def project(self) -> HyperSchedule:
        """Clip every value into its bounds (weight decay never negative by default)."""
        return self.replace({n: v.clamp(*self.specs[n].bounds) for n, v in self.values.items()})

    def n_columns(self) -> int:
        return sum(self.specs[n].n_segments for n in self.learned)

    def to_dict(self) -> dict[str, Any]:
        return {
            n: {
                "values": self.values[n].tolist(),
                "segments": self.specs[n].n_segments,
                "bounds": list(self.specs[n].bounds),
                "learned": self.specs[n].learn,
            }
            for n in HYPERPARAMETERS
        }

    @classmethod
    def from_dict(cls, horizon: int, d: Mapping[str, Mapping[str, Any]]) -> HyperSchedule:
        """The schedule :meth:`to_dict` described (``results.json``'s ``learned_schedule``)."""
        specs = {}
        for n in HYPERPARAMETERS:
            lo, hi = d[n]["bounds"]
            specs[n] = HyperSpec(
                int(d[n]["segments"]), (float(lo), float(hi)), bool(d[n]["learned"])
            )
        return cls(horizon, specs, {n: d[n]["values"] for n in HYPERPARAMETERS})

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}={[round(x, 5) for x in self.values[n].tolist()]}" for n in HYPERPARAMETERS
        )
        return f"HyperSchedule(T={self.horizon}, {parts})"


def positive_per_type(key: str, values: Mapping[str, float]) -> dict[str, float]:
    """``values`` (a number per hyperparameter type) as floats, each checked positive.

    Raises:
        ConfigError: ``{key}.{type}=... must be a positive number``.
    """
    out = {}
    for name, v in values.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"{key}.{name}={v!r} must be a positive number")
        out[str(name)] = float(v)
    return out


def require_types(key: str, per_type: Mapping[str, float], schedule: HyperSchedule) -> None:
    """Raise ConfigError unless ``per_type`` has an entry for every learned type."""
    missing = [n for n in schedule.learned if n not in per_type]
    if missing:
        raise ConfigError(f"{key} has no entry for {', '.join(missing)}")


def constant_schedule(horizon: int, **values: float) -> HyperSchedule:
    """A one-segment, fixed schedule (baselines, retraining, tests)."""
    specs = {n: HyperSpec(1, (float("-inf"), float("inf")), learn=False) for n in HYPERPARAMETERS}
    return HyperSchedule(horizon, specs, {n: values.get(n, 0.0) for n in HYPERPARAMETERS})


def cosine_schedule(horizon: int, lr: float, momentum: float, weight_decay: float) -> HyperSchedule:
    """Cosine-annealed learning rate (one value per step), constant momentum and weight decay."""
    t = torch.arange(horizon, dtype=torch.float64)
    lrs = 0.5 * lr * (1 + torch.cos(torch.pi * t / horizon))
    specs = {
        "lr": HyperSpec(horizon, (0.0, float("inf")), learn=False),
        "momentum": HyperSpec(1, (0.0, 1.0), learn=False),
        "weight_decay": HyperSpec(1, (0.0, float("inf")), learn=False),
    }
    return HyperSchedule(
        horizon, specs, {"lr": lrs, "momentum": momentum, "weight_decay": weight_decay}
    )
