"""Evolution strategies: unbiased for the smoothed objective, variance 1/pairs, agrees with
forward mode for a small sigma, one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

import metahpo
from metahpo.estimators.es import EvolutionStrategies, antithetic_estimate
from metahpo.estimators.forward import ForwardMode
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import quadratic


def cubic(x: torch.Tensor) -> float:
    return float((torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * x**3).sum())


def test_mean_estimate_is_the_smoothed_gradient_and_variance_falls_as_one_over_pairs() -> None:
    """For f = sum c x^3 the smoothed gradient is 3 c (x^2 + sigma^2 s^2), not the gradient."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
    s = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    sigma = 0.4
    want = 3 * c * (x**2 + sigma**2 * s**2)
    g = torch.Generator().manual_seed(0)
    runs = {
        p: torch.stack([antithetic_estimate(cubic, x, s, sigma, p, g)[0] for _ in range(400)])
        for p in (2, 8)
    }
    mean, err = runs[8].mean(0), runs[8].std(0) / math.sqrt(400)
    assert bool(((mean - want).abs() <= 3 * err).all()), (mean, want, err)
    assert not bool(((mean - 3 * c * x**2).abs() <= 3 * err).all())  # the smoothing is real
    ratio = runs[2].var(0) / runs[8].var(0)
    assert bool(((ratio > 2.5) & (ratio < 6.0)).all()), ratio  # 4 expected
    _, stderr, values = antithetic_estimate(cubic, x, s, sigma, 8, g)
    assert len(values) == 16 and bool((stderr > 0).all())


def test_small_sigma_points_where_forward_mode_does() -> None:
    task = quadratic(n_train=32, batch_size=8)
    specs = {n: HyperSpec(2, b) for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99))]}
    values = {
        "lr": torch.tensor([0.1, 0.05]).double(),
        "momentum": torch.tensor([0.5, 0.3]).double(),
    }
    schedule = HyperSchedule(12, specs, values)
    exact = ForwardMode().hypergradient(task, schedule)
    es = EvolutionStrategies(sigma=1e-4, pairs=64).hypergradient(task, schedule)
    a = torch.cat([exact.grads[k] for k in specs])
    b = torch.cat([es.grads[k] for k in specs])
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99
    assert es.meta_loss == pytest.approx(exact.meta_loss, rel=1e-12)
    assert es.metrics["es_pairs"] == 64 and es.inner_steps == 129 * 12
    again = EvolutionStrategies(sigma=1e-4, pairs=64).hypergradient(task, schedule)
    assert all(torch.equal(es.grads[k], again.grads[k]) for k in specs)  # reproducible


def test_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = metahpo.run(
        [
            "experiment=smoke",
            "estimator=es",
            "estimator.pairs=2",
            "outer.steps=2",
            "progress=false",
            "final.seeds=[0]",
        ],
        tmp_path,
    )
    assert results["history"][0]["es_pairs"] == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.sigma=0", r"^estimator\.sigma=0 must be a number > 0 and < 1"),
        ("estimator.pairs=0", r"^estimator\.pairs=0 must be an integer >= 1"),
        ("estimator.pairs=2.5", r"^estimator\.pairs=2\.5 must be an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message):
        metahpo.compose(["estimator=es", override])


def _two_keys(horizon: int) -> HyperSchedule:
    specs = {n: HyperSpec(2, b) for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99))]}
    values = {
        "lr": torch.tensor([0.1, 0.05]).double(),
        "momentum": torch.tensor([0.5, 0.3]).double(),
    }
    return HyperSchedule(horizon, specs, values)


@pytest.mark.parametrize("case", ["quadratic", "digits_dropout", "digits_loss"])
def test_batched_samples_equal_the_sequential_loop(case: str) -> None:
    """``torch.func.vmap`` over the samples (weights, optimiser state, values and loss
    hyperparameters per run; per-step dropout masks shared, as each run draws them) gives the
    sequential loop's estimate to rounding."""
    from tests.conftest import small_digits
    from tests.test_evograd import loss_only

    if case == "quadratic":
        task, schedule = quadratic(n_train=32, batch_size=8), _two_keys(12)
    elif case == "digits_dropout":
        task, schedule = small_digits(dropout=0.3), _two_keys(8)
    else:
        task = small_digits()
        schedule = loss_only(task)
    one_by_one = EvolutionStrategies(sigma=0.01, pairs=3, batch=False)
    seq = one_by_one.hypergradient(task, schedule)
    bat = EvolutionStrategies(sigma=0.01, pairs=3).hypergradient(task, schedule)
    assert seq.metrics["es_batch"] == 0 and bat.metrics["es_batch"] == 6
    assert bat.meta_loss == seq.meta_loss  # the centre is a plain run either way
    for k in schedule.learned:
        torch.testing.assert_close(bat.grads[k], seq.grads[k], rtol=1e-10, atol=1e-12)
        assert bool(seq.grads[k].abs().max() > 0)


def test_the_memory_rule_chunks_or_falls_back_to_the_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Runs per vmap call: the most whose state and one step's activations (here 1 MiB, fixed)
    fit ``memory_mb``; fewer than 2: the sequential loop."""
    import metahpo.estimators.checkpointed_reverse as cr

    monkeypatch.setattr(cr, "graph_bytes_per_step", lambda flat, schedule, steps=2: 2**20)
    task, schedule = quadratic(n_train=32, batch_size=8), _two_keys(12)
    seq = EvolutionStrategies(sigma=0.01, pairs=4, batch=False).hypergradient(task, schedule)
    for memory_mb, runs in [(1.5, 0), (3.5, 3), (100.0, 8)]:
        hg = EvolutionStrategies(sigma=0.01, pairs=4, memory_mb=memory_mb).hypergradient(
            task, schedule
        )
        assert hg.metrics["es_batch"] == runs, memory_mb
        assert f"memory_mb={memory_mb}" in hg.metrics["es_batch_why"]
        for k in schedule.learned:
            torch.testing.assert_close(hg.grads[k], seq.grads[k], rtol=1e-10, atol=1e-12)
