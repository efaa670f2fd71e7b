"""Shared fixtures and references for the tests.

``unrolled_reference`` and ``central_differences`` are written here, independently of
``metahpo.inner``, so that the estimators are checked against code they do not share.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping

import pytest
import torch

from metahpo.core import StepBatch
from metahpo.optim import SGD, InnerOptimizer
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import Digits
from metahpo.tasks.quadratic import Quadratic

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Sharing patterns: segments per type ("per_step" = one value per inner step).
SHARING = {"one": 1, "several": 3, "per_step": "T"}


def small_digits(**kw) -> Digits:
    """A float64 digits task small enough for central differences (tanh: no ReLU kinks)."""
    args = dict(dtype=torch.float64, n_train=96, batch_size=32, hidden=(12,), activation="tanh")
    return Digits(**{**args, **kw})


def quadratic(**kw) -> Quadratic:
    return Quadratic(**{"dtype": torch.float64, **kw})


# Tasks for exactness tests, with horizons short enough for central differences.
EXACT_TASKS = {"quadratic": (quadratic, 12), "digits": (small_digits, 9)}


# Starting values per optimiser for ``init="nonzero"`` (each segment gets 0.5-1.5 times these).
BASE_VALUES = {
    "sgd": {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3},
    "adam": {"lr": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 1e-3},
    "adamw": {"lr": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1},
}
# ``init="zero"`` sets these to 0. Never eps (0/0 where Adam's second moment is 0) nor beta2:
# at 0 the loss is smooth but curves so sharply (sqrt(beta2 v + g^2) for small g) that central
# differences need steps below 1e-7 (the exact estimators agree there all the same).
ZERO_ABLE = {"lr", "momentum", "weight_decay", "beta1"}


def make_schedule(
    horizon: int,
    sharing: int | str,
    init: str = "nonzero",
    learn: tuple[str, ...] | None = None,
    seed: int = 0,
    optimizer: InnerOptimizer | None = None,
    groups: Mapping[str, Mapping[str, tuple[str, ...]]] | None = None,
) -> HyperSchedule:
    """A schedule with distinct values per segment (``init="nonzero"``), or lr, beta2 and eps
    only non-zero (``"zero_mom_wd"``), or every value that can start at zero at zero
    (``"zero"``, the paper's starting point; for Adam lr, beta1 and weight decay). Keys of
    ``groups`` get one key per group, each with its own values. ``learn``: names (default:
    all)."""
    optimizer = optimizer if optimizer is not None else SGD()
    n = horizon if sharing == "T" else int(sharing)
    g = torch.Generator().manual_seed(seed)
    base = BASE_VALUES[optimizer.name]
    groups = groups or {}
    keys = [
        f"{name}/{grp}" if name in groups else name
        for name in optimizer.hyperparameters
        for grp in (groups.get(name) or [None])
    ]
    values = {}
    for key in keys:
        name = key.split("/")[0]
        r = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
        v = 1 - (1 - base[name]) * r if name.startswith("beta") else base[name] * r
        zero = (init == "zero" and name in ZERO_ABLE) or (
            init == "zero_mom_wd" and name in ZERO_ABLE and name != "lr"
        )
        values[key] = torch.zeros(n, dtype=torch.float64) if zero else v
    learned = tuple(optimizer.hyperparameters) if learn is None else learn
    specs = {
        k: HyperSpec(n, (float("-inf"), float("inf")), learn=k.split("/")[0] in learned)
        for k in keys
    }
    return HyperSchedule(horizon, specs, values, optimizer, groups)


def _next_buffers(task, params, buffers, batch):
    """Batch-norm statistics after a step, as ``metahpo.inner.train`` advances them: from the
    parameters before the step, on the same batch, never differentiated."""
    if not buffers:
        return buffers
    with torch.no_grad():
        return task.next_buffers({k: p.detach() for k, p in params.items()}, buffers, batch)


def _values_of(schedule: HyperSchedule, values, param: str, t: int) -> dict:
    """The optimiser's hyperparameters for parameter ``param`` at step ``t``: its group's key for
    a per-group name (matched here with fnmatch), the name's key, or the optimiser's default;
    a key's value from its raw values by its parameterisation's ``at``."""
    out = {}
    for name, spec in schedule.optimizer.hyperparameters.items():
        key = name
        if name in schedule.groups:
            (key,) = [
                f"{name}/{grp}"
                for grp, patterns in schedule.groups[name].items()
                if any(fnmatch.fnmatchcase(param, p) for p in patterns)
            ]
        if key in values:
            out[name] = schedule.param(key).at(values[key], t, schedule.horizon)
        else:
            out[name] = spec.default
    return out


def _reference_step(optimizer: InnerOptimizer, p, state, g, h, k):
    """One update of one parameter tensor, written from the torch.optim documentation (not
    metahpo.optim): SGD (dampening 0, optionally Nesterov, or averaged), Adam and AdamW; other
    optimisers (tests' own) with their ``step``."""
    if optimizer.name == "sgd":
        d = g + h["weight_decay"] * p
        if optimizer.average:  # v = mu v + (1 - mu) d: an average of the gradients
            v = h["momentum"] * state.get("v", torch.zeros_like(p)) + (1 - h["momentum"]) * d
            return p - h["lr"] * v, {"v": v}
        v = h["momentum"] * state.get("v", torch.zeros_like(p)) + d
        step = d + h["momentum"] * v if optimizer.nesterov else v
        return p - h["lr"] * step, {"v": v}
    if optimizer.name in ("adam", "adamw"):
        m = state.get("m", torch.zeros_like(p))
        v = state.get("v", torch.zeros_like(p))
        if optimizer.name == "adamw":
            p = p - h["lr"] * h["weight_decay"] * p
        else:
            g = g + h["weight_decay"] * p
        m = h["beta1"] * m + (1 - h["beta1"]) * g
        v = h["beta2"] * v + (1 - h["beta2"]) * g**2
        m_hat = m / (1 - h["beta1"] ** k)
        # sqrt(v_hat) with a zero derivative where v == 0 (its tangent is 0 there)
        root = torch.where(
            v > 0, torch.sqrt(torch.where(v > 0, v, 1.0) / (1 - h["beta2"] ** k)), 0.0
        )
        return p - h["lr"] * m_hat / (root + h["eps"]), {"m": m, "v": v}
    # a user's own optimiser (tests only): its own step, one parameter tensor at a time
    new, state = optimizer.step(p, state.get("s") or optimizer.init(p), g, h, k)
    return new, {"s": state}


def _with_loss_values(batch, schedule: HyperSchedule, values, params, t: int):
    """``batch`` carrying the loss hyperparameters' values at step ``t`` (groups matched here
    with fnmatch)."""
    hyper = {}
    for key in schedule.loss_keys:
        name, group = key.partition("/")[::2]
        value = schedule.param(key).at(values[key], t, schedule.horizon)
        if not group:
            hyper[name] = value
            continue
        for p in params:
            if any(fnmatch.fnmatchcase(p, pat) for pat in schedule.groups[name][group]):
                hyper.setdefault(name, {})[p] = value
    return StepBatch(batch[0], batch[1], getattr(batch, "seed", None), hyper) if hyper else batch


def _reference_run(
    task, schedule: HyperSchedule, values, differentiable: bool, clamp_grad: float | None = None
):
    """Parameters and buffers after the run, parameter by parameter (independent of
    metahpo.inner and metahpo.optim); ``clamp_grad``: each training gradient clamped to
    ``[-c, c]`` before the update (the paper code's clamp)."""
    params, buffers = task.init_params()
    states = {k: {} for k in params}
    for t in range(schedule.horizon):
        batch = _with_loss_values(task.batch(t), schedule, values, params, t)
        if differentiable:
            params = {
                k: p if p.requires_grad else p.requires_grad_(True) for k, p in params.items()
            }
            loss = task.train_loss(params, buffers, batch)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        else:
            ps = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            grads = torch.autograd.grad(task.train_loss(ps, buffers, batch), list(ps.values()))
        if clamp_grad is not None:
            grads = [g.clamp(-clamp_grad, clamp_grad) for g in grads]
        new_params = {}
        with torch.set_grad_enabled(differentiable):
            for (k, p), g in zip(params.items(), grads, strict=True):
                h = _values_of(schedule, values, k, t)
                new_params[k], states[k] = _reference_step(
                    schedule.optimizer, p, states[k], g, h, t + 1
                )
        buffers = _next_buffers(task, params, buffers, batch)
        params = new_params
    return params, buffers


def unrolled_reference(
    task, schedule: HyperSchedule, clamp_grad: float | None = None
) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain autograd through the whole unrolled run, written out step by step (with
    ``clamp_grad``: through the clamped run, see :func:`_reference_run`).

    Buffers (batch-norm running statistics) follow the run but are not differentiated.
    """
    values = {
        n: schedule.values[n].to(task.dtype).clone().requires_grad_(True) for n in schedule.keys
    }
    params, buffers = _reference_run(task, schedule, values, True, clamp_grad)
    meta = task.val_loss(params, buffers)
    learned = list(schedule.learned)
    grads = torch.autograd.grad(meta, [values[n] for n in learned], allow_unused=True)
    out = {n: torch.zeros_like(schedule.values[n]) for n in schedule.keys}
    for n, g in zip(learned, grads, strict=True):
        if g is not None:
            out[n] = g.detach().to(torch.float64)
    return float(meta.detach()), out


def final_run(task, schedule: HyperSchedule, clamp_grad: float | None = None):
    """Parameters and buffers after a plain (no-grad) run, written independently of
    metahpo.inner."""
    values = {n: v.to(task.dtype) for n, v in schedule.values.items()}
    return _reference_run(task, schedule, values, False, clamp_grad)


def final_val_loss(
    task, schedule: HyperSchedule, buffers=None, clamp_grad: float | None = None
) -> float:
    """Validation loss after a plain (no-grad) run, written independently of metahpo.inner.

    Args:
        buffers: evaluate with these buffers instead of the run's own (None: the run's).
    """
    params, run_buffers = final_run(task, schedule, clamp_grad)
    with torch.no_grad():
        return float(task.val_loss(params, run_buffers if buffers is None else buffers))


def central_differences(
    task,
    schedule: HyperSchedule,
    eps: float = 1e-5,
    *,
    freeze_buffers: bool = True,
    clamp_grad: float | None = None,
) -> dict[str, torch.Tensor]:
    """d L_val / d h for every shared value, by float64 central differences.

    With ``freeze_buffers`` the validation loss of every perturbed run is taken with the
    buffers (batch-norm running statistics) of the unperturbed run: the derivative that treats
    them as constants, which is what the estimators compute (PAPER.md). Tasks without buffers
    are unaffected. Adam's ``eps`` (a small value in a denominator) is stepped by ``eps / 100``.
    """
    frozen = final_run(task, schedule)[1] if freeze_buffers and task.init_params()[1] else None
    out = {n: torch.zeros_like(schedule.values[n]) for n in schedule.keys}
    for n in schedule.learned:
        h = eps / 100 if n.split("/")[0] == "eps" else eps
        for k in range(schedule.specs[n].n_segments):
            plus, minus = schedule.values[n].clone(), schedule.values[n].clone()
            plus[k] += h
            minus[k] -= h
            f_plus = final_val_loss(task, schedule.replace({n: plus}), frozen, clamp_grad)
            f_minus = final_val_loss(task, schedule.replace({n: minus}), frozen, clamp_grad)
            out[n][k] = (f_plus - f_minus) / (2 * h)
    return out


def assert_grads_close(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], rtol: float
) -> None:
    """Every key agrees to ``rtol`` relative to that key's largest entry (exact zeros too)."""
    assert set(got) == set(want), f"keys differ: {sorted(got)} vs {sorted(want)}"
    for n in want:
        g, w = got[n].to(torch.float64), want[n].to(torch.float64)
        scale = float(w.abs().max())
        if scale == 0.0:
            assert float(g.abs().max()) <= 1e-12, f"{n}: expected zeros, got {g}"
            continue
        err = float((g - w).abs().max()) / scale
        assert err <= rtol, f"{n}: relative error {err:.3e} > {rtol:.0e}\n got {g}\nwant {w}"


@pytest.fixture
def digits_small() -> Digits:
    return small_digits()


@pytest.fixture
def quad() -> Quadratic:
    return quadratic()


def active_columns(monkeypatch, task, schedule: HyperSchedule) -> list[int]:  # type: ignore[no-untyped-def]
    """Columns forward mode differentiates at each step (a spy on its Hessian-vector products)."""
    from metahpo.estimators.forward import ForwardMode

    seen: list[int] = []
    original = ForwardMode._grad_and_hvp

    def spy(self, flat, st, batch, Z, mixed):  # type: ignore[no-untyped-def]
        seen.append(Z.shape[0])
        return original(self, flat, st, batch, Z, mixed)

    monkeypatch.setattr(ForwardMode, "_grad_and_hvp", spy)
    ForwardMode().hypergradient(task, schedule)
    return seen
