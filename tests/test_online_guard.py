"""The online estimators' guard (``estimator.accept=meta_loss``): a step that raises the
window-end validation loss is undone and the online step halved; the halving is checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metahpo
from metahpo.core import ConfigError
from metahpo.estimators.evograd import EvoGrad
from metahpo.estimators.greedy import Greedy
from metahpo.estimators.pes import PersistentES
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import quadratic, small_digits
from tests.test_evograd import loss_only

# One learned lr on the quadratic, from 0.3 with sign steps of 1.5: the first step lands at
# 1.8, past the edge of stability, and two windows later the loss has risen 500-fold.
STEP = {"lr": 1.5}


def edge_schedule(horizon: int = 40) -> HyperSchedule:
    specs = {
        "lr": HyperSpec(1, (0.0, 3.0)),
        "momentum": HyperSpec(1, (0.0, 0.99), learn=False),
        "weight_decay": HyperSpec(1, (0.0, 1.0), learn=False),
    }
    return HyperSchedule(horizon, specs, {"lr": 0.3, "momentum": 0.0, "weight_decay": 0.0})


def test_a_step_that_raises_the_loss_is_undone_and_the_step_halved() -> None:
    task, schedule = quadratic(), edge_schedule()
    free = Greedy(W=4, step_size=STEP).hypergradient(task, schedule)
    losses = [w["val_loss"] for w in free.metrics["greedy_windows"]]
    assert max(losses[2:]) > 100 * min(losses[:2])  # the problem: a step raises the loss
    assert "online_rejections" not in free.metrics  # off by default
    guarded_est = Greedy(W=4, step_size=STEP, accept="meta_loss", tolerance=0.1)
    hg = guarded_est.hypergradient(task, schedule)
    windows, rejected = hg.metrics["greedy_windows"], hg.metrics["online_rejections"]
    assert rejected[0]["steps"] == [8, 12] and rejected[0]["val_loss"] == losses[2]
    assert rejected[0]["limit"] == pytest.approx(1.1 * min(losses[:2]), rel=1e-12)
    assert guarded_est.scale == hg.metrics["online_scale"] == 0.5 ** len(rejected)
    # back to the values of window [4, 8) (lr 1.8), then a halved step down along the
    # rejected window's estimate: lr 1.8 - 0.75 for window [12, 16)
    after = [w["val_loss"] for w in windows[3:]]
    assert max(after) < 0.1 * max(losses[3:])  # the rise does not go on
    assert hg.meta_loss < free.meta_loss
    # the same run with a tolerance no rise reaches is the unguarded run, bit for bit
    loose = Greedy(W=4, step_size=STEP, accept="meta_loss", tolerance=1e9)
    same = loose.hypergradient(task, schedule)
    assert same.meta_loss == free.meta_loss and torch.equal(same.grads["lr"], free.grads["lr"])
    assert same.metrics["online_rejections"] == [] and loose.scale == 1.0


def test_the_halving_carries_over_to_the_next_call() -> None:
    task, schedule = quadratic(), edge_schedule()
    est = Greedy(W=4, step_size=STEP, accept="meta_loss")
    est.hypergradient(task, schedule)
    scale = est.scale
    assert scale < 1 and est.state_dict() == {"scale": scale}
    fresh = Greedy(W=4, step_size=STEP, accept="meta_loss")
    fresh.load_state_dict(est.state_dict())
    a, b = est.hypergradient(task, schedule), fresh.hypergradient(task, schedule)
    assert torch.equal(a.schedule.values["lr"], b.schedule.values["lr"])  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["pes", "evograd"])
def test_pes_and_evograd_share_the_guard(name: str) -> None:
    """With a tolerance no rise reaches the guarded run is the unguarded one; with a zero
    tolerance every rise is rejected and halves the step."""
    if name == "pes":
        task, schedule = quadratic(), edge_schedule(24)

        def make(**kw):  # type: ignore[no-untyped-def]
            return PersistentES(K=4, pairs=2, step_size=STEP, **kw)

        key = "lr"
    else:
        task = small_digits()
        schedule = loss_only(task)

        def make(**kw):  # type: ignore[no-untyped-def]  # steps big enough to raise the loss
            return EvoGrad(K=2, step_size={"label_smoothing": 0.2, "l2": 1.0}, **kw)

        key = "label_smoothing"
    free = make().hypergradient(task, schedule)
    loose = make(accept="meta_loss", tolerance=1e9).hypergradient(task, schedule)
    assert loose.meta_loss == free.meta_loss
    assert torch.equal(loose.schedule.values[key], free.schedule.values[key])  # type: ignore[union-attr]
    strict = make(accept="meta_loss", tolerance=0.0)
    hg = strict.hypergradient(task, schedule)
    assert len(hg.metrics["online_rejections"]) >= 1
    assert strict.scale == 0.5 ** len(hg.metrics["online_rejections"])
    assert all(r["val_loss"] > r["limit"] for r in hg.metrics["online_rejections"])


QUICK = [
    "task=quadratic",
    "experiment=smoke",
    "progress=false",
    "horizon=40",
    "estimator=greedy",
    "estimator.W=4",
    "estimator.accept=meta_loss",
    "estimator.step_size={lr: 1.5}",
    "schedule.lr.segments=1",
    "schedule.lr.init=0.3",
    "schedule.lr.bounds=[0.0,3.0]",
    "schedule.momentum.learn=false",
    "schedule.momentum.segments=1",
    "schedule.momentum.init=0.0",
    "schedule.weight_decay.learn=false",
    "schedule.weight_decay.segments=1",
]


def test_resume_repeats_the_guarded_run(tmp_path: Path) -> None:
    straight = metahpo.run(metahpo.compose([*QUICK, "outer.steps=3"]))
    metahpo.run(metahpo.compose([*QUICK, "outer.steps=1"]), tmp_path / "first")
    again = [*QUICK, "outer.steps=3", f"resume={tmp_path / 'first'}"]
    resumed = metahpo.run(metahpo.compose(again))
    scales = [h["online_scale"] for h in straight["history"] if "online_scale" in h]
    assert scales[0] < 1 and scales == sorted(scales, reverse=True)  # halved, and kept
    assert [h.get("hypergradient") for h in resumed["history"]] == [
        h.get("hypergradient") for h in straight["history"]
    ]
    assert [h.get("online_scale") for h in resumed["history"]] == [
        h.get("online_scale") for h in straight["history"]
    ]
    assert resumed["learned_schedule"] == straight["learned_schedule"]


@pytest.mark.parametrize("name", ["greedy", "pes", "evograd"])
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.accept=loss", r"^estimator\.accept='loss' is unknown; allowed: finite, "),
        ("estimator.tolerance=-0.1", r"^estimator\.tolerance=-0\.1 must be a number >= 0"),
    ],
)
def test_bad_settings_are_one_line(name: str, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        metahpo.compose([f"estimator={name}", override])
