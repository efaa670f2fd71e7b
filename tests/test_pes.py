"""Persistent ES: unbiased for the sum of the window-end validation losses where truncated reverse
mode is not; one window is plain ES; online steps; resume; one-line errors."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import metahpo
from metahpo.core import ConfigError
from metahpo.estimators.auto import Auto
from metahpo.estimators.checkpointed_reverse import CheckpointedReverse
from metahpo.estimators.es import EvolutionStrategies
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.pes import PersistentES, persistent_es
from metahpo.estimators.reversible import Reversible
from metahpo.inner import FlatTask
from metahpo.reverse import window_hypergradient
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import quadratic

QUICK = ["task=quadratic", "experiment=smoke", "progress=false"]


def lr_schedule(horizon: int, lr: float = 0.2, momentum: float = 0.5) -> HyperSchedule:
    """One learned lr for the whole run (momentum and decay fixed): the lr acts on every
    window, so dropping the windows' dependence on earlier ones (truncation) is a large bias."""
    specs = {
        "lr": HyperSpec(1, (0.0, 1.0)),
        "momentum": HyperSpec(1, (0.0, 0.99), learn=False),
        "weight_decay": HyperSpec(1, (0.0, 1.0), learn=False),
    }
    return HyperSchedule(horizon, specs, {"lr": lr, "momentum": momentum, "weight_decay": 0.0})


def window_sums(task, schedule: HyperSchedule, K: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """d/d lr of sum_tau L_val(theta_{tau K}): exact (reverse mode from step 0 to every window
    end) and truncated (reverse mode over each window from its start, held constant: truncated
    reverse mode / greedy's windows with the schedule fixed)."""
    flat = FlatTask(task)
    init = state = flat.init_state(schedule.optimizer)
    exact = truncated = 0.0
    for begin in range(0, schedule.horizon, K):
        stop = min(begin + K, schedule.horizon)
        exact += float(window_hypergradient(flat, schedule, init, stop).grads["lr"][0])
        window = window_hypergradient(flat, schedule, state, stop)
        truncated += float(window.grads["lr"][0])
        state = window.state
    return exact, truncated


def test_unbiased_for_the_sum_of_window_losses_where_truncation_is_not() -> None:
    """T=6, K=1, one lr: exact -14.9, truncated -7.4; PES within 3 standard errors of exact."""
    task = quadratic(n_train=32, batch_size=8)
    schedule, K = lr_schedule(6), 1
    exact, truncated = window_sums(task, schedule, K)
    assert float(ForwardMode(window=K).hypergradient(task, schedule).grads["lr"][0]) == (
        pytest.approx(exact, rel=1e-10)
    )
    out = persistent_es(task, schedule, K, 0.01, 96, torch.Generator().manual_seed(0))
    pes, se = float(out.total["lr"][0]), float(out.stderr["lr"][0])
    assert abs(pes - exact) <= 3 * se, (pes, exact, se)
    assert abs(truncated - exact) > 3 * se, (truncated, exact, se)
    assert abs(truncated - exact) > 0.3 * abs(exact)  # the bias is large, not marginal
    assert out.schedule is schedule  # no move: the schedule stayed fixed
    assert [w["steps"] for w in out.windows] == [[t, t + 1] for t in range(6)]


@pytest.mark.parametrize(
    "estimator",
    [
        ForwardMode,
        ExactReverse,
        CheckpointedReverse,
        functools.partial(CheckpointedReverse, stretch=2),
        functools.partial(Auto, calibrate=False),
    ],
)
@pytest.mark.parametrize("window", [1, 3, 7])
def test_exact_estimators_offer_the_same_objective(estimator, window: int) -> None:  # type: ignore[no-untyped-def]
    """``estimator.window``: forward mode's, exact and checkpointed reverse's (stretches that
    do and do not line up with the windows) and auto's gradient of the sum of the validation
    losses every W steps equals the sum of the window ends' exact hypergradients (reverse mode
    from step 0 to each)."""
    task = quadratic(n_train=32, batch_size=8)
    specs = {n: HyperSpec(2, b) for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99))]}
    values = {"lr": torch.tensor([0.1, 0.05]), "momentum": torch.tensor([0.5, 0.3])}
    schedule = HyperSchedule(7, specs, values)
    flat = FlatTask(task)
    init = flat.init_state(schedule.optimizer)
    ends = [*range(window, 7, window), 7]
    parts = [window_hypergradient(flat, schedule, init, e) for e in ends]
    hg = estimator(window=window).hypergradient(task, schedule)
    for k in specs:
        want = sum(p.grads[k] for p in parts)
        torch.testing.assert_close(hg.grads[k], want, rtol=1e-10, atol=1e-14)
    assert hg.meta_loss == pytest.approx(sum(p.meta_loss for p in parts), rel=1e-12)
    assert hg.metrics["final_val_loss"] == pytest.approx(parts[-1].meta_loss, rel=1e-12)
    with pytest.raises(ConfigError, match=r"^estimator\.window=8 must be .* horizon \(7\)$"):
        estimator(window=8).hypergradient(task, schedule)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_reversible_offers_the_same_objective(window: int) -> None:
    """Reversible learning's windowed hypergradient is exact reverse's, to its fixed-point
    rounding (radix 2^-44: ~1e-13 relative on the weights)."""
    task = quadratic(n_train=32, batch_size=8)
    specs = {n: HyperSpec(2, b) for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99))]}
    values = {"lr": torch.tensor([0.1, 0.05]), "momentum": torch.tensor([0.5, 0.75])}
    schedule = HyperSchedule(7, specs, values)
    want = ExactReverse(window=window).hypergradient(task, schedule)
    got = Reversible(window=window).hypergradient(task, schedule)
    for k in specs:
        torch.testing.assert_close(got.grads[k], want.grads[k], rtol=1e-8, atol=1e-12)
    assert got.meta_loss == pytest.approx(want.meta_loss, rel=1e-9)
    assert got.metrics["final_val_loss"] == pytest.approx(want.metrics["final_val_loss"], rel=1e-9)
    plain = Reversible().hypergradient(task, schedule)
    if window < 7:  # the windows change the objective
        assert not torch.allclose(got.grads["lr"], plain.grads["lr"], rtol=1e-3)
    with pytest.raises(ConfigError, match=r"^estimator\.window=8 must be .* horizon \(7\)$"):
        Reversible(window=8).hypergradient(task, schedule)


