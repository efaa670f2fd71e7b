"""Hyperparameter schedules: learnable raw values per key, and their value at every step.

Each key (a hyperparameter of the inner optimiser or of the task's training loss, or one
group's value of it) has a :class:`~metahpo.parameterisation.Parameterisation` of its own: by
default piecewise constant, ``n`` values over a horizon of ``T`` inner steps, step ``t`` using
value ``floor(n * t / T)`` (contiguous sharing); the gradient with respect to a shared value is
the sum of the per-step hypergradients over its block of steps. Log space, piecewise linear and
a warm-up + cosine family are built in (:mod:`metahpo.parameterisation`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metahpo.core import ConfigError
from metahpo.optim import SGD, Hyperparameter, InnerOptimizer, Recorded
from metahpo.parameterisation import (
    Constant,
    Parameterisation,
    make_parameterisation,
    segment_index,
)


def split_key(key: str) -> tuple[str, str | None]:
    """``"lr/fc1"`` -> ``("lr", "fc1")``; ``"lr"`` -> ``("lr", None)``."""
    name, sep, group = key.partition("/")
    return name, (group if sep else None)


@dataclass(frozen=True)
class HyperSpec:
    """How one schedule key is parameterised: raw values (``n_segments`` of them), bounds in
    the hyperparameter's units, learned or fixed, and the parameterisation (None: piecewise
    constant in ``n_segments`` segments)."""

    n_segments: int
    bounds: tuple[float, float]
    learn: bool = True
    param: Parameterisation | None = None

    def __post_init__(self) -> None:
        if self.param is None:
            object.__setattr__(self, "param", Constant(self.n_segments))
        elif self.param.size != self.n_segments:
            raise ValueError(
                f"HyperSpec: n_segments={self.n_segments} but {self.param!r} has "
                f"{self.param.size} raw values"
            )

    @property
    def parameterisation(self) -> Parameterisation:
        assert self.param is not None
        return self.param


class HyperSchedule:
    """Values of the inner optimiser's hyperparameters, shared over contiguous blocks of steps.

    Keys are the optimiser's hyperparameter names (``"lr"``), or ``"<name>/<group>"`` for a
    hyperparameter learned per group of parameters (``"lr/fc1"``; ``groups`` gives each group's
    parameter-name patterns). Each key has its own segments, bounds and learned flag. A
    hyperparameter of the optimiser that the schedule does not name stays at the optimiser's
    default (:attr:`metahpo.optim.Hyperparameter.default`).

    Values are the raw values of each key's parameterisation (for the default, piecewise
    constant, the hyperparameter's own values), as float64 CPU tensors: the outer loop's
    currency and what estimators differentiate. :meth:`per_step` maps them to the value at each
    step on the task's device and dtype. Instances are immutable: :meth:`replace` and
    :meth:`project` return new ones.

    Args:
        horizon: inner steps per run.
        specs: ``{key: HyperSpec}``; its order is the order of keys everywhere.
        values: ``{key: number or one number per segment}``.
        optimizer: the inner optimiser (default :class:`metahpo.optim.SGD`).
        groups: ``{name: {group: (pattern, ...)}}`` for per-group hyperparameters (fnmatch
            patterns on the task's parameter names, resolved by
            :func:`metahpo.groups.resolve_groups`).
        loss: the hyperparameters of the task's training loss
            (``task.loss_hyperparameters``); keys may name them as well as the optimiser's.
            Their values reach ``train_loss`` through the batch
            (:func:`metahpo.core.loss_hyper`).

    Raises:
        ConfigError: a key that is not a hyperparameter of the optimiser or of the loss, or a
            group key without its groups (and the reverse).
    """

    def __init__(
        self,
        horizon: int,
        specs: Mapping[str, HyperSpec],
        values: Mapping[str, Tensor | Sequence[float] | float],
        optimizer: InnerOptimizer | None = None,
        groups: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        loss: Mapping[str, Hyperparameter] | None = None,
    ) -> None:
        self.horizon = int(horizon)
        self.optimizer = optimizer if optimizer is not None else SGD()
        self.loss = dict(loss or {})
        self.groups = {
            str(n): {str(g): (p,) if isinstance(p, str) else tuple(p) for g, p in gs.items()}
            for n, gs in (groups or {}).items()
        }
        self.specs = dict(specs)
        _check_keys(self.specs, self.optimizer, self.groups, self.loss)
        self.values: dict[str, Tensor] = {}
        for key, spec in self.specs.items():
            if key not in values:
                raise ConfigError(f"schedule.{key} has no value")
            n = spec.n_segments
            v = torch.as_tensor(values[key], dtype=torch.float64).detach().clone()
            self.values[key] = v.expand(n).clone() if v.ndim == 0 else v.reshape(n)

    # -- structure -------------------------------------------------------------------------
    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.specs)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """Keys of hyperparameters of the training loss (not of the optimiser)."""
        return tuple(k for k in self.specs if split_key(k)[0] in self.loss)

    @property
    def learned(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.specs.items() if s.learn)

    def param(self, name: str) -> Parameterisation:
        """The parameterisation of key ``name``."""
        return self.specs[name].parameterisation

    def segment_index(self, name: str) -> Tensor:
        """LongTensor [T]: the segment in force at every step (``floor(n t / T)``)."""
        return segment_index(self.specs[name].n_segments, self.horizon)

    def supports(self, name: str) -> list[tuple[int, int]]:
        """``(first, last)`` step each raw value of ``name`` can influence."""
        return self.param(name).supports(self.horizon)

    def segment_starts(self, name: str) -> list[int]:
        """First step each raw value can influence (for segments, ``ceil(k T / n)``)."""
        return [first for first, _ in self.supports(name)]

    def raw_bounds(self, name: str) -> tuple[Tensor, Tensor]:
        """Bounds of every raw value of ``name`` (float64 ``[n]`` each)."""
        return self.param(name).raw_bounds(self.specs[name].bounds)

    def unit_scale(self, name: str) -> Tensor:
        """Per raw value, (width of its raw bounds) / (width of the key's bounds): turns a step
        given in the hyperparameter's units into raw units (1 for linear parameterisations and
        for infinite bounds)."""
        lo, hi = self.specs[name].bounds
        n = self.specs[name].n_segments
        if self.param(name).linear_units or not math.isfinite(hi - lo) or hi <= lo:
            return torch.ones(n, dtype=torch.float64)
        rlo, rhi = self.raw_bounds(name)
        return (rhi - rlo) / (hi - lo)

    def pullback(self, name: str, per_step_grad: Tensor) -> Tensor:
        """d L / d(raw values of ``name``) from ``[T]`` per-step hypergradients d L / d value_t."""
        return self.param(name).pullback(self.values[name], per_step_grad, self.horizon)

    # -- values ------------------------------------------------------------------------------
    def per_step(
        self,
        name: str,
        values: Tensor | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Tensor [T] of the value in force at each step; differentiable in ``values`` (raw)."""
        v = self.values[name] if values is None else values
        v = v.to(device=device or v.device, dtype=dtype or v.dtype)
        return self.param(name).per_step(v, self.horizon)

    def table(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        values: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-step values of every key: ``{key: Tensor[T]}`` (what the inner loop reads)."""
        values = values or {}
        return {n: self.per_step(n, values.get(n), device=device, dtype=dtype) for n in self.specs}

    def replace(self, values: Mapping[str, Tensor]) -> HyperSchedule:
        return HyperSchedule(
            self.horizon,
            self.specs,
            {**self.values, **values},
            self.optimizer,
            self.groups,
            self.loss,
        )

    def project(self) -> HyperSchedule:
        """Clip every raw value into its bounds."""
        return self.replace({n: v.clamp(*self.raw_bounds(n)) for n, v in self.values.items()})

    def n_columns(self) -> int:
        return sum(self.specs[n].n_segments for n in self.learned)

    def to_dict(self) -> dict[str, Any]:
        """``{key: {values, segments, bounds, learned, param}}`` (``results.json``'s schedules;
        ``values`` are raw values, ``param`` names their parameterisation)."""
        return {
            n: {
                "values": self.values[n].tolist(),
                "segments": self.specs[n].n_segments,
                "bounds": list(self.specs[n].bounds),
                "learned": self.specs[n].learn,
                "param": self.param(n).to_config(),
            }
            for n in self.specs
        }

    @classmethod
    def from_dict(
        cls,
        horizon: int,
        d: Mapping[str, Mapping[str, Any]],
        optimizer: InnerOptimizer | None = None,
        groups: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> HyperSchedule:
        """The schedule :meth:`to_dict` described (``results.json``'s ``learned_schedule``).

        ``optimizer`` and ``groups`` are not part of the dictionary; without them the schedule
        is for reading (plots, tables): its optimiser is a :class:`~metahpo.optim.Recorded`
        that knows the names, and its groups have no patterns.
        """
        if optimizer is None:
            names = list(dict.fromkeys(split_key(k)[0] for k in d))
            optimizer = Recorded(names)
            groups = {}
            for k in d:
                name, group = split_key(k)
                if group is not None:
                    groups.setdefault(name, {})[group] = ()
        specs = {}
        for n, entry in d.items():
            lo, hi = entry["bounds"]
            segments = int(entry["segments"])
            param = make_parameterisation(f"schedule.{n}", entry.get("param"), segments)
            specs[n] = HyperSpec(param.size, (float(lo), float(hi)), bool(entry["learned"]), param)
        return cls(horizon, specs, {n: d[n]["values"] for n in d}, optimizer, groups)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}={[round(x, 5) for x in self.values[n].tolist()]}" for n in self.specs
        )
        return f"HyperSchedule(T={self.horizon}, {parts})"


def require_loss_keys(schedule: HyperSchedule, estimator: str, why: str, can: str) -> None:
    """Raise ConfigError in one line unless ``schedule`` learns at least one key and only keys
    of the training loss (estimators that see nothing else: ``why`` says so, ``can`` names the
    estimators that differentiate the rest)."""
    other = [k for k in schedule.learned if k not in schedule.loss_keys]
    if other:
        raise ConfigError(
            f"estimator={estimator} {why}; schedule.{split_key(other[0])[0]} is the "
            f"optimiser's: set its learn=false, or use {can}"
        )
    if not schedule.learned:
        raise ConfigError(f"estimator={estimator}: no hyperparameter of the loss is learned")


def unknown_hyperparameter(
    name: str,
    optimizer: InnerOptimizer | type[InnerOptimizer],
    loss: Mapping[str, Hyperparameter],
) -> ConfigError:
    """The one-line error for ``schedule.<name>`` naming neither a hyperparameter of the
    optimiser nor one of the task's loss."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    of_loss = " or of the task's loss" if loss else ""
    known = ", ".join({**optimizer.hyperparameters, **loss})
    return ConfigError(
        f"schedule.{name} is not a hyperparameter of the {optimizer.name} optimizer "
        f"({cls.__module__}.{cls.__qualname__}){of_loss}; allowed: {known}"
    )


def _check_keys(
    specs: Mapping[str, HyperSpec],
    optimizer: InnerOptimizer,
    groups: Mapping[str, Mapping[str, Sequence[str]]],
    loss: Mapping[str, Hyperparameter],
) -> None:
    known = {**optimizer.hyperparameters, **loss}
    for key in specs:
        name, group = split_key(key)
        if name not in known:
            raise unknown_hyperparameter(name, optimizer, loss)
        if group is None and name in groups:
            raise ConfigError(
                f"schedule.{key}: {name} has groups ({', '.join(groups[name])}); "
                f"name them as {name}/<group>"
            )
        if group is not None and group not in groups.get(name, {}):
            raise ConfigError(
                f"schedule.{key}: {name} has no group {group!r}; "
                f"groups: {', '.join(groups.get(name, {})) or 'none'}"
            )
    for name, gs in groups.items():
        missing = [g for g in gs if f"{name}/{g}" not in specs]
        if name not in known or missing:
            raise ConfigError(
                f"schedule.{name}.groups: no schedule entry for group(s) {', '.join(missing)}"
                if name in known
                else f"schedule.{name}.groups: {name} is not a hyperparameter of the "
                f"{optimizer.name} optimizer; allowed: {', '.join(known)}"
            )


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


def per_key(
    key: str,
    per_type: Mapping[str, float],
    schedule: HyperSchedule,
    fraction: float | None = None,
) -> dict[str, float]:
    """A number for every learned key of ``schedule``, read from a per-type mapping.

    A key ``"lr/fc1"`` takes ``per_type["lr/fc1"]``, else ``per_type["lr"]``, else
    ``per_type["default"]``, else (with ``fraction``) ``fraction`` of the width of its bounds
    when they are finite. Entries for hyperparameters the schedule does not have are unused
    (the shipped outer configs name SGD's).

    Raises:
        ConfigError: ``{key} has no entry for ...`` when a learned key gets no number.
    """
    out, missing = {}, []
    for k in schedule.learned:
        name, _ = split_key(k)
        lo, hi = schedule.specs[k].bounds
        for candidate in (k, name, "default"):
            if candidate in per_type:
                out[k] = float(per_type[candidate])
                break
        else:
            if fraction is not None and math.isfinite(hi - lo) and hi > lo:
                out[k] = fraction * (hi - lo)
            else:
                missing.append(k)
    if missing:
        raise ConfigError(f"{key} has no entry for {', '.join(missing)}")
    return out


def raw_steps(
    key: str,
    per_type: Mapping[str, float],
    schedule: HyperSchedule,
    fraction: float | None = None,
    power: int = 1,
) -> dict[str, Tensor]:
    """:func:`per_key`'s numbers (in each hyperparameter's units) as steps on the raw values:
    times :meth:`HyperSchedule.unit_scale` to the ``power`` (1 for a step size, 2 for a
    gradient-descent learning rate, which a change of variables scales twice)."""
    sizes = per_key(key, per_type, schedule, fraction)
    return {k: sizes[k] * schedule.unit_scale(k) ** power for k in sizes}


def require_types(key: str, per_type: Mapping[str, float], schedule: HyperSchedule) -> None:
    """Raise ConfigError unless ``per_type`` gives a number for every learned key
    (:func:`per_key` without the bounds fallback)."""
    per_key(key, per_type, schedule)


def constant_schedule(
    horizon: int, optimizer: InnerOptimizer | None = None, **values: float
) -> HyperSchedule:
    """A one-segment, fixed schedule of every hyperparameter of ``optimizer`` (default SGD);
    those ``values`` omits take the optimiser's defaults (baselines, retraining, tests).

    Raises:
        ConfigError: a value for a name that is not a hyperparameter of the optimiser.
    """
    optimizer = optimizer if optimizer is not None else SGD()
    names = optimizer.hyperparameters
    unknown = [n for n in values if n not in names]
    if unknown:
        raise ConfigError(
            f"baseline.{unknown[0]} is not a hyperparameter of the {optimizer.name} optimizer; "
            f"allowed: {', '.join(names)}"
        )
    specs = {n: HyperSpec(1, (-math.inf, math.inf), learn=False) for n in names}
    full = {n: float(values.get(n, h.default)) for n, h in names.items()}
    return HyperSchedule(horizon, specs, full, optimizer)


def cosine_schedule(
    horizon: int, optimizer: InnerOptimizer | None = None, **values: float
) -> HyperSchedule:
    """:func:`constant_schedule` with the learning rate cosine-annealed (one value per step)."""
    base = constant_schedule(horizon, optimizer, **values)
    t = torch.arange(horizon, dtype=torch.float64)
    lrs = 0.5 * float(base.values["lr"]) * (1 + torch.cos(torch.pi * t / horizon))
    specs = {**base.specs, "lr": HyperSpec(horizon, (0.0, math.inf), learn=False)}
    return HyperSchedule(horizon, specs, {**base.values, "lr": lrs}, base.optimizer)
