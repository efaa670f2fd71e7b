"""Shared fixtures and references for the tests.

``unrolled_reference`` and ``central_differences`` are written here, independently of
``metahpo.inner``, so that the estimators are checked against code they do not share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
import torch

from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from metahpo.schedule import HyperSchedule, HyperSpec
from tasks.digits import Digits
from tasks.quadratic import Quadratic

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


def make_schedule(
    horizon: int,
    sharing: int | str,
    init: str = "nonzero",
    learn: tuple[str, ...] = HYPERPARAMETERS,
    seed: int = 0,
) -> HyperSchedule:
    """A schedule with distinct values per segment (``init="nonzero"``), or lr only non-zero
    (``"zero_mom_wd"``), or everything zero (``"zero"``, the paper's starting point)."""
    n = horizon if sharing == "T" else int(sharing)
    g = torch.Generator().manual_seed(seed)
    base = {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3}
    values = {}
    for name in HYPERPARAMETERS:
        v = base[name] * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
        if init == "zero" or (init == "zero_mom_wd" and name != "lr"):
            v = torch.zeros(n, dtype=torch.float64)
        values[name] = v
    specs = {
        name: HyperSpec(n, (float("-inf"), float("inf")), learn=name in learn)
        for name in HYPERPARAMETERS
    }
    return HyperSchedule(horizon, specs, values)


def _next_buffers(task, params, buffers, batch):
    """Batch-norm statistics after a step, as ``metahpo.inner.train`` advances them: from the
    parameters before the step, on the same batch, never differentiated."""
    if not buffers:
        return buffers
    with torch.no_grad():
        return task.next_buffers({k: p.detach() for k, p in params.items()}, buffers, batch)


def unrolled_reference(task, schedule: HyperSchedule) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain autograd through the whole unrolled run, written out step by step.

    Buffers (batch-norm running statistics) follow the run but are not differentiated.
    """
    values = {
        n: schedule.values[n].to(task.dtype).clone().requires_grad_(True) for n in HYPERPARAMETERS
    }
    index = {n: schedule.segment_index(n) for n in HYPERPARAMETERS}
    params, buffers = task.init_params()
    velocity = {k: torch.zeros_like(p) for k, p in params.items()}
    for t in range(schedule.horizon):
        lr, mu, wd = (values[n][index[n][t]] for n in HYPERPARAMETERS)
        params = {k: p if p.requires_grad else p.requires_grad_(True) for k, p in params.items()}
        batch = task.batch(t)
        loss = task.train_loss(params, buffers, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        new_params = {}
        for (k, p), g in zip(params.items(), grads, strict=True):
            velocity[k] = mu * velocity[k] + g + wd * p
            new_params[k] = p - lr * velocity[k]
        buffers = _next_buffers(task, params, buffers, batch)
        params = new_params
    meta = task.val_loss(params, buffers)
    learned = [n for n in schedule.learned]
    grads = torch.autograd.grad(meta, [values[n] for n in learned], allow_unused=True)
    out = {n: torch.zeros_like(schedule.values[n]) for n in HYPERPARAMETERS}
    for n, g in zip(learned, grads, strict=True):
        if g is not None:
            out[n] = g.detach().to(torch.float64)
    return float(meta.detach()), out


def final_run(task, schedule: HyperSchedule):
    """Parameters and buffers after a plain (no-grad) run, written independently of
    metahpo.inner."""
    index = {n: schedule.segment_index(n) for n in HYPERPARAMETERS}
    params, run_buffers = task.init_params()
    velocity = {k: torch.zeros_like(p) for k, p in params.items()}
    for t in range(schedule.horizon):
        lr, mu, wd = (float(schedule.values[n][index[n][t]]) for n in HYPERPARAMETERS)
        batch = task.batch(t)
        ps = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        grads = torch.autograd.grad(task.train_loss(ps, run_buffers, batch), list(ps.values()))
        run_buffers = _next_buffers(task, params, run_buffers, batch)
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads, strict=True):
                velocity[k] = mu * velocity[k] + g + wd * p
                params[k] = p - lr * velocity[k]
    return params, run_buffers


def final_val_loss(task, schedule: HyperSchedule, buffers=None) -> float:
    """Validation loss after a plain (no-grad) run, written independently of metahpo.inner.

    Args:
        buffers: evaluate with these buffers instead of the run's own (None: the run's).
    """
    params, run_buffers = final_run(task, schedule)
    with torch.no_grad():
        return float(task.val_loss(params, run_buffers if buffers is None else buffers))


def central_differences(
    task, schedule: HyperSchedule, eps: float = 1e-5, *, freeze_buffers: bool = True
) -> dict[str, torch.Tensor]:
    """d L_val / d h for every shared value, by float64 central differences.

    With ``freeze_buffers`` the validation loss of every perturbed run is taken with the
    buffers (batch-norm running statistics) of the unperturbed run: the derivative that treats
    them as constants, which is what the estimators compute (PAPER.md). Tasks without buffers
    are unaffected.
    """
    frozen = final_run(task, schedule)[1] if freeze_buffers and task.init_params()[1] else None
    out = {n: torch.zeros_like(schedule.values[n]) for n in HYPERPARAMETERS}
    for n in schedule.learned:
        for k in range(schedule.specs[n].n_segments):
            plus, minus = schedule.values[n].clone(), schedule.values[n].clone()
            plus[k] += eps
            minus[k] -= eps
            f_plus = final_val_loss(task, schedule.replace({n: plus}), frozen)
            f_minus = final_val_loss(task, schedule.replace({n: minus}), frozen)
            out[n][k] = (f_plus - f_minus) / (2 * eps)
    return out


def assert_grads_close(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], rtol: float
) -> None:
    """Every type agrees to ``rtol`` relative to that type's largest entry (exact zeros too)."""
    for n in HYPERPARAMETERS:
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
