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
from metahpo.inner import FlatTask, Steps, train
from metahpo.reverse import check_window
from metahpo.schedule import HyperSchedule
from metahpo.validation import Positive, PositiveInt, checked

#: Seconds per inner step in units of a plain training step, measured side by side on the
#: digits MLP (benchmarks/checkpointed.py, docs/estimators.md; medians over its cells): forward
#: mode ``1 + FORWARD_PER_COLUMN`` per started column, exact reverse ``REVERSE``, checkpointed
#: reverse exact reverse's plus ``RECOMPUTE`` per recomputed step. Counting gradient
#: evaluations instead (forward 1 + 2 C, reverse 4) puts the crossover at the same 1.5 columns.
#: These are the model's figures with ``calibrate=false``; ``calibrate=true`` (the default)
#: measures the first two on the task's own model (:func:`measure_rates`).
FORWARD_PER_COLUMN = 0.33
REVERSE = 1.5
RECOMPUTE = 0.6
#: Exact reverse (through ``higher``) against the window machinery that :func:`measure_rates`
#: times, per step: 1.2-1.3x on the digits MLP and on LeNet (docs/estimators.md).
HIGHER_OVERHEAD = 1.25
#: Columns :func:`measure_rates` times (the products' cost is about linear in the columns).
PROBE_COLUMNS = 8


@dataclass(frozen=True)
class Rates:
    """Seconds per inner step of each candidate, in plain training steps: forward mode
    ``1 + per_column`` per started column, exact reverse ``reverse``, checkpointed reverse
    exact reverse's plus ``recompute`` per recomputed step; ``source`` says where they came
    from."""

    per_column: float = FORWARD_PER_COLUMN
    reverse: float = REVERSE
    recompute: float = RECOMPUTE
    source: str = "constants fitted on the digits MLP"


def measure_rates(task: Task, schedule: HyperSchedule, steps: int = 3, repeats: int = 5) -> Rates:
    """:class:`Rates` for ``task``'s own model, timed on its first batches (interleaved; each
    figure called for at least 20 ms, the least of ``repeats`` rounds after a warm-up round;
    nothing kept):

    - a plain step: :func:`metahpo.inner.train` without a graph (the unit);
    - forward mode: one gradient with ``PROBE_COLUMNS`` Hessian-vector products by forward
      mode's own :func:`~metahpo.estimators.forward.grad_and_hvp`; the excess over a plain
      step, per column, is ``per_column`` (the tangents' update, O(C P), is left out);
    - reverse mode: ``steps`` steps of a reverse window's graph (the one checkpointed reverse
      builds) and the backward pass through it, per step, times :data:`HIGHER_OVERHEAD`;
    - ``recompute``: one plain step (a recomputed step is one), i.e. 1.

    Cost: ``repeats + 1`` rounds of at least 60 ms, or of ``steps`` plain steps + one gradient
    with 8 products + ``steps`` reverse steps where that is longer: about 0.4 s on the digits
    MLP, 3 s on LeNet on a CPU. The timings vary with the machine's load, so the pick can
    differ between machines near a crossover; every candidate is exact, and a resumed run
    keeps the pick it made (:meth:`Auto.state_dict`).
    """
    import time

    from metahpo.device import synchronize
    from metahpo.estimators.checkpointed_reverse import _graph_probe
    from metahpo.estimators.forward import grad_and_hvp

    flat = FlatTask(task)
    table = Steps(flat, schedule)
    init = table.init_state(flat)
    steps = max(1, min(steps, schedule.horizon))
    c = PROBE_COLUMNS
    Z = torch.randn(
        c, flat.n_params, generator=torch.Generator().manual_seed(0), dtype=init.theta.dtype
    ).to(init.theta.device)
    batch = flat.batch(0)

    def timed(fn: Any, least: float = 0.02) -> float:
        """Seconds per call of ``fn``, called until ``least`` seconds have passed."""
        calls = 0
        synchronize(task.device)
        start = time.perf_counter()
        while not calls or time.perf_counter() - start < least:
            fn()
            calls += 1
            synchronize(task.device)
        return (time.perf_counter() - start) / calls

    def plain() -> None:
        with torch.no_grad():
            train(flat, table, init, steps)

    def reverse() -> None:
        window = _graph_probe(flat, schedule, init, steps)
        torch.autograd.backward(sum(t.sum() for t in (window.theta, *window.opt_state)))

    times: dict[str, list[float]] = {"plain": [], "forward": [], "reverse": []}
    for _ in range(repeats + 1):
        times["plain"].append(timed(plain) / steps)
        times["forward"].append(timed(lambda: grad_and_hvp("rev_rev", flat, init, batch, Z)))
        times["reverse"].append(timed(reverse) / steps)
    # the least of the rounds after a warm-up: the one least disturbed by other work
    p, f, r = (min(v[1:]) for v in times.values())
    return Rates(
        per_column=max(f - p, 0.0) / (c * p),
        reverse=HIGHER_OVERHEAD * r / p,
        recompute=1.0,
        source=f"measured on this model: a plain step {p * 1e3:.3g} ms",
    )


