"""The open core: inner optimisers, any named hyperparameter, per-group values.

Primal parity of every built-in optimiser with ``torch.optim``; exactness of forward mode and
exact reverse for every learnable hyperparameter of every built-in optimiser (against each
other, against an unrolled reference written in tests/conftest.py without metahpo's step code,
and against central differences), across sharing patterns, per-layer groups and zero starts;
finite tangents through Adam's square root; one-line errors for bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jvp

import metahpo
from metahpo.core import ConfigError
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.truncated_reverse import TruncatedReverse
from metahpo.inner import FlatTask, fit
from metahpo.optim import SGD, Adam, AdamW, InnerOptimizer, safe_sqrt
from metahpo.schedule import HyperSchedule, HyperSpec, constant_schedule
from tests.conftest import (
    assert_grads_close,
    central_differences,
    make_schedule,
    small_digits,
    unrolled_reference,
)

OPTIMIZERS = {
    "sgd": SGD,
    "sgd_nesterov": lambda: SGD(nesterov=True),
    "sgd_average": lambda: SGD(average=True),
    "adam": Adam,
    "adamw": AdamW,
}
HORIZON = 6
# Central differences' step: Adam's update is normalised (about lr per coordinate), so the loss
# curves faster in lr than under SGD; 1e-6 keeps the truncation error below 1e-6 relative.
CD_STEP = 1e-6
LAYERS = {"first": ("0.*",), "last": ("2.*",)}  # small_digits: Linear, Tanh, Linear


# -- primal parity -----------------------------------------------------------------------------
PARITY = [
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, torch.optim.SGD, {}),
    ("sgd_nesterov", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, torch.optim.SGD, {}),
    (
        "adam",
        {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 1e-3},
        torch.optim.Adam,
        {},
    ),
    (
        "adamw",
        {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1},
        torch.optim.AdamW,
        {},
    ),
]


@pytest.mark.parametrize(
    ("name", "values", "torch_cls", "extra"), PARITY, ids=[p[0] for p in PARITY]
)
def test_trajectory_equals_torch_optim(name, values, torch_cls, extra) -> None:
    """50 steps of metahpo's inner loop and of torch.optim on the same batches, float64."""
    task = small_digits(activation="relu")  # ReLU: some coordinates get exactly zero gradient
    optimizer = OPTIMIZERS[name]()
    flat, state = fit(task, constant_schedule(50, optimizer, **values))

    params, buffers = task.init_params()
    leaves = [p.detach().clone().requires_grad_(True) for p in params.values()]
    kwargs = {"lr": values["lr"], "weight_decay": values["weight_decay"], **extra}
    if name.startswith("sgd"):
        kwargs.update(momentum=values["momentum"], nesterov=name == "sgd_nesterov")
    else:
        kwargs.update(betas=(values["beta1"], values["beta2"]), eps=values["eps"])
    opt = torch_cls(leaves, **kwargs)
    for t in range(50):
        opt.zero_grad()
        task.train_loss(dict(zip(params, leaves, strict=True)), buffers, task.batch(t)).backward()
        opt.step()
    want = torch.cat([p.detach().reshape(-1) for p in leaves])
    err = float((state.theta - want).abs().max())
    assert err <= 1e-12, f"{name}: max |theta - torch| = {err:.2e}"
    assert float((want - flat.flatten(params)).abs().max()) > 1e-3  # it did train


def test_averaged_momentum_is_plain_sgd_with_lr_over_one_minus_momentum() -> None:
    """SGD(average=True) at (lr, mu) is torch.optim.SGD at (lr (1 - mu), mu) step for step
    (float64, 50 steps): a baseline can be stated exactly in either form."""
    task = small_digits(activation="relu")
    lr, mu, wd = 0.5, 0.9, 1e-3
    flat, state = fit(
        task, constant_schedule(50, SGD(average=True), lr=lr, momentum=mu, weight_decay=wd)
    )
    params, buffers = task.init_params()
    leaves = [p.detach().clone().requires_grad_(True) for p in params.values()]
    opt = torch.optim.SGD(leaves, lr=lr * (1 - mu), momentum=mu, weight_decay=wd)
    for t in range(50):
        opt.zero_grad()
        task.train_loss(dict(zip(params, leaves, strict=True)), buffers, task.batch(t)).backward()
        opt.step()
    want = torch.cat([p.detach().reshape(-1) for p in leaves])
    assert float((state.theta - want).abs().max()) <= 1e-12
    assert float((want - flat.flatten(params)).abs().max()) > 1e-3  # it did train


