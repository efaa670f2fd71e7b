"""Hyperparameters of the training loss (label smoothing, L2 per group of parameters): every
estimator differentiates them exactly (forward mode through the mixed second derivative)."""

from __future__ import annotations

import pytest
import torch

import metahpo
from metahpo.core import StepBatch
from metahpo.estimators.checkpointed_reverse import CheckpointedReverse
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.reversible import Reversible
from metahpo.estimators.truncated_reverse import TruncatedReverse
from metahpo.optim import SGD, Adam
from metahpo.parameterisation import Linear, Log
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import assert_grads_close, central_differences, small_digits

HORIZON = 9
GROUPS = {"l2": {"hidden": ("0.*",), "out": ("2.*",)}}


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return small_digits()


def loss_schedule(task, optimizer=None, l2_param=None) -> HyperSchedule:  # type: ignore[no-untyped-def]
    optimizer = optimizer if optimizer is not None else SGD()
    lr = 0.1 if isinstance(optimizer, SGD) else 0.01
    specs = {
        "lr": HyperSpec(2, (0.0, 1.0), True),
        "label_smoothing": HyperSpec(3, (0.0, 0.5), True),
        "l2/hidden": HyperSpec(2, (0.0, 1.0), True, l2_param),
        "l2/out": HyperSpec(1, (0.0, 1.0), True),
    }
    values = {
        "lr": torch.tensor([lr, 0.8 * lr], dtype=torch.float64),
        "label_smoothing": torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64),
        "l2/hidden": torch.tensor([1e-2, 3e-2], dtype=torch.float64),
        "l2/out": torch.tensor([2e-2], dtype=torch.float64),
    }
    if isinstance(optimizer, SGD):
        specs["momentum"] = HyperSpec(1, (0.0, 0.99), False)
        values["momentum"] = torch.tensor([0.5], dtype=torch.float64)
    return HyperSchedule(HORIZON, specs, values, optimizer, GROUPS, task.loss_hyperparameters)


@pytest.mark.parametrize("optimizer", [SGD(), Adam()], ids=["sgd", "adam"])
def test_every_exact_estimator_agrees(digits, optimizer) -> None:  # type: ignore[no-untyped-def]
    schedule = loss_schedule(digits, optimizer)
    exact = ExactReverse().hypergradient(digits, schedule)
    for hvp in ("fwd_rev", "rev_rev"):
        for chunk in (None, 1, 2):
            got = ForwardMode(hvp=hvp, chunk_size=chunk).hypergradient(digits, schedule)
            assert got.meta_loss == pytest.approx(exact.meta_loss, rel=1e-12)
            assert_grads_close(got.grads, exact.grads, rtol=1e-10)
    checkpointed = CheckpointedReverse(stretch=4).hypergradient(digits, schedule)
    assert_grads_close(checkpointed.grads, exact.grads, rtol=1e-10)
    whole = TruncatedReverse(K=HORIZON).hypergradient(digits, schedule)  # K = T: exact
    assert_grads_close(whole.grads, exact.grads, rtol=1e-10)
    for key in ("label_smoothing", "l2/hidden", "l2/out"):
        assert bool((exact.grads[key] != 0).all())


def test_forward_matches_central_differences(digits) -> None:  # type: ignore[no-untyped-def]
    schedule = loss_schedule(digits)
    grads = ForwardMode().hypergradient(digits, schedule).grads
    assert_grads_close(grads, central_differences(digits, schedule), rtol=1e-6)


def test_with_another_parameterisation(digits) -> None:  # type: ignore[no-untyped-def]
    """Overlapping supports (knots) and log space for a loss hyperparameter."""
    for param, l2 in ((Linear(2), [1e-2, 3e-2]), (Log(2), [-4.0, -3.5])):
        schedule = loss_schedule(digits, l2_param=param)
        schedule = schedule.replace({"l2/hidden": torch.tensor(l2, dtype=torch.float64)})
        forward = ForwardMode().hypergradient(digits, schedule).grads
        assert_grads_close(forward, ExactReverse().hypergradient(digits, schedule).grads, 1e-10)
        assert_grads_close(forward, central_differences(digits, schedule), rtol=1e-6)


def test_the_loss_reads_the_batch_and_the_meta_objective_does_not(digits) -> None:  # type: ignore[no-untyped-def]
    params, buffers = digits.init_params()
    b = digits.batch(0)
    plain = digits.train_loss(params, buffers, b)
    zero = StepBatch(b[0], b[1], b.seed, {"label_smoothing": torch.tensor(0.0).double()})
    assert torch.allclose(digits.train_loss(params, buffers, zero), plain, rtol=1e-14)
    l2 = torch.tensor(0.1, dtype=torch.float64)
    with_l2 = StepBatch(b[0], b[1], b.seed, {"l2": l2})
    norm = sum(p.pow(2).sum() for p in params.values())
    assert torch.allclose(digits.train_loss(params, buffers, with_l2), plain + 0.05 * norm)
    smooth = StepBatch(b[0], b[1], b.seed, {"label_smoothing": torch.tensor(0.3).double()})
    assert float(digits.train_loss(params, buffers, smooth)) != pytest.approx(float(plain))
    assert digits.val_loss(params, buffers) == digits.val_loss(params, buffers)  # no batch


def test_reversible_refuses_in_one_line(digits) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(metahpo.ConfigError, match=r"^estimator=reversible .* schedule\.label"):
        Reversible().hypergradient(digits, loss_schedule(digits))


def test_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = metahpo.run(
        ["experiment=smoke", "schedule=loss", "progress=false", "outer.steps=2", "final.seeds=[0]"],
        tmp_path,
    )
    learned = results["learned_schedule"]
    assert {"label_smoothing", "l2"} <= set(learned)
    assert results["history"][0]["hypergradient"]["label_smoothing"] != [0.0, 0.0]


BAD = [
    (
        ["+schedule.dropout_rate={segments: 1, init: 0.1, bounds: [0, 1], learn: true}"],
        r"^schedule\.dropout_rate is not a hyperparameter of the sgd optimizer "
        r"\(metahpo\.optim\.SGD\) or of the task's loss; allowed: lr, momentum, weight_decay, "
        r"label_smoothing, l2$",
    ),
    (
        ["task=quadratic", "schedule=loss"],
        r"^schedule\.label_smoothing is not a hyperparameter .*allowed: .*l2",
    ),
    (
        [
            "schedule=loss",
            "schedule.label_smoothing.init=1.0",
            "schedule.label_smoothing.bounds=[0,1]",
        ],
        r"^schedule\.label_smoothing\.bounds=\[0\.0, 1\.0\]: the loss's label_smoothing must be "
        r">= 0 and < 1$",
    ),
    (["schedule=loss", "estimator=reversible"], r"^estimator=reversible"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=range(len(BAD)))
def test_bad_loss_hyperparameters_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message) as info:
        metahpo.build.build(metahpo.compose(overrides))
    assert "\n" not in str(info.value)
