"""Antithetic evolution strategies on the raw schedule values: no derivatives at all."""

from __future__ import annotations

import functools
import logging
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metahpo.core import ConfigError, DivergenceError, Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.inner import FlatTask, InnerState, Steps, fit, train
from metahpo.schedule import HyperSchedule
from metahpo.validation import Fraction, Positive, PositiveInt, checked

log = logging.getLogger(__name__)


def antithetic_estimate(
    f: Callable[[Tensor], float],
    x: Tensor,
    scale: Tensor,
    sigma: float,
    pairs: int,
    generator: torch.Generator,
    f_many: Callable[[Tensor], list[float]] | None = None,
) -> tuple[Tensor, Tensor, list[float]]:
    """Antithetic ES estimate of the gradient of ``J(x) = E_eps f(x + sigma scale eps)``.

    With ``eps ~ N(0, I)`` and ``d_i = (f(x + sigma s eps_i) - f(x - sigma s eps_i)) / 2``,
    each pair gives ``d_i eps_i / (sigma s)``, an unbiased estimate of ``grad J(x)``; the result
    is their mean, with its standard error (per coordinate, from the spread over pairs).
    ``f_many``, if given, evaluates all the samples at once (rows ``x + step_1, x - step_1,
    x + step_2, ...``) instead of ``f`` one by one; the noise is the same either way.

    Returns:
        ``(estimate, standard error, [f at every sample])``, float64.
    """
    eps = torch.stack(
        [torch.randn(x.shape, generator=generator, dtype=torch.float64) for _ in range(pairs)]
    )
    steps = sigma * scale * eps
    points = torch.stack([x + steps, x - steps], 1).reshape(2 * pairs, -1)
    values = f_many(points) if f_many is not None else [f(p) for p in points]
    rows = [
        (values[2 * i] - values[2 * i + 1]) / 2 * eps[i] / (sigma * scale) for i in range(pairs)
    ]
    samples = torch.stack(rows)
    stderr = samples.std(0) / math.sqrt(pairs) if pairs > 1 else torch.full_like(x, math.inf)
    return samples.mean(0), stderr, values