def test_averaged_momentum_refuses_nesterov() -> None:
    with pytest.raises(ConfigError, match=r"^optimizer\.average=true: .* nesterov=true$"):
        SGD(nesterov=True, average=True)


# -- exactness ---------------------------------------------------------------------------------
CASES = [
    (opt, sharing, init)
    for opt in OPTIMIZERS
    for sharing, init in [(1, "nonzero"), (3, "zero"), (2, "zero_mom_wd"), ("T", "nonzero")]
]


@pytest.mark.parametrize(("opt", "sharing", "init"), CASES)
def test_forward_equals_exact_reverse_and_unrolled_reference(opt, sharing, init) -> None:
    task = small_digits()
    schedule = make_schedule(HORIZON, sharing, init, seed=2, optimizer=OPTIMIZERS[opt]())
    fwd = ForwardMode().hypergradient(task, schedule)
    rev = ExactReverse().hypergradient(task, schedule)
    meta, ref = unrolled_reference(task, schedule)
    assert fwd.meta_loss == pytest.approx(meta, rel=1e-12)
    assert_grads_close(fwd.grads, rev.grads, rtol=1e-10)
    assert_grads_close(fwd.grads, ref, rtol=1e-10)
    # every learnable hyperparameter gets a gradient; from lr = 0 only lr does (nothing moves)
    for key in ["lr"] if init == "zero" else schedule.learned:
        assert float(fwd.grads[key].abs().max()) > 0, key


@pytest.mark.parametrize("sharing", [1, 3, "T"])
@pytest.mark.parametrize("init", ["nonzero", "zero", "zero_mom_wd"])
def test_sgd_fast_path_equals_the_generic_tangents(sharing, init) -> None:
    """Plain SGD's hand-written recurrence (the default) and the generic jvp of its step."""
    task = small_digits()
    schedule = make_schedule(HORIZON, sharing, init, seed=6)
    fast = ForwardMode().hypergradient(task, schedule)
    generic = ForwardMode(tangents="generic").hypergradient(task, schedule)
    assert (fast.metrics["tangents"], generic.metrics["tangents"]) == ("sgd", "generic")
    assert fast.meta_loss == generic.meta_loss
    assert_grads_close(fast.grads, generic.grads, rtol=1e-12)


