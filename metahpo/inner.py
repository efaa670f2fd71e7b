"""The inner run: the optimiser's step with a schedule's values, and the one loop.

Every estimator, the retraining at the end and the tests go through :func:`train`; estimators
change what it computes per step only through ``grad_fn`` (how the training gradient is
obtained, e.g. together with Hessian-vector products), ``step_fn`` (how the update is applied,
e.g. together with its forward-mode tangents) and ``on_step`` (what they observe after it).
The update itself is always :meth:`Steps.step`, i.e. the optimiser's one ``step``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value
from tqdm.auto import tqdm

from metahpo import distributed
from metahpo.core import Batch, Buffers, ConfigError, DivergenceError, Params, Task, with_hyper
from metahpo.optim import InnerOptimizer, State
from metahpo.schedule import HyperSchedule, split_key


@dataclass
class InnerState:
    """Inner-run state at the start of step ``step``: flat parameters, the optimiser's state
    tensors (:meth:`metahpo.optim.InnerOptimizer.init`), buffers."""

    theta: Tensor
    opt_state: State
    buffers: Buffers
    step: int = 0

    def detached(self) -> InnerState:
        """The same state cut from any autograd graph."""
        opt_state = tuple(s.detach() for s in self.opt_state)
        return InnerState(self.theta.detach(), opt_state, self.buffers, self.step)


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

    def init_state(self, optimizer: InnerOptimizer | None = None) -> InnerState:
        """The state before step 0 (no optimiser state without ``optimizer``)."""
        theta = self._init_theta.detach().clone()
        buffers = {k: b.clone() for k, b in self._init_buffers.items()}
        opt_state = optimizer.init(theta) if optimizer is not None else ()
        return InnerState(theta, opt_state, buffers, 0)

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


def resolve_groups(
    schedule: HyperSchedule, names: Sequence[str], numels: Sequence[int]
) -> dict[str, Tensor]:
    """For every per-group hyperparameter, the group of each flat parameter coordinate.

    Returns ``{name: LongTensor [P]}`` indexing ``schedule.groups[name]``'s groups in order.

    Raises:
        ConfigError: a pattern that matches no parameter, a parameter matched by two groups,
            or a parameter matched by none (one line, naming the key).
    """
    out = {}
    for name, groups in schedule.groups.items():
        owner: dict[str, str] = {}
        for group, patterns in groups.items():
            for pattern in patterns:
                matched = [p for p in names if fnmatch.fnmatchcase(p, pattern)]
                if not matched:
                    raise ConfigError(
                        f"schedule.{name}.groups.{group}: pattern {pattern!r} matches no "
                        f"parameter; parameters: {', '.join(names)}"
                    )
                for p in matched:
                    if owner.get(p, group) != group:
                        raise ConfigError(
                            f"schedule.{name}.groups: parameter {p!r} is in both "
                            f"{owner[p]} and {group}; each parameter belongs to one group"
                        )
                    owner[p] = group
        left = [p for p in names if p not in owner]
        if left:
            raise ConfigError(
                f"schedule.{name}.groups: parameter(s) {', '.join(left)} belong to no group; "
                "every parameter needs one (a pattern such as '*' for the rest)"
            )
        order = {g: i for i, g in enumerate(groups)}
        index = [
            torch.full((n,), order[owner[p]], dtype=torch.long)
            for p, n in zip(names, numels, strict=True)
        ]
        out[name] = torch.cat(index)
    return out


class Steps:
    """One run's per-step hyperparameter values and the optimiser's step with them.

    ``values(t)`` is ``{key: 0-d tensor}`` of the values in force at step ``t`` (one per
    schedule key); :meth:`expand` maps them to what the optimiser reads (``{name: 0-d tensor}``,
    or ``[P]`` for a per-group hyperparameter: each coordinate gets its group's value; names the
    schedule omits get the optimiser's default). Both are differentiable, so forward mode
    takes the ``jvp`` of :meth:`step` in the per-key values and reverse mode backpropagates
    through them.

    Args:
        flat: the task, flattened (parameter names and sizes for groups; device and dtype).
        schedule: the values and the optimiser.
        values: shared values to build the table from instead of ``schedule.values`` (leaves
            that require grad make the run differentiable in them).
    """

    def __init__(
        self,
        flat: FlatTask,
        schedule: HyperSchedule,
        values: dict[str, Tensor] | None = None,
    ) -> None:
        task = flat.task
        self.schedule = schedule
        self.optimizer = schedule.optimizer
        self.table = schedule.table(task.device, task.dtype, values)
        self.keys = schedule.keys
        index = resolve_groups(schedule, flat.names, flat.numels)
        self._groups = {
            name: ([f"{name}/{g}" for g in schedule.groups[name]], idx.to(task.device))
            for name, idx in index.items()
        }
        named = {split_key(k)[0] for k in self.keys}
        self._defaults = {
            name: torch.tensor(h.default, device=task.device, dtype=task.dtype)
            for name, h in self.optimizer.hyperparameters.items()
            if name not in named
        }
        # hyperparameters of the training loss: per name, its key or (groups) each parameter's
        self.loss_keys = schedule.loss_keys
        self._loss_groups: dict[str, dict[str, str]] = {}
        starts = [sum(flat.numels[:i]) for i in range(len(flat.names))]
        for name, (keys, idx) in self._groups.items():
            if name in schedule.loss:
                self._loss_groups[name] = {
                    p: keys[int(idx[s])] for p, s in zip(flat.names, starts, strict=True)
                }

    def values(self, t: int) -> dict[str, Tensor]:
        """``{key: 0-d tensor}``: every key's value at step ``t``."""
        return {k: self.table[k][t] for k in self.keys}

    def expand(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-key values as the optimiser's ``h``: ``{name: 0-d tensor or [P]}``."""
        h = dict(self._defaults)
        for k, v in values.items():
            name, group = split_key(k)
            if group is None and k not in self.loss_keys:
                h[name] = v
        for name, (keys, idx) in self._groups.items():
            if name not in self._loss_groups:
                h[name] = torch.stack([values[k] for k in keys])[idx]
        return h

    def attach(self, t: int, batch: Batch, values: dict[str, Tensor] | None = None) -> Batch:
        """``batch`` carrying the values at step ``t`` of the training loss's hyperparameters
        (:attr:`metahpo.core.StepBatch.hyper`); ``values`` replaces some of them (forward
        mode differentiates the loss in them). Unchanged when the schedule names none."""
        if not self.loss_keys:
            return batch
        v = {k: self.table[k][t] for k in self.loss_keys}
        v.update(values or {})
        hyper: dict[str, Any] = {k: v[k] for k in self.loss_keys if split_key(k)[1] is None}
        for name, owner in self._loss_groups.items():
            hyper[name] = {p: v[key] for p, key in owner.items()}
        return with_hyper(batch, hyper)

    def step(
        self, t: int, theta: Tensor, opt_state: State, grad: Tensor, values: dict[str, Tensor]
    ) -> tuple[Tensor, State]:
        """The optimiser's step ``t`` (0-based) with per-key ``values``."""
        return self.optimizer.step(theta, opt_state, grad, self.expand(values), t + 1)

    def init_state(self, flat: FlatTask) -> InnerState:
        return flat.init_state(self.optimizer)

    def describe(self) -> str:
        """The largest value of every key, for divergence messages."""
        return ", ".join(f"max {k} {float(v.max()):.4g}" for k, v in self.table.items())


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
StepFn = Callable[[int, InnerState, Tensor], tuple[Tensor, State]]
StepHook = Callable[[int, InnerState, InnerState, Batch], None]


def train(
    flat: FlatTask,
    steps: Steps,
    state: InnerState,
    stop: int,
    *,
    grad_fn: GradFn | None = None,
    step_fn: StepFn | None = None,
    on_step: StepHook | None = None,
    finite: bool = True,
) -> InnerState:
    """Run inner steps ``state.step .. stop-1`` and return the state after them.

    Args:
        flat: the task, flattened.
        steps: the per-step values and the optimiser (:class:`Steps`). Values that require
            grad make the run differentiable in them (reverse mode).
        state: where to start (``steps.init_state(flat)`` for a fresh run).
        stop: the step to stop before.
        grad_fn: ``(t, state, batch) -> gradient`` (default: plain ``torch.func`` gradient).
        step_fn: ``(t, state, gradient) -> (theta, opt_state)`` (default: ``steps.step`` with
            step t's values); forward mode's computes the update together with its tangents.
        on_step: ``(t, state_before, state_after, batch)``, called after every step.
        finite: raise when the parameters end non-finite (``False``: the caller checks, as a
            batch of runs stepped together with ``vmap`` does, row by row).

    Raises:
        DivergenceError: the parameters are not finite at the end (with ``finite``).
    """
    grad_fn = grad_fn or flat.grad
    if step_fn is None:

        def step_fn(t: int, st: InnerState, g: Tensor) -> tuple[Tensor, State]:
            return steps.step(t, st.theta, st.opt_state, g, steps.values(t))

    todo: Iterable[int] = range(state.step, stop)
    if stop - state.step >= PROGRESS_MIN_STEPS:  # long runs get a bar (on terminals only)
        quiet = None if distributed.is_main() else True
        todo = tqdm(todo, desc="inner steps", unit="step", leave=False, disable=quiet)
    for t in todo:
        batch = steps.attach(t, flat.batch(t))
        g = grad_fn(t, state, batch)
        theta, opt_state = step_fn(t, state, g)
        buffers = flat.next_buffers(state.theta, state.buffers, batch)
        new = InnerState(theta, opt_state, buffers, t + 1)
        if on_step is not None:
            on_step(t, state, new, batch)
        state = new
    if finite and not bool(torch.isfinite(state.theta).all()):
        raise DivergenceError(
            f"inner training diverged: parameters are not finite after step {state.step} "
            f"({steps.describe()})"
        )
    return state


def fit(
    task: Task,
    schedule: HyperSchedule,
    *,
    step_fn: StepFn | None = None,
    on_step: StepHook | None = None,
    flat: FlatTask | None = None,
) -> tuple[FlatTask, InnerState]:
    """Train from the task's initial parameters over the whole horizon with ``schedule``
    (``step_fn`` and ``on_step`` as for :func:`train`; ``flat``: the task's flat view, when
    the caller already built it)."""
    flat = FlatTask(task) if flat is None else flat
    steps = Steps(flat, schedule)
    with torch.no_grad():
        state = train(
            flat, steps, steps.init_state(flat), schedule.horizon, step_fn=step_fn, on_step=on_step
        )
    return flat, state
