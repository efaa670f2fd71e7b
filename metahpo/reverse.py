"""Reverse mode through a window of the one inner loop, shared by truncated and greedy estimators.

A *window* is a run of inner steps ``state.step .. stop-1`` started from a state that is treated
as a constant. :func:`window_hypergradient` runs it through :func:`metahpo.inner.train` with the
per-step table built from shared values that require grad and with a ``grad_fn`` that keeps the
graph of every training gradient, then backpropagates the validation loss after the window to
the shared values. Autograd sums each segment's per-step contributions on its own, because the
table is an indexing of the shared values (:meth:`HyperSchedule.per_step`).

Memory: the window's graph, i.e. O(window length x (P + activations of one step and of its
double backward)); nothing is stored for the steps before the window.

A window can also continue a reverse sweep (checkpointed reverse mode): given the *adjoint* of
the state at its end (d L_val / d(theta, optimiser state) after step ``stop - 1``) instead of
the validation loss, it backpropagates that adjoint, and with ``carry`` it also returns the
adjoint of the state at its start, for the window before it.

Data-parallel (:mod:`metahpo.distributed`): every step's gradient is averaged over ranks with
:func:`~metahpo.distributed.all_reduce_mean`, whose backward averages the vector-Jacobian
products over ranks too, and the window's hypergradient is averaged once at the end: exactly
the single-process result on the same global batches, at one all-reduce of P numbers per step
forward and one per step backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metahpo import distributed
from metahpo.core import Batch, ConfigError, loss_hyper
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.optim import State
from metahpo.schedule import HyperSchedule
from metahpo.second_order import data_convolutions

#: Adjoint of an inner state: ``(d/d theta, *d/d optimiser state)``, each shaped like theta.
Adjoint = tuple[Tensor, ...]


@dataclass
class Window:
    """What one differentiated window gives.

    Attributes:
        state: the inner state after the window, detached from the graph.
        meta_loss: validation loss after the window (NaN for a window given an adjoint).
        grads: per key, float64 CPU ``[n_segments]``: d(meta_loss)/d(shared value) with the
            state at the window's start held constant (given an adjoint: the adjoint's
            contraction with d(state at the end)/d(shared value)); zeros for fixed keys and
            for segments the window does not touch.
        adjoint: with ``carry``, the adjoint of the state at the window's start (this rank's
            local adjoint in a data-parallel run, see :mod:`metahpo.distributed`); else None.
    """

    state: InnerState
    meta_loss: float
    grads: dict[str, Tensor]
    adjoint: Adjoint | None = None


def check_window(key: str, value: object, horizon: int | None = None) -> int:
    """``value`` as a window length from 1 to ``horizon`` (inner steps).

    Raises:
        ConfigError: one line naming ``estimator.<key>``, its value and the allowed range.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1 and (horizon is None or value <= horizon):
            return value
    upper = "the horizon" if horizon is None else f"the horizon ({horizon})"
    raise ConfigError(f"estimator.{key}={value!r} must be an integer from 1 to {upper}")


def window_ends(window: int | None, horizon: int) -> list[int]:
    """The steps after which the meta-objective takes a validation loss: ``[horizon]`` (the
    final loss) without a window; else ``window, 2 window, ...`` and ``horizon`` (the sum of the
    window-end losses, the objective ``estimator=pes`` is unbiased for; ``estimator.window``
    of ``forward`` and ``exact_reverse``)."""
    if window is None:
        return [horizon]
    return [*range(window, horizon, window), horizon]


def grad_with_graph(flat: FlatTask, step: int, state: InnerState, batch: Batch) -> Tensor:
    """Training gradient that keeps its graph (a ``grad_fn`` for :func:`metahpo.inner.train`).

    When neither ``state.theta`` (the window's first step, a constant) nor the loss
    hyperparameters ``batch`` carries have a graph, the gradient is a constant too and no graph
    is built. Averaged over ranks in a data-parallel run.
    """
    tracked = state.theta.requires_grad or _has_graph(loss_hyper(batch))
    theta = state.theta if state.theta.requires_grad else state.theta.detach().requires_grad_(True)
    with torch.enable_grad():
        with data_convolutions(flat.task):  # its double backward skips the images' gradient
            loss = flat.train_loss(theta, state.buffers, batch)
        (g,) = torch.autograd.grad(loss, theta, create_graph=tracked)
        return distributed.all_reduce_mean(g)


def _has_graph(values: object) -> bool:
    """Any tensor in ``values`` (nested dicts) requires grad."""
    if isinstance(values, dict):
        return any(_has_graph(v) for v in values.values())
    return isinstance(values, Tensor) and values.requires_grad


def window_hypergradient(
    flat: FlatTask,
    schedule: HyperSchedule,
    state: InnerState,
    stop: int,
    *,
    adjoint: Adjoint | None = None,
    carry: bool = False,
) -> Window:
    """Run steps ``state.step .. stop-1`` differentiably and backpropagate the validation loss.

    Args:
        flat: the task, flattened.
        schedule: the values in force (only its learned keys are differentiated).
        state: the window's start (its graph, if any, is cut).
        stop: the step to stop before.
        adjoint: backpropagate this adjoint of the state at ``stop`` instead of the gradient
            of the validation loss there (which is then not computed).
        carry: differentiate with respect to the start state as well and return its adjoint
            in :attr:`Window.adjoint` (buffers are not differentiated, as everywhere).

    Raises:
        DivergenceError: inner training diverged inside the window.
    """
    leaves = {
        name: schedule.values[name].detach().clone().requires_grad_(True)
        for name in schedule.learned
    }
    steps = Steps(flat, schedule, values=leaves)
    start = state.detached()
    if carry:
        start = InnerState(
            start.theta.clone().requires_grad_(True),
            _leaves(start.opt_state),
            start.buffers,
            start.step,
        )
    with torch.enable_grad():
        end = train(
            flat,
            steps,
            start,
            stop,
            grad_fn=lambda t, st, batch: grad_with_graph(flat, t, st, batch),
        )
        if adjoint is None:
            meta, g_val = flat.val_loss_and_grad(end.theta, end.buffers)
            pairs = [(end.theta, g_val)]
        else:
            meta = float("nan")
            pairs = list(zip((end.theta, *end.opt_state), adjoint, strict=True))
        pairs = [(out, a) for out, a in pairs if out.requires_grad]
        inputs = list(leaves.values())
        if carry:
            inputs += [start.theta, *start.opt_state]
        got: tuple[Tensor | None, ...] = (None,) * len(inputs)
        if pairs:  # else no value in force touched the window's run
            outs, seeds = zip(*pairs, strict=True)
            got = torch.autograd.grad(outs, inputs, seeds, allow_unused=True)
    grads = {name: torch.zeros_like(v) for name, v in schedule.values.items()}
    for name, g in zip(leaves, got[: len(leaves)], strict=True):
        if g is not None:  # the same on every rank: the graphs have the same shape
            grads[name] = distributed.all_reduce_mean_(g.detach()).to(torch.float64)
    carried = None
    if carry:
        starts = (start.theta, *start.opt_state)
        carried = tuple(
            torch.zeros_like(x) if g is None else g.detach()
            for x, g in zip(starts, got[len(leaves) :], strict=True)
        )
    return Window(end.detached(), meta, grads, carried)


def _leaves(opt_state: State) -> State:
    return tuple(s.clone().requires_grad_(True) for s in opt_state)
