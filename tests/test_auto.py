"""``estimator=auto``: the cost model's choice in each regime, one-line errors, and an end-to-end
run whose results.json says what was picked and why (and whose hypergradient is exact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import metahpo
from metahpo.core import ConfigError
from metahpo.estimators import auto as auto_module
from metahpo.estimators.auto import (
    FORWARD_PER_COLUMN,
    REVERSE,
    Auto,
    Rates,
    choose,
    measure_rates,
    started_columns,
)
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.validation import check_arguments
from tests.conftest import assert_grads_close, make_schedule, small_digits

MIB = 2**20
P = 10_000  # parameters, float32
STATE, PER_STEP = 2 * P * 4, 40 * P * 4  # SGD: theta + velocity; graph per step ~ 40 P numbers


def pick(columns: int, T: int = 800, budget_mb: float = 1e6, **kw) -> str:
    return choose(T, [columns] * T, P, STATE, PER_STEP, 4, 1, int(budget_mb * MIB), **kw).name


def test_measured_rates_move_the_crossover() -> None:
    # LeNet's measured figures (docs/estimators.md): a column costs ~2 plain steps, reverse ~3
    lenet = Rates(per_column=2.0, reverse=3.2, recompute=1.0, source="test")
    assert pick(1, rates=lenet) == "forward"  # 3.0 < 3.2
    assert pick(2, rates=lenet) == "exact_reverse"  # 5.0 > 3.2
    cheap_products = Rates(per_column=0.1, reverse=1.5, recompute=1.0, source="test")
    assert pick(4) == "exact_reverse"  # the MLP's constants: 2.32 > 1.5
    assert pick(4, rates=cheap_products) == "forward"  # 1.4 < 1.5
    choice = choose(800, [2] * 800, P, STATE, PER_STEP, 4, 1, int(1e6 * MIB), rates=lenet)
    assert choice.rates == {"per_column": 2.0, "reverse": 3.2, "recompute": 1.0}
    assert choice.metrics()["auto_rate_per_column"] == 2.0
    assert choice.cost["forward"] == pytest.approx(5.0) and "2.00 per column" in choice.reason


def test_measure_rates_on_the_model() -> None:
    task = small_digits()
    rates = measure_rates(task, make_schedule(9, 3), steps=2, repeats=1)
    assert rates.per_column >= 0 and rates.reverse > 0 and rates.recompute == 1.0
    assert rates.source.startswith("measured on this model")


def test_calibration_changes_nothing_but_the_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe leaves no trace: the same pick gives bit-identical hypergradients; and a
    restored choice (resume) is used without measuring again."""
    task = small_digits()
    schedule = make_schedule(9, "T")
    calibrated = Auto(calibrate=True)
    first = calibrated.hypergradient(task, schedule)
    fixed = Auto(calibrate=False).hypergradient(task, schedule)
    if first.metrics["auto_choice"] == fixed.metrics["auto_choice"]:
        for n in fixed.grads:
            assert torch.equal(first.grads[n], fixed.grads[n])
    state = calibrated.state_dict()
    assert state["choices"]["9"]["name"] == first.metrics["auto_choice"]

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("a restored choice must not be measured again")

    monkeypatch.setattr(auto_module, "measure_rates", no_probe)
    resumed = Auto(calibrate=True)
    resumed.load_state_dict(state)
    again = resumed.hypergradient(task, schedule)
    assert (
        again.metrics == first.metrics
        or again.metrics["auto_choice"] == first.metrics["auto_choice"]
    )
    assert again.metrics["auto_reason"] == first.metrics["auto_reason"]
    for n in first.grads:
        assert torch.equal(first.grads[n], again.grads[n])


def test_started_columns_follow_the_segments() -> None:
    schedule = make_schedule(6, 3, learn=("lr",))  # lr: 3 segments of 2 steps; others fixed
    assert started_columns(schedule) == [1, 1, 2, 2, 3, 3]
    assert started_columns(make_schedule(4, "T")) == [3, 6, 9, 12]


def test_few_columns_pick_forward_many_pick_reverse() -> None:
    crossover = (REVERSE - 1) / FORWARD_PER_COLUMN  # forward's per-step cost = reverse's
    assert pick(1) == "forward"
    assert pick(int(crossover)) == "forward"
    assert pick(int(crossover) + 1) == "exact_reverse"
    assert pick(30) == "exact_reverse"


def test_a_tight_budget_picks_checkpointed_reverse() -> None:
    exact_mb = (STATE + 800 * PER_STEP) / MIB  # about 122 MiB
    assert pick(30, budget_mb=exact_mb * 1.01) == "exact_reverse"
    choice = choose(800, [30] * 800, P, STATE, PER_STEP, 4, 1, int(exact_mb / 4 * MIB))
    assert choice.name == "checkpointed_reverse"
    assert choice.memory_mb["checkpointed_reverse"] <= exact_mb / 4
    assert 28 <= choice.stretch < 800  # at least the least-memory stretch, sqrt(800 / 20)
    assert "over budget" in choice.reason and "checkpointed_reverse" in choice.reason
    # forward mode's tangents (30 columns x 2 P) fit the same budget but cost more time
    assert choice.memory_mb["forward"] < exact_mb / 4
    assert choice.cost["forward"] > choice.cost["checkpointed_reverse"]


def test_data_parallel_never_picks_plain_exact_reverse() -> None:
    assert pick(30, exact_reverse=False) == "checkpointed_reverse"


def test_nothing_fits_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^estimator.memory_mb=0.1: no exact estimator fits"):
        choose(800, [30] * 800, P, STATE, PER_STEP, 4, 1, int(0.1 * MIB))
    with pytest.raises(ConfigError, match=r"^estimator.memory_mb=0 must be a number > 0 or null"):
        check_arguments("estimator", Auto, {"memory_mb": 0})


def test_auto_delegates_and_reports() -> None:
    task = small_digits()
    schedule = make_schedule(9, "T")  # 27 columns by the end: reverse mode
    hg = Auto(calibrate=False).hypergradient(task, schedule)  # the constants: a fixed pick
    assert hg.metrics["auto_choice"] == "exact_reverse"
    assert hg.metrics["auto_reason"].startswith("exact_reverse: ")
    assert_grads_close(hg.grads, ExactReverse().hypergradient(task, schedule).grads, 1e-10)
    few = Auto(calibrate=False).hypergradient(task, make_schedule(9, 1, learn=("lr",)))
    assert few.metrics["auto_choice"] == "forward"


def test_run_writes_the_choice_to_results_json(tmp_path: Path) -> None:
    cfg = metahpo.compose(
        [
            "task=quadratic",
            "experiment=smoke",
            "progress=false",
            "estimator=auto",
            "estimator.calibrate=false",  # the model's constants: a pick that cannot flip
            "outer.steps=2",
        ]
    )
    metahpo.run(cfg, tmp_path)
    out = json.loads((tmp_path / "results.json").read_text())
    steps = [h for h in out["history"] if h["hypergradient"] is not None]
    # 3 keys x 2 segments: 6 columns by the end, 4.5 on average: reverse mode is cheaper
    assert steps and all(h["auto_choice"] == "exact_reverse" for h in steps)
    assert steps[0]["auto_cost_forward"] > steps[0]["auto_cost_exact_reverse"]
    assert "6 columns, T=20" in steps[0]["auto_reason"]
