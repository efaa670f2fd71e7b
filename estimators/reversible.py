"""Exact hypergradients by running SGD with momentum backwards (Maclaurin, Duvenaud & Adams 2015).

The forward run holds weights ``W`` and velocity ``V`` as int64 tensors at a fixed radix
(value = integer x 2^-radix_bits), so additions are exact, and the momentum factor is a
dyadic rational ``mu = n / 2^D`` (``D = momentum_bits``). Step t, with ``Q(x) = round(x 2^R)``::

    g = grad L_train(w_t);  D_t = Q(g + wd w_t)
    V <- mul(V, n / 2^D) + D_t          (remainder of the division pushed onto the buffer)
    W <- W - Q(lr v_{t+1})

and the reverse sweep undoes it exactly: ``W_t = W_{t+1} + Q(lr v_{t+1})``, recompute ``g`` at
``w_t``, ``V_t = unmul(V_{t+1} - D_t)``. ``mul`` rounds ``V n / 2^D`` down (error below one
unit of the radix, unlike Maclaurin et al.'s push-base-2^D / pop-base-n product, whose result
is off by up to n units) and pushes the index of the lost remainder among the ~2^D/n that
are possible; ``unmul`` pops it and divides exactly. The buffer (:class:`InfoBuffer`) keeps
the digits of each parameter in mixed radix in an int64 state, flushed whole to a stack of
int64 words when the next digit could overflow it, so a push or pop is O(1) tensor operations
of size P; it grows by about ``log2(2^D / n) = log2(1/mu)`` bits per parameter per step. At
steps whose momentum is below ``store_below`` the velocity ``V_t`` is stored outright instead
(64 bits per parameter; momentum 0 destroys all of it).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Interval, Le
from torch import Tensor
from torch.func import vjp

from metahpo.core import Batch, ConfigError, DivergenceError, Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.optim import SGD, State
from metahpo.reverse import check_window, window_ends
from metahpo.schedule import HyperSchedule, split_key
from metahpo.second_order import data_convolutions
from metahpo.validation import Positive, PositiveInt, checked

CAN = "forward, exact_reverse, truncated_reverse or greedy"


class InfoBuffer:
    """A stack of digits in mixed radix per element: constant work per push and pop.

    Each element keeps a state ``x`` (int64) holding the digits pushed since its last flush
    behind a sentinel 1 (``x = 1`` is empty), and a stack of full states (``words``, int64
    ``[rows, P]``, element ``e``'s words in rows ``0 .. count[e] - 1``). :meth:`push` appends a
    digit ``r`` in base ``m`` (``x <- x m + r``); where that could pass 2^63 (``x >= (2^63 - 1)
    div m``) it first writes ``x`` to row ``count`` and restarts at ``x = 1``. :meth:`pop` is the
    exact inverse: ``r = x mod m``, ``x <- x div m``, and where that leaves ``x = 1`` with words
    below, it reads the top word back (a flushed element is left at ``m + r >= 2`` after its
    push, so ``x = 1`` with words below happens exactly where the push flushed). Bases
    ``1 <= m <= 2^31``, scalar or per element; both vectorised over the elements, O(1) tensor
    operations of size P each (the rows double when full; the maximum count is read only when
    the pushes since the last read could have filled them).
    """

    def __init__(self, n: int, device: torch.device | str) -> None:
        self.x = torch.ones(n, dtype=torch.int64, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.words = torch.zeros(1, n, dtype=torch.int64, device=device)
        self._cols = torch.arange(n, device=device)
        self._top = torch.tensor(2**63 - 1, dtype=torch.int64, device=device)
        self._free = 1  # pushes that surely fit: at most rows - max(count)

    def push(self, r: Tensor, m: Tensor) -> None:
        if self._free == 0:
            self._grow()
        flush = self.x >= torch.div(self._top, m, rounding_mode="floor")
        self.words[self.count, self._cols] = self.x  # above each element's top: harmless
        self.count += flush.long()
        self.x = torch.where(flush, 1, self.x) * m + r
        self._free -= 1

    def pop(self, m: Tensor) -> Tensor:
        r = torch.remainder(self.x, m)
        x = torch.div(self.x, m, rounding_mode="floor")
        load = (x == 1) & (self.count > 0)
        self.count -= load.long()
        top = self.words[self.count.clamp(max=len(self.words) - 1), self._cols]
        self.x = torch.where(load, top, x)
        return r

    def _grow(self) -> None:
        rows = len(self.words)
        used = int(self.count.max()) if self.count.numel() else 0
        if used == rows:
            more = torch.zeros_like(self.words[: max(rows, 1)])
            self.words = torch.cat([self.words, more])
        self._free = len(self.words) - used

    def empty(self) -> bool:
        """Whether every element is back at the empty state."""
        return not bool(self.count.any()) and bool((self.x == 1).all())

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the words' rows, the states and the counts."""
        return (self.words.numel() + self.x.numel() + self.count.numel()) * 8

    def bits(self) -> Tensor:
        """Bits stored per element (float64 [P]): 64 per word, plus the state's digits (its
        bit length less the sentinel)."""
        length = sum(((self.x >> j) != 0).to(torch.float64) for j in range(1, 63))
        return (64 * self.count.to(torch.float64) + length).cpu()


@checked("estimator")
class Reversible:
    """Exact d L_val(w_T) / d h for SGD with momentum, by reversing the training run.

    Computes the hypergradient of the final validation loss of the fixed-point run (the float
    step with every weight and velocity rounded to ``2^-radix_bits`` and the momentum to a
    multiple of ``2^-momentum_bits``), differentiated through
    :meth:`metahpo.inner.Steps.step` (the optimiser's own SGD step, ``torch.func.vjp``) at the
    recovered states. The reverse recurrence, per step from T-1 down to 0, is the adjoint of
    ``(w', v') = step(w, v, g(w), h)``::

        (w_bar, v_bar, g_bar, h_bar_t) = vjp(step)(w_bar, v_bar);  w_bar += H(w_t) g_bar

    Bias: none beyond the fixed-point rounding of the trajectory (at radix 2^-44 the weights
    differ from a float64 run by ~1e-13 relative; docs/estimators.md).
    Memory: constant in the horizon except the information buffer, about ``log2(1/mu)`` bits
    per parameter per step (0.15 at mu = 0.9; ``metrics['buffer_bits_per_param_step']``), held
    in 64-bit words, plus 64 bits per parameter for every step with momentum below
    ``store_below``. No per-step weights, no graph, one step's activations.
    Compute: forward one gradient per step; reverse one gradient and one Hessian-vector product
    per step, plus O(1) integer operations on P numbers per step for the buffer; independent of
    the number of shared values.
    Refuses (one-line ConfigError, before training): optimisers other than SGD, Nesterov
    momentum (the update reads d(w_t) after w_t has been overwritten), hyperparameters of the
    training loss (they would need the mixed second derivative), tasks with batch-norm
    buffers, data-parallel runs. Raises DivergenceError on fixed-point overflow, and if the
    reversal fails to recover the initial state bit for bit (never a silently wrong result).

    Args:
        radix_bits: fractional bits R of the fixed point; values must stay below 2^(60-R).
        momentum_bits: D; the momentum is rounded to a multiple of 2^-D (1 <= D <= 30).
        store_below: steps with momentum below this store the velocity outright.
        window: None: the final validation loss; ``W`` (1..horizon): the sum of the
            validation losses every W steps and at the end (exact reverse's ``window``; the
            reverse sweep adds each one's gradient at the recovered weights, ``T / W`` more
            validation gradients, no more memory).
    """

    name = "reversible"
    data_parallel = False
    buffer = InfoBuffer  # the information buffer's class (benchmarks.reversible swaps it)

    def __init__(
        self,
        radix_bits: Annotated[int, Interval(ge=8, le=56)] = 44,
        momentum_bits: Annotated[int, Interval(ge=1, le=30)] = 30,
        store_below: Annotated[Positive, Le(1)] = 1 / 16,
        window: PositiveInt | None = None,
    ) -> None:
        self.window = window
        self.radix_bits = radix_bits
        self.momentum_bits = momentum_bits
        self.store_below = float(store_below)

    def check(self, schedule: HyperSchedule) -> None:
        if self.window is not None:
            check_window("window", self.window, schedule.horizon)
        opt = schedule.optimizer
        if not isinstance(opt, SGD):
            raise ConfigError(
                f"estimator=reversible reverses SGD only, not optimizer={opt.name}; use {CAN}"
            )
        if opt.nesterov:
            raise ConfigError(
                "estimator=reversible cannot reverse optimizer.nesterov=true (the update reads "
                f"the gradient at the overwritten weights); use {CAN}"
            )
        if opt.average:
            raise ConfigError(
                f"estimator=reversible cannot reverse optimizer.average=true; use {CAN}"
            )
        if schedule.loss_keys:
            raise ConfigError(
                f"estimator=reversible reverses the optimiser's step only; schedule."
                f"{split_key(schedule.loss_keys[0])[0]} is a hyperparameter of the training "
                f"loss: use {CAN}"
            )
        mom = [k for k in schedule.keys if split_key(k)[0] == "momentum"]
        for k in mom:
            top = float(schedule.per_step(k).max())
            if top >= 2:
                raise ConfigError(
                    f"estimator=reversible: schedule.{k} reaches {top:g}; it must stay below 2"
                )

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        if task.init_params()[1]:
            raise ConfigError(
                f"estimator=reversible cannot reverse batch-norm buffers (task={task.name}); "
                f"use {CAN}"
            )
        with CostMeter(task.device) as cost:
            meta_loss, grads, metrics = self._run(task, schedule)
        return Hypergradient(meta_loss, grads, cost.seconds, cost.peak, schedule.horizon, metrics)

    # -- fixed point -----------------------------------------------------------------------------
    def _q(self, x: Tensor, t: int, what: str) -> Tensor:
        """``round(x 2^R)`` as int64; DivergenceError (one line) when it would overflow."""
        limit = 2.0 ** (60 - self.radix_bits)
        if not bool((x.abs() < limit).all()):
            raise DivergenceError(
                f"estimator=reversible: fixed-point overflow at step {t}: |{what}| reached "
                f"{float(x.abs().max()):.3g} >= 2^{60 - self.radix_bits} (radix 2^-"
                f"{self.radix_bits}); lower estimator.radix_bits"
            )
        return torch.round(x.to(torch.float64) * 2.0**self.radix_bits).to(torch.int64)

    def _f(self, X: Tensor, dtype: torch.dtype) -> Tensor:
        return (X.to(torch.float64) * 2.0**-self.radix_bits).to(dtype)

    def _quantised(self, steps: Steps, schedule: HyperSchedule) -> dict[str, Tensor]:
        """The momentum keys' per-step tables rounded to multiples of 2^-D (in place)."""
        scale = 2.0**self.momentum_bits
        for k in schedule.keys:
            if split_key(k)[0] == "momentum":
                steps.table[k] = torch.round(steps.table[k] * scale) / scale
        return steps.table

    def _numerator(self, steps: Steps, values: dict[str, Tensor]) -> Tensor:
        mu = steps.expand(values)["momentum"]
        return torch.round(mu.to(torch.float64) * 2.0**self.momentum_bits).to(torch.int64)

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], dict[str, Any]]:
        flat = FlatTask(task)
        dt, dev = task.dtype, task.device
        steps = Steps(flat, schedule)
        self._quantised(steps, schedule)
        T, P = schedule.horizon, flat.n_params
        den = torch.tensor(2**self.momentum_bits, dtype=torch.int64, device=dev)
        store_n = math.ceil(self.store_below * 2**self.momentum_bits)

        start = steps.init_state(flat)
        W = self._q(start.theta, 0, "initial weights")
        V = torch.zeros_like(W)
        W0 = W.clone()
        buf = self.buffer(P, dev)
        stored: list[Tensor] = []
        ints = {"W": W, "V": V}
        bound_bits = 0.0
        buffered_steps = 0

        def step_fn(t: int, st: InnerState, g: Tensor) -> tuple[Tensor, State]:
            nonlocal bound_bits, buffered_steps
            values = steps.values(t)
            h = steps.expand(values)
            W, V = ints["W"], ints["V"]
            D = self._q(g + h["weight_decay"] * st.theta, t, "gradient + weight decay")
            n = self._numerator(steps, values)
            if bool((n < store_n).any()):
                stored.append(V)
                V = _product(V, n, den)[0]  # rounded like the buffered steps; V_t is kept
            else:
                V = self._mul(buf, V, n, den)
                bound_bits += float(torch.log2(den / n.to(torch.float64)).mean())
                buffered_steps += 1
            V = V + D
            v = self._f(V, dt)
            W = W - self._q(h["lr"] * v, t, "lr x velocity")
            self._check(W, V, t)
            ints["W"], ints["V"] = W, V
            return self._f(W, dt), (v,)

        with torch.no_grad():
            start = InnerState(self._f(W, dt), (self._f(V, dt),), {}, 0)
            train(flat, steps, start, T, grad_fn=_grad_fn(flat), step_fn=step_fn)
        info_bits = buf.bits()
        buffer_bytes = buf.nbytes
        stored_bytes = sum(s.numel() * 8 for s in stored)

        W, V = ints["W"], ints["V"]
        meta_loss, g_val = flat.val_loss_and_grad(self._f(W, dt), {})
        learned = [k for k in schedule.keys if k in schedule.learned]
        per_step = {k: torch.zeros(T, dtype=torch.float64) for k in learned}
        w_bar, v_bar = g_val, torch.zeros_like(g_val)
        ends, earlier = set(window_ends(self.window, T)[:-1]), 0.0
        for t in reversed(range(T)):
            values = steps.values(t)
            h = steps.expand(values)
            v = self._f(V, dt)
            W = W + self._q(h["lr"] * v, t, "lr x velocity")
            w = self._f(W, dt)
            batch = flat.batch(t)
            g, hvp = _grad_and_hvp_fn(flat, w, batch)
            D = self._q(g + h["weight_decay"] * w, t, "gradient + weight decay")
            V = V - D
            n = self._numerator(steps, values)
            if bool((n < store_n).any()):
                V = stored.pop()
            else:
                V = self._unmul(buf, V, n, den)
            w_bar, v_bar, g_bar, h_bar = _step_vjp(
                steps, t, w, self._f(V, dt), g, values, learned, w_bar, v_bar
            )
            w_bar = w_bar + hvp(g_bar)
            for k, hb in zip(learned, h_bar, strict=True):
                per_step[k][t] = float(hb)
            if t in ends:  # a window end: w is w_t, recovered bit for bit
                term, g_end = flat.val_loss_and_grad(w, {})
                earlier += term
                w_bar = w_bar + g_end
        self.recovered = (W, V, W0)  # for the tests: what the reverse sweep ended at
        self.recovered_final = self._f(ints["W"], dt)
        if not (torch.equal(W, W0) and not bool(V.any()) and buf.empty()):
            raise DivergenceError(
                "estimator=reversible: the reverse sweep did not recover the initial weights "
                "and velocity bit for bit (non-deterministic gradients?); use " + CAN
            )
        grads = {name: torch.zeros_like(v) for name, v in schedule.values.items()}
        for k in learned:
            grads[k] = schedule.pullback(k, per_step[k])
        final = InnerState(self._f(ints["W"], dt), (), {}, T)
        metrics: dict[str, Any] = {
            "val_accuracy": flat.evaluate(final, "val")["accuracy"],
            "buffer_bits_per_param_step": float(info_bits.mean()) / max(buffered_steps, 1),
            "bound_bits_per_param_step": bound_bits / max(buffered_steps, 1),
            "buffered_steps": buffered_steps,
            "stored_velocity_steps": T - buffered_steps,
            "buffer_bytes": buffer_bytes,
            "stored_velocity_bytes": stored_bytes,
            "radix_bits": self.radix_bits,
        }
        if self.window is not None:
            metrics["final_val_loss"] = meta_loss
        return meta_loss + earlier, grads, metrics

    # -- the invertible product by n / den -------------------------------------------------------
    @staticmethod
    def _mul(buf: InfoBuffer, V: Tensor, n: Tensor, den: Tensor) -> Tensor:
        """``floor(V n / den)``, pushing what it loses: of the ``den`` remainders ``r`` of
        ``V n`` only those with ``y den + r`` divisible by n can occur (``k`` of them, about
        ``den / n``), so the index of ``r`` among them is pushed in base ``k``."""
        y, r = _product(V, n, den)
        c, k = _admissible(y, n, den)
        buf.push(torch.div(r - c, n, rounding_mode="floor"), k)
        return y

    @staticmethod
    def _unmul(buf: InfoBuffer, y: Tensor, n: Tensor, den: Tensor) -> Tensor:
        """The inverse of :meth:`_mul`: ``V = (y den + r) / n`` exactly."""
        c, k = _admissible(y, n, den)
        r = c + buf.pop(k) * n
        b = torch.remainder(y, n)
        return torch.div(y, n, rounding_mode="floor") * den + torch.div(
            b * den + r, n, rounding_mode="floor"
        )

    def _check(self, W: Tensor, V: Tensor, t: int) -> None:
        top = max(int(W.abs().max()), int(V.abs().max())) if W.numel() else 0
        if top >= 2**61:
            raise DivergenceError(
                f"estimator=reversible: fixed-point overflow at step {t}: weights or velocity "
                f"reached 2^{61 - self.radix_bits}; lower estimator.radix_bits"
            )


