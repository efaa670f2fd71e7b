"""Truncated reverse mode: backpropagate through the last K inner steps (Shaban et al. 2019)."""

from __future__ import annotations

import torch

from metahpo.core import Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.inner import FlatTask, Steps, train
from metahpo.reverse import check_window, window_hypergradient
from metahpo.schedule import HyperSchedule
from metahpo.validation import PositiveInt, checked


@checked("estimator")
class TruncatedReverse:
    """d L_val(theta_T) / d h with theta_{T-K} held constant: reverse mode over the last K steps.

    Runs steps ``0 .. T-K-1`` plainly (no graph), then steps ``T-K .. T-1`` through
    :func:`metahpo.inner.train` with the per-step values built from shared values that require
    grad and training gradients taken with ``create_graph``, and backpropagates the final
    validation loss (:func:`metahpo.reverse.window_hypergradient`).

    Objective: the final validation loss, as forward mode, but differentiated only through the
    window; with ``K = T`` it is the exact hypergradient.
    Bias: the dependence of ``theta_{T-K}`` and ``v_{T-K}`` on the hyperparameters is dropped.
    A segment lying entirely before the window gets exactly zero; a segment straddling the
    window's start gets only the part of its gradient from its steps inside the window; a
    segment inside the window gets its exact gradient (its values act only after
    ``T-K``). With sign or gradient outer steps, segments before the window never move.
    Memory: grows with K, not T: the graph of K steps, O(K (P + activations)).
    Compute: ``T - K`` plain steps, then ``K`` steps with ``create_graph`` and one backward
    through them: about ``T + 3 K`` gradient evaluations.
    Data-parallel (:mod:`metahpo.distributed`): per step one all-reduce of the gradient (P
    numbers), plus one per window step in the backward pass (:mod:`metahpo.reverse`).

    Args:
        K: steps to backpropagate through, from 1 to the horizon (checked at the start of
            :meth:`hypergradient`, before any training, when the horizon is known).
    """

    name = "truncated_reverse"
    data_parallel = True

    def __init__(self, K: PositiveInt = 20) -> None:
        self.K = K

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless K fits the horizon (called before any training)."""
        check_window("K", self.K, schedule.horizon)

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        with CostMeter(task.device) as cost:
            flat = FlatTask(task)
            begin = schedule.horizon - self.K
            steps = Steps(flat, schedule)
            with torch.no_grad():
                state = train(flat, steps, steps.init_state(flat), begin)
            window = window_hypergradient(flat, schedule, state, schedule.horizon)
            val_accuracy = flat.evaluate(window.state, "val")["accuracy"]
        return Hypergradient(
            meta_loss=window.meta_loss,
            grads=window.grads,
            seconds=cost.seconds,
            peak_memory=cost.peak,
            inner_steps=schedule.horizon,
            metrics={"val_accuracy": val_accuracy, "window_start": begin},
        )
