"""``estimator=auto``: forward mode, exact reverse or checkpointed reverse, by a cost model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from metahpo import distributed
from metahpo.core import ConfigError, Hypergradient, HypergradientEstimator, Task
from metahpo.estimators.checkpointed_reverse import (
    MIB,
    CheckpointedReverse,
    graph_bytes_per_step,
    memory_estimate,
    state_bytes,
    stretch_for_budget,
)
from metahpo.inner import FlatTask, Steps
from metahpo.schedule import HyperSchedule
from metahpo.validation import Positive, checked

#: Seconds per inner step in units of a plain training step, measured side by side on the
#: digits MLP (benchmarks/checkpointed.py, docs/estimators.md; medians over its cells): forward
#: mode ``1 + FORWARD_PER_COLUMN`` per started column, exact reverse ``REVERSE``, checkpointed
#: reverse exact reverse's plus ``RECOMPUTE`` per recomputed step. Counting gradient
#: evaluations instead (forward 1 + 2 C, reverse 4) puts the crossover at the same 1.5 columns.
FORWARD_PER_COLUMN = 0.33
REVERSE = 1.5
RECOMPUTE = 0.6


@dataclass
class Choice:
    """What :class:`Auto` picked, why, and the model's figures for every candidate."""

    name: str
    reason: str
    stretch: int | None = None
    cost: dict[str, float] = field(default_factory=dict)  # in plain training steps
    memory_mb: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"auto_choice": self.name, "auto_reason": self.reason}
        for name, c in self.cost.items():
            out[f"auto_cost_{name}"] = c
        for name, m in self.memory_mb.items():
            out[f"auto_memory_mb_{name}"] = m
        return out


def started_columns(schedule: HyperSchedule) -> list[int]:
    """Per inner step, the learned raw values whose support has started (forward mode's active
    columns)."""
    active = torch.zeros(schedule.horizon + 1, dtype=torch.long)
    for key in schedule.learned:
        for first in schedule.segment_starts(key):
            active[first] += 1
    return [int(a) for a in active.cumsum(0)[:-1]]


def available_bytes(device: torch.device) -> int:
    """Half the memory free now on ``device`` (the default budget)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def schedule_bytes(horizon: int, n_keys: int, itemsize: int) -> int:
    """Bytes of the per-step schedule every estimator reads: per key, the segment index
    (int64) and the value in force (``itemsize``) at each of the ``horizon`` steps."""
    return horizon * n_keys * (8 + itemsize)


def check_fits(horizon: int, n_keys: int, itemsize: int, device: torch.device) -> None:
    """Pre-flight, before anything is allocated: raise ConfigError in one line when the
    per-step schedule alone (:func:`schedule_bytes`) exceeds :func:`available_bytes`; the
    estimators' own memory (forward mode's tangents, reverse mode's graph) comes on top."""
    need, have = schedule_bytes(horizon, n_keys, itemsize), available_bytes(device)
    if need > have:
        most = have // (n_keys * (8 + itemsize))
        raise ConfigError(
            f"horizon={horizon} needs an estimated {need / 2**30:.1f} GiB for the per-step "
            f"schedule alone ({n_keys} keys x {horizon} steps x {8 + itemsize} bytes), more than "
            f"the {have / 2**30:.1f} GiB available on {device} (half the free memory); lower "
            f"horizon (at most about {most})"
        )


def relative_cost(estimator: Any, schedule: HyperSchedule) -> tuple[float, str]:
    """Seconds per inner step of ``estimator``'s hypergradient in plain training steps, by the
    same model :func:`choose` uses, and the estimator it was modelled as (an unknown
    estimator is modelled as exact reverse)."""
    name = str(getattr(estimator, "name", type(estimator).__name__))
    T = schedule.horizon
    forward = sum(1 + FORWARD_PER_COLUMN * c for c in started_columns(schedule)) / T
    if name == "forward":
        return forward, name
    if name == "auto":
        return min(forward, REVERSE), name
    if name == "checkpointed_reverse":
        return REVERSE + RECOMPUTE, name
    known = ("exact_reverse", "truncated_reverse", "greedy", "reversible")
    return REVERSE, name if name in known else "exact reverse (assumed)"


