"""Outer optimisers: move the shared hyperparameter values along their hypergradients.

Each optimiser is a small object with explicit, checkpointable state (a dict of float64
tensors per schedule key): ``init(schedule)``, ``step(schedule, grads, state) ->
(schedule, state)``, ``converged(before, after, state)`` and ``backtrack(state)`` (after a
rejected step). Results are always projected into the bounds. Per-key settings (step sizes,
learning rates) are read with :func:`metahpo.schedule.per_key`: by key, by hyperparameter name,
``default``, or (sign descent, Adam and Rprop) a fraction of the key's bounds. The runner
(metahpo/runner.py) decides whether a step is accepted (``outer.accept``) and calls
``backtrack`` after a rejected one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from annotated_types import Ge, Le
from torch import Tensor

from metahpo.core import ConfigError
from metahpo.schedule import HyperSchedule, per_key, raw_steps
from metahpo.validation import Decay, Positive, checked

#: A step as a fraction of a key's bounds width (Rprop).
Width = Annotated[Positive, Le(1)]

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


def sign_step(
    schedule: HyperSchedule,
    grads: Mapping[str, Tensor],
    state: State,
    resize: Callable[[str, Tensor, Tensor], Tensor],
) -> tuple[HyperSchedule, State]:
    """``h <- h - sign(g) s_h`` for every learned value, projected into the bounds.

    ``resize(key, s, agree)`` gives the new steps of ``key`` from the old ones and ``agree``
    (positive where the sign held since the last step, negative where it flipped, 0 where either
    sign was 0). A zero hypergradient keeps the previous sign. State: ``step`` and ``sign``.
    """
    new_values, steps, signs = {}, {}, {}
    for n in schedule.learned:
        sign = torch.sign(grads[n])
        steps[n] = resize(n, state["step"][n], sign * state["sign"][n])
        new_values[n] = schedule.values[n] - sign * steps[n]
        signs[n] = torch.where(sign == 0, state["sign"][n], sign)
    return schedule.replace(new_values).project(), {"step": steps, "sign": signs}


@checked("outer.optimizer")
class SignDescent:
    """The paper's update: ``h <- h - sign(dL/dh) * s_h``; ``s_h`` halves when the sign flips.

    One step size per shared value. Converged when every step size is below ``stop_fraction``
    of its value's magnitude. Hypergradient clipping does not change a sign step.
    """

    def __init__(self, step_size: Mapping[str, Positive], halve_on_flip: bool = True) -> None:
        self.step_size = _floats(step_size)
        self.halve_on_flip = halve_on_flip

    def init(self, schedule: HyperSchedule) -> State:
        sizes = raw_steps("outer.optimizer.step_size", self.step_size, schedule, STEP_FRACTION)
        return {
            "step": {n: torch.ones_like(schedule.values[n]) * sizes[n] for n in schedule.learned},
            "sign": {n: torch.zeros_like(schedule.values[n]) for n in schedule.learned},
        }

    def step(
        self, schedule: HyperSchedule, grads: Mapping[str, Tensor], state: State
    ) -> tuple[HyperSchedule, State]:
        def resize(name: str, step: Tensor, agree: Tensor) -> Tensor:
            return torch.where(agree < 0, step / 2, step) if self.halve_on_flip else step

        return sign_step(schedule, grads, state, resize)

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


@checked("outer.optimizer")
class Adam(_ScaledStep):
    """Adam on the shared values, with a learning rate per hyperparameter type."""

    def __init__(
        self,
        lr: Mapping[str, Positive],
        betas: tuple[Decay, Decay] = (0.9, 0.999),
        eps: Positive = 1e-12,
    ) -> None:
        self.lr = _floats(lr)
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
        new_values, lr = {}, raw_steps("outer.optimizer.lr", self.lr, schedule, STEP_FRACTION)
        for n in schedule.learned:
            m_hat, v_hat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
            update = state["scale"] * lr[n] * m_hat / (v_hat.sqrt() + self.eps)
            new_values[n] = schedule.values[n] - update
        return schedule.replace(new_values).project(), {**state, "m": m, "v": v, "t": t}


@checked("outer.optimizer")
class SGD(_ScaledStep):
    """Plain gradient descent on the shared values, with a learning rate per type."""

    def __init__(self, lr: Mapping[str, Positive]) -> None:
        self.lr = _floats(lr)

    def init(self, schedule: HyperSchedule) -> State:
        per_key("outer.optimizer.lr", self.lr, schedule)
        return {"scale": 1.0}

    def step(
        self, schedule: HyperSchedule, grads: Mapping[str, Tensor], state: State
    ) -> tuple[HyperSchedule, State]:
        lr = raw_steps("outer.optimizer.lr", self.lr, schedule, power=2)
        new = {n: schedule.values[n] - state["scale"] * lr[n] * grads[n] for n in schedule.learned}
        return schedule.replace(new).project(), state


@checked("outer.optimizer")
class Rprop:
    """Sign steps measured in each value's bounds range, grown while the sign holds (Rprop).

    Every shared value ``h`` has its own step ``s_h``, starting at ``step`` times the width of
    its key's bounds (``hi - lo``), so one setting suits any hyperparameter (a learning rate in
    [0, 1], a weight decay in [0, 0.01], an Adam beta in [0, 0.999]): ``h <- h - sign(g) s_h``;
    ``s_h`` grows by ``grow`` while the sign of ``g`` holds and shrinks by ``shrink`` when it
    flips, within ``[min_step, max_step]`` times the width. The step ignores the hypergradient's
    magnitude, which near the edge of stability spans many decades without carrying
    information; ``backtrack`` (after a rejected step) halves every step. Converged when every
    step is below ``stop_fraction`` of its value's magnitude or down at ``min_step``.
    """

    def __init__(
        self,
        step: Width | Mapping[str, Width] = 0.05,
        grow: Annotated[float, Ge(1)] = 1.2,
        shrink: Width = 0.5,
        max_step: Width = 0.25,
        min_step: Width = 1e-4,
    ) -> None:
        if isinstance(step, Mapping):
            self.fractions: dict[str, float] | None = _floats(step)
            self.fraction = 0.0
        else:
            self.fractions, self.fraction = None, float(step)
        if min_step > max_step:
            raise ConfigError(
                f"outer.optimizer.min_step={min_step} must be <= "
                f"outer.optimizer.max_step={max_step}"
            )
        self.grow, self.shrink = float(grow), float(shrink)
        self.max_step, self.min_step = float(max_step), float(min_step)

    @staticmethod
    def _width(schedule: HyperSchedule, name: str) -> Tensor:
        """Width of every raw value's bounds (the hyperparameter's, in raw units)."""
        rlo, rhi = schedule.raw_bounds(name)
        width = rhi - rlo
        if not bool(torch.isfinite(width).all() and (width > 0).all()):
            lo, hi = schedule.specs[name].bounds
            raise ConfigError(
                f"outer.optimizer.step: Rprop steps are fractions of each key's bounds, but "
                f"schedule.{name}.bounds=[{lo}, {hi}] has no finite width; give finite bounds"
            )
        return width

    def init(self, schedule: HyperSchedule) -> State:
        fractions = (
            {n: self.fraction for n in schedule.learned}
            if self.fractions is None
            else per_key("outer.optimizer.step", self.fractions, schedule)  # "lr/g" -> "lr"
        )
        step = {}
        for n in schedule.learned:
            step[n] = fractions[n] * self._width(schedule, n)
        return {"step": step, "sign": {n: torch.zeros_like(step[n]) for n in step}}

    def step(
        self, schedule: HyperSchedule, grads: Mapping[str, Tensor], state: State
    ) -> tuple[HyperSchedule, State]:
        def resize(name: str, step: Tensor, agree: Tensor) -> Tensor:
            width = self._width(schedule, name)
            step = torch.where(agree > 0, step * self.grow, step)
            step = torch.where(agree < 0, step * self.shrink, step)
            return torch.minimum(torch.maximum(step, self.min_step * width), self.max_step * width)

        return sign_step(schedule, grads, state, resize)

    def converged(
        self, before: HyperSchedule, after: HyperSchedule, state: State, frac: float
    ) -> bool:
        for n in after.learned:
            floor = self.min_step * self._width(after, n) * (1 + 1e-9)
            step = state["step"][n]
            if not bool(((step < frac * after.values[n].abs()) | (step <= floor)).all()):
                return False
        return True

    def backtrack(self, state: State) -> State:
        return {**state, "step": {n: s / 2 for n, s in state["step"].items()}}


def _floats(values: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}
