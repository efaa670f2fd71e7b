"""metahpo.testing.check_estimator: passes the exact estimators, catches a wrong one."""

from __future__ import annotations

import pytest

from metahpo.core import Hypergradient
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.testing import check_estimator


def test_an_exact_estimator_passes_and_agrees_with_forward_mode_to_1e_10() -> None:
    result = check_estimator(ExactReverse())
    assert result.error_vs_forward < 1e-10
    assert result.error_vs_central < 1e-5
    assert set(result.grads) == {"lr", "momentum", "weight_decay"}
    assert all(float(g.abs().max()) > 0 for g in result.grads.values())


class HalfWrong:
    """Exact reverse with the last segment of every key scaled by 1.01."""

    name = "half_wrong"

    def hypergradient(self, task, schedule) -> Hypergradient:
        hg = ExactReverse().hypergradient(task, schedule)
        for g in hg.grads.values():
            g[-1] *= 1.01
        return hg


def test_a_one_percent_error_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"HalfWrong: relative error .* central differences"):
        check_estimator(HalfWrong())
