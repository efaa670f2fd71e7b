"""Reversible learning: exact reversal of the fixed-point run, exact hypergradients, refusals.

The estimator trains on fixed-point weights (radix 2^-44) with the momentum rounded to a
multiple of 2^-30. The schedules here use momenta that are multiples of 2^-30 (:func:`dyadic`),
so the only difference from the float64 run that forward mode and exact reverse differentiate
is the rounding of weights and velocity to 2^-44 (about 6e-14 per step): their hypergradients
agree to 1e-10 relative, the same tolerance the other exact estimators are held to.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import metahpo
from benchmarks.reversible import lenet_digits
from metahpo.build import build
from metahpo.core import ConfigError, DivergenceError
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.reversible import InfoBuffer, Reversible
from metahpo.inner import FlatTask, Steps, train
from metahpo.optim import SGD, Adam
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import (
    SHARING,
    assert_grads_close,
    central_differences,
    make_schedule,
    quadratic,
    small_digits,
)
from tests.test_batchnorm import tiny_wrn

LAYERS = {"first": ("0.*",), "last": ("2.*",)}  # small_digits: Linear, Tanh, Linear


def dyadic(schedule: HyperSchedule, bits: int = 30) -> HyperSchedule:
    """The schedule with every momentum value rounded to a multiple of 2^-bits."""
    return schedule.replace(
        {
            k: torch.round(v * 2**bits) / 2**bits
            for k, v in schedule.values.items()
            if k.split("/")[0] == "momentum"
        }
    )


def test_info_buffer_push_pop_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    buf = InfoBuffer(50, "cpu")
    digits = []
    for i in range(200):  # bases from 1 to 2^31, scalar and per element
        m = torch.randint(1, 2**31 + 1, (50,), generator=g) if i % 2 else torch.tensor(7)
        r = torch.remainder(torch.randint(0, 2**62, (50,), generator=g), m)
        buf.push(r, m)
        digits.append((r, m))
    bits = buf.bits()
    assert float(bits.min()) > 200 * 2.5  # log2(7) = 2.8 per push at least on average
    for r, m in reversed(digits):
        assert torch.equal(buf.pop(m), r)
    assert buf.empty() and not bool(buf.count.any())


BASES = st.one_of(
    st.just(1), st.just(2), st.integers(1, 40), st.integers(2**30 - 64, 2**30), st.just(2**31)
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.lists(BASES, min_size=3, max_size=3), st.integers(0, 2**62)),
        max_size=300,
    ),
    scalar=st.booleans(),
)
def test_info_buffer_random_pushes_and_pops(
    ops: list[tuple[bool, list[int], int]], scalar: bool
) -> None:
    """Interleaved pushes and pops with random bases (1, small, near 2^30, 2^31; scalar or per
    element): every pop returns the digit pushed last, and popping everything empties it."""
    buf = InfoBuffer(3, "cpu")
    stack: list[tuple[Tensor, Tensor]] = []
    for push, bases, seed in ops:
        m = torch.tensor(bases[0] if scalar else bases)
        if push or not stack:
            r = torch.remainder(torch.tensor([seed, seed // 3, seed // 7]), m)
            buf.push(r, m)
            stack.append((r, m))
        else:
            r, m = stack.pop()
            assert torch.equal(buf.pop(m), r)
    while stack:
        r, m = stack.pop()
        assert torch.equal(buf.pop(m), r)
    assert buf.empty()


def test_info_buffer_stores_about_the_information_pushed() -> None:
    """Base 2 (one bit a push): 10,000 pushes fill about 10,000 / 62 words of 64 bits per
    element, and the words allocated stay within twice those used (rows grow by doubling)."""
    buf = InfoBuffer(4, "cpu")
    g = torch.Generator().manual_seed(1)
    pushed = [torch.randint(0, 2, (4,), generator=g) for _ in range(10_000)]
    for r in pushed:
        buf.push(r, torch.tensor(2))
    assert torch.equal(buf.count, torch.full((4,), 10_000 // 62))
    assert 10_000 <= float(buf.bits().min()) <= 10_000 * 64 / 62 + 64
    assert len(buf.words) <= 2 * int(buf.count.max()) + 2
    for r in reversed(pushed):
        assert torch.equal(buf.pop(torch.tensor(2)), r)
    assert buf.empty()


def _long_schedule(horizon: int) -> HyperSchedule:
    """Per-step momentum cycling through 0, 0.01, 0.05, 0.3, 0.5, 0.9, 0.99 (stored, then
    buffered), lr 0.05 and weight decay 1e-3."""
    cycle = torch.tensor([0.0, 0.01, 0.05, 0.3, 0.5, 0.9, 0.99], dtype=torch.float64)
    values = {
        "lr": torch.full((horizon,), 0.05, dtype=torch.float64),
        "momentum": cycle.repeat(horizon // len(cycle) + 1)[:horizon],
        "weight_decay": torch.full((horizon,), 1e-3, dtype=torch.float64),
    }
    specs = {k: HyperSpec(horizon, (-1.0, 1.0)) for k in values}
    return dyadic(HyperSchedule(horizon, specs, values, SGD()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reversal_recovers_the_initial_state_bit_for_bit(dtype: torch.dtype) -> None:
    """T = 1000 on a digits MLP with momenta from 0 to 0.99: the reverse sweep ends at the
    quantised initial weights and a zero velocity exactly, with the buffer empty."""
    task = small_digits(dtype=dtype, hidden=(16,), n_train=128)
    est = Reversible()
    hg = est.hypergradient(task, _long_schedule(1000))
    W, V, W0 = est.recovered
    want = torch.round(FlatTask(task).init_state().theta.double() * 2.0**44).to(torch.int64)
    assert torch.equal(W0, want) and torch.equal(W, want)
    assert torch.equal(V, torch.zeros_like(V))
    m = hg.metrics
    assert m["stored_velocity_steps"] == 3 * 1000 // 7 + 1  # momenta 0, 0.01, 0.05
    assert m["buffered_steps"] == 1000 - m["stored_velocity_steps"]
    # about log2(1/mu) bits per buffered step; each push is in base k <= ceil(2^30 / n)
    n = torch.round(torch.tensor([0.3, 0.5, 0.9, 0.99], dtype=torch.float64) * 2**30)
    most = float(torch.log2(torch.ceil(2**30 / n)).mean())
    assert 0.5 * m["bound_bits_per_param_step"] < m["buffer_bits_per_param_step"] <= most


def test_reversal_is_bit_exact_on_lenet() -> None:
    """LeNet-5 (44k parameters, ReLU, max-pool, float32) on digits upscaled in memory to 28x28,
    T = 60 with the same momenta from 0 to 0.99: the reverse sweep ends at the quantised
    initial weights and a zero velocity exactly (T = 1000: ``benchmarks.reversible --lenet``)."""
    task = lenet_digits(n_train=64, batch_size=8)
    est = Reversible()
    schedule = _long_schedule(60)
    hg = est.hypergradient(task, schedule)
    W, V, W0 = est.recovered
    want = torch.round(FlatTask(task).init_state().theta.double() * 2.0**44).to(torch.int64)
    assert W.numel() == 44_426
    assert torch.equal(W0, want) and torch.equal(W, want)
    assert torch.equal(V, torch.zeros_like(V))
    assert hg.metrics["stored_velocity_steps"] == int((schedule.values["momentum"] < 1 / 16).sum())
    assert hg.metrics["buffered_steps"] == 60 - hg.metrics["stored_velocity_steps"]


def test_a_wrong_bit_in_the_reverse_sweep_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the reverse sweep recomputed a gradient differently, the reversal must not end at the
    initial state, and the estimator says so rather than return a wrong result."""
    import metahpo.estimators.reversible as rev

    calls = {"n": 0}
    real = rev._grad_and_hvp_fn

    def perturbed(flat, w, batch, hvp=True):  # type: ignore[no-untyped-def]
        g, fn = real(flat, w, batch, hvp)
        calls["n"] += hvp
        return (g * (1 + 1e-9) if hvp and calls["n"] == 3 else g), fn

    monkeypatch.setattr(rev, "_grad_and_hvp_fn", perturbed)
    with pytest.raises(DivergenceError, match=r"^estimator=reversible: the reverse sweep did not"):
        Reversible().hypergradient(small_digits(), dyadic(make_schedule(9, 3)))


