"""The inner run: SGD with momentum and weight decay as a pure function, and the one loop.

Every estimator, the retraining at the end and the tests go through :func:`train`; estimators
change what it computes per step only through ``grad_fn`` (how the training gradient is
obtained, e.g. together with Hessian-vector products) and ``on_step`` (what they carry beside
the parameters, e.g. forward-mode tangents).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value
from tqdm.auto import tqdm

from metahpo import distributed
from metahpo.core import Batch, Buffers, DivergenceError, Params, Task
from metahpo.schedule import HyperSchedule


def sgd_step(
    theta: Tensor,
    velocity: Tensor,
    grad: Tensor,
    lr: Tensor,
    momentum: Tensor,
    weight_decay: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step of ``torch.optim.SGD`` (dampening 0, no Nesterov) as a pure function.

    ``v' = momentum * v + grad + weight_decay * theta``, ``theta' = theta - lr * v'``, with
    ``v = 0`` before the first step (torch's first step sets the buffer to the gradient, which is
    the same thing). One deliberate difference: at a step whose momentum is exactly 0, torch
    leaves its momentum buffer untouched (a later non-zero momentum resumes the stale buffer),
    which makes the update discontinuous in momentum at 0 and its derivative there zero. Here
    the update is the continuous form, so d/d momentum at 0 is the one-sided limit: the
    trajectories agree whenever momentum is never 0, or always 0.
    """
    velocity = momentum * velocity + grad + weight_decay * theta
    return theta - lr * velocity, velocity


@dataclass
class InnerState:
    """Inner-run state at the start of step ``step``: flat parameters, velocity, buffers."""

    theta: Tensor
    velocity: Tensor
    buffers: Buffers
    step: int = 0


