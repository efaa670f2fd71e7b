"""Random layers: dropout masks are drawn per step from the batch's seed, so runs repeat and
the exact estimators agree on a model with dropout (float64)."""

from __future__ import annotations

import pytest
import torch

import metahpo
from metahpo.core import StepBatch
from metahpo.estimators.checkpointed_reverse import CheckpointedReverse
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from tests.conftest import assert_grads_close, central_differences, make_schedule, small_digits

HORIZON = 9


@pytest.fixture(scope="module")
def dropout_digits():  # type: ignore[no-untyped-def]
    return small_digits(dropout=0.3)


def test_masks_are_per_step_and_fixed_by_the_seed(dropout_digits) -> None:
    task = dropout_digits
    assert task.random_layers
    params, buffers = task.init_params()
    b0, b1 = task.batch(0), task.batch(1)
    assert isinstance(b0, StepBatch) and b0.seed != b1.seed
    torch.manual_seed(123)
    first = task.train_loss(params, buffers, b0)
    torch.manual_seed(456)  # the global generator does not matter
    assert torch.equal(task.train_loss(params, buffers, b0), first)
    # the masks are real: another seed on the same examples gives another loss
    other = StepBatch(b0[0], b0[1], b0.seed + 1)
    assert not torch.equal(task.train_loss(params, buffers, other), first)
    # a plain tuple draws from the global generator, as torch does
    torch.manual_seed(0)
    a = task.train_loss(params, buffers, tuple(b0))
    assert not torch.equal(task.train_loss(params, buffers, tuple(b0)), a)


@pytest.mark.parametrize("sharing", [1, 3, "T"])
@pytest.mark.parametrize("hvp", ["fwd_rev", "rev_rev"])
def test_exact_estimators_agree_with_dropout(dropout_digits, sharing, hvp: str) -> None:
    schedule = make_schedule(HORIZON, sharing)
    exact = ExactReverse().hypergradient(dropout_digits, schedule)
    forward = ForwardMode(hvp=hvp).hypergradient(dropout_digits, schedule)
    checkpointed = CheckpointedReverse(stretch=4).hypergradient(dropout_digits, schedule)
    assert forward.meta_loss == pytest.approx(exact.meta_loss, rel=1e-12)
    assert_grads_close(forward.grads, exact.grads, rtol=1e-10)
    assert_grads_close(checkpointed.grads, exact.grads, rtol=1e-10)


def test_dropout_hypergradient_matches_central_differences(dropout_digits) -> None:
    schedule = make_schedule(HORIZON, 3)
    grads = ForwardMode().hypergradient(dropout_digits, schedule).grads
    assert_grads_close(grads, central_differences(dropout_digits, schedule), rtol=1e-6)


def test_two_runs_with_dropout_are_identical(tmp_path) -> None:
    args = ["experiment=smoke", "progress=false", "task.n_train=256", "task.dropout=0.2"]
    a = metahpo.run(args, tmp_path / "a")
    torch.manual_seed(99)  # whatever the global generator holds
    b = metahpo.run(args, tmp_path / "b")
    assert [h["meta_loss"] for h in a["history"]] == [h["meta_loss"] for h in b["history"]]
    for label in ("learned", "baseline"):
        losses = [[r["test_loss"] for r in x["final"][label]["per_seed"]] for x in (a, b)]
        assert losses[0] == losses[1]


def test_bad_dropout_is_one_line() -> None:
    with pytest.raises(metahpo.ConfigError, match=r"^task\.dropout=1\.0 must be a number >= 0"):
        metahpo.compose(["task.dropout=1.0"])
