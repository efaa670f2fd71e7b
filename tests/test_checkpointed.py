"""Checkpointed reverse mode is exact: equal to exact reverse and forward mode in float64 for
every stretch length (1, one not dividing the horizon, the horizon), SGD and AdamW, several
sharing patterns and a batch-norm model; the stretch from a memory budget; one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from metahpo.core import ConfigError
from metahpo.estimators.checkpointed_reverse import (
    CheckpointedReverse,
    memory_estimate,
    stretch_for_budget,
)
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.optim import SGD, AdamW
from metahpo.validation import check_arguments
from tests.conftest import (
    EXACT_TASKS,
    SHARING,
    assert_grads_close,
    make_schedule,
    unrolled_reference,
)
from tests.test_batchnorm import tiny_wrn

OPTIMIZERS = {"sgd": SGD, "adamw": AdamW}


@pytest.mark.parametrize("task_name", EXACT_TASKS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stretch", [1, 7, "T"])
def test_equals_exact_reverse_and_forward_mode(task_name: str, opt: str, stretch) -> None:
    make_task, horizon = EXACT_TASKS[task_name]
    assert horizon % 7 != 0  # 7 leaves a shorter first stretch
    task = make_task()
    k = horizon if stretch == "T" else stretch
    for i, sharing in enumerate(SHARING):  # every pattern, each with its own values
        init = "nonzero" if i % 2 == 0 else "zero_mom_wd"
        schedule = make_schedule(
            horizon, SHARING[sharing], init, seed=i, optimizer=OPTIMIZERS[opt]()
        )
        hg = CheckpointedReverse(stretch=k).hypergradient(task, schedule)
        rev = ExactReverse().hypergradient(task, schedule)
        fwd = ForwardMode().hypergradient(task, schedule)
        assert hg.metrics["stretch"] == k
        assert hg.meta_loss == pytest.approx(rev.meta_loss, rel=1e-12)
        assert_grads_close(hg.grads, rev.grads, rtol=1e-10)
        assert_grads_close(hg.grads, fwd.grads, rtol=1e-10)
        assert all(float(g.abs().max()) > 0 for n, g in hg.grads.items() if n != "eps")


def test_batch_norm_buffers_are_checkpointed_and_held_constant() -> None:
    """A tiny WRN with 7 batch-norm layers: the stored states carry the running statistics, the
    recomputed stretches advance them as the plain pass did, and they are not differentiated."""
    task = tiny_wrn(activation="relu")
    schedule = make_schedule(4, 3, seed=3)
    meta, ref = unrolled_reference(task, schedule)
    hg = CheckpointedReverse(stretch=3).hypergradient(task, schedule)
    assert hg.meta_loss == pytest.approx(meta, rel=1e-12)
    assert_grads_close(hg.grads, ref, rtol=1e-8)


def test_default_stretch_and_memory_budget() -> None:
    make_task, horizon = EXACT_TASKS["digits"]
    task = make_task()
    schedule = make_schedule(horizon, 3)
    default = CheckpointedReverse()
    hg = default.hypergradient(task, schedule)
    assert hg.metrics["stretch"] == round(math.sqrt(horizon)) == 3
    want = ExactReverse().hypergradient(task, schedule).grads
    assert_grads_close(hg.grads, want, rtol=1e-10)
    # a generous budget takes the whole horizon (no recomputation); the result is the same
    big = CheckpointedReverse(memory_mb=1e4).hypergradient(task, schedule)
    assert big.metrics["stretch"] == horizon
    assert "memory_mb" in big.metrics["stretch_from"]
    assert_grads_close(big.grads, want, rtol=1e-10)
    with pytest.raises(ConfigError, match=r"^estimator.memory_mb=1e-06 is too small") as e:
        CheckpointedReverse(memory_mb=1e-6).hypergradient(task, schedule)
    assert "\n" not in str(e.value)


def test_stretch_for_budget_is_the_longest_that_fits() -> None:
    T, state, per_step = 100, 10, 40  # least memory at k = sqrt(T state / per_step) = 5
    least = memory_estimate(T, 5, state, per_step)
    assert (
        least
        == 20 * 10 + (5 + 1) * 40
        == min(memory_estimate(T, k, state, per_step) for k in range(1, 101))
    )
    assert stretch_for_budget(T, least - 1, state, per_step) is None
    assert stretch_for_budget(T, least, state, per_step) == 5
    for budget in (500, 1000, 2000, 4010):
        k = stretch_for_budget(T, budget, state, per_step)
        assert memory_estimate(T, k, state, per_step) <= budget
        assert k == T or memory_estimate(T, k + 1, state, per_step) > budget
    assert stretch_for_budget(T, 10**9, state, per_step) == T


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stretch": 0}, "estimator.stretch=0 must be an integer >= 1 or null"),
        ({"stretch": 2.5}, "estimator.stretch=2.5 must be an integer"),
        ({"memory_mb": -1}, "estimator.memory_mb=-1 must be a number > 0 or null"),
        ({"memory_mb": "big"}, "estimator.memory_mb='big' must be a number > 0"),
        (
            {"stretch": 3, "memory_mb": 10},
            "estimator.stretch=3 and estimator.memory_mb=10 are both",
        ),
        ({"offload": "yes"}, "estimator.offload='yes' must be true or false"),
    ],
)
def test_bad_settings_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_arguments("estimator", CheckpointedReverse, kwargs)
        CheckpointedReverse(**kwargs)  # relations between the arguments
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_stretch_longer_than_the_horizon_fails_before_training() -> None:
    schedule = make_schedule(9, 3)
    with pytest.raises(
        ConfigError, match=r"^estimator.stretch=10 must be an integer from 1 to the horizon \(9\)$"
    ):
        CheckpointedReverse(stretch=10).check(schedule)


def test_offload_stores_states_on_the_cpu_with_the_same_result() -> None:
    make_task, horizon = EXACT_TASKS["quadratic"]
    task = make_task()
    schedule = make_schedule(horizon, 3, optimizer=AdamW())
    a = CheckpointedReverse(stretch=5, offload=True).hypergradient(task, schedule)
    b = CheckpointedReverse(stretch=5).hypergradient(task, schedule)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n])


@pytest.mark.parametrize("task,no_exact", [("digits", False), ("lenet", False), ("digits", True)])
def test_benchmark_script_runs_and_agrees(tmp_path, task, no_exact) -> None:  # type: ignore[no-untyped-def]
    """benchmarks/checkpointed.py at its smallest, on the digits MLP and on LeNet (digits
    written as 28x28 MNIST files): the table is written and the three exact estimators agree
    (float32); with --no-exact exact reverse is modelled, not run."""
    import json

    from benchmarks.checkpointed import main

    main(
        ["--task", task, "--horizons", "6", "--columns", "1", "--repeats", "1"]
        + ["--out", str(tmp_path), "--budget-fraction", "0.5"]  # a quarter fits no T = 6 run
        + (["--no-exact"] if no_exact else [])
    )
    out = json.loads((tmp_path / "checkpointed.json").read_text())
    assert out["task"] == task
    (row,) = out["rows"]
    assert row["T"] == 6 and row["stretch"] == 2
    for name in (
        ("checkpointed", "budgeted") if no_exact else ("exact_reverse", "checkpointed", "budgeted")
    ):
        assert row[f"{name}_vs_forward"] < 1e-4
    assert (row["exact_reverse_s"] is None) == no_exact and row["exact_reverse_mb"] > 0
    for label in ("auto", "auto_measured", "auto_budget", "auto_budget_measured"):
        assert row[label] in ("forward", "exact_reverse", "checkpointed_reverse")
    assert "| 6 | 1 |" in (tmp_path / "checkpointed.md").read_text()
