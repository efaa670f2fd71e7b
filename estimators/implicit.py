"""Implicit differentiation at the trained weights (the implicit function theorem): one
validation gradient and one linear solve with the training Hessian, by conjugate gradient or a
truncated Neumann series (Lorraine, Vicol & Duvenaud 2020)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from metahpo.core import Batch, ConfigError, Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.estimators.forward import grad_and_hvp
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.schedule import HyperSchedule, require_loss_keys, split_key
from metahpo.validation import NonNegative, Positive, PositiveInt, checked

log = logging.getLogger("metahpo")

#: the estimators that differentiate the optimiser's hyperparameters (named in the refusal)
CAN = "forward, exact_reverse, checkpointed_reverse, truncated_reverse, reversible, greedy or es"
#: a Neumann term this many times larger than the right-hand side: the series diverges
DIVERGED = 2.0

Operator = Callable[[Tensor], Tensor]


@dataclass
class Solve:
    """A linear solve's answer ``x ~ A^-1 b`` and how good it is.

    Attributes:
        x: the solution.
        iterations: conjugate-gradient iterations (Hessian-vector products), or Neumann terms.
        residual: ``||b - A x|| / ||b||``, from one more product with ``A`` (0 when ``b = 0``).
        converged: ``residual <= tol``.
        note: why it stopped early (negative curvature), or ``""``.
    """

    x: Tensor
    iterations: int
    residual: float
    converged: bool
    note: str = ""


def _residual(A: Operator, b: Tensor, x: Tensor) -> float:
    norm = float(b.norm())
    return 0.0 if norm == 0 else float((b - A(x)).norm()) / norm


def conjugate_gradient(A: Operator, b: Tensor, tol: float, max_iter: int) -> Solve:
    """Conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite, from ``x = 0``.

    Stops when ``||r|| <= tol ||b||``, after ``max_iter`` products, or on a direction of
    non-positive curvature ``p^T A p <= 0`` (A is not positive definite there: the run has not
    reached a minimum, or the damping is too small; the iterate so far is returned).
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = float(r @ r)
    target = tol * math.sqrt(rs)
    note, i = "", 0
    while i < max_iter and math.sqrt(rs) > target:
        Ap = A(p)
        i += 1
        curvature = float(p @ Ap)
        if not curvature > 0:
            note = f"non-positive curvature p^T A p = {curvature:.3g} at iteration {i}"
            break
        a = rs / curvature
        x.add_(p, alpha=a)
        r.sub_(Ap, alpha=a)
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    residual = _residual(A, b, x)
    return Solve(x, i, residual, residual <= tol and not note, note)


def neumann(A: Operator, b: Tensor, terms: int, alpha: float, tol: float) -> Solve:
    """``A^-1 b ~ alpha sum_{j=0}^{terms} (I - alpha A)^j b``, the truncated Neumann series.

    It converges when every eigenvalue of ``A`` lies in ``(0, 2 / alpha)``; the error after
    ``J`` terms is ``(I - alpha A)^{J+1} A^-1 b``, so it shrinks like ``(1 - alpha mu)^J`` for
    the smallest eigenvalue ``mu``.

    Raises:
        ConfigError: a term grew past ``DIVERGED`` times ``||b||`` (or is not finite): alpha is
            too large for this Hessian (or the Hessian has a negative eigenvalue).
    """
    x, v = b.clone(), b.clone()
    norm_b, prev = float(b.norm()), float(b.norm())
    for j in range(1, terms + 1):
        v = v - alpha * A(v)
        x.add_(v)
        now = float(v.norm())
        if not math.isfinite(now) or now > DIVERGED * norm_b:
            ratio = now / prev if prev > 0 and math.isfinite(now) else math.inf
            top = (1 + ratio) / alpha  # |1 - alpha lam| ~ ratio for the largest eigenvalue
            raise ConfigError(
                f"estimator.alpha={alpha:g} makes the Neumann series diverge (term {j} is "
                f"{now / norm_b:.3g} times the first; the Hessian's largest eigenvalue is about "
                f"{top:.3g}, so alpha must be below {2 / top:.3g}); lower it, or use "
                "estimator.solver=cg"
            )
        prev = now
    x.mul_(alpha)
    residual = _residual(A, b, x)
    return Solve(x, terms, residual, residual <= tol)


