"""How a schedule key's learnable *raw values* become its value at every inner step.

A :class:`Parameterisation` maps ``n`` raw values (what the outer loop moves and what every
estimator differentiates) to a tensor ``[T]`` of per-step values, says which steps each raw
value can influence (forward mode starts a raw value's column at the first of them) and gives
the raw values' own bounds and initial values from the hyperparameter's bounds and ``init``.

Built in (``schedule.<name>.param``):

============== ============================ ==================================================
name           raw values                   value at step t
============== ============================ ==================================================
constant       one per segment (default)    the value of the segment in force (the paper's)
log            log of one per segment       ``exp(raw)`` of the segment in force (bounds > 0)
linear         one per knot                 linear between knots at ``k (T-1)/(n-1)``
warmup_cosine  peak, warmup, final          linear warm-up over ``warmup T`` steps to ``peak``,
                                            then cosine to ``final x peak``
============== ============================ ==================================================

A user's parameterisation subclasses :class:`Parameterisation` and is named by its class path
(``schedule.lr.param=mypkg.MyParam``, or ``{_target_: mypkg.MyParam, option: ...}``);
docs/extending.md shows one. Subclasses implement :meth:`per_step` and :meth:`supports`; the
rest has defaults (the derivative at one step by ``torch.func.jacfwd`` of :meth:`at`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import jacfwd

from metahpo.core import ConfigError


class Parameterisation:
    """``size`` raw values -> the value of one hyperparameter at each of ``horizon`` steps.

    Args:
        segments: the configured sharing (``schedule.<name>.segments``): segments or knots;
            a fixed-size family ignores it (and says so through :meth:`check`).

    Subclasses set ``name`` and implement :meth:`per_step` and :meth:`supports`; they may
    override :meth:`at` and :meth:`derivative` (per-step cost in forward mode),
    :meth:`raw_bounds` and :meth:`to_raw` (a change of variables) and :meth:`check`.
    """

    name: ClassVar[str] = "custom"
    #: raw values are the hyperparameter's own values (bounds and steps in its units)
    linear_units: ClassVar[bool] = False

    def __init__(self, segments: int = 1) -> None:
        self.segments = int(segments)

    # -- what a subclass defines ----------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of raw values."""
        return self.segments

    def per_step(self, raw: Tensor, horizon: int) -> Tensor:
        """``[horizon]`` values, differentiable in ``raw`` (on ``raw``'s device and dtype)."""
        raise NotImplementedError

    def supports(self, horizon: int) -> list[tuple[int, int]]:
        """``(first, last)`` step each raw value can influence (its derivative is exactly 0
        outside); forward mode starts its column at ``first``."""
        raise NotImplementedError

    # -- defaults -------------------------------------------------------------------------------
    def at(self, raw: Tensor, t: int, horizon: int) -> Tensor:
        """The value at step ``t`` (0-d); default: one entry of :meth:`per_step`."""
        return self.per_step(raw, horizon)[t]

    def derivative(self, raw: Tensor, t: int, horizon: int) -> list[tuple[int, float]]:
        """``[(i, d value_t / d raw_i)]`` for the raw values that influence step ``t``."""
        d = jacfwd(lambda r: self.at(r, t, horizon))(raw.to(torch.float64))
        return [(i, float(d[i])) for i, (a, b) in enumerate(self.supports(horizon)) if a <= t <= b]

    def pullback(self, raw: Tensor, per_step_grad: Tensor, horizon: int) -> Tensor:
        """``d L / d raw`` from ``d L / d value_t`` for every step (a vector-Jacobian product)."""
        raw = raw.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.per_step(raw, horizon), raw, per_step_grad)
        return g

    def raw_bounds(self, bounds: tuple[float, float]) -> tuple[Tensor, Tensor]:
        """Bounds of every raw value (float64 ``[size]`` each) from the hyperparameter's."""
        lo, hi = bounds
        return _full(self.size, lo), _full(self.size, hi)

    def to_raw(self, init: Sequence[float]) -> Tensor:
        """Raw values from ``init`` (one number, or one per raw value, as configured)."""
        v = torch.as_tensor(list(init), dtype=torch.float64)
        return v.expand(self.size).clone() if v.numel() == 1 else v.reshape(self.size)

    def from_raw(self, raw: Tensor) -> list[float]:
        """Raw values in the units ``init`` is given in (inverse of :meth:`to_raw`)."""
        return [float(x) for x in raw]

    def hyperparameter_values(self, init: Sequence[float]) -> list[float]:
        """The entries of ``init`` that are values of the hyperparameter itself (checked
        against its domain); default: all."""
        return list(init)

    def check(
        self, key: str, horizon: int, bounds: tuple[float, float], init: Sequence[float]
    ) -> None:
        """Raise :class:`ConfigError` (one line, naming ``key``) for settings this
        parameterisation cannot use; ``init`` is in the units :meth:`to_raw` reads."""
        if not 1 <= self.segments <= horizon:
            raise ConfigError(
                f"{key}.segments={self.segments} must be an integer from 1 to {horizon} "
                f"(horizon={horizon})"
            )
        if len(init) not in (1, self.size):
            raise ConfigError(
                f"{key}.init={list(init)} must be a number or a list of {self.size} numbers"
            )

    def to_config(self) -> Any:
        """What ``schedule.<name>.param`` names (``results.json``, plots, resume)."""
        if type(self) in BUILT_IN.values():
            return self.name
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), self.segments))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(segments={self.segments})"