def gradient_evaluations(estimator: Any, schedule: HyperSchedule) -> tuple[int, str]:
    """Compute of one hypergradient of ``estimator`` in gradient evaluations (plain training
    steps), by the count the model above states: forward mode ``1 + 2 c_t`` at step ``t`` with
    ``c_t`` started columns (a Hessian-vector product costs about two), exact reverse 4 per step
    (``auto``: the smaller; every other estimator is modelled as exact reverse); and the
    estimator it was modelled as. Black-box searches spend their budget in the same unit
    (metahpo/search.py)."""
    name = str(getattr(estimator, "name", type(estimator).__name__))
    forward = sum(1 + 2 * c for c in started_columns(schedule))
    reverse = 4 * schedule.horizon
    if name == "forward":
        return forward, name
    if name == "auto":
        return min(forward, reverse), name
    known = ("exact_reverse", "checkpointed_reverse", "truncated_reverse", "greedy", "reversible")
    return reverse, name if name in known else "exact reverse (assumed)"


def plain_step_seconds(task: Task, schedule: HyperSchedule, steps: int = 3) -> float:
    """Seconds of one plain training step of ``task``, timed over ``steps`` steps after a
    warm-up step (a probe of a few steps, nothing kept)."""
    import time

    from metahpo.device import synchronize
    from metahpo.inner import train

    flat = FlatTask(task)
    table = Steps(flat, schedule)
    n = min(steps + 1, schedule.horizon)
    state = train(flat, table, table.init_state(flat), 1)
    synchronize(task.device)
    start = time.perf_counter()
    train(flat, table, state, n)
    synchronize(task.device)
    return (time.perf_counter() - start) / max(n - 1, 1)


def estimate_seconds(
    task: Task,
    schedule: HyperSchedule,
    estimator: Any,
    outer_runs: int,
    final_runs: int,
) -> tuple[float, str]:
    """Wall-time estimate of a run before it starts, and how it was made: a probe of a plain
    step (:func:`plain_step_seconds`) times :func:`relative_cost` times the horizon for each of
    ``outer_runs`` hypergradients, plus ``final_runs`` plain retrainings."""
    plain = plain_step_seconds(task, schedule)
    cost, modelled = relative_cost(estimator, schedule)
    T = schedule.horizon
    seconds = plain * T * (cost * outer_runs + final_runs)
    how = (
        f"a plain inner step {plain * 1e3:.3g} ms x {T} steps x ({outer_runs} estimates at "
        f"~{cost:.1f} plain steps per step for {modelled} + {final_runs} plain retrainings)"
    )
    return seconds, how


