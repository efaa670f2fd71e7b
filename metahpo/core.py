"""The interfaces every estimator and task plugs into: Task, HypergradientEstimator, Hypergradient.

Type aliases follow torch.func: parameters and buffers are plain ``dict[str, Tensor]`` so any
estimator can differentiate a task through ``torch.func.functional_call``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from metahpo.schedule import HyperSchedule

Params = dict[str, Tensor]
Buffers = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]


class StepBatch(tuple):  # type: ignore[type-arg]
    """A training batch ``(x, y)`` that carries its step's seed and loss hyperparameters.

    A task's ``batch(step)`` returns one; its ``train_loss`` and ``next_buffers`` draw dropout
    masks from a generator seeded with ``seed``, so every evaluation of step ``step`` (the
    gradient, each Hessian-vector product, a reverse sweep's recomputation) sees the same masks
    and a run is reproducible. A plain tuple (or ``seed=None``) draws from torch's global
    generator.

    ``hyper`` holds the values at this step of the hyperparameters of the training loss that
    the schedule names (``{name: 0-d tensor}``, or ``{name: {parameter name: 0-d tensor}}`` for
    one learned per group of parameters); the inner loop fills it (:func:`with_hyper`), possibly
    with tensors that carry a graph (reverse mode) or are differentiated (forward mode). A
    task's ``train_loss`` reads it; names it lacks take the task's defaults.
    """

    seed: int | None
    hyper: dict[str, Any]

    def __new__(
        cls, x: Tensor, y: Tensor, seed: int | None, hyper: dict[str, Any] | None = None
    ) -> StepBatch:
        batch = super().__new__(cls, (x, y))
        batch.seed = None if seed is None else int(seed)
        batch.hyper = dict(hyper or {})
        return batch

    def __reduce__(self) -> Any:
        return (StepBatch, (self[0], self[1], self.seed, self.hyper))


def with_hyper(batch: Batch, hyper: dict[str, Any]) -> Batch:
    """``batch`` carrying ``hyper`` (its seed kept; unchanged when ``hyper`` is empty)."""
    if not hyper:
        return batch
    return StepBatch(batch[0], batch[1], getattr(batch, "seed", None), hyper)


def loss_hyper(batch: Batch) -> dict[str, Any]:
    """The loss hyperparameters ``batch`` carries (``{}`` for a plain tuple)."""
    return getattr(batch, "hyper", None) or {}


class ConfigError(ValueError):
    """Bad user input, reported in one line that names the key and what is allowed."""


class DivergenceError(RuntimeError):
    """Inner training produced non-finite parameters or losses."""


@runtime_checkable
class Task(Protocol):
    """A dataset and a model, written functionally so that estimators can differentiate it.

    A task is built for one ``seed``, which fixes the initial weights and the order of training
    batches; ``with_seed`` gives the same data with another seed. Data lives on ``device`` in
    ``dtype`` from construction on.
    """

    name: str
    seed: int
    device: torch.device
    dtype: torch.dtype
    model: nn.Module  # the architecture; its own parameters are never trained in place

    def with_seed(self, seed: int, *, keep_weights: bool = False) -> Task:
        """The same data with another seed; ``keep_weights``: only the batch order changes."""
        ...

    def init_params(self) -> tuple[Params, Buffers]:
        """Initial parameters and buffers for ``self.seed`` (fresh tensors every call)."""
        ...

    def batch(self, step: int) -> Batch:
        """The training batch used at inner step ``step`` (deterministic given the seed)."""
        ...

    def train_loss(self, params: Params, buffers: Buffers, batch: Batch) -> Tensor:
        """Mean training loss on ``batch``; pure: never mutates ``buffers``. A task with
        hyperparameters of its loss declares them in a class attribute
        ``loss_hyperparameters: {name: metahpo.optim.Hyperparameter}`` and reads their values
        at this step from :func:`loss_hyper` ``(batch)``."""
        ...

    def next_buffers(self, params: Params, buffers: Buffers, batch: Batch) -> Buffers:
        """Buffers after a training step on ``batch`` (batch-norm statistics); no gradient."""
        ...

    def val_loss(self, params: Params, buffers: Buffers) -> Tensor:
        """The meta objective: mean loss on the whole validation split."""
        ...

    def evaluate(self, params: Params, buffers: Buffers, split: str = "test") -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` on ``split`` (``accuracy`` is None for regression)."""
        ...


@dataclass
class Hypergradient:
    """What every estimator returns.

    Attributes:
        meta_loss: validation loss at the end of the inner run the gradient was taken on.
        grads: per schedule key, a float64 CPU tensor with one entry per shared segment
            (the gradient with respect to that segment's value; zeros for fixed keys).
        seconds: wall time of the estimate.
        peak_memory: peak memory above the level at the start, in bytes (see metahpo.device).
        inner_steps: inner SGD steps taken (forward and backward passes over them count once).
        metrics: extra scalars (``val_accuracy``...).
        schedule: for estimators that move the schedule online (greedy), the schedule they ended
            with; None for the others.
    """

    meta_loss: float
    grads: dict[str, Tensor]
    seconds: float = 0.0
    peak_memory: int = 0
    inner_steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    schedule: HyperSchedule | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta_loss": self.meta_loss,
            "hypergradient": {k: v.tolist() for k, v in self.grads.items()},
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory / 2**20,
            "inner_steps": self.inner_steps,
            **self.metrics,
        }


@runtime_checkable
class HypergradientEstimator(Protocol):
    """``hypergradient(task, schedule)``: d(final validation loss)/d(each shared value).

    Implementations state in their class docstring the quantity they estimate, its bias, and
    their memory and compute cost. They may also define ``check(schedule)``, raising
    ConfigError for settings that depend on the schedule (a window longer than the horizon);
    :func:`metahpo.build.build` calls it before any training.
    """

    name: str

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient: ...