def _full(n: int, value: float) -> Tensor:
    return torch.full((n,), float(value), dtype=torch.float64)


def segment_index(n: int, horizon: int, device: torch.device | None = None) -> Tensor:
    """LongTensor ``[T]``: the segment in force at every step (``floor(n t / T)``)."""
    return torch.arange(horizon, dtype=torch.long, device=device) * n // horizon


def segment_supports(n: int, horizon: int) -> list[tuple[int, int]]:
    """``(first, last)`` step of each of ``n`` contiguous segments (``ceil(k T / n)`` ...)."""
    starts = [-(-k * horizon // n) for k in range(n)] + [horizon]
    return [(starts[k], starts[k + 1] - 1) for k in range(n)]


class Constant(Parameterisation):
    """Piecewise constant: segment ``k`` of ``n`` holds steps ``ceil(k T / n)`` to
    ``ceil((k + 1) T / n) - 1`` (the paper's contiguous sharing; the default)."""

    name = "constant"
    linear_units = True

    def per_step(self, raw: Tensor, horizon: int) -> Tensor:
        return raw[segment_index(self.size, horizon, raw.device)]

    def at(self, raw: Tensor, t: int, horizon: int) -> Tensor:
        return raw[t * self.size // horizon]

    def supports(self, horizon: int) -> list[tuple[int, int]]:
        return segment_supports(self.size, horizon)

    def derivative(self, raw: Tensor, t: int, horizon: int) -> list[tuple[int, float]]:
        return [(t * self.size // horizon, 1.0)]

    def pullback(self, raw: Tensor, per_step_grad: Tensor, horizon: int) -> Tensor:
        index = segment_index(self.size, horizon, per_step_grad.device)
        return torch.zeros_like(raw).index_add_(0, index, per_step_grad.to(raw))


class Log(Constant):
    """Piecewise constant in log space: the raw value of a segment is ``log(value)``.

    For positive hyperparameters (a learning rate, a weight decay): steps are relative, bounds
    are never clamped at 0, and the value cannot reach 0: "learning from zero" becomes learning
    from a small value (the lower bound, or ``init``). Needs ``bounds[0] > 0``.
    """

    name = "log"
    linear_units = False

    def per_step(self, raw: Tensor, horizon: int) -> Tensor:
        return raw.exp()[segment_index(self.size, horizon, raw.device)]

    def at(self, raw: Tensor, t: int, horizon: int) -> Tensor:
        return raw[t * self.size // horizon].exp()

    def derivative(self, raw: Tensor, t: int, horizon: int) -> list[tuple[int, float]]:
        k = t * self.size // horizon
        return [(k, math.exp(float(raw[k])))]

    def pullback(self, raw: Tensor, per_step_grad: Tensor, horizon: int) -> Tensor:
        return super().pullback(raw, per_step_grad, horizon) * raw.exp()

    def raw_bounds(self, bounds: tuple[float, float]) -> tuple[Tensor, Tensor]:
        lo, hi = bounds
        return _full(self.size, math.log(lo)), _full(self.size, math.log(hi))

    def to_raw(self, init: Sequence[float]) -> Tensor:
        return super().to_raw(init).log()

    def from_raw(self, raw: Tensor) -> list[float]:
        return [float(x) for x in raw.exp()]

    def check(
        self, key: str, horizon: int, bounds: tuple[float, float], init: Sequence[float]
    ) -> None:
        super().check(key, horizon, bounds, init)
        if not bounds[0] > 0:
            raise ConfigError(
                f"{key}.bounds=[{bounds[0]}, {bounds[1]}]: param=log needs a lower bound > 0 "
                "(log space cannot reach 0); e.g. [1.0e-4, ...]"
            )


class Linear(Parameterisation):
    """Piecewise linear between ``n >= 2`` knots at steps ``k (T - 1) / (n - 1)`` (the first at
    step 0, the last at step T - 1): a continuous schedule; each knot influences the steps
    between its two neighbours (so forward mode starts its column just after the knot before).
    One knot is a constant value."""

    name = "linear"
    linear_units = True

    def _weights(self, t: int, horizon: int) -> tuple[int, float]:
        """``(k, w)``: step ``t`` is ``(1 - w) knot_k + w knot_{k+1}``."""
        n = self.size
        if n == 1 or horizon == 1:
            return 0, 0.0
        k = min(t * (n - 1) // (horizon - 1), n - 2)
        return k, (t * (n - 1) - k * (horizon - 1)) / (horizon - 1)

    def per_step(self, raw: Tensor, horizon: int) -> Tensor:
        n = self.size
        if n == 1 or horizon == 1:
            return raw[torch.zeros(horizon, dtype=torch.long, device=raw.device)]
        t = torch.arange(horizon, dtype=torch.long, device=raw.device)
        k = (t * (n - 1) // (horizon - 1)).clamp(max=n - 2)
        w = ((t * (n - 1) - k * (horizon - 1)).to(raw.dtype)) / (horizon - 1)
        return raw[k] * (1 - w) + raw[k + 1] * w

    def at(self, raw: Tensor, t: int, horizon: int) -> Tensor:
        k, w = self._weights(t, horizon)
        return raw[k] if self.size == 1 else raw[k] * (1 - w) + raw[k + 1] * w

    def derivative(self, raw: Tensor, t: int, horizon: int) -> list[tuple[int, float]]:
        k, w = self._weights(t, horizon)
        if self.size == 1:
            return [(0, 1.0)]
        return [(i, d) for i, d in ((k, 1.0 - w), (k + 1, w)) if d != 0.0]

    def supports(self, horizon: int) -> list[tuple[int, int]]:
        n = self.size
        if n == 1 or horizon == 1:
            return [(0, horizon - 1)]
        # knot k sits at p_k = k (T-1)/(n-1); it weighs on the steps strictly between p_{k-1}
        # and p_{k+1}
        out = []
        for k in range(n):
            first = 0 if k == 0 else (k - 1) * (horizon - 1) // (n - 1) + 1
            last = horizon - 1 if k == n - 1 else -(-(k + 1) * (horizon - 1) // (n - 1)) - 1
            out.append((first, last))
        return out


class WarmupCosine(Parameterisation):
    """A warm-up + cosine family with three raw values ``(peak, warmup, final)``::

        value_t = peak * min(1, (t + 1) / (warmup T + 1)) * c_t,
        c_t = final + (1 - final) (1 + cos(pi clamp((t - warmup T) / (T - warmup T), 0, 1))) / 2

    a linear warm-up over the first ``warmup`` fraction of the run to ``peak``, then a cosine
    from ``peak`` to ``final x peak``. ``peak`` lies in the hyperparameter's bounds, ``warmup``
    in [0, 0.5] and ``final`` in [0, 1]; ``init`` is ``peak`` alone (warm-up 0.1, final 0) or
    all three. Every raw value influences every step; ``segments`` is not used (always 3
    raw values).
    """

    name = "warmup_cosine"
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"warmup": (0.0, 0.5), "final": (0.0, 1.0)}
    DEFAULTS: ClassVar[tuple[float, float]] = (0.1, 0.0)

    def __init__(self, segments: int = 3) -> None:
        super().__init__(3)  # ``segments`` is not used: one family, whatever the sharing

    @property
    def size(self) -> int:
        return 3

    def _values(self, raw: Tensor, t: Tensor, horizon: int) -> Tensor:
        peak, warmup, final = raw[0], raw[1], raw[2]
        w = warmup * horizon
        ramp = torch.clamp((t + 1) / (w + 1), max=1.0)
        progress = torch.clamp((t - w) / (horizon - w), 0.0, 1.0)
        return peak * ramp * (final + (1 - final) * (1 + torch.cos(math.pi * progress)) / 2)

    def per_step(self, raw: Tensor, horizon: int) -> Tensor:
        return self._values(raw, torch.arange(horizon, dtype=raw.dtype, device=raw.device), horizon)

    def at(self, raw: Tensor, t: int, horizon: int) -> Tensor:
        return self._values(raw, torch.tensor(float(t), dtype=raw.dtype), horizon)

    def supports(self, horizon: int) -> list[tuple[int, int]]:
        return [(0, horizon - 1)] * 3

    def raw_bounds(self, bounds: tuple[float, float]) -> tuple[Tensor, Tensor]:
        (wl, wh), (fl, fh) = self.RANGES["warmup"], self.RANGES["final"]
        lo = torch.tensor([bounds[0], wl, fl], dtype=torch.float64)
        return lo, torch.tensor([bounds[1], wh, fh], dtype=torch.float64)

    def hyperparameter_values(self, init: Sequence[float]) -> list[float]:
        return [float(init[0])]  # the peak; warm-up and final are fractions

    def to_raw(self, init: Sequence[float]) -> Tensor:
        values = list(init) if len(init) == 3 else [init[0], *self.DEFAULTS]
        return torch.tensor(values, dtype=torch.float64)

    def check(
        self, key: str, horizon: int, bounds: tuple[float, float], init: Sequence[float]
    ) -> None:
        if len(init) not in (1, 3):
            raise ConfigError(f"{key}.init={list(init)} must be the peak, or [peak, warmup, final]")
        if horizon < 2:
            raise ConfigError(f"{key}.param=warmup_cosine needs a horizon of 2 steps or more")
        for (name, (lo, hi)), v in zip(self.RANGES.items(), self.to_raw(init)[1:], strict=True):
            if not lo <= float(v) <= hi:
                raise ConfigError(
                    f"{key}.init: {name}={float(v)} must lie in [{lo}, {hi}] "
                    "(init is [peak, warmup, final])"
                )


BUILT_IN: dict[str, type[Parameterisation]] = {
    c.name: c for c in (Constant, Log, Linear, WarmupCosine)
}


def make_parameterisation(key: str, spec: Any, segments: int) -> Parameterisation:
    """``schedule.<name>.param`` (a built-in name, a class path, or ``{_target_: path, ...}``;
    None: constant) as a :class:`Parameterisation` with ``segments``.

    Raises:
        ConfigError: an unknown name, a class that is not a Parameterisation, or options its
            constructor refuses (one line naming ``key``).
    """
    if spec is None:
        return Constant(segments)
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = {str(k): v for k, v in spec.items() if k != "_target_"}
        spec = spec.get("_target_")
    if not isinstance(spec, str):
        raise ConfigError(
            f"{key}.param={spec!r} must be one of {', '.join(BUILT_IN)} or a class path"
        )
    cls: Any = BUILT_IN.get(spec)
    if cls is None:
        module, _, attr = spec.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr) if module else None
        except (ImportError, AttributeError):
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, Parameterisation)):
            raise ConfigError(
                f"{key}.param={spec!r} is not a parameterisation; allowed: "
                f"{', '.join(BUILT_IN)}, or the path of a metahpo.parameterisation."
                "Parameterisation subclass"
            )
    try:
        return cls(segments, **options)
    except TypeError as e:
        raise ConfigError(f"{key}.param: {spec} does not take these options: {e}") from None
