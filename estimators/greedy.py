"""Greedy online hyperparameter learning over windows of W steps (Hypergradient Descent at W=1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from metahpo.core import Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.inner import FlatTask
from metahpo.reverse import check_window, window_hypergradient
from metahpo.schedule import HyperSchedule, raw_steps
from metahpo.validation import Accept, Positive, PositiveInt, Tolerance, checked, rise_limit

Update = Literal["sign", "gradient"]
DEFAULT_STEP_SIZE = {"lr": 0.02, "momentum": 0.05, "weight_decay": 1.0e-4}
STEP_FRACTION = 0.02  # a key without a step size steps by this fraction of its bounds' width


class Online:
    """Estimators that move the schedule during their run (``greedy``, ``evograd``, ``pes``):
    sign or gradient steps on the raw values (:meth:`_step`), an optional guard against steps
    that raise the loss (:class:`Guard`), and a result carrying the schedule the run ended with.

    Subclasses set ``update``, ``step_size``, ``accept`` and ``tolerance`` and define
    ``check(schedule)`` and ``_run(task, schedule) -> (meta_loss, grads, final schedule,
    metrics)``; a ``_run`` moves the schedule with ``guard.move`` from :meth:`_guard`.
    """

    update: str
    step_size: dict[str, float]
    accept: str = "finite"
    tolerance: float = 0.1
    #: the online step's factor: 1, halved by every step the guard rejects, kept across calls
    #: (and in the checkpoint: :meth:`state_dict`)
    scale: float = 1.0

    def check(self, schedule: HyperSchedule) -> None:
        raise NotImplementedError

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], HyperSchedule, dict[str, Any]]:
        raise NotImplementedError

    def _sizes(self, schedule: HyperSchedule) -> dict[str, Tensor]:
        """Steps on the raw values (a gradient step's learning rate scales twice), times
        :attr:`scale`."""
        power = 1 if self.update == "sign" else 2
        sizes = raw_steps("estimator.step_size", self.step_size, schedule, STEP_FRACTION, power)
        return {k: v * self.scale for k, v in sizes.items()}

    def _step(self, schedule: HyperSchedule, grads: Mapping[str, Tensor]) -> HyperSchedule:
        """One hyper-step on the learned raw values (``h -= s_h sign(g)`` or ``h -= s_h g``),
        projected into their bounds; a zero gradient leaves its value where it is."""
        new, sizes = {}, self._sizes(schedule)
        for name in schedule.learned:
            g = grads[name]
            direction = torch.sign(g) if self.update == "sign" else g
            new[name] = schedule.values[name] - sizes[name] * direction
        return schedule.replace(new).project()

    def _guard(self) -> Guard:
        """A fresh guard for one run (its best loss and anchor do not outlive the run)."""
        return Guard(self)

    def state_dict(self) -> dict[str, float]:
        """What carries over between calls: the online step's factor."""
        return {"scale": self.scale}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.scale = float(state["scale"])

    #: inner runs per call, each of the horizon (``inner_steps`` = runs x horizon)
    runs_per_call = 1

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        with CostMeter(task.device) as cost:
            meta_loss, grads, final, metrics = self._run(task, schedule)
        steps = self.runs_per_call * schedule.horizon
        return Hypergradient(
            meta_loss, grads, cost.seconds, cost.peak, steps, metrics, schedule=final
        )


class Guard:
    """``outer.accept=meta_loss`` for an online estimator's steps, within one run.

    With ``accept="meta_loss"``, a window whose end validation loss ``L`` is above
    ``best + tolerance |best|`` rejects the step that set the values in force during it: the
    schedule goes back to the values in force at the last accepted window (the anchor) and
    steps from there along the rejected window's own estimate, with the online step halved
    (``scale /= 2``, kept for the rest of the run and for later calls). The inner state is not
    rewound (training goes on from where the rise left it), so ``best`` restarts from the
    rejected loss: later windows are judged against the state the run is in, and a rise that
    continues is rejected again, halving again. ``best`` is otherwise the lowest window-end loss
    of the run; a non-finite loss counts as a rise. With ``accept="finite"`` every step is kept
    (a diverged window still raises). ``rejections`` lists the rejected windows.
    """

    def __init__(self, owner: Online) -> None:
        self.owner = owner
        self.best = math.inf
        self.anchor: HyperSchedule | None = None
        self.rejections: list[dict[str, Any]] = []

    def move(
        self,
        schedule: HyperSchedule,
        grads: Mapping[str, Tensor],
        loss: float,
        steps: tuple[int, int] | None = None,
    ) -> HyperSchedule:
        """The next window's schedule, from the one in force, its estimate and its end loss."""
        owner = self.owner
        if owner.accept == "meta_loss" and self.anchor is not None:
            limit = rise_limit(self.best, owner.tolerance)
            if not loss <= limit:  # NaN too
                owner.scale /= 2
                self.rejections.append(
                    {"steps": list(steps or ()), "val_loss": loss, "limit": limit}
                )
                self.best = loss if math.isfinite(loss) else math.inf
                return owner._step(self.anchor, grads)
        self.best = min(self.best, loss)
        self.anchor = schedule
        return owner._step(schedule, grads)

    def metrics(self) -> dict[str, Any]:
        """``online_rejections`` and ``online_scale`` (with ``accept=meta_loss`` only)."""
        if self.owner.accept != "meta_loss":
            return {}
        return {"online_rejections": self.rejections, "online_scale": self.owner.scale}


@checked("estimator")
class Greedy(Online):
    """One training run whose hyperparameters are moved online, every W steps.

    The run is cut into windows ``[s, s+W)``. For each window, with the inner state at ``s``
    held constant, it takes ``g = d L_val(theta_{s+W}) / d h`` for the shared values ``h`` in
    force during the window (reverse mode over the window,
    :func:`metahpo.reverse.window_hypergradient`), then steps those values
    (``h <- h - s_h sign(g)`` or ``h <- h - s_h g``, projected to the bounds) and continues
    training from ``theta_{s+W}`` with the new values. With W=1 and a one-segment learning
    rate this is Hypergradient Descent (Baydin et al. 2018), with the validation loss after the
    step in place of HD's next training batch.

    Objective: greedy. Each window's values are tuned for the validation loss W steps later,
    not at the end of training, so it has the short-horizon bias (it favours whatever lowers
    the loss soonest, e.g. decaying the learning rate too early) and the schedule it reaches is
    not a stationary point of the final validation loss.
    Result: ``schedule`` is the schedule the run ended with (an online estimator: the outer loop
    takes it as its next iterate instead of stepping on ``grads``); ``grads`` is, per segment, the
    **sum** of the window hypergradients taken with respect to it during the run (with
    ``update="gradient"``, no bound reached and no step undone by the guard, ``schedule = start -
    scale * step_size * grads`` exactly); ``metrics["greedy_windows"]`` lists every window's steps,
    validation loss and non-zero hypergradients; ``meta_loss`` is the validation loss at the end of
    this run, whose schedule moved during it (so it is the loss of neither the starting nor the
    final schedule run plainly). A value is updated only while its segment is in force, so use few
    segments (one per key is classic online learning); with one segment per step each value is
    stepped once per run.
    Memory: the graph of one window, O(W (P + activations)), constant in the horizon.
    Compute: every step is taken once with ``create_graph``, plus one validation loss and one
    backward per window: about ``3 T`` gradient evaluations and ``T / W`` validation passes.
    Data-parallel (:mod:`metahpo.distributed`): per step one all-reduce of the gradient (P
    numbers), plus one per window step in the backward pass (:mod:`metahpo.reverse`).

    Args:
        W: inner steps per window, from 1 to the horizon.
        update: ``"sign"`` (``h -= s_h sign(g)``) or ``"gradient"`` (``h -= s_h g``).
        step_size: ``s_h`` per schedule key, by key (``lr/fc1``), by hyperparameter name
            (``lr``) or ``default``; a key with none steps by 2 % of its bounds' width (finite
            bounds needed, else a ConfigError before training).
        accept: ``"finite"`` (keep every step) or ``"meta_loss"`` (:class:`Guard`: undo a step
            whose window-end validation loss rises, and halve the step).
        tolerance: the rise ``accept="meta_loss"`` allows, as a fraction of the best loss.
    """

    name = "greedy"
    data_parallel = True

    def __init__(
        self,
        W: PositiveInt = 10,
        update: Update = "sign",
        step_size: Mapping[str, Positive] | None = None,
        accept: Accept = "finite",
        tolerance: Tolerance = 0.1,
    ) -> None:
        self.W = W
        self.update = update
        sizes = DEFAULT_STEP_SIZE if step_size is None else step_size
        self.step_size = {str(k): float(v) for k, v in sizes.items()}
        self.accept, self.tolerance = accept, tolerance

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless W fits the horizon and every learned key has a step size."""
        check_window("W", self.W, schedule.horizon)
        self._sizes(schedule)

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], HyperSchedule, dict[str, Any]]:
        flat = FlatTask(task)
        state = flat.init_state(schedule.optimizer)
        total = {name: torch.zeros_like(v) for name, v in schedule.values.items()}
        windows: list[dict[str, Any]] = []
        meta_loss = float("nan")
        guard = self._guard()
        for begin in range(0, schedule.horizon, self.W):
            stop = min(begin + self.W, schedule.horizon)
            window = window_hypergradient(flat, schedule, state, stop)
            state, meta_loss = window.state, window.meta_loss
            record: dict[str, Any] = {"steps": [begin, stop], "val_loss": meta_loss}
            for name in schedule.learned:
                g = window.grads[name]
                total[name] += g
                record[name] = {str(k): float(g[k]) for k in g.nonzero().flatten().tolist()}
            windows.append(record)
            schedule = guard.move(schedule, window.grads, meta_loss, (begin, stop))
        metrics = {
            "val_accuracy": flat.evaluate(state, "val")["accuracy"],
            "greedy_windows": windows,
            **guard.metrics(),
        }
        return meta_loss, total, schedule, metrics
