"""Exact hypergradients by reverse mode through the whole unrolled run, with ``higher``.

This is the plain, memory-hungry unrolled version of Maclaurin et al. (2015) (without their
reversible-learning trick): every inner step is recorded on the autograd tape and the final
validation loss is backpropagated to the shared hyperparameter values.

Why a separate step loop instead of :func:`metahpo.inner.train`: ``higher``'s differentiable
optimiser owns the step (it takes the training gradient with ``create_graph`` and applies the
update to a list of per-tensor fast weights), which is a different loop shape from ``train``'s
flat ``theta`` with ``grad_fn`` + :func:`~metahpo.inner.sgd_step`. Keeping it separate also makes
this estimator an implementation that shares no loop with forward mode and
:class:`~metahpo.estimators.truncated_reverse.TruncatedReverse` (both go through ``train``), so
their agreement in the tests cross-checks the one inner loop.

Why not ``higher``'s own ``DifferentiableSGD`` (what ``higher.innerloop_ctx`` builds for a
``torch.optim.SGD``): it skips the weight-decay term when ``weight_decay == 0`` and the momentum
buffer when ``momentum == 0``. With tensor hyperparameters that (a) drops their gradients
wherever the value is exactly zero, the paper's starting point, and (b) lets a momentum buffer
go stale through a zero-momentum segment, unlike ``torch.optim.SGD`` with a constant momentum.
:class:`ScheduledSGD` below is ``higher``'s ``DifferentiableOptimizer`` with
:func:`metahpo.inner.sgd_step` as its update, so the update is the library's one SGD form
(``tests/test_reverse.py`` shows the stock optimiser's zero-value gradients are missing).

``higher`` is imported only in this module.
"""

from __future__ import annotations

from typing import Any

import higher
import torch
from torch import Tensor

from metahpo.core import Batch, Buffers, DivergenceError, Hypergradient, Params, Task
from metahpo.device import CostMeter
from metahpo.inner import FlatTask, Steps, val_loss_and_grad
from metahpo.optim import State
from metahpo.reverse import check_window, window_ends
from metahpo.schedule import HyperSchedule
from metahpo.second_order import data_convolutions
from metahpo.validation import PositiveInt, checked


class ScheduledStep(higher.optim.DifferentiableOptimizer):
    """``higher``'s differentiable optimiser whose update is the schedule's optimiser step.

    The hyperparameter values of a step come through ``diffopt.step(loss, override=...)``
    (one entry per schedule key, tensors that carry gradient); :meth:`_update` concatenates the
    fast weights and gradients into one flat vector, applies
    :meth:`metahpo.inner.Steps.step` (so per-group values and the optimiser's state work as in
    every other estimator) and splits the result back. The optimiser's state starts from
    ``init`` of the flat initial weights.
    """

    def bind(self, steps: Steps, keys: list[str]) -> None:
        self.steps, self.keys, self.t = steps, keys, 0
        self.opt_state: State | None = None

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        (group,) = self.param_groups
        (grads,) = grouped_grads
        params = group["params"]
        theta = torch.cat([p.reshape(-1) for p in params])
        grad = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(params, grads, strict=True)
            ]
        )  # a parameter the loss does not use has gradient None
        if self.opt_state is None:
            self.opt_state = self.steps.optimizer.init(theta)
        values = {k: group[k] for k in self.keys}
        theta, self.opt_state = self.steps.step(self.t, theta, self.opt_state, grad, values)
        self.t += 1
        chunks = theta.split([p.numel() for p in params])
        group["params"] = [c.view_as(p) for c, p in zip(chunks, params, strict=True)]