def choose(
    horizon: int,
    columns: list[int],
    n_params: int,
    state: int,
    per_step: int,
    itemsize: int,
    n_state: int,
    budget: int,
    exact_reverse: bool = True,
) -> Choice:
    """The fastest estimator whose modelled memory fits ``budget`` bytes.

    Args:
        horizon: T. columns: forward mode's started columns per step. n_params: P.
        state: bytes of one stored inner state. per_step: reverse graph bytes per step.
        itemsize: bytes per number. n_state: the optimiser's state tensors.
        exact_reverse: whether plain exact reverse may be picked (not data-parallel).
    """
    T = horizon
    c_max = max(columns, default=0)
    cost = {
        "forward": float(sum(1 + FORWARD_PER_COLUMN * c for c in columns)),
        "exact_reverse": REVERSE * T,
    }
    memory = {
        "forward": state + c_max * (1 + n_state) * n_params * itemsize,
        "exact_reverse": state + T * per_step,
    }
    k = stretch_for_budget(T, budget, state, per_step)
    if k is not None:
        cost["checkpointed_reverse"] = REVERSE * T + RECOMPUTE * (T - k)
        memory["checkpointed_reverse"] = memory_estimate(T, k, state, per_step)
    if not exact_reverse:
        del cost["exact_reverse"], memory["exact_reverse"]
    fits = [n for n in cost if memory[n] <= budget]
    if not fits:
        raise ConfigError(
            f"estimator.memory_mb={budget / MIB:.1f}: no exact estimator fits; forward mode "
            f"needs {memory['forward'] / MIB:.1f} MiB, checkpointed reverse more than the budget"
        )
    name = min(fits, key=lambda n: (cost[n], memory[n]))
    others = ", ".join(
        f"{n} {cost[n] / T:.1f}" + ("" if n in fits else " (over budget)")
        for n in cost
        if n != name
    )
    reason = (
        f"{name}: {cost[name] / T:.1f} plain steps per step ({others}); "
        f"{memory[name] / MIB:.1f} MiB within {budget / MIB:.1f} MiB; "
        f"{c_max} columns, T={T}, P={n_params}"
    )
    return Choice(
        name,
        reason,
        k if name == "checkpointed_reverse" else None,
        {n: c / T for n, c in cost.items()},
        {n: m / MIB for n, m in memory.items()},
    )


@checked("estimator")
class Auto:
    """Whichever exact estimator the cost model expects to be fastest within a memory budget.

    All three candidates compute the same exact hypergradient of the final validation loss:
    forward mode (time grows with the started columns, memory with columns x P, not T),
    exact reverse (time ~``REVERSE`` plain steps per step whatever the columns, memory grows
    with T) and checkpointed reverse (exact reverse's time plus one recomputed plain pass,
    memory ~sqrt(T)). The choice is made once per horizon, before the first estimate, from
    the started columns per step, T, P, the optimiser's state and the graph bytes per step
    (measured on two probe steps); see :func:`choose`. ``metrics["auto_choice"]`` and
    ``metrics["auto_reason"]`` (and the model's per-candidate cost and memory) land in
    results.json. Bias: none. Data-parallel: plain exact reverse is never picked (it cannot
    run data-parallel; checkpointed reverse with one stretch has its memory).

    Args:
        memory_mb: budget in MiB (None: half the memory free on the device at the choice).
    """

    name = "auto"
    data_parallel = True

    def __init__(self, memory_mb: Positive | None = None) -> None:
        self.memory_mb = memory_mb
        self._picked: tuple[int, Choice, HypergradientEstimator] | None = None

    def pick(self, task: Task, schedule: HyperSchedule) -> tuple[Choice, HypergradientEstimator]:
        """The choice for this schedule's horizon (made once) and the estimator it built."""
        if self._picked is not None and self._picked[0] == schedule.horizon:
            return self._picked[1], self._picked[2]
        flat = FlatTask(task)
        init = Steps(flat, schedule).init_state(flat)
        budget = (
            available_bytes(task.device) if self.memory_mb is None else int(self.memory_mb * MIB)
        )
        choice = choose(
            schedule.horizon,
            started_columns(schedule),
            flat.n_params,
            state_bytes(init),
            graph_bytes_per_step(flat, schedule),
            init.theta.element_size(),
            len(init.opt_state),
            budget,
            exact_reverse=distributed.world_size() == 1,
        )
        estimator: HypergradientEstimator
        if choice.name == "forward":
            from metahpo.estimators.forward import ForwardMode

            estimator = ForwardMode()
        elif choice.name == "exact_reverse":
            from metahpo.estimators.exact_reverse import ExactReverse

            estimator = ExactReverse()
        else:
            estimator = CheckpointedReverse(stretch=choice.stretch)
        self._picked = (schedule.horizon, choice, estimator)
        return choice, estimator

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        choice, estimator = self.pick(task, schedule)
        hg = estimator.hypergradient(task, schedule)
        hg.metrics = {**hg.metrics, **choice.metrics()}
        return hg