def test_fixed_point_run_is_close_to_the_float_run() -> None:
    """Final weights of the fixed-point run (T = 200) against the float64 run of the same
    schedule: relative difference below 1e-11."""
    task = small_digits()
    schedule = _long_schedule(200)
    est = Reversible()
    est.hypergradient(task, schedule)
    flat = FlatTask(task)
    steps = Steps(flat, schedule)
    with torch.no_grad():
        ref = train(flat, steps, steps.init_state(flat), 200).theta
    got = est.recovered_final
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 1e-11


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("init", ["nonzero", "zero_mom_wd"])
def test_equals_forward_mode_and_exact_reverse(sharing: str, init: str) -> None:
    task = small_digits()
    schedule = dyadic(make_schedule(9, SHARING[sharing], init, seed=1))
    rev = Reversible().hypergradient(task, schedule)
    fwd = ForwardMode().hypergradient(task, schedule)
    exact = ExactReverse().hypergradient(task, schedule)
    assert rev.meta_loss == pytest.approx(fwd.meta_loss, rel=1e-12)
    assert_grads_close(rev.grads, fwd.grads, rtol=1e-10)
    assert_grads_close(rev.grads, exact.grads, rtol=1e-10)
    if init == "zero_mom_wd":  # momentum 0: every step stores the velocity
        assert rev.metrics["stored_velocity_steps"] == 9
        assert float(rev.grads["momentum"][-1]) != 0.0


