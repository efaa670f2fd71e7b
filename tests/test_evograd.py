"""EvoGrad: points where the exact one-step hypergradient does, first-order only; refuses the
optimiser's hyperparameters in one line."""

from __future__ import annotations

import pytest
import torch

import metahpo
from metahpo.estimators.evograd import EvoGrad
from metahpo.estimators.greedy import Greedy
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import small_digits
from tests.test_loss_hyperparameters import loss_schedule

LOSS_KEYS = ("label_smoothing", "l2/hidden", "l2/out")


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return small_digits()


def loss_only(task) -> HyperSchedule:  # type: ignore[no-untyped-def]
    s = loss_schedule(task)
    specs = {
        k: HyperSpec(v.n_segments, v.bounds, k in LOSS_KEYS, v.param) for k, v in s.specs.items()
    }
    return HyperSchedule(s.horizon, specs, s.values, s.optimizer, s.groups, s.loss)


def test_agrees_with_the_exact_one_step_hypergradient(digits) -> None:  # type: ignore[no-untyped-def]
    schedule = loss_only(digits)
    exact = Greedy(W=1).hypergradient(digits, schedule)  # reverse mode over each single step
    evo = EvoGrad(K=4).hypergradient(digits, schedule)
    a = torch.cat([exact.grads[k] for k in LOSS_KEYS])
    b = torch.cat([evo.grads[k] for k in LOSS_KEYS])
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9
    assert evo.schedule is not None and not torch.equal(
        evo.schedule.values["label_smoothing"], schedule.values["label_smoothing"]
    )  # it moved online
    again = EvoGrad(K=4).hypergradient(digits, schedule)
    assert all(torch.equal(evo.grads[k], again.grads[k]) for k in LOSS_KEYS)  # reproducible
    assert bool((evo.grads["lr"] == 0).all())


def test_refuses_the_optimisers_hyperparameters(digits) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        metahpo.ConfigError,
        match=r"^estimator=evograd sees hyperparameters of "
        r"the training loss only; schedule\.lr is the optimiser's",
    ):
        EvoGrad().hypergradient(digits, loss_schedule(digits))


def test_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fixed = [f"schedule.{n}.learn=false" for n in ("lr", "momentum", "weight_decay")]
    results = metahpo.run(
        [
            "experiment=smoke",
            "schedule=loss",
            "estimator=evograd",
            *fixed,
            "outer.steps=2",
            "progress=false",
            "final.seeds=[0]",
        ],
        tmp_path,
    )
    assert results["history"][0]["online"] is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.K=1", r"^estimator\.K=1 must be an integer >= 2"),
        ("estimator.sigma=0", r"^estimator\.sigma=0 must be a number > 0"),
        ("estimator.tau=-1", r"^estimator\.tau=-1 must be a number > 0"),
        ("estimator.update=adam", r"^estimator\.update='adam'"),
    ],
)
def test_bad_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message):
        metahpo.compose(["estimator=evograd", override])