@dataclass
class Choice:
    """What :class:`Auto` picked, why, and the model's figures for every candidate."""

    name: str
    reason: str
    stretch: int | None = None
    cost: dict[str, float] = field(default_factory=dict)  # in plain training steps
    memory_mb: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # Rates' figures

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"auto_choice": self.name, "auto_reason": self.reason}
        for name, r in self.rates.items():
            out[f"auto_rate_{name}"] = r
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


def relative_cost(
    estimator: Any, schedule: HyperSchedule, rates: Rates = Rates()
) -> tuple[float, str]:
    """Seconds per inner step of ``estimator``'s hypergradient in plain training steps, by the
    same model :func:`choose` uses (with ``rates``), and the estimator it was modelled as (an
    unknown estimator is modelled as exact reverse)."""
    name = str(getattr(estimator, "name", type(estimator).__name__))
    T = schedule.horizon
    forward = sum(1 + rates.per_column * c for c in started_columns(schedule)) / T
    if name == "forward":
        return forward, name
    if name == "auto":
        return min(forward, rates.reverse), name
    if name == "checkpointed_reverse":
        return rates.reverse + rates.recompute, name
    known = ("exact_reverse", "truncated_reverse", "greedy", "reversible")
    return rates.reverse, name if name in known else "exact reverse (assumed)"


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
    step (:func:`plain_step_seconds`) times :func:`relative_cost` (with the model's own
    :func:`measure_rates`) times the horizon for each of ``outer_runs`` hypergradients, plus
    ``final_runs`` plain retrainings."""
    plain = plain_step_seconds(task, schedule)
    rates = measure_rates(task, schedule)
    cost, modelled = relative_cost(estimator, schedule, rates)
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
    rates: Rates = Rates(),
) -> Choice:
    """The fastest estimator whose modelled memory fits ``budget`` bytes.

    Args:
        horizon: T. columns: forward mode's started columns per step. n_params: P.
        state: bytes of one stored inner state. per_step: reverse graph bytes per step.
        itemsize: bytes per number. n_state: the optimiser's state tensors.
        exact_reverse: whether plain exact reverse may be picked (not data-parallel).
        rates: the per-step costs (:class:`Rates`: the fitted constants or measured ones).
    """
    T = horizon
    c_max = max(columns, default=0)
    cost = {
        "forward": float(sum(1 + rates.per_column * c for c in columns)),
        "exact_reverse": rates.reverse * T,
    }
    memory = {
        "forward": state + c_max * (1 + n_state) * n_params * itemsize,
        "exact_reverse": state + T * per_step,
    }
    k = stretch_for_budget(T, budget, state, per_step)
    if k is not None:
        cost["checkpointed_reverse"] = rates.reverse * T + rates.recompute * (T - k)
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
        f"{c_max} columns, T={T}, P={n_params}; per step: forward 1 + "
        f"{rates.per_column:.2f} per column, reverse {rates.reverse:.2f} ({rates.source})"
    )
    return Choice(
        name,
        reason,
        k if name == "checkpointed_reverse" else None,
        {n: c / T for n, c in cost.items()},
        {n: m / MIB for n, m in memory.items()},
        {"per_column": rates.per_column, "reverse": rates.reverse, "recompute": rates.recompute},
    )


@checked("estimator")
class Auto:
    """Whichever exact estimator the cost model expects to be fastest within a memory budget.

    All three candidates compute the same exact hypergradient of the final validation loss:
    forward mode (time grows with the started columns, memory with columns x P, not T),
    exact reverse (time a few plain steps per step whatever the columns, memory grows with
    T) and checkpointed reverse (exact reverse's time plus one recomputed plain pass, memory
    ~sqrt(T)). The choice is made once per horizon, before the first estimate, from the
    started columns per step, T, P, the optimiser's state, the graph bytes per step (measured
    on two probe steps) and the per-step costs (:class:`Rates`: measured on the task's model
    by :func:`measure_rates` with ``calibrate``, else constants fitted on the digits MLP); see
    :func:`choose`. ``metrics["auto_choice"]`` and ``metrics["auto_reason"]`` (and the model's
    per-candidate cost and memory) land in results.json; the choice is kept in the checkpoint,
    so a resumed run uses the estimator it started with. Bias: none. Data-parallel: plain
    exact reverse is never picked (it cannot run data-parallel; checkpointed reverse with one
    stretch has its memory), and the measured rates are averaged over ranks so that every rank
    picks the same.

    Args:
        memory_mb: budget in MiB (None: half the memory free on the device at the choice).
        calibrate: measure the per-step costs on the task's model (a probe of a second or a
            few; the pick may then differ between machines near a crossover) instead of
            using the digits MLP's constants (the same pick everywhere).
        window: passed to the estimator picked (``estimator.window`` of forward, exact and
            checkpointed reverse: the sum of the validation losses every W steps and at the
            end); the cost model leaves out its ``T / W`` validation gradients.
    """

    name = "auto"
    data_parallel = True

    def __init__(
        self,
        memory_mb: Positive | None = None,
        calibrate: bool = True,
        window: PositiveInt | None = None,
    ) -> None:
        self.memory_mb = memory_mb
        self.calibrate = calibrate
        self.window = window
        self._picked: tuple[int, Choice, HypergradientEstimator] | None = None
        self._restored: dict[int, Choice] = {}

    def state_dict(self) -> dict[str, Any]:
        """The choices made so far, per horizon (restored on resume)."""
        choices = dict(self._restored)
        if self._picked is not None:
            choices[self._picked[0]] = self._picked[1]
        return {"choices": {str(T): vars(c) for T, c in choices.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {int(T): Choice(**c) for T, c in state.get("choices", {}).items()}

    def pick(self, task: Task, schedule: HyperSchedule) -> tuple[Choice, HypergradientEstimator]:
        """The choice for this schedule's horizon (made once, or restored from the checkpoint)
        and the estimator it built."""
        if self._picked is not None and self._picked[0] == schedule.horizon:
            return self._picked[1], self._picked[2]
        choice = self._restored.get(schedule.horizon) or self._choose(task, schedule)
        estimator: HypergradientEstimator
        if choice.name == "forward":
            from metahpo.estimators.forward import ForwardMode

            estimator = ForwardMode(window=self.window)
        elif choice.name == "exact_reverse":
            from metahpo.estimators.exact_reverse import ExactReverse

            estimator = ExactReverse(window=self.window)
        else:
            estimator = CheckpointedReverse(stretch=choice.stretch, window=self.window)
        self._picked = (schedule.horizon, choice, estimator)
        return choice, estimator

    def _choose(self, task: Task, schedule: HyperSchedule) -> Choice:
        columns = started_columns(schedule)
        rates = Rates()
        if self.calibrate:
            rates = measure_rates(task, schedule)
            if distributed.world_size() > 1:  # one pick on every rank
                mean = distributed.all_reduce_mean(
                    torch.tensor([rates.per_column, rates.reverse], device=task.device)
                )
                rates = Rates(float(mean[0]), float(mean[1]), rates.recompute, rates.source)
        flat = FlatTask(task)
        init = Steps(flat, schedule).init_state(flat)
        budget = (
            available_bytes(task.device) if self.memory_mb is None else int(self.memory_mb * MIB)
        )
        return choose(
            schedule.horizon,
            columns,
            flat.n_params,
            state_bytes(init),
            graph_bytes_per_step(flat, schedule),
            init.theta.element_size(),
            len(init.opt_state),
            budget,
            exact_reverse=distributed.world_size() == 1,
            rates=rates,
        )

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless ``window`` (if set) fits the horizon (before the probe)."""
        if self.window is not None:
            check_window("window", self.window, schedule.horizon)

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        choice, estimator = self.pick(task, schedule)
        hg = estimator.hypergradient(task, schedule)
        hg.metrics = {**hg.metrics, **choice.metrics()}
        return hg