@checked("estimator")
class EvolutionStrategies:
    """Antithetic evolution strategies (ES): the gradient of the Gaussian-smoothed meta-loss.

    Estimates ``grad_h E_eps L_val(h + sigma s eps)`` for the learned raw values ``h`` of every
    key (any optimiser, any parameterisation, loss hyperparameters; the inner run need not be
    differentiable), ``s`` being each raw value's bounds width, from ``pairs`` antithetic pairs
    of plain inner runs (:func:`antithetic_estimate`). Perturbed values are projected into their
    bounds before the run.

    Bias: unbiased for the smoothed meta-loss (before projection); against the meta-loss itself
    its bias is ``O(sigma^2)`` where the meta-loss is smooth, and it is exactly what one wants
    where it is not (near the edge of stability, where exact hypergradients reach 1e5 and more,
    the smoothed one stays of the size of the meta-loss's variation over ``sigma s``).
    Variance: ``O(1 / pairs)`` and growing with the number of raw values.
    Memory: with ``batch`` (default), the ``2 pairs`` perturbed runs go through
    ``torch.func.vmap`` in chunks of ``c`` runs (:func:`batched_meta_losses`, :meth:`chunk`):
    ``c`` sets of weights, optimiser state, gradient and one step's activations, ``c`` the
    most that fit ``memory_mb`` (default half the free memory); one by one (one plain run's
    memory) when fewer than 2 fit, with ``batch=false``, and for tasks with batch-norm
    buffers. Compute: ``2 pairs + 1`` plain inner runs (the last at ``h`` itself,
    for the meta-loss, always on its own, so ``meta_loss`` is a plain run's bit for bit);
    batching changes their rounding only (equal to ~1e-12 relative in float64) and their speed
    (docs/estimators.md).
    The noise is drawn from a generator seeded by the task's seed and the schedule's values, so
    an estimate is reproducible and a resumed run repeats it bit for bit. A diverged sample makes
    the estimate non-finite, which the outer loop rejects like a diverged step.
    ``metrics``: ``es_pairs``, ``es_sigma``, ``es_stderr`` (the standard error's norm relative
    to the estimate's), ``es_batch`` (runs per vmap call, 0: one by one) and ``es_batch_why``.

    Args:
        sigma: the noise scale, as a fraction of each raw value's bounds width.
        pairs: antithetic pairs per estimate.
        batch: run the samples batched with ``torch.func.vmap`` where memory allows.
        memory_mb: the budget (MiB) for a batched chunk; None: half the memory free.
    """

    name = "es"
    data_parallel = False

    def __init__(
        self,
        sigma: Fraction = 0.01,
        pairs: PositiveInt = 8,
        batch: bool = True,
        memory_mb: Positive | None = None,
    ) -> None:
        self.sigma = sigma
        self.pairs = pairs
        self.batch, self.memory_mb = batch, memory_mb
        self._chunk: tuple[int, int, str] | None = None  # (horizon, samples per vmap, why)

    def chunk(self, task: Task, schedule: HyperSchedule) -> tuple[int, str]:
        """Samples per batched (vmap) call, 0 for one by one, and why (measured once per
        horizon): the most of the ``2 pairs`` runs whose weights, optimiser state, gradient
        and one step's activations (bounded by the graph bytes of a step, measured) fit
        ``memory_mb`` (None: half the memory free now); fewer than 2: one by one."""
        if self._chunk is not None and self._chunk[0] == schedule.horizon:
            return self._chunk[1], self._chunk[2]
        n = 2 * self.pairs
        if not self.batch:
            c, why = 0, "estimator.batch=false"
        else:
            from metahpo.estimators.auto import MIB, available_bytes
            from metahpo.estimators.checkpointed_reverse import graph_bytes_per_step, state_bytes

            flat = FlatTask(task)
            init = Steps(flat, schedule).init_state(flat)
            if init.buffers:
                self._chunk = (schedule.horizon, 0, "batch-norm buffers are not batched")
                return 0, self._chunk[2]
            grad = init.theta.numel() * init.theta.element_size()
            per_run = state_bytes(init) + grad + graph_bytes_per_step(flat, schedule, 1)
            if self.memory_mb is None:
                budget, source = available_bytes(task.device), "half the free memory"
            else:
                budget, source = int(self.memory_mb * MIB), f"memory_mb={self.memory_mb}"
            c = min(n, budget // per_run)
            c = c if c >= 2 else 0
            why = f"{per_run / MIB:.2f} MiB per run within {source}"
        self._chunk = (schedule.horizon, c, why)
        return c, why

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless every learned key has finite bounds (the noise's scale)."""
        for key in schedule.learned:
            lo, hi = schedule.raw_bounds(key)
            if not bool(torch.isfinite(hi - lo).all() and (hi > lo).all()):
                raise ConfigError(
                    f"estimator=es scales its noise by each key's bounds, but schedule.{key}"
                    f".bounds={list(schedule.specs[key].bounds)} has no finite width"
                )

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        with CostMeter(task.device) as cost:
            meta_loss, grads, metrics = self._run(task, schedule)
        runs = 2 * self.pairs + 1
        return Hypergradient(
            meta_loss, grads, cost.seconds, cost.peak, runs * schedule.horizon, metrics
        )

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], dict[str, Any]]:
        keys = list(schedule.learned)
        sizes = [schedule.specs[k].n_segments for k in keys]
        x = torch.cat([schedule.values[k] for k in keys])
        lo, hi = (torch.cat(b) for b in zip(*(schedule.raw_bounds(k) for k in keys), strict=True))

        def at(v: Tensor) -> HyperSchedule:
            return schedule.replace(dict(zip(keys, v.split(sizes), strict=True))).project()

        def loss(v: Tensor) -> float:
            return _meta_loss(task, at(v))

        c, why = self.chunk(task, schedule)

        def losses(points: Tensor) -> list[float]:
            if not c:
                return [loss(v) for v in points]
            return [
                y
                for part in points.split(c)
                for y in batched_meta_losses(task, [at(v) for v in part])
            ]

        estimate, stderr, _ = antithetic_estimate(
            loss, x, hi - lo, self.sigma, self.pairs, _generator(task, x), losses
        )
        grads = {k: torch.zeros_like(v) for k, v in schedule.values.items()}
        grads.update(dict(zip(keys, estimate.split(sizes), strict=True)))
        rel = float(stderr.norm() / estimate.norm()) if float(estimate.norm()) else math.inf
        metrics = {
            "es_pairs": self.pairs,
            "es_sigma": self.sigma,
            "es_stderr": rel,
            "es_batch": c,
            "es_batch_why": why,
        }
        return _meta_loss(task, schedule), grads, metrics