def test_one_window_is_plain_es() -> None:
    """K = T: one window, accumulated noise = its noise, the same seed: ES's estimate."""
    task = quadratic(n_train=32, batch_size=8)
    specs = {n: HyperSpec(2, b) for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99))]}
    values = {"lr": torch.tensor([0.1, 0.05]), "momentum": torch.tensor([0.5, 0.3])}
    schedule = HyperSchedule(8, specs, values)
    es = EvolutionStrategies(sigma=0.01, pairs=3).hypergradient(task, schedule)
    pes = PersistentES(K=8, sigma=0.01, pairs=3).hypergradient(task, schedule)
    for k in specs:
        torch.testing.assert_close(pes.grads[k], es.grads[k], rtol=1e-12, atol=0)
    assert pes.meta_loss == pytest.approx(es.meta_loss, rel=1e-12)
    assert pes.inner_steps == es.inner_steps == 7 * 8
    assert pes.metrics["pes_pairs"] == 3 and len(pes.metrics["pes_windows"]) == 1
    assert pes.metrics["pes_stderr"] == pytest.approx(es.metrics["es_stderr"], rel=1e-9)


def test_moves_the_schedule_after_every_window() -> None:
    task = quadratic(n_train=32, batch_size=8)
    schedule = lr_schedule(6, lr=0.1)
    hg = PersistentES(K=2, pairs=2, step_size={"lr": 0.01}).hypergradient(task, schedule)
    assert hg.schedule is not None and len(hg.metrics["pes_windows"]) == 3
    moved = float(hg.schedule.values["lr"][0] - schedule.values["lr"][0]) / 0.01
    assert moved == pytest.approx(round(moved), abs=1e-9) and abs(moved) in (1, 3)  # 3 signs
    assert hg.metrics["pes_windows"][-1]["val_loss"] == hg.meta_loss
    assert set(hg.metrics["pes_stderr_values"]) == {"lr"}
    again = PersistentES(K=2, pairs=2, step_size={"lr": 0.01}).hypergradient(task, schedule)
    assert torch.equal(again.grads["lr"], hg.grads["lr"])  # seeded: reproducible


def test_resume_repeats_the_run(tmp_path: Path) -> None:
    args = [*QUICK, "estimator=pes", "estimator.pairs=1", "estimator.K=10"]
    straight = metahpo.run(metahpo.compose([*args, "outer.steps=3"]))
    metahpo.run(metahpo.compose([*args, "outer.steps=1"]), tmp_path / "first")
    resumed = metahpo.run(metahpo.compose([*args, "outer.steps=3", f"resume={tmp_path / 'first'}"]))
    assert [h["hypergradient"] for h in resumed["history"]] == [
        h["hypergradient"] for h in straight["history"]
    ]
    assert resumed["learned_schedule"] == straight["learned_schedule"]
    assert straight["history"][0]["online"] and straight["history"][0]["pes_pairs"] == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.sigma=0", r"^estimator\.sigma=0 must be a number > 0 and < 1"),
        ("estimator.sigma=-0.1", r"^estimator\.sigma=-0\.1 must be a number > 0 and < 1"),
        ("estimator.pairs=0", r"^estimator\.pairs=0 must be an integer >= 1"),
        ("estimator.K=0", r"^estimator\.K=0 must be an integer >= 1"),
        ("estimator.update=adam", r"^estimator\.update='adam' is unknown; allowed: sign, gradient"),
    ],
)
def test_bad_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        metahpo.compose(["estimator=pes", override])


