"""Reverse mode is exact where it should be and biased where it should be.

Exact reverse (higher) against forward mode and central differences; truncated reverse with
K = horizon against exact reverse; truncated reverse's bias, entry by entry, against exact
per-step hypergradients; one-line errors for bad window lengths.
"""

from __future__ import annotations

import higher
import pytest
import torch

import metahpo
from metahpo.build import build
from metahpo.core import ConfigError
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.truncated_reverse import TruncatedReverse
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import (
    EXACT_TASKS,
    SHARING,
    assert_grads_close,
    central_differences,
    make_schedule,
    quadratic,
    small_digits,
)

TASKS = EXACT_TASKS


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("init", ["nonzero", "zero_mom_wd"])
def test_exact_reverse_equals_forward_mode(task_name: str, sharing: str, init: str) -> None:
    make_task, horizon = TASKS[task_name]
    task = make_task()
    schedule = make_schedule(horizon, SHARING[sharing], init, seed=1)
    rev = ExactReverse().hypergradient(task, schedule)
    fwd = ForwardMode().hypergradient(task, schedule)
    assert rev.meta_loss == pytest.approx(fwd.meta_loss, rel=1e-12)
    assert_grads_close(rev.grads, fwd.grads, rtol=1e-10)
    if init == "zero_mom_wd":  # zero momentum and weight decay still get their gradients
        assert float(rev.grads["momentum"][-1]) != 0.0
        assert float(rev.grads["weight_decay"][-1]) != 0.0


@pytest.mark.parametrize(
    ("task_name", "sharing", "init"),
    [("quadratic", "several", "nonzero"), ("digits", "per_step", "zero_mom_wd")],
)
def test_exact_reverse_matches_central_differences(task_name: str, sharing: str, init: str) -> None:
    make_task, horizon = TASKS[task_name]
    task = make_task()
    schedule = make_schedule(horizon, SHARING[sharing], init)
    hg = ExactReverse().hypergradient(task, schedule)
    assert_grads_close(hg.grads, central_differences(task, schedule), rtol=1e-6)


def test_exact_reverse_with_relu_fixed_types_and_float32() -> None:
    """ReLU digits (forward mode's other test task), lr-only learning, and a float32 run."""
    schedule = make_schedule(9, 3, learn=("lr",), seed=2)
    task = small_digits(activation="relu")
    rev = ExactReverse().hypergradient(task, schedule)
    assert_grads_close(rev.grads, ForwardMode().hypergradient(task, schedule).grads, rtol=1e-10)
    assert torch.equal(rev.grads["momentum"], torch.zeros(3, dtype=torch.float64))
    g32 = ExactReverse().hypergradient(small_digits(dtype=torch.float32), schedule).grads
    assert_grads_close(g32, ExactReverse().hypergradient(small_digits(), schedule).grads, 1e-3)