def batched_meta_losses(task: Task, schedules: list[HyperSchedule]) -> list[float]:
    """:func:`_meta_loss` of every schedule, their inner runs batched with ``torch.func.vmap``:
    one step of all runs at a time by the one inner loop, :func:`metahpo.inner.train` (the same
    batches; weights, optimiser state and hyperparameter values, loss hyperparameters included,
    per run).

    Dropout masks are drawn once per step for all runs: with a task's per-step seeded masks
    (:class:`~metahpo.core.StepBatch`) the masks each run draws alone.

    Raises:
        ValueError: the task has buffers (batch-norm statistics).
    """
    flat = FlatTask(task)
    runs = [Steps(flat, s) for s in schedules]
    first, n = runs[0], len(runs)
    init = first.init_state(flat)
    if init.buffers:
        raise ValueError("batch-norm buffers are not batched")
    table = {k: torch.stack([r.table[k] for r in runs]) for k in first.keys}  # [n, T]
    loss_keys = first.loss_keys

    def grad_fn(t: int, state: InnerState, batch: Any) -> Tensor:
        def one(theta: Tensor, values: dict[str, Tensor]) -> Tensor:
            return torch.func.grad(flat.train_loss)(
                theta, init.buffers, first.attach(t, batch, values)
            )

        # randomness="same": one dropout mask per step for all runs, as each run alone draws
        # it from the step's seed
        values = {k: table[k][:, t] for k in loss_keys}
        return torch.func.vmap(one, randomness="same")(state.theta, values)

    def step_fn(t: int, state: InnerState, grad: Tensor) -> Any:
        values = {k: v[:, t] for k, v in table.items()}
        return torch.func.vmap(functools.partial(first.step, t))(
            state.theta, state.opt_state, grad, values
        )

    start = InnerState(
        init.theta.expand(n, *init.theta.shape),
        tuple(x.expand(n, *x.shape) for x in init.opt_state),
        init.buffers,
        0,
    )
    with torch.no_grad():
        end = train(
            flat, first, start, schedules[0].horizon, grad_fn=grad_fn, step_fn=step_fn, finite=False
        )
        out = []
        for row in end.theta:
            finite = bool(torch.isfinite(row).all())
            out.append(float(flat.val_loss(row, init.buffers)) if finite else math.inf)
    return out


def _meta_loss(task: Task, schedule: HyperSchedule) -> float:
    """Validation loss after a plain inner run (``inf`` when it diverged)."""
    try:
        flat, state = fit(task, schedule)
    except DivergenceError:
        return math.inf
    return float(flat.val_loss(state.theta, state.buffers))


def _generator(task: Task, x: Tensor) -> torch.Generator:
    """Seeded by the task's seed and the values: reproducible, and identical on resume."""
    digest = zlib.crc32(x.numpy().tobytes())
    return torch.Generator().manual_seed(int(task.seed) * 1_000_003 + digest)
