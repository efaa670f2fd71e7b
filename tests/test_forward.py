"""Forward mode (FDS) is exact: central differences, an unrolled autograd reference, closed form."""

from __future__ import annotations

import pytest
import torch

from metahpo.estimators.forward import ForwardMode
from metahpo.inner import FlatTask
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from metahpo.schedule import HyperSchedule, HyperSpec
from tests.conftest import (
    EXACT_TASKS,
    SHARING,
    active_columns,
    assert_grads_close,
    central_differences,
    make_schedule,
    quadratic,
    small_digits,
    unrolled_reference,
)

TASKS = EXACT_TASKS


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("init", ["nonzero", "zero_mom_wd", "zero"])
def test_matches_central_differences(task_name: str, sharing: str, init: str) -> None:
    make_task, horizon = TASKS[task_name]
    task = make_task()
    schedule = make_schedule(horizon, SHARING[sharing], init)
    hg = ForwardMode().hypergradient(task, schedule)
    assert_grads_close(hg.grads, central_differences(task, schedule), rtol=1e-6)
    if init == "zero":  # lr = 0: the weights never move, only the lr columns are non-zero
        assert float(hg.grads["lr"].abs().max()) > 0
        assert float(hg.grads["momentum"].abs().max()) == 0.0


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("hvp", ["fwd_rev", "rev_rev"])
def test_matches_unrolled_autograd(task_name: str, sharing: str, hvp: str) -> None:
    make_task, horizon = TASKS[task_name]
    task = make_task(activation="relu") if task_name == "digits" else make_task()
    schedule = make_schedule(horizon, SHARING[sharing], seed=3)
    hg = ForwardMode(hvp=hvp).hypergradient(task, schedule)
    meta, ref = unrolled_reference(task, schedule)
    assert hg.meta_loss == pytest.approx(meta, rel=1e-12)
    assert_grads_close(hg.grads, ref, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_chunked_columns_agree(chunk_size: int, digits_small) -> None:
    schedule = make_schedule(8, 4)
    full = ForwardMode().hypergradient(digits_small, schedule)
    for hvp in ("fwd_rev", "rev_rev"):
        chunked = ForwardMode(hvp=hvp, chunk_size=chunk_size).hypergradient(digits_small, schedule)
        assert_grads_close(chunked.grads, full.grads, rtol=1e-12)


def test_fixed_types_get_zero_and_learned_ones_do_not_change(digits_small) -> None:
    everything = make_schedule(9, 3)
    lr_only = make_schedule(9, 3, learn=("lr",))
    a = ForwardMode().hypergradient(digits_small, everything)
    b = ForwardMode().hypergradient(digits_small, lr_only)
    assert torch.equal(b.grads["momentum"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(b.grads["weight_decay"], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(a.grads["lr"], b.grads["lr"], rtol=1e-12, atol=0)


def test_shared_value_gradient_is_sum_over_its_block(quad) -> None:
    """Sharing: d/dh of a shared value = sum of the per-step hypergradients in its block."""
    horizon, n = 12, 3
    per_step = make_schedule(horizon, "T")
    shared = HyperSchedule(
        horizon,
        {name: HyperSpec(n, (-1.0, 1.0)) for name in HYPERPARAMETERS},
        {name: per_step.values[name][::4].clone() for name in HYPERPARAMETERS},
    )
    # give the per-step schedule the shared schedule's values, step by step
    per_step = per_step.replace({name: shared.per_step(name) for name in HYPERPARAMETERS})
    g_step = ForwardMode().hypergradient(quad, per_step).grads
    g_shared = ForwardMode().hypergradient(quad, shared).grads
    for name in HYPERPARAMETERS:
        summed = g_step[name].reshape(n, horizon // n).sum(1)
        torch.testing.assert_close(g_shared[name], summed, rtol=1e-10, atol=1e-14)


def test_closed_form_one_weight_gradient_descent() -> None:
    """One weight, full batch, no momentum or decay: w_T = w* + (1 - a lr)^T (w_0 - w*)."""
    task = quadratic(dim=1, n_train=32, batch_size=32)
    horizon, lr = 20, 0.3
    f64 = {"dtype": torch.float64}
    schedule = make_schedule(horizon, 1, learn=("lr",)).replace(
        {
            "lr": torch.tensor([lr], **f64),
            "momentum": torch.zeros(1, **f64),
            "weight_decay": torch.zeros(1, **f64),
        }
    )
    (xt, yt), (xv, yv) = task.data["train"], task.data["val"]
    a, b = float((xt[:, 0] ** 2).mean()), float((xt[:, 0] * yt).mean())
    av, bv = float((xv[:, 0] ** 2).mean()), float((xv[:, 0] * yv).mean())
    w0 = float(task.init_params()[0]["weight"])
    w_star, r = b / a, 1 - lr * a
    w_T = w_star + r**horizon * (w0 - w_star)
    dw_dlr = horizon * r ** (horizon - 1) * (-a) * (w0 - w_star)
    expected = (av * w_T - bv) * dw_dlr
    got = ForwardMode().hypergradient(task, schedule).grads["lr"]
    assert float(got[0]) == pytest.approx(expected, rel=1e-10)


def test_skips_columns_before_their_segment(monkeypatch, digits_small) -> None:
    """Step t computes Hessian-vector products only for columns whose segment has started."""
    schedule = make_schedule(8, 4)  # segments start at steps 0, 2, 4, 6; three types each
    seen = active_columns(monkeypatch, digits_small, schedule)
    assert seen == [3, 3, 6, 6, 9, 9, 12, 12]


def test_clamps_are_off_by_default_and_change_the_result(digits_small) -> None:
    schedule = make_schedule(9, 3)
    exact = ForwardMode()
    clamped = ForwardMode(clamp_hvp=1e-3)
    assert exact.exact and not clamped.exact
    assert ForwardMode(clamp_grad=1.0).exact  # the exact derivative of the clamped run
    a = exact.hypergradient(digits_small, schedule).grads["lr"]
    b = clamped.hypergradient(digits_small, schedule).grads["lr"]
    assert not torch.allclose(a, b, rtol=1e-3)


@pytest.mark.parametrize("hvp", ["rev_rev", "fwd_rev"])
@pytest.mark.parametrize("tangents", ["auto", "generic"])
def test_clamp_grad_is_the_derivative_of_the_clamped_run(hvp: str, tangents: str) -> None:
    """clamp_grad: the tangent of a clamped gradient is H Z masked where |g| > c, so forward
    mode matches reverse mode through the clamped unrolled run (float64, 1e-10), and float64
    central differences of the clamped run; the clamp is active on some entries, not all
    (unmasked tangents were 23 % off here)."""
    task, schedule = small_digits(), make_schedule(9, 3, seed=3)
    g = FlatTask(task).grad(0, FlatTask(task).init_state(), task.batch(0))
    c = float(g.abs().quantile(0.8))
    assert 0.0 < float((g.abs() > c).double().mean()) < 0.5
    hg = ForwardMode(hvp=hvp, tangents=tangents, clamp_grad=c).hypergradient(task, schedule)
    meta, ref = unrolled_reference(task, schedule, clamp_grad=c)
    assert hg.meta_loss == pytest.approx(meta, rel=1e-12)
    assert_grads_close(hg.grads, ref, rtol=1e-10)
    unclamped = unrolled_reference(task, schedule)[1]
    assert not torch.allclose(ref["lr"], unclamped["lr"], rtol=1e-3)
    if hvp == "rev_rev" and tangents == "auto":
        assert_grads_close(hg.grads, central_differences(task, schedule, clamp_grad=c), 1e-6)


def test_float32_close_to_float64() -> None:
    schedule = make_schedule(9, 3)
    g64 = ForwardMode().hypergradient(small_digits(), schedule).grads
    g32 = ForwardMode().hypergradient(small_digits(dtype=torch.float32), schedule).grads
    assert_grads_close(g32, g64, rtol=1e-3)


def test_reports_costs(digits_small) -> None:
    hg = ForwardMode().hypergradient(digits_small, make_schedule(9, 3))
    assert hg.inner_steps == 9
    assert hg.seconds > 0
    assert hg.peak_memory >= 0
    assert 0.0 <= hg.metrics["val_accuracy"] <= 1.0


def test_auto_hvp_measures_once_and_agrees_with_both(monkeypatch, digits_small) -> None:
    schedule = make_schedule(9, 3)
    calls: list[str] = []
    original = ForwardMode._fastest

    def spy(self, *args):  # type: ignore[no-untyped-def]
        calls.append(original(self, *args))
        return calls[-1]

    monkeypatch.setattr(ForwardMode, "_fastest", spy)
    auto = ForwardMode(hvp="auto")
    first = auto.hypergradient(digits_small, schedule)
    second = auto.hypergradient(digits_small, schedule)
    assert len(calls) == 1 and first.metrics["hvp"] == calls[0] == second.metrics["hvp"]
    assert calls[0] in ("fwd_rev", "rev_rev")
    for hvp in ("fwd_rev", "rev_rev"):
        fixed = ForwardMode(hvp=hvp).hypergradient(digits_small, schedule)
        assert fixed.metrics["hvp"] == hvp
        assert_grads_close(first.grads, fixed.grads, rtol=1e-12)


def _lenet(dtype: torch.dtype, batch: int = 8):  # type: ignore[no-untyped-def]
    from benchmarks.workloads import _synthetic
    from metahpo.tasks.models import LeNet

    return _synthetic(
        "lenet", (1, 28, 28), lambda: LeNet(1, 28, 10, pool="avg"), batch, "cpu", dtype=dtype
    )


def test_default_formulation_is_a_fixed_rule_of_the_model(monkeypatch) -> None:
    """hvp="model" never times anything: the same model gives the same choice, any dtype."""
    import metahpo.estimators.forward as forward
    from benchmarks.workloads import _synthetic
    from metahpo.tasks.models import WideResNet

    def no_timing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("hvp='model' timed the formulations")

    monkeypatch.setattr(forward, "time_hvp", no_timing)
    wrn = _synthetic(
        "wrn",
        (3, 32, 32),
        lambda: WideResNet(3, 32, 10, depth=10, base_channels=4),
        4,
        "cpu",
        dtype=torch.float64,
    )
    looped, vectorised = ("rev_rev", 1), ("rev_rev", None)
    expected = [
        (small_digits(), vectorised),
        (small_digits(dtype=torch.float32), vectorised),
        (quadratic(), vectorised),
        (_lenet(torch.float32), looped),
        (_lenet(torch.float64), looped),
        (wrn, looped),
    ]
    for task, formulation in expected:
        assert forward.formulation_for(task) == formulation
        assert forward.formulation_for(task.with_seed(1)) == formulation
    lenet, schedule = _lenet(torch.float64), make_schedule(3, 1)
    hg = ForwardMode().hypergradient(lenet, schedule)
    assert (hg.metrics["hvp"], hg.metrics["hvp_chunk_size"]) == looped
    hg = ForwardMode(chunk_size=2).hypergradient(lenet, schedule)  # an explicit size wins
    assert (hg.metrics["hvp"], hg.metrics["hvp_chunk_size"]) == ("rev_rev", 2)
    hg = ForwardMode().hypergradient(small_digits(), schedule)
    assert (hg.metrics["hvp"], hg.metrics["hvp_chunk_size"]) == vectorised


def test_both_formulations_agree_on_lenet_in_float64() -> None:
    """The default (looped rev_rev), vectorised rev_rev (without the images' gradient) and
    fwd_rev against reverse mode through the unrolled run."""
    task, schedule = _lenet(torch.float64), make_schedule(4, 2, seed=3)
    meta, ref = unrolled_reference(task, schedule)
    for hvp in ("model", "rev_rev", "fwd_rev"):
        hg = ForwardMode(hvp=hvp).hypergradient(task, schedule)
        assert hg.meta_loss == pytest.approx(meta, rel=1e-12)
        assert_grads_close(hg.grads, ref, rtol=1e-10)


@pytest.mark.parametrize("sizes", [(4,), (2, 16)])
def test_compiled_products_equal_the_eager_ones(sizes: tuple[int, ...]) -> None:
    """compile: fwd_rev through torch.compile (aot_eager here: traced, no C++ compiler), the
    started columns padded with zero tangents to ``compile_sizes`` (``(4,)``: 9 columns in
    blocks of 4, the last padded; ``(2, 16)``: 3-9 columns padded to 16): float64 equal to
    exact reverse through the unrolled run and to the eager products to 1e-10, every step
    compiled (dynamo traced graphs), the compiled function kept across hypergradients."""
    from torch._dynamo.utils import counters

    task, schedule = small_digits(activation="relu"), make_schedule(9, 3, seed=3)
    estimator = ForwardMode(compile="aot_eager", compile_sizes=sizes)
    graphs = counters["stats"]["unique_graphs"]
    hg = estimator.hypergradient(task, schedule)
    assert counters["stats"]["unique_graphs"] > graphs
    meta, ref = unrolled_reference(task, schedule)
    assert hg.meta_loss == pytest.approx(meta, rel=1e-12)
    assert_grads_close(hg.grads, ref, rtol=1e-10)
    eager = ForwardMode().hypergradient(task, schedule)
    assert_grads_close(hg.grads, eager.grads, rtol=1e-10)
    assert hg.metrics["compiled_steps"] == 9  # every step: lr, momentum and wd start at 0
    products = next(iter(estimator._compiled.values()))[1]
    again = estimator.hypergradient(task, schedule)  # kept: no new compilation
    assert next(iter(estimator._compiled.values()))[1] is products
    assert_grads_close(again.grads, hg.grads, rtol=0)
    assert {products.padded_size(n) for n in range(1, 10)} == set(sizes)


def test_compiled_products_leave_loss_hyperparameters_to_the_eager_ones() -> None:
    from metahpo.core import StepBatch

    flat = FlatTask(small_digits())
    products = ForwardMode(compile="aot_eager")._compiled_for(flat)
    assert products is not None and products.applies(flat.batch(0))
    x, y = flat.batch(0)
    assert not products.applies(StepBatch(x, y, 0, {"label_smoothing": torch.tensor(0.1)}))
    assert ForwardMode()._compiled_for(flat) is None


def test_compiled_products_leave_random_layers_to_the_eager_ones() -> None:
    """A model with dropout keeps its seeded masks: the eager products, bit for bit."""
    task, schedule = small_digits(dropout=0.3), make_schedule(6, 2)
    hg = ForwardMode(compile="aot_eager").hypergradient(task, schedule)
    assert hg.metrics["compiled_steps"] == 0
    assert_grads_close(hg.grads, ForwardMode().hypergradient(task, schedule).grads, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inductor", "cuda_graphs"])
def test_inductor_products_equal_the_eager_ones(mode: str) -> None:
    """The code-generated products (a C++ compiler on CPU; ``cuda_graphs`` is plain inductor
    on a CPU, CUDA graphs on a GPU): float64 equal to exact reverse to 1e-10 (~20-60 s)."""
    task, schedule = small_digits(activation="relu"), make_schedule(9, 3, seed=3)
    hg = ForwardMode(compile=mode, compile_sizes=(16,)).hypergradient(task, schedule)
    assert hg.metrics["compiled_steps"] == 9
    assert_grads_close(hg.grads, unrolled_reference(task, schedule)[1], rtol=1e-10)
