"""Time, measured side by side in one process: hypergradients, inner steps, and their parts.

Every measurement here runs with CPU memory sampling off (``host_memory_sampling(False)``;
memory is measured in separate runs, :mod:`benchmarks.memory`) and with queued CUDA kernels
waited for (``CostMeter``). Methods are interleaved repeat by repeat, so a change of load on a
shared machine hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp

from benchmarks.workloads import Workload, make_estimator
from metahpo.core import Batch, Task
from metahpo.device import CostMeter, host_memory_sampling, synchronize
from metahpo.estimators.forward import Columns, ForwardMode, time_hvp
from metahpo.inner import FlatTask, InnerState, fit
from metahpo.second_order import data_convolutions

HVP_CANDIDATES: list[tuple[str, int | None]] = [
    ("rev_rev", None),
    ("rev_rev", 1),
    ("fwd_rev", None),
    ("fwd_rev", 1),
]


def candidate_name(mode: str, chunk: int | None) -> str:
    return f"{mode} {'looped' if chunk == 1 else 'vectorised'}"


class StepClock:
    """A task that notes the time whenever the inner loop asks for a batch, i.e. once per step.

    Delegates everything else to the task it wraps. ``durations()`` gives the seconds of every
    step but the last (whose end is not stamped).
    """

    def __init__(self, task: Task) -> None:
        self._task = task
        self.stamps: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def batch(self, step: int) -> Batch:
        synchronize(self._task.device)
        self.stamps.append(time.perf_counter())
        return self._task.batch(step)

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


@dataclass
class Timed:
    """Seconds of one method at one horizon over the repeats, and its per-step durations."""

    seconds: list[float] = field(default_factory=list)
    steps: list[list[float]] = field(default_factory=list)
    grads: dict[str, list[float]] | None = None


def run_once(
    method: str,
    task: Task,
    workload: Workload,
    horizon: int,
    forward: ForwardMode,
    clock: bool = True,
) -> tuple[float, list[float], dict[str, list[float]] | None]:
    """One hypergradient (or plain training run): seconds, step durations, hypergradient.

    ``clock=False`` leaves out the step clock (whose stamps grow with the horizon), for memory.
    """
    stamped = StepClock(task) if clock else None
    schedule = workload.schedule(horizon)
    grads = None
    with host_memory_sampling(False), CostMeter(task.device, sample_memory=False) as cost:
        run_task: Task = stamped or task  # type: ignore[assignment]
        if method == "plain":
            fit(run_task, schedule)
        else:
            hg = make_estimator(method, horizon, forward).hypergradient(run_task, schedule)
            grads = {k: v.tolist() for k, v in hg.grads.items()}
    return cost.seconds, stamped.durations() if stamped else [], grads


def time_methods(
    methods: list[str],
    task: Task,
    workload: Workload,
    horizon: int,
    forward: ForwardMode,
    repeats: int,
    parts_repeats: int = 5,
) -> tuple[dict[str, Timed], list[dict[str, Any]]]:
    """Every method ``repeats`` times at ``horizon``, interleaved; the order rotates per repeat.

    Each round also times the lower bound's parts (:func:`lower_bound_parts`), so that the
    lower bound sees the same load as the runs it is compared with.

    Returns:
        per method its timings, and the lower bound's parts of every round.
    Cost: ``repeats`` runs of every method.
    """
    out = {m: Timed() for m in methods}
    parts = []
    for r in range(repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            seconds, steps, grads = run_once(m, task, workload, horizon, forward)
            out[m].seconds.append(seconds)
            out[m].steps.append(steps)
            if out[m].grads is None:
                out[m].grads = grads
            print(f"  {workload.name} T={horizon} {m}: {seconds:.3f} s", flush=True)
        parts.append(lower_bound_parts(task, parts_repeats))
    return out, parts


def steps_by_columns(timed: Timed, workload: Workload, horizon: int) -> dict[int, list[float]]:
    """Step durations grouped by the number of columns started at that step."""
    cols = Columns(workload.schedule(horizon))
    out: dict[int, list[float]] = {}
    for run in timed.steps:
        for t, d in enumerate(run):
            out.setdefault(cols.n_active(t), []).append(d)
    return out


# -- the parts of a forward-mode step, each timed alone ------------------------------------------
def _timed(fn: Callable[[], object], device: torch.device) -> float:
    with CostMeter(device, sample_memory=False) as cost:
        fn()
    return cost.seconds


def lower_bound_parts(task: Task, repeats: int) -> dict[str, Any]:
    """One gradient and the extra cost of one Hessian-vector product, each timed alone.

    Gradient: the faster of ``torch.autograd.grad`` and ``torch.func.grad``. Hessian-vector
    product: the faster of (a) one vector-Jacobian product through a gradient graph that is
    already built (reverse-over-reverse; the graph is built outside the timing) and (b)
    ``jvp(grad(loss))`` minus ``grad(loss)`` (forward-over-reverse, whose gradient comes with
    the product). All at the initial parameters on the first batch; medians over ``repeats``
    interleaved calls after one warm-up. Cost: about ``6 repeats`` gradient evaluations.
    """
    flat = FlatTask(task)
    st = flat.init_state()
    batch = task.batch(0)
    dev = task.device
    z = torch.randn(flat.n_params, generator=torch.Generator().manual_seed(0)).to(st.theta)

    def loss(theta: Tensor) -> Tensor:
        return flat.train_loss(theta, st.buffers, batch)

    def autograd_grad() -> None:
        theta = st.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(loss(theta), theta)

    def func_grad() -> None:
        grad_and_value(loss)(st.theta)

    def jvp_grad() -> None:
        jvp(grad(loss), (st.theta,), (z,))

    def vjp_alone() -> float:
        theta = st.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            with data_convolutions(task):  # as rev_rev: no images' gradient
                value = loss(theta)
            (g,) = torch.autograd.grad(value, theta, create_graph=True)
        return _timed(lambda: torch.autograd.grad(g, theta, z), dev)

    parts: dict[str, list[float]] = {k: [] for k in ("autograd", "func", "jvp_grad", "vjp")}
    for r in range(repeats + 1):
        times = {
            "autograd": _timed(autograd_grad, dev),
            "func": _timed(func_grad, dev),
            "jvp_grad": _timed(jvp_grad, dev),
            "vjp": vjp_alone(),
        }
        if r:  # the first round is warm-up
            for k, v in times.items():
                parts[k].append(v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    grad_s = min(med["autograd"], med["func"])
    hvp = {"rev_rev": med["vjp"], "fwd_rev": max(med["jvp_grad"] - med["func"], 0.0)}
    best = min(hvp, key=hvp.__getitem__)
    autograd_wins = med["autograd"] <= med["func"]
    return {
        "grad_seconds": grad_s,
        "grad_formulation": "torch.autograd.grad" if autograd_wins else "torch.func.grad",
        "hvp_seconds": hvp[best],
        "hvp_formulation": best,
        "medians": med,
    }


def lower_bound(parts: dict[str, Any], workload: Workload, horizon: int) -> float:
    """Seconds of one gradient per step plus one Hessian-vector product per started column."""
    cols = Columns(workload.schedule(horizon))
    active = sum(cols.n_active(t) for t in range(horizon))
    return horizon * parts["grad_seconds"] + active * parts["hvp_seconds"]


def time_formulations(task: Task, columns: int, repeats: int) -> dict[str, Any]:
    """Forward mode's Hessian-vector products on ``columns`` columns, per formulation.

    Each of rev_rev and fwd_rev, vectorised over the columns and looped one column per call
    (:func:`~metahpo.estimators.forward.time_hvp`, with the gradient), at the initial parameters
    on the first batch; median over ``repeats`` interleaved calls after one warm-up. Cost: about
    ``4 repeats (1 + 2 columns)`` gradient evaluations.
    """
    flat = FlatTask(task)
    st: InnerState = flat.init_state()
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(columns, flat.n_params, generator=g).to(st.theta)
    with host_memory_sampling(False):
        times = time_hvp(flat, st, task.batch(0), Z, HVP_CANDIDATES, repeats + 1)
    seconds = {candidate_name(*c): statistics.median(v[1:]) for c, v in times.items()}
    best = min(HVP_CANDIDATES, key=lambda c: seconds[candidate_name(*c)])
    return {
        "columns": columns,
        "seconds": seconds,
        "spread": {candidate_name(*c): [min(v[1:]), max(v[1:])] for c, v in times.items()},
        "best": {"hvp": best[0], "chunk_size": best[1]},
    }
