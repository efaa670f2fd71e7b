"""Shared machinery of supervised tasks: splits on the device, seeded batches, functional losses.

A concrete task (``tasks/digits.py``...) only loads its data and builds its model, then calls
``SupervisedTask.__init__``; everything an estimator touches is implemented once, here.

Batch-norm: ``train_loss`` normalises with the batch's own statistics and never reads or writes
the running statistics, so it is a pure function that ``torch.func`` transforms and double
backward can differentiate; ``next_buffers`` advances the running statistics (under no_grad, in
the primal pass only); ``val_loss`` and ``evaluate`` use them as constants (eval mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metahpo import distributed
from metahpo.core import Batch, Buffers, ConfigError, Params, StepBatch, loss_hyper
from metahpo.optim import Hyperparameter

Split = Literal["train", "val", "test"]


@contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Within the block, batch-norm layers in train mode leave their running statistics alone.

    With ``track_running_stats`` off, torch's batch-norm passes no running statistics to
    ``F.batch_norm`` in train mode: it normalises with the batch statistics and mutates nothing,
    which is what a pure, differentiable training loss needs. The flag is restored on exit.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's generators (CPU, and ``device``'s when CUDA) seeded with ``seed`` in the block,
    restored after it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class SupervisedTask:
    """A model and train / validation / test tensors, with losses over parameter dicts.

    Args:
        name: task name used in results.
        data: ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` tensors; moved to ``device``
            (floating ones to ``dtype``) once, here.
        make_model: builds the architecture; called under the seed so weights are reproducible.
        loss: ``"cross_entropy"`` (classification, reports accuracy) or ``"mse"`` (regression,
            half mean squared error).
        batch_size: training batch size; each epoch is a fresh permutation, last partial batch
            dropped, so every step sees the same number of examples.
        seed: fixes the initial weights and the batch order.
        device, dtype: where the data and parameters live.
        augment: optional ``(x, generator) -> x`` applied to every training batch; the
            generator lives on ``device`` and is seeded by (seed, step), so batches are
            deterministic.

    Hyperparameters of the training loss (:attr:`loss_hyperparameters`, learned like the
    optimiser's when the schedule names them; the validation loss, the meta-objective, never
    has them): ``label_smoothing`` (cross-entropy with its targets mixed with the uniform
    distribution: ``(1 - s) CE + s mean_c(-log p_c)``) and ``l2``, the penalty
    ``l2 / 2 ||w||^2`` on every parameter, or per group of parameters
    (``schedule.l2.groups``): the same gradient as weight decay, but inside the loss, so every
    optimiser (Adam as well) sees it and estimators differentiate it as a loss term.

    Random layers (dropout): every training batch carries a seed of its own (a
    :class:`~metahpo.core.StepBatch`, from (seed, step)), and the training loss and the
    buffers' update draw their masks from it, so every estimator sees the same masks at a
    step however often it evaluates that step, and the exact estimators agree.
        eval_batch_size: chunk size for validation / test passes.
    """

    loss_hyperparameters: ClassVar[dict[str, Hyperparameter]] = {
        "label_smoothing": Hyperparameter(0.0, (0.0, 0.2), low=0.0, high=1.0, high_open=True),
        "l2": Hyperparameter(0.0, (0.0, 0.01), low=0.0),
    }

    def __init__(
        self,
        name: str,
        data: dict[str, tuple[Tensor, Tensor]],
        make_model: Callable[[], nn.Module],
        *,
        loss: Literal["cross_entropy", "mse"],
        batch_size: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        eval_batch_size: int = 4096,
    ) -> None:
        self.name = name
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.loss_kind = loss
        self.augment = augment
        self.eval_batch_size = eval_batch_size
        n_train = len(data["train"][0])
        if not 1 <= batch_size <= n_train:
            raise ConfigError(
                f"task.batch_size={batch_size} must be between 1 and the {n_train} training "
                "examples"
            )
        self.batch_size = int(batch_size)
        self.batches_per_epoch = n_train // self.batch_size
        self.data = {
            split: (
                x.to(device=self.device, dtype=dtype if x.is_floating_point() else x.dtype),
                y.to(device=self.device, dtype=dtype if y.is_floating_point() else y.dtype),
            )
            for split, (x, y) in data.items()
        }
        self._make_model = make_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = make_model().to(device=self.device, dtype=dtype)
        self._perms: dict[int, Tensor] = {}
        self.random_layers = any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in self.model.modules()
        )

    # -- seeds ---------------------------------------------------------------------------------
    def with_seed(self, seed: int, *, keep_weights: bool = False) -> SupervisedTask:
        """The same data with another seed: new batch order, and new initial weights unless
        ``keep_weights`` (then only the batch order and augmentation change)."""
        other = copy.copy(self)
        other.seed = int(seed)
        other._perms = {}
        if not keep_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(other.seed)
                other.model = self._make_model().to(device=self.device, dtype=self.dtype)
        return other

    def init_params(self) -> tuple[Params, Buffers]:
        params = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in self.model.named_buffers()}
        return params, buffers

    # -- batches -------------------------------------------------------------------------------
    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def batch(self, step: int) -> Batch:
        epoch, i = divmod(step, self.batches_per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            n = len(self.data["train"][1])
            perm = torch.randperm(n, generator=self._generator(epoch)).to(self.device)
            self._perms = {epoch: perm}  # steps run in order: one epoch cached is enough
        idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
        x, y = self.data["train"]
        xb = x[idx]
        if self.augment is not None:
            g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + 7919 * step + 1)
            xb = self.augment(xb, g)
        return StepBatch(xb, y[idx], self.seed * 1_000_003 + 7919 * step + 2)

    def train_set(self) -> list[tuple[Batch, float]]:
        """The whole training split as ``(batch, share)`` chunks of ``eval_batch_size``
        examples, shares summing to 1: ``sum share * train_loss(batch)`` is the mean training
        loss over the split (what ``estimator=implicit`` differentiates at; no augmentation;
        random layers draw one fixed set of masks, from the task's seed)."""
        x, y = self.data["train"]
        n = len(y)
        seed = self.seed * 1_000_003 + 3
        return [
            (
                StepBatch(x[i : i + self.eval_batch_size], y[i : i + self.eval_batch_size], seed),
                min(self.eval_batch_size, n - i) / n,
            )
            for i in range(0, n, self.eval_batch_size)
        ]

    def _masks(self, batch: Batch) -> AbstractContextManager[object]:
        """Within the block, random layers draw from ``batch``'s own seed (when it has one)."""
        seed = getattr(batch, "seed", None)
        if not self.random_layers or seed is None:
            return nullcontext()
        return _seeded(seed, self.device)

    # -- losses --------------------------------------------------------------------------------
    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_kind == "cross_entropy":
            return F.cross_entropy(out, y)
        return 0.5 * (out.squeeze(-1) - y).pow(2).mean()

    def _forward(self, params: Params, buffers: Buffers, x: Tensor) -> Tensor:
        return functional_call(self.model, (params, buffers), (x,))

    def train_loss(self, params: Params, buffers: Buffers, batch: Batch) -> Tensor:
        """Mean loss on ``batch`` in train mode, with the loss hyperparameters ``batch``
        carries; pure (batch-norm uses batch statistics only)."""
        self.model.train()
        x, y = batch
        hyper = loss_hyper(batch)
        with batch_statistics_only(self.model), self._masks(batch):
            out = self._forward(params, buffers, x)
        smoothing = hyper.get("label_smoothing")
        if smoothing is None:
            loss = self._loss(out, y)
        else:
            logp = F.log_softmax(out, dim=-1)
            nll = -logp.gather(-1, y.unsqueeze(-1)).mean()
            loss = (1 - smoothing) * nll + smoothing * -logp.mean(-1).mean()
        l2 = hyper.get("l2")
        if l2 is not None:
            per = l2 if isinstance(l2, dict) else dict.fromkeys(params, l2)
            loss = loss + sum(per[k] * params[k].pow(2).sum() for k in params) / 2
        return loss

    def next_buffers(self, params: Params, buffers: Buffers, batch: Batch) -> Buffers:
        """Running statistics after a train-mode pass on ``batch`` (new tensors, no gradient)."""
        if not buffers:
            return buffers
        new = {k: b.detach().clone() for k, b in buffers.items()}
        self.model.train()
        with torch.no_grad(), self._masks(batch):
            self._forward(params, new, batch[0])  # batch-norm updates ``new`` in place
        return new

    def val_loss(self, params: Params, buffers: Buffers) -> Tensor:
        return self._split_metrics(params, buffers, "val", differentiable=True)[0]

    def val_loss_terms(self, params: Params, buffers: Buffers) -> Iterator[Tensor]:
        """The validation loss as a sum of per-chunk terms (``eval_batch_size`` images each).

        Differentiating term by term (:func:`metahpo.inner.val_loss_and_grad`) holds one
        chunk's activations at a time instead of the whole validation split's. In a
        data-parallel run only this rank's share of the split is chunked (the terms of all
        ranks add up to the loss).
        """
        self.model.eval()
        try:
            x, y = self.data["val"]
            n = len(y)
            mine = distributed.share(n)
            for i in range(mine.start, mine.stop, self.eval_batch_size):
                j = min(i + self.eval_batch_size, mine.stop)
                xb, yb = x[i:j], y[i:j]
                yield self._loss(self._forward(params, buffers, xb), yb) * (len(yb) / n)
        finally:
            self.model.train()

    def evaluate(self, params: Params, buffers: Buffers, split: str = "test") -> dict[str, float]:
        if split not in self.data:
            raise ConfigError(f"split={split!r} is unknown; allowed: {', '.join(self.data)}")
        with torch.no_grad():
            loss, acc = self._split_metrics(params, buffers, split, differentiable=False)
        return {"loss": float(loss), "accuracy": None if acc is None else float(acc)}

    def _split_metrics(
        self, params: Params, buffers: Buffers, split: str, *, differentiable: bool
    ) -> tuple[Tensor, Tensor | None]:
        self.model.eval()
        x, y = self.data[split]
        n = len(y)
        total = torch.zeros((), device=self.device, dtype=self.dtype)
        correct = torch.zeros((), device=self.device)
        for i in range(0, n, self.eval_batch_size):
            xb, yb = x[i : i + self.eval_batch_size], y[i : i + self.eval_batch_size]
            out = self._forward(params, buffers, xb)
            total = total + self._loss(out, yb) * len(yb)
            if self.loss_kind == "cross_entropy":
                correct = correct + (out.detach().argmax(-1) == yb).sum()
        self.model.train()
        acc = correct / n if self.loss_kind == "cross_entropy" else None
        return total / n, acc
