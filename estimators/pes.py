"""Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein 2021): unbiased online
estimates over truncated windows of the one inner loop, without derivatives."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from metahpo.core import ConfigError, Task
from metahpo.estimators.greedy import Online
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.reverse import check_window
from metahpo.schedule import HyperSchedule
from metahpo.validation import Accept, Fraction, Positive, PositiveInt, Tolerance, checked

#: ``(schedule in force, window's per-key estimate, unperturbed run's loss at the window's end,
#: (begin, stop)) -> schedule for the next window``
Move = Callable[[HyperSchedule, dict[str, Tensor], float, tuple[int, int]], HyperSchedule]


@dataclass
class PESRun:
    """What :func:`persistent_es` gives.

    Attributes:
        schedule: the schedule after the last window (the start's, when nothing moved it).
        total: per key, float64 ``[n_segments]``: the sum over windows of the window estimates
            (with a fixed schedule, an unbiased estimate of the gradient of the sum of the
            window-end validation losses, smoothed; see :class:`PersistentES`).
        stderr: per key, the standard error of ``total`` from its spread over the pairs.
        state: the unperturbed run's inner state at the end.
        windows: per window, its steps, the unperturbed run's validation loss at its end, the
            mean of the particles' losses and the window estimate's relative standard error.
    """

    schedule: HyperSchedule
    total: dict[str, Tensor]
    stderr: dict[str, Tensor]
    state: InnerState
    windows: list[dict[str, Any]] = field(default_factory=list)


def window_masks(schedule: HyperSchedule, keys: list[str], begin: int, stop: int) -> Tensor:
    """1 for every learned raw value that can influence a step of ``[begin, stop)``, else 0
    (a value not in force in a window is not perturbed there: it would add variance only)."""
    masks = [
        torch.tensor([float(a < stop and b >= begin) for a, b in schedule.supports(k)])
        for k in keys
    ]
    return torch.cat(masks).to(torch.float64)


def persistent_es(
    task: Task,
    schedule: HyperSchedule,
    K: int,
    sigma: float,
    pairs: int,
    generator: torch.Generator,
    move: Move | None = None,
) -> PESRun:
    """Antithetic PES over windows of ``K`` steps of :func:`metahpo.inner.train`.

    ``2 pairs`` particles and one unperturbed run each carry their inner state (weights,
    optimiser state, buffers) from window to window. In window ``tau`` pair ``i`` draws
    ``eps ~ N(0, I)`` (masked by :func:`window_masks`), adds it to its accumulated noise
    ``xi_i``, and its two particles train the window with the raw values ``h +- sigma s eps``
    (``s``: each raw value's bounds width; projected into the bounds). With ``L+-`` their
    validation losses at the window's end, the window estimate is the mean over pairs of
    ``xi_i (L+ - L-) / (2 sigma s)``. ``move``, if given, then turns the schedule in force into
    the next window's (an online step); without it the schedule stays fixed.

    Raises:
        DivergenceError: a particle's or the unperturbed run's training diverged.
    """
    flat = FlatTask(task)
    keys = list(schedule.learned)
    sizes = [schedule.specs[k].n_segments for k in keys]
    lo, hi = (torch.cat(b) for b in zip(*(schedule.raw_bounds(k) for k in keys), strict=True))
    scale = hi - lo
    init = flat.init_state(schedule.optimizer)
    center = init
    particles = [[init, init] for _ in range(pairs)]
    xi = torch.zeros(pairs, int(scale.numel()), dtype=torch.float64)
    totals = torch.zeros_like(xi)  # per pair, the sum over windows of its rows
    windows: list[dict[str, Any]] = []

    def run(values: Tensor, state: InnerState, stop: int) -> tuple[InnerState, float]:
        parts = dict(zip(keys, values.split(sizes), strict=True))
        steps = Steps(flat, schedule.replace(parts).project())
        with torch.no_grad():
            end = train(flat, steps, state, stop)
            return end, float(flat.val_loss(end.theta, end.buffers))

    for begin in range(0, schedule.horizon, K):
        stop = min(begin + K, schedule.horizon)
        x = torch.cat([schedule.values[k] for k in keys])
        mask = window_masks(schedule, keys, begin, stop)
        rows, losses = [], []
        for i, pair in enumerate(particles):
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64) * mask
            xi[i] += eps
            step = sigma * scale * eps
            pair[0], plus = run(x + step, pair[0], stop)
            pair[1], minus = run(x - step, pair[1], stop)
            losses += [plus, minus]
            rows.append(xi[i] * (plus - minus) / (2 * sigma * scale))
        samples = torch.stack(rows)
        totals += samples
        estimate = samples.mean(0)
        center, val_loss = run(x, center, stop)
        stderr = samples.std(0) / math.sqrt(pairs) if pairs > 1 else torch.full_like(x, math.inf)
        windows.append(
            {
                "steps": [begin, stop],
                "val_loss": val_loss,
                "particle_loss": sum(losses) / len(losses),
                "stderr": _relative(stderr, estimate),
            }
        )
        if move is not None:
            grads = {k: torch.zeros_like(v) for k, v in schedule.values.items()}
            grads.update(dict(zip(keys, estimate.split(sizes), strict=True)))
            schedule = move(schedule, grads, val_loss, (begin, stop))
    total = totals.mean(0)
    se = totals.std(0) / math.sqrt(pairs) if pairs > 1 else torch.full_like(total, math.inf)
    return PESRun(
        schedule,
        dict(zip(keys, total.split(sizes), strict=True)),
        dict(zip(keys, se.split(sizes), strict=True)),
        center,
        windows,
    )


def _relative(stderr: Tensor, estimate: Tensor) -> float:
    """``|stderr| / |estimate|`` (inf for a zero estimate)."""
    norm = float(estimate.norm())
    return float(stderr.norm()) / norm if norm else math.inf


@checked("estimator")
class PersistentES(Online):
    """Persistent evolution strategies (PES): unbiased online estimates over windows, no
    derivatives (:func:`persistent_es`).

    The run is cut into windows of ``K`` steps. ``pairs`` antithetic pairs of particles carry
    their inner state and their accumulated perturbations ``xi`` across windows; in each
    window every particle trains with freshly perturbed raw values (noise ``sigma`` times each
    raw value's bounds width), and the window's estimate is the mean over pairs of ``xi (L+ -
    L-) / (2 sigma s)``. Then the learned values step along it (``h -= s_h sign(g)`` or ``h -=
    s_h g``, projected into their bounds, as ``greedy`` does) and all particles go on with the
    moved values. An unperturbed run goes alongside for the reported losses.

    Objective: with the schedule held fixed, the sum of the window estimates is an unbiased
    estimate of the gradient of ``sum_tau E L_val(theta_{tau K})``, the **sum of the validation
    losses at the window ends**, Gaussian-smoothed over per-window perturbations of the raw
    values (bias ``O(sigma^2)`` against the unsmoothed sum where it is smooth); its last term
    is the final validation loss. Truncated reverse mode and greedy estimate the same sum with
    the dependence of each window's start on earlier windows dropped, a bias PES does not have
    (tests/test_pes.py measures both against the exact gradient). The final-loss objective alone
    is not reachable online: its only unbiased PES estimate waits for the last window, i.e.
    plain ES (``estimator=es``) at ``2 pairs + 1`` runs per step. When the schedule moves, each
    window's estimate is taken at values that changed along the way (as in the paper's online
    PES).
    Variance: ``O(1 / pairs)``, growing with the number of windows (``xi`` accumulates) and of
    raw values perturbed (a value not in force in a window is not perturbed in it).
    Result: as ``greedy``: ``schedule`` is where the run ended (the outer loop takes it),
    ``grads`` the sum of the window estimates, ``meta_loss`` the unperturbed run's final
    validation loss. ``metrics``: ``pes_pairs``, ``pes_sigma``, ``pes_windows`` (per window:
    steps, validation loss, mean particle loss, relative standard error), ``pes_stderr`` (the
    relative standard error of ``grads``) and ``pes_stderr_values`` (per key and raw value).
    Memory: ``2 pairs + 1`` inner states (weights and optimiser state), one step's activations.
    Compute: ``2 pairs + 1`` plain inner runs of the horizon (``inner_steps`` counts them all)
    and one validation loss per particle per window; no graph, no second derivatives.
    The noise comes from a generator seeded by the task's seed and the schedule's values, and
    the particles start from the task's initial state at every call, so nothing but the
    schedule and the guard's step factor (``state_dict``, in the checkpoint) carries over
    between calls: a resumed run repeats its estimates bit for bit.

    Args:
        K: steps per window, from 1 to the horizon.
        sigma: the noise scale, as a fraction of each raw value's bounds width.
        pairs: antithetic pairs of particles.
        update: ``"sign"`` or ``"gradient"``.
        step_size: per key, name or ``default``, in the hyperparameter's units (a key with
            none steps by 2 % of its bounds' width).
        accept: ``"finite"`` or ``"meta_loss"`` (:class:`~metahpo.estimators.greedy.Guard` on
            the unperturbed run's window-end validation loss).
        tolerance: the rise ``accept="meta_loss"`` allows, as a fraction of the best loss.
    """

    name = "pes"
    data_parallel = False

    def __init__(
        self,
        K: PositiveInt = 10,
        sigma: Fraction = 0.01,
        pairs: PositiveInt = 8,
        update: Literal["sign", "gradient"] = "sign",
        step_size: Mapping[str, Positive] | None = None,
        accept: Accept = "finite",
        tolerance: Tolerance = 0.1,
    ) -> None:
        self.K, self.sigma, self.pairs, self.update = K, sigma, pairs, update
        self.accept, self.tolerance = accept, tolerance
        self.step_size = {str(k): float(v) for k, v in (step_size or {}).items()}

    @property
    def runs_per_call(self) -> int:  # type: ignore[override]
        return 2 * self.pairs + 1

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless K fits the horizon and every learned key has finite bounds
        (the noise's scale) and a step size."""
        check_window("K", self.K, schedule.horizon)
        for key in schedule.learned:
            lo, hi = schedule.raw_bounds(key)
            if not bool(torch.isfinite(hi - lo).all() and (hi > lo).all()):
                raise ConfigError(
                    f"estimator=pes scales its noise by each key's bounds, but schedule.{key}"
                    f".bounds={list(schedule.specs[key].bounds)} has no finite width"
                )
        self._sizes(schedule)

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], HyperSchedule, dict[str, Any]]:
        x = torch.cat([schedule.values[k] for k in schedule.learned])
        gen = torch.Generator().manual_seed(
            int(task.seed) * 1_000_003 + zlib.crc32(x.numpy().tobytes())
        )
        guard = self._guard()
        out = persistent_es(task, schedule, self.K, self.sigma, self.pairs, gen, guard.move)
        flat = FlatTask(task)
        meta_loss = out.windows[-1]["val_loss"]
        grads = {k: torch.zeros_like(v) for k, v in schedule.values.items()}
        grads.update(out.total)
        g = torch.cat(list(out.total.values()))
        se = torch.cat(list(out.stderr.values()))
        metrics = {
            "val_accuracy": flat.evaluate(out.state, "val")["accuracy"],
            "pes_pairs": self.pairs,
            "pes_sigma": self.sigma,
            "pes_stderr": _relative(se, g),
            "pes_stderr_values": {k: v.tolist() for k, v in out.stderr.items()},
            "pes_windows": out.windows,
            **guard.metrics(),
        }
        return meta_loss, grads, out.schedule, metrics