@pytest.mark.parametrize(("opt", "sharing", "init"), CASES)
def test_forward_matches_central_differences(opt, sharing, init) -> None:
    task = small_digits()
    schedule = make_schedule(HORIZON, sharing, init, seed=3, optimizer=OPTIMIZERS[opt]())
    hg = ForwardMode().hypergradient(task, schedule)
    # Adam's L2 decay at 0: coordinates whose loss gradient is 0 (digits' blank pixels) see
    # wd theta / (|wd theta| c + eps), whose second derivative jumps at wd = 0, so central
    # differences are only O(h) accurate there: a smaller step.
    step = 1e-8 if opt == "adam" and init == "zero_mom_wd" else CD_STEP
    assert_grads_close(hg.grads, central_differences(task, schedule, step), rtol=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("init", ["nonzero", "zero"])
def test_per_layer_groups_are_exact(opt: str, init: str) -> None:
    """One lr and one weight decay per layer, each with its own segments: forward mode equals
    exact reverse, truncated reverse over the whole run, the reference and central differences."""
    task = small_digits()
    groups = {"lr": LAYERS, "weight_decay": LAYERS}
    schedule = make_schedule(HORIZON, 2, init, seed=4, optimizer=OPTIMIZERS[opt](), groups=groups)
    assert {"lr/first", "lr/last", "weight_decay/first"} <= set(schedule.learned)
    fwd = ForwardMode().hypergradient(task, schedule)
    assert_grads_close(fwd.grads, ExactReverse().hypergradient(task, schedule).grads, 1e-10)
    assert_grads_close(
        fwd.grads, TruncatedReverse(K=HORIZON).hypergradient(task, schedule).grads, 1e-10
    )
    assert_grads_close(fwd.grads, unrolled_reference(task, schedule)[1], 1e-10)
    assert_grads_close(fwd.grads, central_differences(task, schedule, CD_STEP), 1e-6)


@pytest.mark.parametrize("opt", ["sgd_nesterov", "adamw"])
def test_greedy_and_truncated_windows_carry_the_optimiser_state(opt: str) -> None:
    """Greedy over one window of the whole run is the exact hypergradient; truncated reverse
    over the last 2 steps equals exact reverse of a run whose first steps are constants: the
    optimiser's state crosses the window boundary."""
    from metahpo.estimators.greedy import Greedy

    task = small_digits()
    schedule = make_schedule(HORIZON, HORIZON, seed=7, optimizer=OPTIMIZERS[opt]())
    exact = ExactReverse().hypergradient(task, schedule)
    greedy = Greedy(W=HORIZON, update="gradient", step_size={"default": 1e-3})
    assert_grads_close(greedy.hypergradient(task, schedule).grads, exact.grads, 1e-10)
    trunc = TruncatedReverse(K=2).hypergradient(task, schedule)
    for key in schedule.learned:  # per-step values: the last two segments are exact
        torch.testing.assert_close(trunc.grads[key][-2:], exact.grads[key][-2:], rtol=1e-10, atol=0)
        assert float(trunc.grads[key][:-2].abs().max()) == 0.0


def test_groups_with_equal_values_are_the_ungrouped_run() -> None:
    """Per-layer lr values all equal to one shared lr: the same run, and the per-group
    hypergradients sum to the shared one."""
    task = small_digits()
    plain = make_schedule(HORIZON, 2, seed=5)
    specs = {k: v for k, v in plain.specs.items() if k != "lr"}
    specs.update({"lr/first": plain.specs["lr"], "lr/last": plain.specs["lr"]})
    values = {**plain.values, "lr/first": plain.values["lr"], "lr/last": plain.values["lr"]}
    del values["lr"]
    grouped = HyperSchedule(HORIZON, specs, values, SGD(), {"lr": LAYERS})
    a = ForwardMode().hypergradient(task, plain)
    b = ForwardMode().hypergradient(task, grouped)
    assert b.meta_loss == a.meta_loss
    total = b.grads["lr/first"] + b.grads["lr/last"]
    torch.testing.assert_close(total, a.grads["lr"], rtol=1e-12, atol=0)
    assert not torch.allclose(b.grads["lr/first"], b.grads["lr/last"])


def test_lr_from_zero_gets_a_gradient_through_adam() -> None:
    """AdamW with every learned value at zero that can be (lr included): the run does not move,
    yet lr's hypergradient is the exact, non-zero one."""
    task = small_digits()
    schedule = make_schedule(HORIZON, 2, "zero", optimizer=AdamW())
    assert float(schedule.values["lr"].abs().max()) == 0.0
    hg = ForwardMode().hypergradient(task, schedule)
    assert float(hg.grads["lr"].abs().min()) > 0
    assert_grads_close(hg.grads, central_differences(task, schedule, CD_STEP), 1e-6)


# -- Adam's square root ------------------------------------------------------------------------
def test_safe_sqrt_has_finite_tangents_at_zero() -> None:
    x = torch.tensor([0.0, 4.0], dtype=torch.float64)
    dx = torch.tensor([0.0, 1.0], dtype=torch.float64)
    value, tangent = jvp(safe_sqrt, (x,), (dx,))
    assert value.tolist() == [0.0, 2.0]
    assert tangent.tolist() == [0.0, 0.25]
    _, naive = jvp(torch.sqrt, (x,), (dx,))
    assert math.isnan(float(naive[0]))  # what plain sqrt gives: inf * 0


def test_adam_hypergradients_are_finite_where_the_second_moment_is_zero() -> None:
    """Digits has pixels that are 0 in every image, so first-layer weights on them have zero
    gradient and (AdamW: decoupled decay) a second moment of exactly 0; hypergradients stay
    finite and exact."""
    task = small_digits()
    schedule = make_schedule(HORIZON, 1, optimizer=AdamW())  # no L2 term in the gradient
    flat = FlatTask(task)
    _, state = fit(task, schedule)
    m, v = state.opt_state
    assert int((v == 0).sum()) > 0  # the case that made plain sqrt's tangents NaN
    fwd = ForwardMode().hypergradient(task, schedule)
    assert all(bool(torch.isfinite(g).all()) for g in fwd.grads.values())
    assert_grads_close(fwd.grads, ExactReverse().hypergradient(task, schedule).grads, 1e-10)
    assert flat.n_params == v.numel()


# -- a user's own optimiser --------------------------------------------------------------------
class SignSGD(InnerOptimizer):
    """A smooth sign-like step ``theta - lr * tanh(g / temperature)``: two hyperparameters."""

    name = "softsign"
    hyperparameters = {
        "lr": metahpo.Hyperparameter(0.01, (0.0, 1.0), low=0.0),
        "temperature": metahpo.Hyperparameter(1.0, (0.01, 10.0), low=0.0),
    }

    def init(self, theta):
        return ()

    def step(self, theta, state, grad, h, count):
        return theta - h["lr"] * torch.tanh(grad / h["temperature"]), state


def test_a_users_optimiser_is_differentiated_by_every_exact_estimator() -> None:
    task = small_digits()
    specs = {"lr": HyperSpec(2, (0.0, 1.0)), "temperature": HyperSpec(1, (0.01, 10.0))}
    schedule = HyperSchedule(HORIZON, specs, {"lr": [0.05, 0.1], "temperature": 0.5}, SignSGD())
    fwd = ForwardMode().hypergradient(task, schedule)
    assert_grads_close(fwd.grads, ExactReverse().hypergradient(task, schedule).grads, 1e-10)
    assert_grads_close(fwd.grads, central_differences(task, schedule, CD_STEP), 1e-6)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optimizer=adamw", "schedule=lr_only"],
            r"^schedule\.momentum is not a hyperparameter of the adamw optimizer "
            r"\(metahpo\.optim\.AdamW\) or of the task's loss; allowed: lr, beta1, beta2, eps, "
            r"weight_decay, label_smoothing, l2$",
        ),
        (
            ["optimizer=adamw", "schedule.beta1.bounds=[0.0,1.0]"],
            r"^schedule\.beta1\.bounds=\[0\.0, 1\.0\]: adamw's beta1 must be >= 0 and < 1$",
        ),
        (
            ["optimizer=adam", "schedule.beta2.init=1.0"],
            r"^schedule\.beta2\.init=1\.0: adam's beta2 must be >= 0 and < 1$",
        ),
        (
            ["optimizer=adamw", "schedule.eps.bounds=[-1.0e-3,1.0e-3]"],
            r"^schedule\.eps\.bounds=\[-0\.001, 0\.001\]: adamw's eps must be > 0$",
        ),
        (
            ["optimizer=adamw", "optimizer.baseline.eps=-1.0"],
            r"^optimizer\.baseline\.eps=-1\.0: adamw's eps must be > 0$",
        ),
        (
            ["+baseline.beta1=0.9"],
            r"^baseline\.beta1 is not a hyperparameter of the sgd optimizer; allowed: lr, "
            r"momentum, weight_decay \(set optimizer\.baseline for this optimizer\)$",
        ),
        (
            ["+schedule.lr.groups={a: '0.*', b: 'nothing.*'}", "task.hidden=[12]"],
            r"^schedule\.lr\.groups\.b: pattern 'nothing\.\*' matches no parameter; "
            r"parameters: 0\.weight, 0\.bias, 2\.weight, 2\.bias$",
        ),
        (
            ["+schedule.lr.groups={a: '0.*', b: '*.weight', c: '2.bias'}"],
            r"^schedule\.lr\.groups: parameter '0\.weight' is in both a and b; each parameter "
            r"belongs to one group$",
        ),
        (
            ["+schedule.lr.groups={a: '0.*'}"],
            r"^schedule\.lr\.groups: parameter\(s\) 2\.weight, 2\.bias belong to no group",
        ),
        (
            ["+schedule.lr.groups={a: {params: '*', colour: red}}"],
            r"^schedule\.lr\.groups\.a\.colour is not a key metahpo reads",
        ),
        (["optimizer._target_=metahpo.outer.SGD"], r"is not a metahpo\.optim\.InnerOptimizer$"),
        (["optimizer.nesterov=maybe"], r"^optimizer\.nesterov='maybe' must be true or false$"),
        (["optimizer.average=1.5"], r"^optimizer\.average=1\.5 must be true or false$"),
        (["optimizer=nope"], r"^optimizer='nope' is unknown; allowed: adam, adamw, sgd$"),
    ],
)
def test_bad_input_is_one_line_before_training(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metahpo.inner

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("training started")

    monkeypatch.setattr(metahpo.inner, "train", no_training)
    with pytest.raises(ConfigError, match=message) as info:
        cfg = metahpo.compose(overrides)
        metahpo.build.build(cfg)
    assert "\n" not in str(info.value)


def test_unknown_key_in_a_python_schedule() -> None:
    with pytest.raises(ConfigError, match=r"^schedule\.momentum is not a hyperparameter of the"):
        HyperSchedule(4, {"momentum": HyperSpec(1, (0.0, 1.0))}, {"momentum": 0.5}, AdamW())
    with pytest.raises(ConfigError, match=r"^schedule\.lr/x: lr has no group 'x'"):
        HyperSchedule(4, {"lr/x": HyperSpec(1, (0.0, 1.0))}, {"lr/x": 0.5}, AdamW())


def test_groups_in_the_config_give_one_key_per_group() -> None:
    cfg = metahpo.compose(
        [
            "optimizer=adamw",
            "schedule.lr.segments=2",
            "+schedule.lr.groups={hidden: '0.*', out: {params: ['2.weight', '2.bias'],"
            " segments: 3}}",
            "horizon=12",
        ]
    )
    setup = metahpo.build.build(cfg)
    s = setup.schedule
    assert s.keys == ("lr/hidden", "lr/out", "beta1", "beta2", "eps", "weight_decay")
    assert s.specs["lr/hidden"].n_segments == 2 and s.specs["lr/out"].n_segments == 3
    assert s.groups["lr"] == {"hidden": ("0.*",), "out": ("2.weight", "2.bias")}
    assert setup.baseline.optimizer.name == "adamw"
    assert float(setup.baseline.values["weight_decay"]) == cfg.optimizer.baseline.weight_decay


# -- the whole run -----------------------------------------------------------------------------
@pytest.mark.slow
def test_optimizer_adamw_runs_the_outer_loop_and_learns_every_hyperparameter(tmp_path) -> None:
    from metahpo import plots
    from metahpo import results as results_lib

    cfg = metahpo.compose(
        ["optimizer=adamw", "horizon=12", "outer.steps=2", "final.seeds=[0]", "progress=false"]
        + ["task.n_train=256", "+schedule.lr.groups={hidden: '0.*', out: '2.*'}"]
    )
    res = metahpo.run(cfg, tmp_path)
    keys = ["lr/hidden", "lr/out", "beta1", "beta2", "eps", "weight_decay"]
    assert list(res["learned_schedule"]) == keys
    assert res["optimizer"] == "metahpo.optim.AdamW"
    first = res["history"][0]
    for key in keys:  # every hyperparameter got a hypergradient and a sign step
        assert any(g != 0 for g in first["hypergradient"][key]), key
        assert res["history"][1]["schedule"][key] != first["schedule"][key], key
    assert res["final"]["learned"]["test_accuracy"] is not None
    baseline = results_lib.baseline_schedule(res)
    assert float(baseline.values["weight_decay"]) == cfg.optimizer.baseline.weight_decay
    assert (tmp_path / "schedules.png").stat().st_size > 0
    compared = plots.plot_schedule_comparison({"forward": [res]}, tmp_path / "cmp.png")
    assert compared.stat().st_size > 0