@checked("estimator")
class ExactReverse:
    """Exact d L_val(theta_T) / d h for every shared value h, by reverse mode over all T steps.

    Unrolls the whole inner run with ``higher`` (per step
    ``diffopt.step(train_loss, override={"lr": [lr_t], "momentum": [mu_t], ...})``, the values
    indexed from the shared ones so that each segment's gradient is the sum over its block),
    then backpropagates the final validation loss. Training and validation losses go through
    the task's functional ``train_loss`` / ``val_loss`` with the fast weights under the
    model's parameter names; buffers follow ``task.next_buffers`` and are not differentiated.

    Objective: the final validation loss, as forward mode; with ``window = W``, the sum of the
    validation losses after steps W, 2W, ... and T (``estimator=pes``'s objective; ``meta_loss``
    is that sum, ``metrics["final_val_loss"]`` its last term), at ``T / W`` extra validation
    gradients and no extra memory but theirs.
    Bias: none (exact to rounding): in float64 it matches forward mode to ~1e-15 relative.
    Memory: grows linearly with the horizon T: the tape keeps, for every step, the fast weights,
    the velocity and the activations of the training loss and of its double backward, i.e.
    O(T (P + activations)) for P parameters. This is what limits it to short horizons
    (docs/benchmarks.md measures it).
    Compute: one training gradient with ``create_graph`` per step forward, then one backward
    through the whole tape (roughly a Hessian-vector product per step): about ``4 T`` gradient
    evaluations, independent of the number of shared values.
    """

    name = "exact_reverse"

    def __init__(self, window: PositiveInt | None = None) -> None:
        self.window = window

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless ``window`` (if set) fits the horizon."""
        if self.window is not None:
            check_window("window", self.window, schedule.horizon)

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        with CostMeter(task.device) as cost:
            meta_loss, grads, metrics = self._run(task, schedule)
        return Hypergradient(meta_loss, grads, cost.seconds, cost.peak, schedule.horizon, metrics)

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], dict[str, Any]]:
        leaves = {
            name: schedule.values[name].detach().clone().requires_grad_(True)
            for name in schedule.learned
        }
        flat = FlatTask(task)  # parameter names and sizes (groups), nothing else
        steps = Steps(flat, schedule, values=leaves)
        table = steps.table
        names = flat.names
        init, buffers = task.init_params()
        fast = [init[name].detach().requires_grad_(True) for name in names]
        model_params = dict(task.model.named_parameters())
        diffopt = ScheduledStep(
            torch.optim.SGD([model_params[n] for n in names], lr=0.0),
            [model_params[n] for n in names],
        )
        diffopt.bind(steps, list(schedule.keys))
        ends = set(window_ends(self.window, schedule.horizon)[:-1])  # the earlier terms
        outs: list[Tensor] = []
        seeds: list[Tensor] = []
        earlier = 0.0
        with torch.enable_grad():
            for t in range(schedule.horizon):
                batch = steps.attach(t, task.batch(t))
                params = dict(zip(names, fast, strict=True))
                with data_convolutions(task):  # its double backward skips the images' gradient
                    loss = task.train_loss(params, buffers, batch)
                override = {name: [table[name][t]] for name in schedule.keys}
                new = diffopt.step(loss, params=fast, override=override)
                buffers = _next_buffers(task, params, buffers, batch)
                fast = list(new)
                if t + 1 in ends:
                    term, g = val_loss_and_grad(task, dict(zip(names, fast, strict=True)), buffers)
                    earlier += term
                    outs += fast
                    seeds += [g[n] for n in names]
            params = dict(zip(names, fast, strict=True))
            _check_finite(params, schedule, steps)
            meta, g_val = val_loss_and_grad(task, params, buffers)
            got = torch.autograd.grad(
                [*outs, *fast],
                list(leaves.values()),
                [*seeds, *(g_val[n] for n in names)],
                allow_unused=True,
            )
        grads = {name: torch.zeros_like(v) for name, v in schedule.values.items()}
        for name, g in zip(leaves, got, strict=True):
            if g is not None:
                grads[name] = g.detach().to(torch.float64)
        with torch.no_grad():
            detached = {k: p.detach() for k, p in params.items()}
            metrics = {"val_accuracy": task.evaluate(detached, buffers, "val")["accuracy"]}
        if self.window is not None:
            metrics["final_val_loss"] = meta
            meta += earlier
        return meta, grads, metrics


def _next_buffers(task: Task, params: Params, buffers: Buffers, batch: Batch) -> Buffers:
    if not buffers:
        return buffers
    with torch.no_grad():
        return task.next_buffers({k: p.detach() for k, p in params.items()}, buffers, batch)


def _check_finite(params: Params, schedule: HyperSchedule, steps: Steps) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in params.values()):
        raise DivergenceError(
            f"inner training diverged: parameters are not finite after step {schedule.horizon} "
            f"({steps.describe()})"
        )