def test_a_window_longer_than_the_horizon_is_refused_before_training(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    task = quadratic()

    def no_training(step: int):  # type: ignore[no-untyped-def]
        raise AssertionError("trained before checking the settings")

    monkeypatch.setattr(task, "batch", no_training)
    with pytest.raises(ConfigError, match=r"^estimator\.K=9 must be .* horizon \(8\)$"):
        PersistentES(K=9).hypergradient(task, lr_schedule(8))
    unbounded = HyperSchedule(
        8,
        {"lr": HyperSpec(1, (0.0, float("inf"))), "momentum": HyperSpec(1, (0, 1), learn=False)},
        {"lr": 0.1, "momentum": 0.0},
    )
    with pytest.raises(ConfigError, match=r"^estimator=pes scales its noise by .*lr\.bounds"):
        PersistentES(K=2).hypergradient(task, unbounded)


def test_only_values_in_force_in_a_window_are_perturbed() -> None:
    from metahpo.estimators.pes import window_masks

    specs = {"lr": HyperSpec(2, (0.0, 1.0)), "momentum": HyperSpec(1, (0.0, 0.99))}
    schedule = HyperSchedule(8, specs, {"lr": [0.1, 0.2], "momentum": 0.5})
    keys = ["lr", "momentum"]
    assert window_masks(schedule, keys, 0, 4).tolist() == [1.0, 0.0, 1.0]
    assert window_masks(schedule, keys, 4, 8).tolist() == [0.0, 1.0, 1.0]
    assert window_masks(schedule, keys, 2, 6).tolist() == [1.0, 1.0, 1.0]


def test_any_optimiser_and_loss_hyperparameters() -> None:
    """No derivatives needed: Adam with label smoothing and a per-group L2 learned."""
    from metahpo.optim import Adam
    from tests.conftest import small_digits
    from tests.test_loss_hyperparameters import loss_schedule

    task = small_digits()
    schedule = loss_schedule(task, Adam())
    hg = PersistentES(K=3, pairs=2).hypergradient(task, schedule)
    assert hg.schedule is not None and len(hg.metrics["pes_windows"]) == 3
    for k in schedule.learned:
        assert bool(torch.isfinite(hg.grads[k]).all()), k
    moved = [
        k for k in schedule.learned if not torch.equal(hg.schedule.values[k], schedule.values[k])
    ]
    assert "label_smoothing" in moved and "lr" in moved


@pytest.mark.parametrize("name", ["es", "greedy", "truncated_reverse", "evograd", "implicit"])
def test_a_window_for_an_estimator_without_one_names_those_with_one(name: str) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^estimator\.window is not an argument of \w+; arguments: .* \(estimator\.window "
        r"is taken by forward, exact_reverse, checkpointed_reverse, reversible and auto; ",
    ):
        metahpo.compose([f"estimator={name}", "+estimator.window=5"])


@pytest.mark.parametrize("window", [None, 3, 7])
def test_a_plain_run_scores_the_windowed_objective(window: int | None) -> None:
    """The outer loop scores its last iterate with a plain run (``metahpo.runner.meta_loss``):
    with ``estimator.window`` that score is the estimators' objective (the sum of the window
    ends' validation losses), not the final loss alone, so the last iterate competes with the
    estimates on the same scale."""
    from metahpo.runner import meta_loss

    task = quadratic(n_train=32, batch_size=8)
    specs = {n: HyperSpec(2, b) for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99))]}
    values = {"lr": torch.tensor([0.1, 0.05]), "momentum": torch.tensor([0.5, 0.3])}
    schedule = HyperSchedule(7, specs, values)
    want = ExactReverse(window=window).hypergradient(task, schedule)
    got = meta_loss(task, schedule, window=window)
    assert got["meta_loss"] == pytest.approx(want.meta_loss, rel=1e-10)
    if window is not None:
        assert got["final_val_loss"] == pytest.approx(want.metrics["final_val_loss"], rel=1e-10)
    if window == 3:  # three terms: well above the final loss alone
        assert got["meta_loss"] > 1.5 * meta_loss(task, schedule)["meta_loss"]


def test_the_last_iterate_is_scored_with_the_windowed_objective(tmp_path: Path) -> None:
    """A whole run with ``estimator.window``: the last iterate's score is the same objective as
    the estimates' (it was the final loss alone, which always won the selection)."""
    from metahpo.runner import meta_loss

    cfg = metahpo.compose(
        [
            *QUICK,
            "estimator=exact_reverse",
            "estimator.window=5",
            "outer.steps=3",
            "final.seeds=[0]",
        ]
    )
    out = metahpo.run(cfg, tmp_path)
    last = out["history"][-1]
    assert last["hypergradient"] is None
    setup = metahpo.build.build(cfg)
    schedule = setup.schedule.replace(
        {n: torch.tensor(v, dtype=torch.float64) for n, v in last["schedule"].items()}
    )
    want = ExactReverse(window=5).hypergradient(setup.task, schedule).meta_loss
    assert last["meta_loss"] == pytest.approx(want, rel=1e-6)
    assert last["meta_loss"] > 1.5 * meta_loss(setup.task, schedule)["meta_loss"]
