"""Data-parallel inner runs over ``torch.distributed``: the process group, averaging, shards.

Launched by ``torchrun --nproc_per_node=N -m metahpo ...``, every rank runs the same outer loop
on the same global batches. Each rank takes its equal, contiguous share of every batch
(:func:`shard`); the losses are means over the batch, so the mean over ranks of the per-rank
gradients and Hessian-vector products is exactly the global batch's (:func:`all_reduce_mean_`),
and parameters, tangents and hyperparameters stay identical on every rank. Only rank 0 writes
(:func:`is_main`). Outside torchrun, and with one process, every function here is a no-op.

Reverse mode through a data-parallel step uses :func:`all_reduce_mean`, whose backward
averages the incoming gradients over ranks as well. Why that is exact: give every replicated
quantity (parameters, velocity, averaged gradient) a local adjoint whose mean over ranks is its
true adjoint, and every rank-owned one (a rank's own shard gradient ``g_r``) ``world_size``
times its true adjoint. Seeding every rank with the same validation gradient satisfies this;
steps that every rank takes alike preserve it; the average ``y = mean_r g_r`` has true adjoint
``mean_r ybar_r``, so ``dL/dg_r = mean_r ybar_r / W`` and ``g_r``'s local adjoint is
``mean_r ybar_r``: the backward all-reduce. ``g_r``'s own graph then adds ``J_r^T`` times it
to the parameters' local adjoint, whose mean over ranks is the true ``sum_r J_r^T dL/dg_r``.
So the hypergradient is the mean over ranks of the local ones (reduced once more at the end).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor

from metahpo.core import Batch, Buffers, ConfigError, HypergradientEstimator, StepBatch, Task
from metahpo.device import resolve_device

T = TypeVar("T")


class PeerError(RuntimeError):
    """A collective failed: another rank died, or did not answer within ``distributed.timeout``."""


# -- who am I ---------------------------------------------------------------------------------
def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    """Processes in the running group (1 when there is none)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: the group's, else torchrun's ``RANK`` (0 when not launched)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes results, checkpoints, plots, W&B and prints."""
    return rank() == 0


# -- the process group ------------------------------------------------------------------------
def join(cfg: DictConfig) -> None:
    """Join torchrun's process group, once per process; it is left when the process exits.

    A no-op outside torchrun and when already joined (the jobs of a sweep launched by torchrun
    share one group: joining again after leaving is not supported by torchrun's store). The
    backend comes from ``distributed.backend`` (``auto``: nccl on CUDA, gloo on CPU); a
    collective that waits longer than ``distributed.timeout`` seconds for another rank fails
    with :class:`PeerError` instead of hanging.

    Raises:
        ConfigError: nccl without CUDA (other values are checked by
            :func:`metahpo.config.validate`).
        PeerError: the other ranks did not all join within the timeout.
    """
    if not launched() or dist.is_initialized():
        return
    device = resolve_device(cfg.device)
    backend = str(cfg.distributed.backend)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"distributed.backend=nccl needs a CUDA device (device={cfg.device})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(cfg.distributed.timeout))
    try:
        dist.init_process_group(backend, timeout=timeout)
    except RuntimeError as e:
        raise PeerError(f"rank {rank()} could not join the others: {_first_line(e)}") from None
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- collectives ------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _all_reduce_sum_(t: Tensor) -> Tensor:
    try:
        dist.all_reduce(t)
    except RuntimeError as e:  # torch's DistError and gloo's errors are RuntimeErrors
        raise PeerError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective failed (another "
            f"rank died, or did not answer within distributed.timeout): {_first_line(e)}"
        ) from None
    return t


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it (``t`` unchanged on one process)."""
    return _all_reduce_sum_(t) if world_size() > 1 else t


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average ``t`` over ranks in place and return it (``t`` unchanged on one process)."""
    w = world_size()
    return _all_reduce_sum_(t).div_(w) if w > 1 else t


class _MeanOverRanks(torch.autograd.Function):
    """``mean_r x_r``; backward: the mean over ranks of the incoming gradients (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return _all_reduce_sum_(x.detach().clone()).div_(dist.get_world_size())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _all_reduce_sum_(grad.clone()).div_(dist.get_world_size())


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over ranks into a new tensor, differentiably (``t`` on one process).

    For reverse mode through data-parallel steps; the hypergradient it leads to must itself be
    averaged over ranks at the end (the module docstring says why).
    """
    if world_size() == 1:
        return t
    if t.requires_grad:
        return _MeanOverRanks.apply(t)  # type: ignore[no-any-return]
    return all_reduce_mean_(t.detach().clone())


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself on one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise PeerError(f"rank {dist.get_rank()}: a broadcast failed: {_first_line(e)}") from None
    return box[0]  # type: ignore[no-any-return]


# -- data -------------------------------------------------------------------------------------
def shard(batch: Batch) -> Batch:
    """This rank's equal, contiguous share of a global batch.

    Raises:
        ConfigError: the batch size is not divisible by the number of ranks.
    """
    w = world_size()
    if w == 1:
        return batch
    n = len(batch[0])
    if n % w:
        raise ConfigError(
            f"task.batch_size={n} must be divisible by the {w} data-parallel ranks "
            "(each rank takes an equal share of every batch)"
        )
    lo, hi = rank() * (n // w), (rank() + 1) * (n // w)
    x, y = batch
    if isinstance(batch, StepBatch):  # each rank's own masks for its own examples
        seed = None if batch.seed is None else batch.seed * 1009 + rank()
        return StepBatch(x[lo:hi], y[lo:hi], seed, batch.hyper)
    return x[lo:hi], y[lo:hi]


def share(n: int) -> range:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one)."""
    w, r = world_size(), rank()
    return range(r * n // w, (r + 1) * n // w)


def average_buffers(buffers: Buffers) -> Buffers:
    """Floating buffers (batch-norm statistics) averaged over ranks, so that they stay identical.

    Each rank's statistics come from its own shard (per-rank batch norm, as
    DistributedDataParallel without SyncBatchNorm), so they are not the one-process values.
    """
    if world_size() == 1:
        return buffers
    return {k: all_reduce_mean_(b) if b.is_floating_point() else b for k, b in buffers.items()}


def check(task: Task, estimator: HypergradientEstimator, name: str) -> None:
    """Raise ConfigError, before any training, for what a data-parallel run cannot do.

    Args:
        task: the built task (its first batch must split evenly across ranks).
        estimator: the built estimator; it must declare ``data_parallel = True``.
        name: the estimator's config name, for the message.
    """
    w = world_size()
    if w == 1:
        return
    if not getattr(estimator, "data_parallel", False):
        raise ConfigError(
            f"estimator={name} does not support data-parallel runs ({w} ranks); use forward, "
            "checkpointed_reverse, auto, truncated_reverse or greedy (an estimator opts in with "
            "data_parallel = True)"
        )
    shard(task.batch(0))
