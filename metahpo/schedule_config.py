"""The ``schedule`` config group -> a :class:`~metahpo.schedule.HyperSchedule`, checked once.

One function, :func:`schedule_from_config`, both validates the group (``metahpo.compose``
calls it before any training, with the task's class) and builds the schedule the run starts
from (:func:`metahpo.build.build`, with the task object). Types and ranges of an entry are
declared in :class:`Entry` (pydantic, strict: no string for a number, no float for a count);
what depends on other keys (the horizon, the hyperparameter's domain, the parameterisation) is
checked by the :class:`~metahpo.optim.Hyperparameter` and
:class:`~metahpo.parameterisation.Parameterisation` that own it. Every error is one line that
names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import annotated_types as at
import torch
from pydantic import Field, StrictBool

from metahpo.core import ConfigError
from metahpo.optim import Hyperparameter, InnerOptimizer
from metahpo.parameterisation import make_parameterisation
from metahpo.schedule import HyperSchedule, HyperSpec, unknown_hyperparameter
from metahpo.validation import Allowed, Node, check_model

Number = float
Init = Annotated[
    Number | Annotated[list[Number], at.MinLen(1)] | None,
    Allowed("a number or a list of numbers (null: the default)"),
]
Bounds = Annotated[
    Annotated[list[Number], at.Len(2, 2)] | None, Allowed("[min, max] (or null: default)")
]
Param = Annotated[
    str | dict[str, Any] | None,
    Allowed("constant, log, linear, warmup_cosine, a class path or {_target_: ..., ...}"),
]
Patterns = Annotated[
    str | Annotated[list[str], at.MinLen(1)],
    Allowed("a parameter-name pattern or a list of them"),
]
SETTINGS = ("segments", "init", "bounds", "learn", "param")


class Group(Node):
    """One group's own settings (each overrides the entry's)."""

    params: Patterns
    segments: int | None = None
    init: Init = None
    bounds: Bounds = None
    learn: StrictBool | None = None
    param: Param = None


class Entry(Node):
    """``schedule.<name>``: how one hyperparameter is learned (docs/config.md)."""

    segments: Annotated[int, Field(description="shared values, 1 to the horizon")] = 1
    init: Init = None
    bounds: Bounds = None
    learn: StrictBool = True
    param: Param = None
    groups: Annotated[
        dict[
            Annotated[str, at.MinLen(1)],
            Annotated[
                Patterns | Group,
                Allowed(
                    "a parameter-name pattern, a list of them, or {params: ..., and any of "
                    "segments, init, bounds, learn, param}"
                ),
            ],
        ]
        | None,
        Allowed("null or a mapping {group: pattern(s), or {params: ..., segments: ...}}"),
    ] = None


def schedule_from_config(
    data: Mapping[str, Any],
    horizon: int,
    optimizer: InnerOptimizer | type[InnerOptimizer],
    loss: Mapping[str, Hyperparameter] | None = None,
) -> HyperSchedule:
    """The schedule ``data`` (the ``schedule`` group as plain values) describes.

    Args:
        optimizer: the inner optimiser (its class is enough to validate).
        loss: the task's training-loss hyperparameters (``task.loss_hyperparameters``).

    Raises:
        ConfigError: one line naming the first bad key.
    """
    loss = dict(loss or {})
    known = {**optimizer.hyperparameters, **loss}
    specs: dict[str, HyperSpec] = {}
    values: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, node in data.items():
        key = f"schedule.{name}"
        if name not in known:
            raise unknown_hyperparameter(name, optimizer, loss)
        if not isinstance(node, Mapping):
            raise ConfigError(
                f"{key}={node!r} must be a mapping of {', '.join(Entry.model_fields)}"
            )
        groups_node = node.get("groups")
        for group, g in groups_node.items() if isinstance(groups_node, Mapping) else ():
            if isinstance(g, Mapping):  # a group's own settings: their own key names
                check_model(f"{key}.groups.{group}", Group, g)
        check_model(key, Entry, node)
        if name in optimizer.hyperparameters:
            owner = (optimizer.hyperparameters[name], f"{optimizer.name}'s {name}")
        else:
            owner = (loss[name], f"the loss's {name}")
        base = {k: (key, node.get(k)) for k in SETTINGS}
        if not node.get("groups"):
            specs[name], values[name] = _entry(base, horizon, owner)
            continue
        groups[name] = {}
        for group, g in node["groups"].items():
            gkey = f"{key}.groups.{group}"
            if "/" in group or "." in group:
                raise ConfigError(f"{gkey}: a group name cannot contain '/' or '.'")
            own = g if isinstance(g, Mapping) else {"params": g}
            patterns = own["params"]
            groups[name][group] = (patterns,) if isinstance(patterns, str) else tuple(patterns)
            settings = {k: (gkey, own[k]) if own.get(k) is not None else base[k] for k in SETTINGS}
            specs[f"{name}/{group}"], values[f"{name}/{group}"] = _entry(settings, horizon, owner)
    if not any(s.learn for s in specs.values()):
        raise ConfigError("schedule: no hyperparameter has learn=true; nothing to learn")
    return HyperSchedule(horizon, specs, values, optimizer, groups, loss)  # type: ignore[arg-type]


def _entry(
    settings: Mapping[str, tuple[str, Any]], horizon: int, owner: tuple[Hyperparameter, str]
) -> tuple[HyperSpec, torch.Tensor]:
    """One key's spec and raw values from its settings (``{setting: (where, value)}``)."""
    spec, what = owner
    (seg_key, n), (p_key, p) = settings["segments"], settings["param"]
    param = make_parameterisation(p_key, p, n)
    b_key, bounds = settings["bounds"]
    b_key = f"{b_key}.bounds"
    lo, hi = spec.bounds if bounds is None else (float(bounds[0]), float(bounds[1]))
    if lo > hi:
        raise ConfigError(f"{b_key}=[{lo}, {hi}] has min > max")
    for b in (lo, hi):
        spec.check(b_key, what, b, shown=[lo, hi])
    i_key, init = settings["init"]
    i_key = f"{i_key}.init"
    init = [spec.default] if init is None else init if isinstance(init, list) else [init]
    if len(init) not in (1, param.size):
        raise ConfigError(f"{i_key}={init} must be a number or a list of {param.size} numbers")
    init = [float(v) for v in init]
    param.check(seg_key, horizon, (lo, hi), init)
    for v in param.hyperparameter_values(init):
        spec.check(i_key, what, v)
    raw, (rlo, rhi) = param.to_raw(init), param.raw_bounds((lo, hi))
    if not bool(((rlo <= raw) & (raw <= rhi)).all()):
        raise ConfigError(f"{i_key}={init} lies outside {b_key}=[{lo}, {hi}]")
    return HyperSpec(param.size, (lo, hi), bool(settings["learn"][1]), param), raw
