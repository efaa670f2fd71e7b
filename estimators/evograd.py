"""EvoGrad (Bohdal, Yang & Hospedales 2021): online first-order hypergradients of the training
loss's hyperparameters from a few perturbed copies of the weights."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import annotated_types as at
import torch
from torch import Tensor

from metahpo.core import Batch, Task
from metahpo.estimators.greedy import Online
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.schedule import HyperSchedule, require_loss_keys
from metahpo.validation import Accept, Positive, Tolerance, checked

CAN = "forward, exact_reverse, checkpointed_reverse, truncated_reverse, greedy, es or pes"


def evograd_estimate(
    flat: FlatTask,
    st: InnerState,
    train_loss: Any,
    generator: torch.Generator,
    K: int,
    sigma: float,
    tau: float,
) -> Tensor:
    """The EvoGrad surrogate ``L_val(sum_k w_k theta_k)`` at one step, differentiable in the
    loss hyperparameters ``train_loss`` closes over.

    ``theta_k = theta + sigma eps_k`` (``eps_k ~ N(0, I)``), ``w = softmax(-L_train(theta_k)
    / tau)``: the weights of the perturbed copies depend on the hyperparameters through their
    training losses only, so backpropagating the surrogate needs first-order gradients alone.
    """
    eps = torch.randn(K, flat.n_params, generator=generator, dtype=torch.float64)
    copies = st.theta.detach() + sigma * eps.to(st.theta)
    losses = torch.stack([train_loss(c) for c in copies])
    w = torch.softmax(-losses / tau, dim=0)
    return flat.val_loss(w @ copies, st.buffers)


@checked("estimator")
class EvoGrad(Online):
    """EvoGrad: hyperparameters of the training loss moved online, one step at a time.

    At every inner step ``t`` it draws ``K`` perturbed copies ``theta_k = theta_t + sigma
    eps_k`` of the weights, weighs them by ``softmax(-L_train(theta_k, lambda_t) / tau)`` on the
    step's batch and takes ``g_t = d L_val(sum_k w_k theta_k) / d lambda_t`` by one backward pass
    through the softmax (first-order: no Hessian-vector product, no unrolled graph); then it
    steps the raw values in force (``h -= s_h sign(g)`` or ``h -= s_h g``, projected into their
    bounds) and trains on with the optimiser's ordinary step.

    Objective: greedy, like ``greedy`` with ``W = 1``: each value is tuned for the validation
    loss right after the step, and the evolutionary surrogate of that step is a random,
    biased estimate of the one-step hypergradient (``sigma`` and ``tau`` trade its bias against
    its variance). Only hyperparameters of the training loss (``label_smoothing``, ``l2``) are
    visible to it; the optimiser's are refused in one line before training.
    Result: as ``greedy``: ``schedule`` is where the run ended (the outer loop takes it),
    ``grads`` the sum of the per-step estimates pulled back to each raw value, ``meta_loss`` the
    final validation loss of this run.
    Memory: ``K`` copies of the weights and one forward graph per copy; no graph over steps.
    Compute: per step ``K`` training losses and their backward, one validation loss (the whole
    validation split) and the ordinary gradient: about ``K + 3`` gradient evaluations.
    The noise comes from a generator seeded by the task's seed and the schedule's values
    (reproducible; a resumed run repeats it bit for bit).

    Args:
        K: perturbed copies per step (>= 2).
        sigma: the perturbations' standard deviation (weights' units).
        tau: the softmax temperature.
        update: ``"sign"`` or ``"gradient"``.
        step_size: per key, name or ``default``, in the hyperparameter's units (a key with
            none steps by 2 % of its bounds' width).
        accept: ``"finite"`` or ``"meta_loss"`` (:class:`~metahpo.estimators.greedy.Guard`,
            each step a window: one more validation loss per step).
        tolerance: the rise ``accept="meta_loss"`` allows, as a fraction of the best loss.
    """

    name = "evograd"
    data_parallel = False

    def __init__(
        self,
        K: Annotated[int, at.Ge(2)] = 2,
        sigma: Positive = 1e-3,
        tau: Positive = 0.05,
        update: Literal["sign", "gradient"] = "sign",
        step_size: Mapping[str, Positive] | None = None,
        accept: Accept = "finite",
        tolerance: Tolerance = 0.1,
    ) -> None:
        self.K, self.sigma, self.tau, self.update = K, sigma, tau, update
        self.accept, self.tolerance = accept, tolerance
        self.step_size = {str(k): float(v) for k, v in (step_size or {}).items()}

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless every learned key is a hyperparameter of the loss."""
        require_loss_keys(
            schedule, "evograd", "sees hyperparameters of the training loss only", CAN
        )
        self._sizes(schedule)

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], HyperSchedule, dict[str, Any]]:
        flat = FlatTask(task)
        steps = Steps(flat, schedule)  # the optimiser's values; the loss's are set per step
        keys, T = list(schedule.learned), schedule.horizon
        total = {k: torch.zeros_like(v) for k, v in schedule.values.items()}
        x = torch.cat([schedule.values[k] for k in keys])
        gen = torch.Generator().manual_seed(
            int(task.seed) * 1_000_003 + zlib.crc32(x.numpy().tobytes())
        )
        dev, dt = task.device, task.dtype
        guard, guarded = self._guard(), self.accept == "meta_loss"
        # the values in force and, once step t is taken, their estimate g_t: the move to the
        # next values waits for the loss after step t (the guard's window end)
        now: dict[str, Any] = {"schedule": schedule, "grads": None}

        def advance(t: int, loss: float) -> None:
            if now["grads"] is not None:
                now["schedule"] = guard.move(now["schedule"], now["grads"], loss, (t - 1, t))

        def grad_fn(t: int, st: InnerState, batch: Batch) -> Tensor:
            advance(t, float(flat.val_loss(st.theta, st.buffers)) if guarded else math.nan)
            raw = now["schedule"].values
            leaves = {k: raw[k].detach().requires_grad_(True) for k in keys}
            with torch.enable_grad():
                at_t = {
                    k: schedule.param(k).at(leaves[k].to(device=dev, dtype=dt), t, T) for k in keys
                }
                step_batch = steps.attach(t, batch, at_t)

                def loss(theta: Tensor) -> Tensor:
                    return flat.train_loss(theta, st.buffers, step_batch)

                surrogate = evograd_estimate(flat, st, loss, gen, self.K, self.sigma, self.tau)
                got = torch.autograd.grad(surrogate, [leaves[k] for k in keys], allow_unused=True)
            grads = {k: torch.zeros_like(v) for k, v in raw.items()}
            for k, g in zip(keys, got, strict=True):
                if g is not None:
                    grads[k] = g.detach().to(torch.float64)
                total[k] += grads[k]
            now["grads"] = grads
            # the step itself with the values in force
            plain = steps.attach(t, batch, {k: v.detach() for k, v in at_t.items()})
            return flat.grad(t, st, plain)

        with torch.no_grad():
            state = train(flat, steps, steps.init_state(flat), T, grad_fn=grad_fn)
        meta_loss = float(flat.val_loss(state.theta, state.buffers))
        advance(T, meta_loss)
        metrics = {
            "val_accuracy": flat.evaluate(state, "val")["accuracy"],
            "evograd_K": self.K,
            **guard.metrics(),
        }
        if not math.isfinite(meta_loss):
            metrics["diverged"] = True
        return meta_loss, total, now["schedule"], metrics
