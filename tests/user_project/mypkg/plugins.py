"""A user's own task, estimator and outer optimiser, outside metahpo's repository."""

from __future__ import annotations

import time

import torch
from torch import nn

import metahpo
from metahpo.taskbase import SupervisedTask


class Blobs(SupervisedTask):
    """Three Gaussian blobs in 4-d, a linear classifier."""

    def __init__(self, *, seed=0, device="cpu", dtype=torch.float32, batch_size=16):
        g = torch.Generator().manual_seed(0)
        centres = 2 * torch.randn(3, 4, generator=g)

        def split(n):
            y = torch.randint(0, 3, (n,), generator=g)
            return centres[y] + torch.randn(n, 4, generator=g), y

        super().__init__(
            "blobs",
            {"train": split(96), "val": split(48), "test": split(48)},
            lambda: nn.Linear(4, 3),
            loss="cross_entropy",
            batch_size=batch_size,
            seed=seed,
            device=torch.device(device),
            dtype=dtype,
        )


class CentralDifferences:
    """d L_val / d h by central differences: 2 inner runs per shared value (O(eps^2) bias)."""

    name = "central_differences"

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def hypergradient(self, task, schedule):
        start = time.perf_counter()
        grads = {n: torch.zeros_like(schedule.values[n]) for n in schedule.learned}
        for n in schedule.learned:
            for k in range(schedule.specs[n].n_segments):
                losses = []
                for sign in (1, -1):
                    v = schedule.values[n].clone()
                    v[k] += sign * self.eps
                    losses.append(metahpo.meta_loss(task, schedule.replace({n: v}))["meta_loss"])
                grads[n][k] = (losses[0] - losses[1]) / (2 * self.eps)
        base = metahpo.meta_loss(task, schedule)
        return metahpo.Hypergradient(
            meta_loss=base["meta_loss"], grads=grads, seconds=time.perf_counter() - start
        )


class HalvingGD:
    """Gradient descent on the shared values whose step halves every outer step."""

    def __init__(self, lr: float = 0.01) -> None:
        self.lr = lr

    def init(self, schedule):
        return {"scale": 1.0}

    def step(self, schedule, grads, state):
        new = {
            n: schedule.values[n] - self.lr * state["scale"] * grads[n] for n in schedule.learned
        }
        return schedule.replace(new).project(), {"scale": state["scale"] / 2}

    def converged(self, before, after, state, fraction):
        return False

    def backtrack(self, state):
        return {"scale": state["scale"] / 2}