@checked("estimator")
class Implicit:
    """Implicit differentiation: ``d L_val / d lambda`` at the trained weights, by the implicit
    function theorem, for hyperparameters of the training loss (``l2``, ``label_smoothing``).

    It trains once with the schedule (:func:`metahpo.inner.train`, no derivatives), then at the
    final weights ``w_T``, treating them as the minimiser ``w*(lambda)`` of the training loss
    ``L`` (``grad_w L(w*, lambda) = 0``)::

        d L_val / d lambda = - grad_w L_val(w_T)^T  H^-1  d2 L / dw dlambda,   H = d2 L / dw2

    solving ``(H + damping I) v = grad_w L_val`` by conjugate gradient (``solver=cg``) or the
    truncated Neumann series ``v = alpha sum_j (I - alpha H)^j grad_w L_val``
    (``solver=neumann``), with forward mode's Hessian-vector products
    (:func:`metahpo.estimators.forward.grad_and_hvp`: double backward, or ``torch.func``'s jvp
    of grad), then ``-v^T d2 L / dw dlambda_k`` for
    every learned key by one double backward. ``H`` includes the L2 penalty's ``l2 I`` and the
    optimiser's coupled weight decay at the final step (SGD, Adam: the inner run's fixed point
    is a stationary point of ``L + wd/2 ||w||^2``; a decoupled decay, AdamW's, must be 0).

    Which ``L``: ``hessian_batches=None`` (default): the whole training split (in chunks of the
    task's ``eval_batch_size``, without augmentation): the objective whose minimiser ``w*`` the
    theorem is about. ``hessian_batches=k``: the mean over the last ``k`` batches of the run (a
    stochastic ``H`` and mixed term, cheaper on large training sets).

    A schedule over steps: ``w*`` is the minimiser of the loss with the values in force at the
    final step, so the estimate is the derivative with respect to the values at step ``T - 1``;
    each raw value receives it through the parameterisation's pullback of a per-step gradient
    that is zero at every earlier step (for the default ``segments: 1`` this equals treating the
    schedule as one constant; with several segments only the last gets a gradient).

    Bias: exact at a minimum (``grad L(w_T) = 0``) with an exact solve; for a run that has not
    converged it is the hypergradient of a different problem, not of the unrolled run (forward
    mode's): docs/estimators.md measures the gap against the horizon. ``metrics`` report the
    solve (``implicit_iterations``, ``implicit_residual`` = ``||b - A v|| / ||b||``,
    ``implicit_converged``) and the convergence assumption (``implicit_train_grad_norm`` =
    ``||grad L(w_T)||``); a solve whose residual exceeds ``tol`` is a warning in the log.
    Memory: a few vectors of P numbers and one Hessian-vector product's activations; nothing
    grows with the horizon.
    Compute: the plain training run (``T`` gradients), one validation gradient, ``iterations +
    1`` Hessian-vector products of ``L`` (each about two gradients of every chunk of ``L``), and
    one double backward for the mixed term.
    Optimiser hyperparameters (``lr``, ``momentum``...) have no implicit derivative at an
    optimum: they are refused in one line before training.

    Args:
        solver: ``"cg"`` or ``"neumann"``.
        damping: ``delta >= 0`` added to ``H`` (``H + delta I``; biases the estimate, makes an
            indefinite ``H`` solvable).
        tol: relative residual a solve must reach (cg stops there; both warn above it).
        max_iter: most conjugate-gradient iterations.
        terms: Neumann terms after the first.
        alpha: Neumann step: must be below ``2 / lambda_max(H)`` (a larger one raises a one-line
            error when the series diverges).
        hessian_batches: None (the whole training split) or the last k batches of the run.
        hvp: ``"rev_rev"`` (double backward; the faster on CPU for the digits models) or
            ``"fwd_rev"`` (``torch.func`` jvp of grad).
    """

    name = "implicit"
    data_parallel = False

    def __init__(
        self,
        solver: Literal["cg", "neumann"] = "cg",
        damping: NonNegative = 0.0,
        tol: Positive = 1e-5,
        max_iter: PositiveInt = 100,
        terms: PositiveInt = 50,
        alpha: Positive = 0.01,
        hessian_batches: PositiveInt | None = None,
        hvp: Literal["fwd_rev", "rev_rev"] = "rev_rev",
    ) -> None:
        self.solver, self.damping, self.tol, self.max_iter = solver, damping, tol, max_iter
        self.terms, self.alpha = terms, alpha
        self.hessian_batches, self.hvp = hessian_batches, hvp

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless every learned key is a hyperparameter of the loss (and the
        rest of the settings fit the schedule)."""
        require_loss_keys(
            schedule,
            "implicit",
            "differentiates hyperparameters of the training loss only (the optimiser's have no "
            "implicit derivative at an optimum)",
            CAN,
        )
        if self.hessian_batches is not None and self.hessian_batches > schedule.horizon:
            raise ConfigError(
                f"estimator.hessian_batches={self.hessian_batches} must be at most the "
                f"horizon ({schedule.horizon}), or null (the whole training split)"
            )
        opt = schedule.optimizer
        if getattr(opt, "decoupled", False):
            decay = [
                float(schedule.per_step(k)[-1])
                for k in schedule.keys
                if split_key(k)[0] == "weight_decay"
            ]
            if not any(split_key(k)[0] == "weight_decay" for k in schedule.keys):
                decay = [opt.hyperparameters["weight_decay"].default]
            if any(d != 0 for d in decay):
                raise ConfigError(
                    f"estimator=implicit: the {opt.name} optimizer's decoupled weight decay "
                    "has no training objective to differentiate at; set schedule.weight_decay "
                    "to 0 (l2 in the loss instead), or use optimizer=sgd or adam"
                )

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        with CostMeter(task.device) as cost:
            meta_loss, grads, metrics = self._run(task, schedule)
        return Hypergradient(meta_loss, grads, cost.seconds, cost.peak, schedule.horizon, metrics)

    # -- the method ----------------------------------------------------------------------------
    def _terms(self, flat: FlatTask, T: int) -> list[tuple[Batch, float]]:
        """The training loss that defines ``H``: ``(batch, weight)`` pairs, weights summing
        to 1 (the batches without hyperparameters: :meth:`Steps.attach` adds them)."""
        if self.hessian_batches is None:
            whole = getattr(flat.task, "train_set", None)
            if whole is None:
                raise ConfigError(
                    f"estimator.hessian_batches=null needs the task's whole training split "
                    f"(task {flat.task.name} has no train_set()); set a number of batches"
                )
            raw = list(whole())
        else:
            k = self.hessian_batches
            raw = [(flat.batch(t), 1.0 / k) for t in range(T - k, T)]
        return raw

    def operator(
        self,
        flat: FlatTask,
        theta: Tensor,
        buffers: dict[str, Tensor],
        terms: list[tuple[Batch, float]],
        decay: Tensor,
    ) -> Operator:
        """``v -> (H + (damping + weight decay) I) v`` with ``H`` of the weighted ``terms``."""
        st = InnerState(theta.detach(), (), buffers)

        def A(v: Tensor) -> Tensor:
            out = (self.damping + decay) * v
            for batch, w in terms:
                _, hv = grad_and_hvp(self.hvp, flat, st, batch, v.unsqueeze(0), 1)
                out = out + w * hv[0]
            return out

        return A

    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], dict[str, Any]]:
        flat = FlatTask(task)
        steps = Steps(flat, schedule)
        with torch.no_grad():
            state = train(flat, steps, steps.init_state(flat), schedule.horizon)
        return self.at(flat, steps, state)

    def at(
        self, flat: FlatTask, steps: Steps, state: InnerState
    ) -> tuple[float, dict[str, Tensor], dict[str, Any]]:
        """``(meta_loss, grads, metrics)`` at the end ``state`` of a run with ``steps``
        (everything after the training: the solve and the mixed term)."""
        schedule = steps.schedule
        T = schedule.horizon
        theta = state.theta.detach()
        meta_loss, g_val = flat.val_loss_and_grad(theta, state.buffers)
        raw = self._terms(flat, T)
        terms = [(steps.attach(T - 1, b), w) for b, w in raw]
        decay = steps.expand(steps.values(T - 1)).get("weight_decay", torch.zeros(()))
        A = self.operator(flat, theta, state.buffers, terms, decay.to(theta))
        if self.solver == "cg":
            solve = conjugate_gradient(A, g_val, self.tol, self.max_iter)
        else:
            solve = neumann(A, g_val, self.terms, self.alpha, self.tol)
        if not solve.converged:
            why = f" ({solve.note})" if solve.note else ""
            log.warning(
                "estimator=implicit: the %s solve did not converge: relative residual %.3g > "
                "tol %.3g after %d %s%s; the hypergradient is inexact",
                self.solver,
                solve.residual,
                self.tol,
                solve.iterations,
                "iterations" if self.solver == "cg" else "terms",
                why,
            )
        mixed, grad_norm = self._mixed(flat, steps, theta, state.buffers, solve.x, raw, T)
        grads = {k: torch.zeros_like(v) for k, v in schedule.values.items()}
        for k, m in mixed.items():
            per_step = torch.zeros(T, dtype=torch.float64)
            per_step[T - 1] = -m
            grads[k] = schedule.pullback(k, per_step).detach().to(torch.float64)
        metrics: dict[str, Any] = {
            "val_accuracy": flat.evaluate(state, "val")["accuracy"],
            "implicit_iterations": solve.iterations,
            "implicit_residual": solve.residual,
            "implicit_converged": solve.converged,
            "implicit_train_grad_norm": grad_norm,
        }
        return meta_loss, grads, metrics

    def _mixed(
        self,
        flat: FlatTask,
        steps: Steps,
        theta: Tensor,
        buffers: dict[str, Tensor],
        v: Tensor,
        raw: list[tuple[Batch, float]],
        T: int,
    ) -> tuple[dict[str, float], float]:
        """``v^T d2 L / dw dlambda_k`` for every learned key (values at the final step), and
        ``||grad_w L(w_T)||`` (the optimiser's weight decay included) from the same pass."""
        keys = [k for k in steps.schedule.learned if k in steps.loss_keys]
        table = steps.values(T - 1)
        total = {k: 0.0 for k in keys}
        g_total = torch.zeros_like(theta)
        for batch, w in raw:
            leaves = {k: table[k].detach().clone().requires_grad_(True) for k in keys}
            w_leaf = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = flat.train_loss(w_leaf, buffers, steps.attach(T - 1, batch, leaves))
                (g,) = torch.autograd.grad(loss, w_leaf, create_graph=True)
                got = torch.autograd.grad(g @ v, list(leaves.values()), allow_unused=True)
            g_total += w * g.detach()
            for k, d in zip(keys, got, strict=True):
                total[k] += 0.0 if d is None else w * float(d)
        decay = steps.expand(table).get("weight_decay", torch.zeros(()))
        grad_norm = float((g_total + decay.to(theta) * theta).norm())
        return total, grad_norm
