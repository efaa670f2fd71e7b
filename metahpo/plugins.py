"""What a plugin hands back is checked where it enters the outer loop, in one line.

An estimator's :class:`~metahpo.core.Hypergradient` and an outer optimiser's ``step`` and
``converged`` results are checked before anything uses them: a wrong type, a missing or unknown
schedule key, a gradient shaped unlike its key's shared values (one entry per segment, never
broadcast) and a tensor meta-loss are a :class:`PluginError` naming the plugin and what it
returned. The rows of docs/reliability.md list every case with its message.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from metahpo.core import ConfigError, Hypergradient
from metahpo.schedule import HyperSchedule


class PluginError(ConfigError):
    """A plugin (estimator, outer optimiser) returned something metahpo cannot use."""


def plugin_name(plugin: Any) -> str:
    """``module.Class`` of a plugin object: what its config's ``_target_`` names."""
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _shown(value: Any) -> str:
    """``a dict``, ``a list [1.0, 1.0]``, ``a 0-d tensor``: what a plugin returned, briefly."""
    if isinstance(value, Tensor):
        return "a 0-d tensor" if value.dim() == 0 else f"a tensor of shape {list(value.shape)}"
    kind = type(value).__name__
    if isinstance(value, list | tuple) and len(repr(value)) <= 40:
        return f"a {kind} {value!r}"
    return "None" if value is None else f"a {kind}"


def check_hypergradient(result: Any, schedule: HyperSchedule, plugin: Any) -> Hypergradient:
    """``result`` of ``plugin.hypergradient(task, schedule)``, checked; its ``grads`` as float64
    CPU tensors for every schedule key (zeros for fixed keys the plugin left out).

    Non-finite values are not a plugin error here: the runner rejects the step (a diverged
    inner run gives them too) and says which it was.

    Raises:
        PluginError: in one line, naming the plugin and what it returned.
    """
    where = f"estimator {plugin_name(plugin)}"
    if not isinstance(result, Hypergradient):
        raise PluginError(
            f"{where}: hypergradient() returned {_shown(result)}; "
            "expected a metahpo.Hypergradient(meta_loss=float, grads={key: tensor})"
        )
    loss = result.meta_loss
    if isinstance(loss, Tensor) or not isinstance(loss, int | float) or isinstance(loss, bool):
        raise PluginError(
            f"{where}: meta_loss is {_shown(loss)}; expected a Python "
            "float (float(loss) of a 0-d tensor)"
        )
    grads = result.grads
    if not isinstance(grads, dict):
        raise PluginError(
            f"{where}: grads is {_shown(grads)}; expected a dict "
            f"{{key: tensor}} with the keys {', '.join(schedule.learned)}"
        )
    unknown = [str(k) for k in grads if k not in schedule.keys]
    missing = [k for k in schedule.learned if k not in grads]
    if unknown or missing:
        what = f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else ""
        what += ("; " if what else "") + (f"no entry for {', '.join(missing)}" if missing else "")
        raise PluginError(
            f"{where}: grads has {what}; expected one entry per learned hyperparameter: "
            f"{', '.join(schedule.learned)}"
        )
    out: dict[str, Tensor] = {}
    for key in schedule.keys:
        n = schedule.specs[key].n_segments
        if key not in grads:
            out[key] = torch.zeros(n, dtype=torch.float64)
            continue
        g = grads[key]
        if not isinstance(g, Tensor):
            raise PluginError(
                f"{where}: grads[{key!r}] is {_shown(g)}; expected a tensor "
                f"of shape [{n}] (one entry per shared value of {key})"
            )
        if tuple(g.shape) != (n,):
            raise PluginError(
                f"{where}: grads[{key!r}] has shape {list(g.shape)}; expected [{n}] (one entry "
                f"per shared value of {key}; never broadcast)"
            )
        if g.is_complex() or not g.is_floating_point():
            raise PluginError(f"{where}: grads[{key!r}] has dtype {g.dtype}; expected a float")
        out[key] = g.detach().to("cpu", torch.float64)
    result.grads = out
    result.meta_loss = float(loss)
    if result.schedule is not None and not isinstance(result.schedule, HyperSchedule):
        raise PluginError(
            f"{where}: schedule is {type(result.schedule).__name__}; expected a "
            "metahpo.HyperSchedule (the schedule an online estimator ended with) or None"
        )
    return result


def nonfinite_message(result: Hypergradient, plugin: Any) -> str | None:
    """Why a checked ``result`` is unusable, or None when all of it is finite.

    A non-finite meta-loss means the inner run diverged; finite meta-loss with a non-finite
    hypergradient is the estimator's own numerical failure, and the message says so.
    """
    bad = [k for k, g in result.grads.items() if not bool(torch.isfinite(g).all())]
    if not math.isfinite(result.meta_loss):
        return "inner training diverged: the meta-loss is not finite"
    if bad:
        return (
            f"estimator {plugin_name(plugin)} returned a non-finite hypergradient of "
            f"{', '.join(bad)} at a finite meta-loss ({result.meta_loss:.6g})"
        )
    return None


def check_outer_step(result: Any, schedule: HyperSchedule, plugin: Any) -> tuple[Any, Any]:
    """``result`` of an outer optimiser's ``step(schedule, grads, state)``: ``(schedule, state)``
    with the same keys and shapes, finite values."""
    where = f"outer optimiser {plugin_name(plugin)}"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise PluginError(
            f"{where}: step() returned {_shown(result)}; expected a "
            "tuple (new HyperSchedule, state)"
        )
    new, state = result
    if not isinstance(new, HyperSchedule):
        raise PluginError(
            f"{where}: step() returned {_shown(new)} as its schedule; "
            "expected a HyperSchedule (schedule.replace(values).project())"
        )
    if new.keys != schedule.keys:
        raise PluginError(
            f"{where}: step() returned a schedule with keys {', '.join(new.keys)}; expected "
            f"{', '.join(schedule.keys)}"
        )
    for key in schedule.keys:
        v, n = new.values[key], schedule.specs[key].n_segments
        if tuple(v.shape) != (n,) or not bool(torch.isfinite(v).all()):
            raise PluginError(
                f"{where}: step() returned {key} = {v.tolist()}; expected {n} finite value(s)"
            )
    return new, state


def check_converged(result: Any, plugin: Any) -> bool:
    """An outer optimiser's ``converged(before, after, state, fraction)``: a bool."""
    if not isinstance(result, bool):
        raise PluginError(
            f"outer optimiser {plugin_name(plugin)}: converged() returned "
            f"{_shown(result)}; expected True or False"
        )
    return result
