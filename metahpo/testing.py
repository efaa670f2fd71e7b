"""Check a hypergradient estimator of your own: ``metahpo.testing.check_estimator(MyEstimator())``.

It runs your estimator on a small float64 task and compares its hypergradient with float64
central differences of the meta-loss (an independent reference, computed with plain inner
runs) and with forward mode (exact), segment by segment. Shipped with the package, so a
plugin's own tests can call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metahpo.core import Task
from metahpo.plugins import check_hypergradient
from metahpo.schedule import HyperSchedule, HyperSpec


@dataclass
class EstimatorCheck:
    """What :func:`check_estimator` compared: per key, your gradient and both references."""

    meta_loss: float
    grads: dict[str, torch.Tensor]
    central_differences: dict[str, torch.Tensor]
    forward: dict[str, torch.Tensor]
    error_vs_central: float  # max over keys of max |yours - reference| / max |reference|
    error_vs_forward: float


def default_problem(horizon: int = 8, segments: int = 2) -> tuple[Task, HyperSchedule]:
    """A float64 linear-regression task and an SGD schedule learning lr, momentum and weight
    decay in ``segments`` segments each, at distinct non-zero values."""
    from metahpo.optim import SGD
    from metahpo.tasks.quadratic import Quadratic

    task = Quadratic(dtype=torch.float64, n_train=32, batch_size=8)
    base = {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3}
    ramp = torch.linspace(0.75, 1.25, segments, dtype=torch.float64)
    specs = {n: HyperSpec(segments, (float("-inf"), float("inf")), True) for n in base}
    values = {n: v * ramp for n, v in base.items()}
    return task, HyperSchedule(horizon, specs, values, SGD())


def central_differences(
    task: Task, schedule: HyperSchedule, eps: float = 1e-6
) -> dict[str, torch.Tensor]:
    """d(meta-loss)/d(each shared value) by central differences of plain inner runs."""
    from metahpo.runner import meta_loss

    out = {}
    for key in schedule.learned:
        grad = torch.zeros_like(schedule.values[key])
        for k in range(schedule.specs[key].n_segments):
            losses = []
            for sign in (1.0, -1.0):
                v = schedule.values[key].clone()
                v[k] += sign * eps
                losses.append(meta_loss(task, schedule.replace({key: v}))["meta_loss"])
            grad[k] = (losses[0] - losses[1]) / (2 * eps)
        out[key] = grad
    return out


def _error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for key, w in want.items():
        scale = float(w.abs().max()) or 1.0
        worst = max(worst, float((got[key] - w).abs().max()) / scale)
    return worst


def check_estimator(
    estimator: Any,
    task: Task | None = None,
    schedule: HyperSchedule | None = None,
    *,
    rtol: float = 1e-5,
    eps: float = 1e-6,
) -> EstimatorCheck:
    """Run ``estimator.hypergradient(task, schedule)`` and compare it with float64 central
    differences and with forward mode; raise AssertionError naming the worst key otherwise.

    ``task`` and ``schedule`` default to :func:`default_problem` (a float64 task is needed for
    the comparison to mean anything). ``rtol`` bounds the error relative to each key's largest
    reference entry; central differences carry an O(eps^2) truncation and rounding of about
    1e-16 / eps, so they are the looser reference (1e-5 by default); forward mode is exact, and
    an exact estimator should agree with it to about 1e-10.
    """
    from metahpo.estimators.forward import ForwardMode

    if task is None or schedule is None:
        task, schedule = default_problem()
    answer = check_hypergradient(estimator.hypergradient(task, schedule), schedule, estimator)
    fd = central_differences(task, schedule, eps)
    fwd = ForwardMode().hypergradient(task, schedule).grads
    learned = {k: answer.grads[k] for k in schedule.learned}
    result = EstimatorCheck(
        meta_loss=answer.meta_loss,
        grads=learned,
        central_differences=fd,
        forward={k: fwd[k] for k in schedule.learned},
        error_vs_central=_error(learned, fd),
        error_vs_forward=_error(learned, {k: fwd[k] for k in schedule.learned}),
    )
    for name, err in (("central differences", result.error_vs_central),
                      ("forward mode", result.error_vs_forward)):  # fmt: skip
        if not err <= rtol:
            worst = max(
                schedule.learned,
                key=lambda k: float((learned[k] - fd[k]).abs().max()),
            )
            raise AssertionError(
                f"{type(estimator).__name__}: relative error {err:.3e} > rtol={rtol:.0e} against "
                f"{name}; worst key {worst}: yours {learned[worst].tolist()}, central "
                f"differences {fd[worst].tolist()}, forward {fwd[worst].tolist()}"
            )
    return result
