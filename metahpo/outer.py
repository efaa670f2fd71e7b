"""Outer optimisers: move the shared hyperparameter values along their hypergradients.

Each optimiser is a small object with explicit, checkpointable state (a dict of float64
tensors per schedule key): ``init(schedule)``, ``step(schedule, grads, state) ->
(schedule, state)``, ``converged(before, after, state)`` and ``backtrack(state)`` (after inner
training diverged). Results are always projected into the bounds. Per-key settings (step sizes,
learning rates) are read with :func:`metahpo.schedule.per_key`: by key, by hyperparameter name,
``default``, or (sign descent and Adam) a fraction of the key's bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metahpo.schedule import HyperSchedule, per_key, positive_per_type

State = dict[str, Any]
# A schedule key the per-type settings do not name (``default`` neither) steps by this fraction
# of its bounds' width (sign descent's step size, Adam's learning rate); see per_key.
STEP_FRACTION = 0.1


def clip_by_norm(grads: Mapping[str, Tensor], max_norm: float | None) -> dict[str, Tensor]:
    """Scale each type's hypergradient so its L2 norm is at most ``max_norm``."""
    if max_norm is None:
        return dict(grads)
    out = {}
    for name, g in grads.items():
        norm = float(g.norm())
        out[name] = g * (max_norm / norm) if norm > max_norm else g
    return out


class SignDescent:
    """The paper's update: ``h <- h - sign(dL/dh) * s_h``; ``s_h`` halves when the sign flips.

    One step size per shared value. Converged when every step size is below ``stop_fraction``
    of its value's magnitude. Hypergradient clipping does not change a sign step.
    """

    def __init__(self, step_size: Mapping[str, float], halve_on_flip: bool = True) -> None:
        self.step_size = positive_per_type("outer.step_size", step_size)
        self.halve_on_flip = halve_on_flip

    def init(self, schedule: HyperSchedule) -> State:
        sizes = per_key("outer.optimizer.step_size", self.step_size, schedule, STEP_FRACTION)
        return {
            "step": {n: torch.full_like(schedule.values[n], sizes[n]) for n in schedule.learned},
            "sign": {n: torch.zeros_like(schedule.values[n]) for n in schedule.learned},
        }

    def step(
        self, schedule: HyperSchedule, grads: Mapping[str, Tensor], state: State
    ) -> tuple[HyperSchedule, State]:
        new_values, steps, signs = {}, {}, {}
        for n in schedule.learned:
            sign = torch.sign(grads[n])
            step = state["step"][n].clone()
            if self.halve_on_flip:
                step[sign * state["sign"][n] < 0] /= 2
            new_values[n] = schedule.values[n] - sign * step
            steps[n] = step
            signs[n] = torch.where(sign == 0, state["sign"][n], sign)
        return schedule.replace(new_values).project(), {"step": steps, "sign": signs}

    def converged(
        self, before: HyperSchedule, after: HyperSchedule, state: State, frac: float
    ) -> bool:
        return all(
            bool((state["step"][n] < frac * after.values[n].abs()).all()) for n in after.learned
        )

    def backtrack(self, state: State) -> State:
        return {**state, "step": {n: s / 2 for n, s in state["step"].items()}}


class _ScaledStep:
    """Optimisers whose step is scaled by ``state["scale"]``: halved when backtracking."""

    def converged(
        self, before: HyperSchedule, after: HyperSchedule, state: State, frac: float
    ) -> bool:
        """Every value moved by less than ``frac`` of its magnitude."""
        return all(
            bool(((after.values[n] - before.values[n]).abs() < frac * after.values[n].abs()).all())
            for n in after.learned
        )

    def backtrack(self, state: State) -> State:
        return {**state, "scale": state["scale"] / 2}


class Adam(_ScaledStep):
    """Adam on the shared values, with a learning rate per hyperparameter type."""

    def __init__(
        self, lr: Mapping[str, float], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12
    ) -> None:
        self.lr = positive_per_type("outer.lr", lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps

    def init(self, schedule: HyperSchedule) -> State:
        per_key("outer.optimizer.lr", self.lr, schedule, STEP_FRACTION)
        zeros = {n: torch.zeros_like(schedule.values[n]) for n in schedule.learned}
        return {"m": dict(zeros), "v": dict(zeros), "t": 0, "scale": 1.0}

    def step(
        self, schedule: HyperSchedule, grads: Mapping[str, Tensor], state: State
    ) -> tuple[HyperSchedule, State]:
        b1, b2 = self.betas
        t = state["t"] + 1
        m = {n: b1 * state["m"][n] + (1 - b1) * grads[n] for n in schedule.learned}
        v = {n: b2 * state["v"][n] + (1 - b2) * grads[n] ** 2 for n in schedule.learned}
        new_values, lr = {}, per_key("outer.optimizer.lr", self.lr, schedule, STEP_FRACTION)
        for n in schedule.learned:
            m_hat, v_hat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
            update = state["scale"] * lr[n] * m_hat / (v_hat.sqrt() + self.eps)
            new_values[n] = schedule.values[n] - update
        return schedule.replace(new_values).project(), {**state, "m": m, "v": v, "t": t}


class SGD(_ScaledStep):
    """Plain gradient descent on the shared values, with a learning rate per type."""

    def __init__(self, lr: Mapping[str, float]) -> None:
        self.lr = positive_per_type("outer.lr", lr)

    def init(self, schedule: HyperSchedule) -> State:
        per_key("outer.optimizer.lr", self.lr, schedule)
        return {"scale": 1.0}

    def step(
        self, schedule: HyperSchedule, grads: Mapping[str, Tensor], state: State
    ) -> tuple[HyperSchedule, State]:
        lr = per_key("outer.optimizer.lr", self.lr, schedule)
        new = {n: schedule.values[n] - state["scale"] * lr[n] * grads[n] for n in schedule.learned}
        return schedule.replace(new).project(), state
