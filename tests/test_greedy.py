"""Greedy online learning: its windows are exact short-horizon hypergradients, its steps move the
schedule during the run, and the outer loop and CLI treat it as an online estimator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metahpo
from metahpo.core import ConfigError
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.greedy import Greedy
from metahpo.estimators.truncated_reverse import TruncatedReverse
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.validation import check_arguments
from tests.conftest import assert_grads_close, make_schedule, quadratic, small_digits

TASKS = {"quadratic": quadratic, "digits": small_digits}
STEPS = {"lr": 0.01, "momentum": 0.01, "weight_decay": 1e-4}


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize(("horizon", "segments"), [(1, 1), (6, 3)])
def test_one_window_is_the_exact_hypergradient(task_name: str, horizon: int, segments: int) -> None:
    """W = horizon (one-step horizon: W = T = 1): the only window is the exact hypergradient."""
    task = TASKS[task_name]()
    schedule = make_schedule(horizon, segments, seed=6)
    greedy = Greedy(W=horizon, step_size=STEPS).hypergradient(task, schedule)
    exact = ExactReverse().hypergradient(task, schedule)
    assert greedy.meta_loss == pytest.approx(exact.meta_loss, rel=1e-12)
    assert_grads_close(greedy.grads, exact.grads, rtol=1e-10)
    assert len(greedy.metrics["greedy_windows"]) == 1


@pytest.mark.parametrize("task_name", TASKS)
def test_windows_are_exact_then_truncated_hypergradients(task_name: str) -> None:
    """T=6, W=3, two segments aligned with the windows. Window 0 is the exact hypergradient of
    a 3-step run; window 1 (segment 1 not yet stepped) is truncated reverse with K=3."""
    task = TASKS[task_name]()
    schedule = make_schedule(6, 2, seed=7)
    hg = Greedy(W=3, step_size=STEPS).hypergradient(task, schedule)
    first, second = hg.metrics["greedy_windows"]
    assert first["steps"] == [0, 3] and second["steps"] == [3, 6]
    short = HyperSchedule(
        3,
        {n: HyperSpec(1, (float("-inf"), float("inf"))) for n in HYPERPARAMETERS},
        {n: schedule.values[n][:1] for n in HYPERPARAMETERS},
    )
    exact3 = ExactReverse().hypergradient(task, short)
    trunc = TruncatedReverse(K=3).hypergradient(task, schedule)
    for n in HYPERPARAMETERS:
        assert set(first[n]) <= {"0"} and set(second[n]) <= {"1"}  # only the segment in force
        assert first[n].get("0", 0.0) == pytest.approx(float(exact3.grads[n][0]), rel=1e-10)
        assert second[n].get("1", 0.0) == pytest.approx(float(trunc.grads[n][1]), rel=1e-10)
        torch.testing.assert_close(  # grads are the per-segment sums over windows
            hg.grads[n],
            torch.tensor([first[n].get("0", 0.0), second[n].get("1", 0.0)], dtype=torch.float64),
            rtol=1e-12,
            atol=0,
        )
    assert first["val_loss"] == pytest.approx(exact3.meta_loss, rel=1e-12)


def test_w1_lr_only_is_hypergradient_descent(quad) -> None:
    """W=1, one learned lr segment, no momentum or decay: h_t = -grad L_val(theta_{t+1}) . g_t
    and lr_{t+1} = lr_t - s h_t (Baydin et al. 2018 with the validation loss), written out."""
    horizon, s, lr0 = 10, 0.05, 0.05
    specs = {
        "lr": HyperSpec(1, (float("-inf"), float("inf"))),
        "momentum": HyperSpec(1, (0.0, 1.0), learn=False),
        "weight_decay": HyperSpec(1, (0.0, 1.0), learn=False),
    }
    schedule = HyperSchedule(horizon, specs, {"lr": lr0, "momentum": 0.0, "weight_decay": 0.0})
    hg = Greedy(W=1, update="gradient", step_size={"lr": s}).hypergradient(quad, schedule)

    params, buffers = quad.init_params()
    w, lr, hs = params["weight"], lr0, []
    for t in range(horizon):
        wt = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(quad.train_loss({"weight": wt}, buffers, quad.batch(t)), wt)
        w = (wt - lr * g).detach().requires_grad_(True)
        (gv,) = torch.autograd.grad(quad.val_loss({"weight": w}, buffers), w)
        h = -float((gv * g).sum())
        hs.append(h)
        lr -= s * h
    got = [wdw["lr"]["0"] for wdw in hg.metrics["greedy_windows"]]
    assert got == pytest.approx(hs, rel=1e-10)
    assert float(hg.schedule.values["lr"][0]) == pytest.approx(lr, rel=1e-12)
    assert float(hg.grads["lr"][0]) == pytest.approx(sum(hs), rel=1e-10)
    assert torch.equal(hg.grads["momentum"], torch.zeros(1, dtype=torch.float64))


def test_updates_move_the_schedule_during_the_run(digits_small) -> None:
    schedule = make_schedule(12, 2, seed=8)
    sign = Greedy(W=2, update="sign", step_size=STEPS).hypergradient(digits_small, schedule)
    plain = Greedy(W=2, update="gradient", step_size=STEPS).hypergradient(digits_small, schedule)
    for n in HYPERPARAMETERS:
        # sign steps: each of the 3 windows per segment moves its value by exactly +-s
        moved = (sign.schedule.values[n] - schedule.values[n]) / STEPS[n]
        assert bool((moved.abs() >= 1 - 1e-9).all())
        torch.testing.assert_close(moved, moved.round(), rtol=0, atol=1e-9)
        # plain steps, no bounds: the end schedule is the start minus s times the summed grads
        torch.testing.assert_close(
            plain.schedule.values[n],
            schedule.values[n] - STEPS[n] * plain.grads[n],
            rtol=1e-12,
            atol=1e-15,
        )
    # the moved values are used during the run: greedy's run differs from a plain one
    assert sign.meta_loss != pytest.approx(
        ExactReverse().hypergradient(digits_small, schedule).meta_loss, rel=1e-6
    )


def test_updates_respect_bounds(quad) -> None:
    specs = {n: HyperSpec(2, (0.0, 0.06)) for n in HYPERPARAMETERS}
    schedule = HyperSchedule(8, specs, {"lr": 0.05, "momentum": 0.05, "weight_decay": 0.0})
    big = {"lr": 1.0, "momentum": 1.0, "weight_decay": 1.0}
    hg = Greedy(W=1, step_size=big).hypergradient(quad, schedule)
    for n in HYPERPARAMETERS:
        v = hg.schedule.values[n]
        assert bool(((v >= 0.0) & (v <= 0.06)).all()), (n, v)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"W": 0}, r"^estimator\.W=0 must be an integer >= 1$"),
        ({"W": 1.5}, r"^estimator\.W=1\.5 must be an integer"),
        ({"update": "adam"}, r"^estimator\.update='adam' is unknown; allowed: sign, gradient$"),
        ({"step_size": {"lr": -1.0}}, r"^estimator\.step_size\.lr=-1\.0 must be a number > 0$"),
    ],
)
def test_bad_settings_are_one_line_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_arguments("estimator", Greedy, kwargs)


def test_checks_against_the_schedule_before_any_training(monkeypatch, quad) -> None:
    def no_training(step: int):  # type: ignore[no-untyped-def]
        raise AssertionError("trained before checking the settings")

    monkeypatch.setattr(quad, "batch", no_training)
    with pytest.raises(ConfigError, match=r"^estimator\.W=9 must be .* horizon \(8\)$"):
        Greedy(W=9).hypergradient(quad, make_schedule(8, 2))
    with pytest.raises(ConfigError, match=r"^estimator\.step_size has no entry for momentum$"):
        Greedy(W=2, step_size={"lr": 0.1, "weight_decay": 1e-4}).hypergradient(
            quad, make_schedule(8, 2)
        )


def test_outer_loop_takes_the_online_schedule() -> None:
    cfg = metahpo.compose(
        [
            "task=quadratic",
            "horizon=8",
            "estimator=greedy",
            "estimator.W=2",
            "outer.steps=3",
            "schedule=constant",
            "schedule.lr.init=0.05",
            "final.seeds=[0]",
            "progress=false",
        ]
    )
    out = metahpo.run(cfg)
    history = out["history"]
    online = [h for h in history if h.get("online")]
    assert len(online) == 3
    for before, after in zip(online, online[1:], strict=False):
        assert after["schedule"] == before["schedule_after"]  # the next iterate
    assert history[-1]["schedule"] == online[-1]["schedule_after"]  # last iterate, scored plainly
    assert history[-1]["hypergradient"] is None
    assert out["selected_outer_step"] == 3
    assert out["learned_schedule"]["lr"]["values"] == online[-1]["schedule_after"]["lr"]
    assert online[0]["schedule_after"]["lr"] != online[0]["schedule"]["lr"]


@pytest.mark.slow
def test_cli_multirun_of_the_four_estimators(tmp_path: Path) -> None:
    """One sweep, same task, seed and budget; every results.json has what a comparison needs."""
    names = ["forward", "exact_reverse", "truncated_reverse", "greedy"]
    cmd = [
        sys.executable,
        "-m",
        "metahpo",
        "-m",
        f"estimator={','.join(names)}",
        "experiment=smoke",
        "task.hidden=[16]",
        "progress=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert sorted(r["estimator"] for r in results) == sorted(names)
    for r in results:
        assert r["seed"] == 0 and r["horizon"] == 20 and r["outer_steps"] == 2
        steps = [h for h in r["history"] if h["hypergradient"] is not None]
        assert len(steps) == 2 and all(h["meta_loss"] > 0 for h in steps)
        assert all(h["peak_memory_mb"] >= 0 for h in steps)
        assert r["wall_time_seconds"] > 0 and r["estimator_peak_memory_mb"] is not None
        assert 0.0 <= r["final"]["learned"]["test_accuracy"] <= 1.0
    by_name = {r["estimator"]: r for r in results}
    # K = horizon in smoke: the three exact estimators take the same path
    for n in ("exact_reverse", "truncated_reverse"):
        assert [h["meta_loss"] for h in by_name[n]["history"]] == pytest.approx(
            [h["meta_loss"] for h in by_name["forward"]["history"]], rel=1e-4
        )
