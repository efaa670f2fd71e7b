"""Parameterisations: exact hypergradients of their raw values, and their contracts.

Every built-in parameterisation (piecewise constant, log space, piecewise linear with
overlapping supports, the warm-up + cosine family) is differentiated exactly by forward mode
(column skipping included), exact reverse, checkpointed reverse and reversible learning: they
agree to 1e-10 in float64 and with central differences to 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

import metahpo
from metahpo.estimators.checkpointed_reverse import CheckpointedReverse
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import Columns, ForwardMode
from metahpo.estimators.reversible import Reversible
from metahpo.optim import SGD
from metahpo.parameterisation import (
    BUILT_IN,
    Constant,
    Linear,
    Log,
    Parameterisation,
    WarmupCosine,
    make_parameterisation,
)
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import active_columns, assert_grads_close, central_differences, small_digits

HORIZON = 9

# name -> {key: (parameterisation, bounds, init in the units to_raw reads)}
CASES = {
    "log": {
        "lr": (Log(3), (1e-3, 1.0), [0.08, 0.12, 0.1]),
        "momentum": (Log(2), (1e-3, 0.99), [0.4, 0.6]),
        "weight_decay": (Constant(1), (0.0, 0.01), [1e-3]),
    },
    "linear": {  # knots at steps 0, 8/3, 16/3, 8: each influences two segments (overlap)
        "lr": (Linear(4), (0.0, 1.0), [0.05, 0.15, 0.1, 0.02]),
        "momentum": (Linear(3), (0.0, 0.99), [0.3, 0.7, 0.5]),
        "weight_decay": (Linear(2), (0.0, 0.01), [1e-3, 2e-3]),
    },
    "warmup_cosine": {
        "lr": (WarmupCosine(), (0.0, 1.0), [0.2, 0.3, 0.1]),
        "momentum": (Constant(2), (0.0, 0.99), [0.5, 0.6]),
        "weight_decay": (Constant(1), (0.0, 0.01), [1e-3]),
    },
}


def schedule_for(case: str, horizon: int = HORIZON) -> HyperSchedule:
    specs, values = {}, {}
    for key, (param, bounds, init) in CASES[case].items():
        specs[key] = HyperSpec(param.size, bounds, True, param)
        values[key] = param.to_raw(init)
    return HyperSchedule(horizon, specs, values, SGD())


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return small_digits()


@pytest.mark.parametrize("case", list(CASES))
def test_exact_estimators_agree_on_raw_values(digits, case: str) -> None:
    schedule = schedule_for(case)
    exact = ExactReverse().hypergradient(digits, schedule)
    for hvp in ("fwd_rev", "rev_rev"):
        forward = ForwardMode(hvp=hvp).hypergradient(digits, schedule)
        assert forward.metrics["tangents"] == "generic"
        assert forward.meta_loss == pytest.approx(exact.meta_loss, rel=1e-12)
        assert_grads_close(forward.grads, exact.grads, rtol=1e-10)
    checkpointed = CheckpointedReverse(stretch=4).hypergradient(digits, schedule)
    assert_grads_close(checkpointed.grads, exact.grads, rtol=1e-10)
    reversible = Reversible().hypergradient(digits, schedule)
    assert_grads_close(reversible.grads, exact.grads, rtol=1e-8)
    # every raw value matters here: no gradient is identically zero
    assert all(bool((g != 0).all()) for g in exact.grads.values())


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_central_differences(digits, case: str) -> None:
    schedule = schedule_for(case)
    grads = ForwardMode().hypergradient(digits, schedule).grads
    assert_grads_close(grads, central_differences(digits, schedule), rtol=1e-6)


def test_constant_is_the_default_and_takes_the_fast_path(digits) -> None:
    spec = HyperSpec(3, (0.0, 1.0))
    assert spec.param == Constant(3)
    schedule = schedule_for("log")
    fixed = schedule.replace({})
    plain = HyperSchedule(
        HORIZON,
        {k: HyperSpec(s.n_segments, s.bounds) for k, s in fixed.specs.items()},
        {k: schedule.per_step(k)[[s for s, _ in schedule.supports(k)]] for k in schedule.keys},
        SGD(),
    )
    assert ForwardMode().hypergradient(digits, plain).metrics["tangents"] == "sgd"
    # the same per-step values whether log-parameterised or constant
    for k in schedule.keys:
        assert torch.allclose(plain.per_step(k), schedule.per_step(k), rtol=1e-15, atol=0)


PARAMS = [Constant(4), Log(4), Linear(4), Linear(9), Linear(2), WarmupCosine()]


@pytest.mark.parametrize("param", PARAMS, ids=repr)
@pytest.mark.parametrize("horizon", [9, 10, 23])
def test_contract_at_derivative_supports_pullback(param: Parameterisation, horizon: int) -> None:
    if param.size > horizon:
        pytest.skip("more raw values than steps")
    g = torch.Generator().manual_seed(horizon)
    raw = torch.rand(param.size, generator=g, dtype=torch.float64) * 0.4 + 0.1
    values = param.per_step(raw, horizon)
    jac = jacrev(lambda r: param.per_step(r, horizon))(raw)  # [T, n]
    supports = param.supports(horizon)
    assert len(supports) == param.size
    for t in range(horizon):
        assert float(param.at(raw, t, horizon)) == pytest.approx(float(values[t]), rel=1e-15)
        got = dict(param.derivative(raw, t, horizon))
        for i, (first, last) in enumerate(supports):
            if not first <= t <= last:  # outside its support a raw value has no influence
                assert float(jac[t, i]) == 0.0 and i not in got
            else:
                assert got.get(i, 0.0) == pytest.approx(float(jac[t, i]), rel=1e-12, abs=1e-15)
    # supports are tight at their first step (forward mode starts the column there)
    for i, (first, _) in enumerate(supports):
        assert float(jac[first, i]) != 0.0 or isinstance(param, WarmupCosine)
    v = torch.rand(horizon, generator=g, dtype=torch.float64)
    assert torch.allclose(param.pullback(raw, v, horizon), jac.T @ v, rtol=1e-12)


def test_columns_start_at_supports_with_overlap() -> None:
    schedule = schedule_for("linear")
    cols = Columns(schedule)
    # lr knots at 0, 8/3, 16/3, 8 -> supports start at 0, 1, 3, 6
    assert schedule.segment_starts("lr") == [0, 1, 3, 6]
    assert cols.n_active(0) == 3  # the first knot of every key
    lr_at_4 = cols.derivative("lr", 4)
    assert [cols.keys[i] for i, _ in lr_at_4] == [("lr", 1), ("lr", 2)]
    assert sum(d for _, d in lr_at_4) == pytest.approx(1.0)


def test_forward_skips_knots_before_their_support(monkeypatch, digits) -> None:
    """Each step computes products only for the knots that already act on it."""
    seen = active_columns(monkeypatch, digits, schedule_for("linear"))
    # starts: lr 0, 1, 3, 6; momentum (knots at 0, 4, 8) 0, 1, 5; weight decay 0, 1
    assert seen == [3, 6, 6, 7, 7, 8, 9, 9, 9]


def test_linear_knots_interpolate_and_pass_through_the_ends() -> None:
    raw = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    v = Linear(3).per_step(raw, 5)  # knots at steps 0, 2, 4
    assert v.tolist() == [1.0, 2.0, 3.0, 2.5, 2.0]


def test_warmup_cosine_shape() -> None:
    raw = torch.tensor([0.4, 0.2, 0.1], dtype=torch.float64)
    v = WarmupCosine().per_step(raw, 100)
    assert float(v[19]) == pytest.approx(0.4 * 20 / 21)  # still warming up
    assert float(v.max()) == pytest.approx(0.4, rel=1e-3)
    assert int(v.argmax()) in (20, 21)
    assert float(v[-1]) == pytest.approx(0.4 * (0.1 + 0.9 * (1 + math.cos(math.pi * 79 / 80)) / 2))
    assert bool((v[21:].diff() <= 0).all())  # non-increasing after the warm-up


def test_log_bounds_and_projection() -> None:
    schedule = schedule_for("log")
    lo, hi = schedule.raw_bounds("lr")
    assert torch.allclose(lo.exp(), torch.full((3,), 1e-3, dtype=torch.float64))
    moved = schedule.replace({"lr": torch.tensor([5.0, -20.0, 0.0], dtype=torch.float64)})
    assert moved.project().per_step("lr")[[0, 3, 6]].tolist() == pytest.approx([1.0, 1e-3, 1.0])


def test_results_round_trip_keeps_the_parameterisation() -> None:
    schedule = schedule_for("warmup_cosine")
    back = HyperSchedule.from_dict(HORIZON, schedule.to_dict())
    assert back.param("lr") == WarmupCosine() and back.param("momentum") == Constant(2)
    assert torch.equal(back.per_step("lr"), schedule.per_step("lr"))


# -- from the config -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["log", "linear", "warmup_cosine"])
def test_presets_build_and_run(tmp_path, preset: str) -> None:
    results = metahpo.run(
        [
            "experiment=smoke",
            f"schedule={preset}",
            "progress=false",
            "outer.steps=2",
            "final.seeds=[0]",
        ],
        tmp_path,
    )
    learned = results["learned_schedule"]
    assert learned["lr"]["param"] == preset
    assert (tmp_path / "schedules.png").exists()


BAD = [
    (
        ["schedule.lr.param=log"],
        r"^schedule\.lr\.bounds=\[0\.0, 1\.0\]: param=log needs a lower bound > 0",
    ),
    (
        ["schedule.lr.param=linear", "schedule.lr.segments=500", "horizon=200"],
        r"^schedule\.lr\.segments=500 must be an integer from 1 to 200",
    ),
    (
        ["schedule=warmup_cosine", "schedule.lr.init=[0.1,0.9,0.0]"],
        r"^schedule\.lr\.init: warmup=0\.9 must lie in \[0\.0, 0\.5\]",
    ),
    (
        ["schedule=warmup_cosine", "schedule.lr.init=[0.1,0.1,1.5]"],
        r"^schedule\.lr\.init: final=1\.5 must lie in \[0\.0, 1\.0\]",
    ),
    (
        ["schedule.lr.param=cubic"],
        r"^schedule\.lr\.param='cubic' is not a parameterisation; allowed: constant, log, "
        r"linear, warmup_cosine",
    ),
    (
        ["schedule.lr.param=torch.nn.Linear"],
        r"^schedule\.lr\.param='torch\.nn\.Linear' is not a parameterisation",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_parameterisations_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message) as info:
        metahpo.compose(overrides)
    assert "\n" not in str(info.value)


def test_make_parameterisation_names() -> None:
    assert set(BUILT_IN) == {"constant", "log", "linear", "warmup_cosine"}
    assert make_parameterisation("k", None, 4) == Constant(4)
    assert make_parameterisation("k", "metahpo.parameterisation.Log", 2) == Log(2)
    assert make_parameterisation("k", {"_target_": "linear"}, 3) == Linear(3)