def test_stock_higher_sgd_drops_gradients_at_zero_values() -> None:
    """Why ExactReverse has its own DifferentiableOptimizer: higher's DifferentiableSGD skips the
    momentum and weight-decay terms when their value is 0, so their gradients go missing."""
    task = quadratic()
    schedule = make_schedule(6, 1, "zero_mom_wd")
    values = {n: schedule.values[n].clone().requires_grad_(True) for n in HYPERPARAMETERS}
    table = schedule.table(values=values)
    names = [n for n, _ in task.model.named_parameters()]
    opt = torch.optim.SGD(task.model.parameters(), lr=0.0)
    with higher.innerloop_ctx(task.model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for t in range(schedule.horizon):
            params = dict(zip(names, fmodel.parameters(), strict=True))
            loss = task.train_loss(params, {}, task.batch(t))
            diffopt.step(loss, override={n: [table[n][t]] for n in HYPERPARAMETERS})
        params = dict(zip(names, fmodel.parameters(), strict=True))
        meta = task.val_loss(params, {})
        stock = torch.autograd.grad(meta, list(values.values()), allow_unused=True)
    assert stock[1] is None and stock[2] is None  # momentum, weight decay: lost
    ours = ExactReverse().hypergradient(task, schedule).grads
    assert float(ours["momentum"].abs().min()) > 0 and float(ours["weight_decay"].abs().min()) > 0
    torch.testing.assert_close(stock[0], ours["lr"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("sharing", SHARING)
def test_truncated_with_full_window_is_exact(task_name: str, sharing: str) -> None:
    make_task, horizon = TASKS[task_name]
    task = make_task()
    schedule = make_schedule(horizon, SHARING[sharing], seed=4)
    trunc = TruncatedReverse(K=horizon).hypergradient(task, schedule)
    exact = ExactReverse().hypergradient(task, schedule)
    assert trunc.meta_loss == pytest.approx(exact.meta_loss, rel=1e-12)
    assert_grads_close(trunc.grads, exact.grads, rtol=1e-10)


@pytest.mark.parametrize("task_name", TASKS)
def test_truncation_bias_segment_by_segment(task_name: str) -> None:
    """T=12, 3 segments of 4 steps, K=6 (window = steps 6..11): segment 0 lies before the
    window (exactly zero), segment 1 straddles it (only its steps 6 and 7 count), segment 2 is
    inside it (exact). Checked against the exact per-step hypergradients."""
    make_task, _ = TASKS[task_name]
    task = make_task()
    horizon, K = 12, 6
    shared = make_schedule(horizon, 3, seed=5)
    per_step = HyperSchedule(
        horizon,
        {n: HyperSpec(horizon, (float("-inf"), float("inf"))) for n in HYPERPARAMETERS},
        {n: shared.per_step(n) for n in HYPERPARAMETERS},
    )
    exact_steps = ExactReverse().hypergradient(task, per_step).grads
    exact = ExactReverse().hypergradient(task, shared).grads
    trunc = TruncatedReverse(K=K).hypergradient(task, shared)
    assert trunc.metrics["window_start"] == horizon - K
    for n in HYPERPARAMETERS:
        g = trunc.grads[n]
        assert float(g[0]) == 0.0
        assert float(g[1]) == pytest.approx(float(exact_steps[n][6:8].sum()), rel=1e-10)
        assert float(g[1]) != pytest.approx(float(exact[n][1]), rel=1e-3)  # biased
        assert float(g[2]) == pytest.approx(float(exact[n][2]), rel=1e-10)
    # per-step sharing: in-window steps exact, earlier steps zero
    trunc_steps = TruncatedReverse(K=K).hypergradient(task, per_step).grads
    for n in HYPERPARAMETERS:
        assert torch.equal(
            trunc_steps[n][: horizon - K], torch.zeros(horizon - K, dtype=torch.float64)
        )
        torch.testing.assert_close(
            trunc_steps[n][horizon - K :], exact_steps[n][horizon - K :], rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize("K", [0, -3, 2.5, True, "4"])
def test_bad_K_is_one_line_config_error(K: object) -> None:
    with pytest.raises(ConfigError, match=r"^estimator\.K=.* must be an integer >= 1$"):
        TruncatedReverse(K=K)  # type: ignore[arg-type]


def test_K_above_horizon_fails_before_any_training(monkeypatch, quad) -> None:
    def no_training(step: int):  # type: ignore[no-untyped-def]
        raise AssertionError("trained before checking K")

    monkeypatch.setattr(quad, "batch", no_training)
    with pytest.raises(
        ConfigError,
        match=r"^estimator\.K=13 must be an integer from 1 to the "
        r"horizon \(12\)$",
    ):
        TruncatedReverse(K=13).hypergradient(quad, make_schedule(12, 3))


def test_reverse_estimators_from_config() -> None:
    """Every new estimator config instantiates and runs through the public API; a window longer
    than the horizon fails when the run is built."""
    base = ["task=quadratic", "horizon=8", "schedule=constant", "schedule.lr.init=0.1"]
    exact = metahpo.hypergradient(metahpo.compose([*base, "estimator=exact_reverse"]))
    fwd = metahpo.hypergradient(metahpo.compose([*base, "estimator=forward"]))
    trunc = metahpo.hypergradient(
        metahpo.compose([*base, "estimator=truncated_reverse", "estimator.K=8"])
    )
    assert_grads_close(exact.grads, fwd.grads, rtol=1e-10)
    assert_grads_close(trunc.grads, fwd.grads, rtol=1e-10)
    with pytest.raises(ConfigError, match=r"^estimator\.K=9 must be .* horizon \(8\)$"):
        build(metahpo.compose([*base, "estimator=truncated_reverse", "estimator.K=9"]))
    with pytest.raises(ConfigError, match=r"^estimator\.W=9 must be .* horizon \(8\)$"):
        build(metahpo.compose([*base, "estimator=greedy", "estimator.W=9"]))
