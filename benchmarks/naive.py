"""The textbook forward mode that :class:`~metahpo.estimators.forward.ForwardMode` is timed against.

Benchmarks only: it is not a library estimator, and it exists so that the speed of forward mode
is quoted against what one would write first, computing the same hypergradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metahpo.core import Batch, ConfigError, Hypergradient, Params, Task
from metahpo.device import CostMeter
from metahpo.estimators.forward import Columns
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.optim import SGD
from metahpo.schedule import HyperSchedule


class NaiveForward:
    """Exact d L_val(theta_T) / d h by forward mode, written the textbook way.

    SGD only (the closed core's recurrences). The inner run is plain training
    (:func:`metahpo.inner.train` with its default gradient).
    After every step the gradient graph is rebuilt at ``theta_t`` (``create_graph=True``), and
    then, in a Python loop over the started columns, each column gets one double-backward
    Hessian-vector product and its tangent update (the recurrences of ForwardMode) as
    per-parameter, out-of-place tensor operations. Columns whose segment has not started are
    skipped, as in ForwardMode, so the two do the same mathematics and differ only in how.

    Bias: none (exact to rounding; the smoke test checks it against ForwardMode in float64).
    Memory: ``2 C P`` tangent numbers and one gradient graph, constant in the horizon.
    Compute: per step a plain gradient, a gradient with graph and ``C_active`` backward passes
    through it, i.e. about ``T (2 + 2 C_active)`` gradient evaluations.
    """

    name = "naive_forward"

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        with CostMeter(task.device) as cost:
            flat = FlatTask(task)
            if not isinstance(schedule.optimizer, SGD) or schedule.optimizer.nesterov:
                raise ConfigError("the naive forward baseline is written for SGD without Nesterov")
            steps = Steps(flat, schedule)
            table = steps.table
            cols = Columns(schedule)
            zero = {
                n: torch.zeros(s, device=task.device, dtype=task.dtype)
                for n, s in zip(flat.names, flat.shapes, strict=True)
            }
            Z: list[Params] = [dict(zero) for _ in range(len(cols))]
            Y: list[Params] = [dict(zero) for _ in range(len(cols))]

            def on_step(t: int, old: InnerState, new: InnerState, batch: Batch) -> None:
                lr, mu, wd = (table[n][t] for n in ("lr", "momentum", "weight_decay"))
                params, g = _gradient_graph(flat, old, batch)
                velocity, theta = flat.unflatten(old.opt_state[0]), flat.unflatten(old.theta)
                new_velocity = flat.unflatten(new.opt_state[0])
                for i in range(cols.n_active(t)):
                    hv = _vjp(g, params, Z[i])
                    name, _ = cols.keys[i]
                    in_force = cols.in_force(name, t) == i
                    for n, h in zip(params, hv, strict=True):
                        y = mu * Y[i][n] + h + wd * Z[i][n]
                        if in_force and name == "momentum":
                            y = y + velocity[n]
                        if in_force and name == "weight_decay":
                            y = y + theta[n]
                        z = Z[i][n] - lr * y
                        if in_force and name == "lr":
                            z = z - new_velocity[n]
                        Y[i][n], Z[i][n] = y, z

            with torch.no_grad():
                state = train(
                    flat, steps, steps.init_state(flat), schedule.horizon, on_step=on_step
                )
            meta_loss, g_val = flat.val_loss_and_grad(state.theta, state.buffers)
            g_params = flat.unflatten(g_val)
            per_column = [float(sum((z[n] * g_params[n]).sum() for n in z)) for z in Z]
            grads = cols.grads(torch.tensor(per_column, dtype=torch.float64))
        return Hypergradient(meta_loss, grads, cost.seconds, cost.peak, schedule.horizon)


def _vjp(g: tuple[Tensor, ...], params: Params, v: Params) -> tuple[Tensor, ...]:
    """``H v`` per parameter: one backward pass through the gradient graph ``g``."""
    pairs = [(gi, v[n]) for gi, n in zip(g, params, strict=True) if gi.requires_grad]
    return torch.autograd.grad(
        [gi for gi, _ in pairs],
        list(params.values()),
        [vi for _, vi in pairs],
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )


def _gradient_graph(
    flat: FlatTask, state: InnerState, batch: Batch
) -> tuple[Params, tuple[Tensor, ...]]:
    """Fresh parameter leaves at ``state.theta`` and the training gradient with its graph."""
    params = {n: p.detach().requires_grad_(True) for n, p in flat.unflatten(state.theta).items()}
    with torch.enable_grad():
        loss = flat.task.train_loss(params, state.buffers, batch)
        leaves = list(params.values())
        g = torch.autograd.grad(
            loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True
        )
    return params, g