def _product(V: Tensor, n: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """``floor(V n / den)`` and ``V n mod den`` without forming ``V n`` (no overflow)."""
    bn = torch.remainder(V, den) * n  # < den n
    y = torch.div(V, den, rounding_mode="floor") * n + torch.div(bn, den, rounding_mode="floor")
    return y, torch.remainder(bn, den)


def _admissible(y: Tensor, n: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """The smallest remainder ``c`` with ``y den + c`` divisible by ``n`` and how many there are
    below ``den`` (``c, c + n, ...``)."""
    c = torch.remainder(-torch.remainder(y, n) * den, n)
    return c, torch.div(den - c + n - 1, n, rounding_mode="floor")


def _grad_fn(flat: FlatTask):
    def grad_fn(t: int, st: InnerState, batch: Batch) -> Tensor:
        return _grad_and_hvp_fn(flat, st.theta, batch, hvp=False)[0]

    return grad_fn


def _grad_and_hvp_fn(flat: FlatTask, w: Tensor, batch: Batch, hvp: bool = True):
    """Training gradient at ``w`` (the same computation forward and reverse, so the reverse
    recovers the same bits) and, with ``hvp``, a function ``u -> H(w) u`` (one Hessian-vector
    product, through the gradient's graph)."""
    theta = w.detach().requires_grad_(True)
    with torch.enable_grad():
        with data_convolutions(flat.task):  # its double backward skips the images' gradient
            loss = flat.train_loss(theta, {}, batch)
        (g,) = torch.autograd.grad(loss, theta, create_graph=hvp)
    if not hvp:
        return g, None

    def hvp_fn(u: Tensor) -> Tensor:
        with torch.enable_grad():
            (out,) = torch.autograd.grad(g, theta, u)
        return out

    return g.detach(), hvp_fn


def _step_vjp(
    steps: Steps,
    t: int,
    w: Tensor,
    v: Tensor,
    g: Tensor,
    values: dict[str, Tensor],
    learned: list[str],
    w_bar: Tensor,
    v_bar: Tensor,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """The adjoint of the optimiser's step ``t`` at ``(w, (v,), g, values)``."""

    def update(w: Tensor, v: Tensor, g: Tensor, lv: tuple[Tensor, ...]):
        theta, (vel,) = steps.step(t, w, (v,), g, {**values, **dict(zip(learned, lv, strict=True))})
        return theta, vel

    _, back = vjp(update, w, v, g, tuple(values[k] for k in learned))
    return back((w_bar, v_bar))