class FlatTask:
    """A task's losses as functions of one flat parameter vector ``theta`` of length P.

    Forward-mode tangents are ``[columns, P]`` matrices; the flat view makes every
    Hessian-vector product one batched call.

    Data-parallel runs (:mod:`metahpo.distributed`) are handled here, once: :meth:`batch` is the
    rank's share of the global batch, and :meth:`grad`, :meth:`next_buffers` and
    :meth:`val_loss_and_grad` are averaged over ranks.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        params, self._init_buffers = task.init_params()
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self._init_theta = self.flatten(params)

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    def flatten(self, params: Params) -> Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, theta: Tensor) -> Params:
        chunks = theta.split(self.numels, dim=-1)
        return {
            n: c.reshape(*theta.shape[:-1], *s)
            for n, c, s in zip(self.names, chunks, self.shapes, strict=True)
        }

    def init_state(self) -> InnerState:
        theta = self._init_theta.detach().clone()
        buffers = {k: b.clone() for k, b in self._init_buffers.items()}
        return InnerState(theta, torch.zeros_like(theta), buffers, 0)

    def train_loss(self, theta: Tensor, buffers: Buffers, batch: Batch) -> Tensor:
        return self.task.train_loss(self.unflatten(theta), buffers, batch)

    def val_loss(self, theta: Tensor, buffers: Buffers) -> Tensor:
        return self.task.val_loss(self.unflatten(theta), buffers)

    def val_loss_and_grad(self, theta: Tensor, buffers: Buffers) -> tuple[float, Tensor]:
        """Validation loss at ``theta`` and its gradient, flat (see :func:`val_loss_and_grad`)."""
        loss, grads = val_loss_and_grad(self.task, self.unflatten(theta.detach()), buffers)
        return loss, self.flatten(grads)

    def batch(self, step: int) -> Batch:
        """The training batch of inner step ``step``: this rank's share of the task's batch."""
        return distributed.shard(self.task.batch(step))

    def grad(self, step: int, state: InnerState, batch: Batch) -> Tensor:
        """Training gradient at ``state`` (the default ``grad_fn`` of :func:`train`)."""
        g, _ = grad_and_value(self.train_loss)(state.theta, state.buffers, batch)
        return distributed.all_reduce_mean_(g)

    def next_buffers(self, theta: Tensor, buffers: Buffers, batch: Batch) -> Buffers:
        if not buffers:
            return buffers
        with torch.no_grad():
            new = self.task.next_buffers(self.unflatten(theta.detach()), buffers, batch)
        return distributed.average_buffers(new)

    def evaluate(self, state: InnerState, split: str = "test") -> dict[str, float]:
        with torch.no_grad():
            return self.task.evaluate(self.unflatten(state.theta.detach()), state.buffers, split)


PROGRESS_MIN_STEPS = 2000


def val_loss_and_grad(task: Task, params: Params, buffers: Buffers) -> tuple[float, Params]:
    """The meta-objective ``L_val(params)`` and its gradient with respect to ``params``.

    Accumulated one validation chunk at a time when the task offers ``val_loss_terms`` (as
    :class:`~metahpo.taskbase.SupervisedTask` does), so memory holds one chunk's activations
    rather than the whole split's; otherwise from ``task.val_loss`` in one pass. Reverse-mode
    estimators backpropagate this gradient through their tape, forward mode contracts its
    tangents with it. In a data-parallel run ``val_loss_terms`` yields this rank's share of the
    terms (:func:`metahpo.distributed.share`) and loss and gradient are summed over ranks.
    """
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    grads = {k: torch.zeros_like(p) for k, p in leaves.items()}
    total = 0.0
    with torch.enable_grad():
        terms_of = getattr(task, "val_loss_terms", None)
        terms = terms_of(leaves, buffers) if terms_of else [task.val_loss(leaves, buffers)]
        for term in terms:
            parts = torch.autograd.grad(term, list(leaves.values()), allow_unused=True)
            for k, g in zip(leaves, parts, strict=True):
                if g is not None:
                    grads[k] += g
            total += float(term.detach())
    if terms_of and distributed.world_size() > 1:  # each rank summed its share of the terms
        for g in grads.values():
            distributed.all_reduce_sum_(g)
        any_grad = next(iter(grads.values()))
        loss = torch.tensor(total, dtype=torch.float64, device=any_grad.device)
        total = float(distributed.all_reduce_sum_(loss))
    return total, grads


GradFn = Callable[[int, InnerState, Batch], Tensor]
StepHook = Callable[[int, InnerState, InnerState, Batch], None]


def train(
    flat: FlatTask,
    table: dict[str, Tensor],
    state: InnerState,
    stop: int,
    *,
    grad_fn: GradFn | None = None,
    on_step: StepHook | None = None,
) -> InnerState:
    """Run inner steps ``state.step .. stop-1`` and return the state after them.

    Args:
        flat: the task, flattened.
        table: ``{type: Tensor[T]}`` of per-step values (:meth:`HyperSchedule.table`). Tensors
            that require grad make the run differentiable in them (reverse mode).
        state: where to start (``flat.init_state()`` for a fresh run).
        stop: the step to stop before.
        grad_fn: ``(t, state, batch) -> gradient`` (default: plain ``torch.func`` gradient).
        on_step: ``(t, state_before, state_after, batch)``, called after every step.

    Raises:
        DivergenceError: the parameters are not finite at the end.
    """
    grad_fn = grad_fn or flat.grad
    lr, mom, wd = table["lr"], table["momentum"], table["weight_decay"]
    steps: Iterable[int] = range(state.step, stop)
    if stop - state.step >= PROGRESS_MIN_STEPS:  # long runs get a bar (on terminals only)
        quiet = None if distributed.is_main() else True
        steps = tqdm(steps, desc="inner steps", unit="step", leave=False, disable=quiet)
    for t in steps:
        batch = flat.batch(t)
        g = grad_fn(t, state, batch)
        theta, velocity = sgd_step(state.theta, state.velocity, g, lr[t], mom[t], wd[t])
        new = InnerState(
            theta, velocity, flat.next_buffers(state.theta, state.buffers, batch), t + 1
        )
        if on_step is not None:
            on_step(t, state, new, batch)
        state = new
    if not bool(torch.isfinite(state.theta).all()):
        raise DivergenceError(
            f"inner training diverged: parameters are not finite after step {state.step} "
            f"(max lr {float(lr.max()):.4g}, max momentum {float(mom.max()):.4g})"
        )
    return state


def fit(task: Task, schedule: HyperSchedule) -> tuple[FlatTask, InnerState]:
    """Train from the task's initial parameters over the whole horizon with ``schedule``."""
    flat = FlatTask(task)
    table = schedule.table(task.device, task.dtype)
    with torch.no_grad():
        state = train(flat, table, flat.init_state(), schedule.horizon)
    return flat, state
