"""Antithetic evolution strategies on the raw schedule values: no derivatives at all."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metahpo.core import ConfigError, DivergenceError, Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.inner import fit
from metahpo.schedule import HyperSchedule
from metahpo.validation import Fraction, PositiveInt, checked


def antithetic_estimate(
    f: Callable[[Tensor], float],
    x: Tensor,
    scale: Tensor,
    sigma: float,
    pairs: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, list[float]]:
    """Antithetic ES estimate of the gradient of ``J(x) = E_eps f(x + sigma scale eps)``.

    With ``eps ~ N(0, I)`` and ``d_i = (f(x + sigma s eps_i) - f(x - sigma s eps_i)) / 2``,
    each pair gives ``d_i eps_i / (sigma s)``, an unbiased estimate of ``grad J(x)``; the result
    is their mean, with its standard error (per coordinate, from the spread over pairs).

    Returns:
        ``(estimate, standard error, [f at every sample])``, float64.
    """
    rows, values = [], []
    for _ in range(pairs):
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        step = sigma * scale * eps
        plus, minus = f(x + step), f(x - step)
        values += [plus, minus]
        rows.append((plus - minus) / 2 * eps / (sigma * scale))
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
    Memory: one plain inner run. Compute: ``2 pairs + 1`` plain inner runs (the last at ``h``
    itself, for the meta-loss), run one after another.
    The noise is drawn from a generator seeded by the task's seed and the schedule's values, so
    an estimate is reproducible and a resumed run repeats it bit for bit. A diverged sample makes
    the estimate non-finite, which the outer loop rejects like a diverged step.
    ``metrics``: ``es_pairs``, ``es_sigma``, ``es_stderr`` (the standard error's norm relative
    to the estimate's).

    Args:
        sigma: the noise scale, as a fraction of each raw value's bounds width.
        pairs: antithetic pairs per estimate.
    """

    name = "es"
    data_parallel = False

    def __init__(self, sigma: Fraction = 0.01, pairs: PositiveInt = 8) -> None:
        self.sigma = sigma
        self.pairs = pairs

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

        def loss(v: Tensor) -> float:
            parts = dict(zip(keys, v.split(sizes), strict=True))
            return _meta_loss(task, schedule.replace(parts).project())

        estimate, stderr, _ = antithetic_estimate(
            loss, x, hi - lo, self.sigma, self.pairs, _generator(task, x)
        )
        grads = {k: torch.zeros_like(v) for k, v in schedule.values.items()}
        grads.update(dict(zip(keys, estimate.split(sizes), strict=True)))
        rel = float(stderr.norm() / estimate.norm()) if float(estimate.norm()) else math.inf
        metrics = {"es_pairs": self.pairs, "es_sigma": self.sigma, "es_stderr": rel}
        return _meta_loss(task, schedule), grads, metrics


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