def test_per_layer_groups_and_quadratic() -> None:
    """Per-layer lr and momentum (a base per coordinate in the buffer), and the quadratic."""
    task = small_digits()
    groups = {"lr": LAYERS, "momentum": LAYERS}
    schedule = dyadic(make_schedule(9, 2, seed=4, groups=groups))
    rev = Reversible().hypergradient(task, schedule)
    assert_grads_close(rev.grads, ForwardMode().hypergradient(task, schedule).grads, 1e-10)
    q = dyadic(make_schedule(12, 3, seed=2))
    got = Reversible().hypergradient(quadratic(), q).grads
    assert_grads_close(got, ForwardMode().hypergradient(quadratic(), q).grads, 1e-10)


def test_matches_central_differences() -> None:
    task = small_digits()
    schedule = dyadic(make_schedule(9, 9, seed=3))
    hg = Reversible().hypergradient(task, schedule)
    assert_grads_close(hg.grads, central_differences(task, schedule), rtol=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (Adam(), r"^estimator=reversible reverses SGD only, not optimizer=adam; use forward"),
        (SGD(nesterov=True), r"^estimator=reversible cannot reverse optimizer\.nesterov=true"),
        (SGD(average=True), r"^estimator=reversible cannot reverse optimizer\.average=true"),
    ],
)
def test_other_optimisers_are_refused_before_training(
    monkeypatch: pytest.MonkeyPatch, optimizer, message: str
) -> None:  # type: ignore[no-untyped-def]
    task = small_digits()
    monkeypatch.setattr(task, "batch", lambda step: pytest.fail("trained before refusing"))
    schedule = make_schedule(6, 2, optimizer=optimizer)
    with pytest.raises(ConfigError, match=message):
        Reversible().hypergradient(task, schedule)


def test_refusals_from_config_and_batch_norm() -> None:
    base = ["task=quadratic", "horizon=8", "schedule=constant", "estimator=reversible"]
    with pytest.raises(ConfigError, match=r"^estimator=reversible reverses SGD only"):
        adam = ["task=quadratic", "horizon=10", "schedule=adam", "optimizer=adam"]
        build(metahpo.compose([*adam, "estimator=reversible"]))
    with pytest.raises(ConfigError, match=r"^estimator\.radix_bits=70 must be an integer"):
        build(metahpo.compose([*base, "estimator.radix_bits=70"]))
    with pytest.raises(ConfigError, match=r"^estimator=reversible cannot reverse batch-norm"):
        Reversible().hypergradient(tiny_wrn(), make_schedule(2, 1))
    got = metahpo.hypergradient(metahpo.compose([*base, "schedule.momentum.init=0.5"]))
    want = metahpo.hypergradient(
        metahpo.compose([*base[:-1], "estimator=forward", "schedule.momentum.init=0.5"])
    )
    assert_grads_close(got.grads, want.grads, rtol=1e-10)


def test_overflow_is_a_one_line_error() -> None:
    """At radix 2^-56 values must stay below 16; a large learning rate drives the weights past
    it, and the run stops with a one-line error, not a wrapped integer."""
    schedule = dyadic(make_schedule(9, 1, seed=0)).replace(
        {"lr": torch.tensor([50.0], dtype=torch.float64)}
    )
    with pytest.raises(DivergenceError, match=r"^estimator=reversible: fixed-point overflow at"):
        Reversible(radix_bits=56).hypergradient(small_digits(), schedule)
