"""estimator=implicit on the strongly convex digits logistic regression (float64): conjugate
gradient equals the closed-form hypergradient at the optimum (a dense Hessian, written here
independently of the task), the Neumann series converges to it as its terms grow, and forward
mode's exact hypergradient of the unrolled run approaches it as the horizon grows."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import metahpo
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.implicit import Implicit
from metahpo.inner import Steps, fit
from metahpo.optim import SGD, AdamW
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import DigitsLogReg

N = 300  # training examples, one full batch per step: plain gradient descent with momentum
HORIZON = 200
L2 = [0.1 + 0.02 * c for c in range(10)]
PER_CLASS = {"l2": {f"c{c}": (f"classes.{c}.*",) for c in range(10)}}
KEYS = [f"l2/c{c}" for c in range(10)]


def logreg_schedule(task, horizon=HORIZON, groups=PER_CLASS, l2=L2, lr_learned=False):  # type: ignore[no-untyped-def]
    specs = {"lr": HyperSpec(1, (0, 1), lr_learned), "momentum": HyperSpec(1, (0, 0.99), False)}
    values: dict = {"lr": 1.0, "momentum": 0.7}  # |grad| ~ 1e-16 after 200 steps
    for i, g in enumerate(groups["l2"]):
        specs[f"l2/{g}"] = HyperSpec(1, (0, 1), True)
        values[f"l2/{g}"] = l2[i]
    return HyperSchedule(horizon, specs, values, SGD(), groups, task.loss_hyperparameters)


def flat_grads(grads) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.cat([grads[k] for k in KEYS])


def augmented(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def losses(task, lam):  # type: ignore[no-untyped-def]
    """Training and validation losses of ``theta`` ([10 classes x (64 weights, bias)], the
    flat layout of PerClassLinear), written by hand."""
    (x, y), (xv, yv) = task.data["train"], task.data["val"]
    xa, xva = augmented(x), augmented(xv)

    def train(theta: torch.Tensor) -> torch.Tensor:
        wb = theta.reshape(10, 65)
        return F.cross_entropy(xa @ wb.T, y) + (lam[:, None] * wb**2).sum() / 2

    def val(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(xva @ theta.reshape(10, 65).T, yv)

    return train, val


def closed_form(task, theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``-grad L_val^T H^-1 d2L/dw dlam`` with the dense Hessian; ``d grad L / d lam_c`` is
    class c's block of theta."""
    train, val = losses(task, lam)
    H = torch.autograd.functional.hessian(train, theta, vectorize=True)
    (g_val,) = torch.autograd.grad(val(theta.requires_grad_(True)), theta)
    v = torch.linalg.solve(H, g_val)
    return -(v.reshape(10, 65) * theta.detach().reshape(10, 65)).sum(1)


def optimum(task, lam: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The training loss's minimiser by Newton's method from ``theta``."""
    train, _ = losses(task, lam)
    theta = theta.detach().clone()
    for _ in range(4):  # quadratic convergence from a converged start
        g = torch.func.grad(train)(theta)
        H = torch.autograd.functional.hessian(train, theta, vectorize=True)
        theta = theta - torch.linalg.solve(H, g)
    return theta


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    task = DigitsLogReg(dtype=torch.float64, n_train=N, batch_size=N)
    schedule = logreg_schedule(task)
    flat, state = fit(task, schedule)
    lam = torch.tensor(L2, dtype=torch.float64)
    return task, schedule, state.theta, closed_form(task, state.theta.clone(), lam), (flat, state)


def at_the_end(problem, estimator: Implicit):  # type: ignore[no-untyped-def]
    """The estimate at the fixture's trained weights (the run is not repeated)."""
    _, schedule, _, _, (flat, state) = problem
    _, grads, metrics = estimator.at(flat, Steps(flat, schedule), state)
    return grads, metrics


def test_cg_equals_the_closed_form(problem) -> None:  # type: ignore[no-untyped-def]
    task, schedule, _, exact, _ = problem
    got = Implicit(tol=1e-13, max_iter=1000).hypergradient(task, schedule)
    assert got.metrics["implicit_train_grad_norm"] < 1e-13  # trained to convergence
    assert got.metrics["implicit_converged"] and got.metrics["implicit_residual"] < 1e-13
    assert 10 < got.metrics["implicit_iterations"] < 650
    assert torch.allclose(flat_grads(got.grads), exact, rtol=1e-8, atol=0)
    assert bool((got.grads["lr"] == 0).all())
    # the loss of the last batch (here the whole split, permuted) defines the same H, and the
    # torch.func formulation of the Hessian-vector products gives the same
    for est in (Implicit(tol=1e-13, max_iter=1000, hessian_batches=1, hvp="fwd_rev"),):
        grads, _ = at_the_end(problem, est)
        assert torch.allclose(flat_grads(grads), exact, rtol=1e-8, atol=0)


def test_several_segments_get_the_final_steps_derivative(problem) -> None:  # type: ignore[no-untyped-def]
    """Two segments of equal values train exactly as one; the estimate is the derivative with
    respect to the values in force at the last step, so only the last segment receives it."""
    _, schedule, _, exact, (flat, state) = problem
    specs = {k: HyperSpec(2, v.bounds, v.learn) for k, v in schedule.specs.items()}
    two = HyperSchedule(
        schedule.horizon,
        specs,
        {k: v.repeat(2) for k, v in schedule.values.items()},
        schedule.optimizer,
        schedule.groups,
        schedule.loss,
    )
    _, grads, _ = Implicit(tol=1e-13, max_iter=1000).at(flat, Steps(flat, two), state)
    assert all(float(grads[k][0]) == 0.0 for k in KEYS)
    assert torch.allclose(torch.stack([grads[k][1] for k in KEYS]), exact, rtol=1e-8, atol=0)


def test_the_optimisers_weight_decay_is_part_of_the_hessian(problem) -> None:  # type: ignore[no-untyped-def]
    """SGD's coupled weight decay moves the fixed point to a minimum of L + wd/2 |w|^2: the
    closed form with every class's L2 raised by wd (and the mixed term unchanged)."""
    task = problem[0]
    schedule = logreg_schedule(task)
    wd = 0.05
    specs = {**schedule.specs, "weight_decay": HyperSpec(1, (0, 1), False)}
    values = {**schedule.values, "weight_decay": torch.tensor([wd], dtype=torch.float64)}
    schedule = HyperSchedule(
        schedule.horizon, specs, values, schedule.optimizer, schedule.groups, schedule.loss
    )
    got = Implicit(tol=1e-13, max_iter=1000).hypergradient(task, schedule)
    assert got.metrics["implicit_train_grad_norm"] < 1e-12
    _, state = fit(task, schedule)
    lam = torch.tensor(L2, dtype=torch.float64)
    exact = closed_form(task, state.theta.clone(), lam + wd)
    assert torch.allclose(flat_grads(got.grads), exact, rtol=1e-8, atol=0)


def test_the_closed_form_is_the_derivative_at_the_optimum(problem) -> None:  # type: ignore[no-untyped-def]
    """The reference itself: central differences of L_val(w*(lam)), w* by Newton's method."""
    task, _, theta, exact, _ = problem
    lam = torch.tensor(L2, dtype=torch.float64)
    _, val = losses(task, lam)
    for c in (7,):
        h = torch.zeros(10, dtype=torch.float64)
        h[c] = 1e-5
        plus = val(optimum(task, lam + h, theta))
        minus = val(optimum(task, lam - h, theta))
        assert float((plus - minus) / 2e-5) == pytest.approx(float(exact[c]), rel=1e-6)


def test_neumann_converges_as_terms_grow(problem) -> None:  # type: ignore[no-untyped-def]
    task, _, theta, exact, _ = problem
    train, _ = losses(task, torch.tensor(L2, dtype=torch.float64))
    top = float(
        torch.linalg.eigvalsh(torch.autograd.functional.hessian(train, theta, vectorize=True)).max()
    )
    errors = []
    for terms in (5, 25, 125):  # the error shrinks like (1 - mu / top)^terms, mu ~ top / 13
        grads, metrics = at_the_end(problem, Implicit(solver="neumann", terms=terms, alpha=1 / top))
        assert metrics["implicit_iterations"] == terms
        errors.append(float((flat_grads(grads) - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * errors[0]


def test_label_smoothing_and_one_l2(problem) -> None:  # type: ignore[no-untyped-def]
    """A hyperparameter that is not a penalty: the mixed term of label smoothing, against the
    closed form with ``d grad L / d (l2, s)`` by ``torch.func`` of a hand-written loss."""
    task = problem[0]
    (x, y), (xv, yv) = task.data["train"], task.data["val"]
    xa, xva = augmented(x), augmented(xv)
    hyper = torch.tensor([0.1, 0.2], dtype=torch.float64)  # l2, label smoothing

    def train(theta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        wb = theta.reshape(10, 65)
        logp = F.log_softmax(xa @ wb.T, dim=-1)
        nll = -logp.gather(1, y[:, None]).mean()
        return (1 - h[1]) * nll + h[1] * -logp.mean() + h[0] * (wb**2).sum() / 2

    specs = {
        "lr": HyperSpec(1, (0, 1), False),
        "momentum": HyperSpec(1, (0, 0.99), False),
        "l2": HyperSpec(1, (0, 1), True),
        "label_smoothing": HyperSpec(1, (0, 0.5), True),
    }
    values = {"lr": 1.0, "momentum": 0.7, "l2": 0.1, "label_smoothing": 0.2}
    schedule = HyperSchedule(HORIZON, specs, values, SGD(), None, task.loss_hyperparameters)
    got = Implicit(tol=1e-13, max_iter=1000).hypergradient(task, schedule)
    assert got.metrics["implicit_train_grad_norm"] < 1e-13
    _, state = fit(task, schedule)
    theta = state.theta
    H = torch.func.hessian(train)(theta, hyper)
    B = torch.func.jacrev(torch.func.grad(train), argnums=1)(theta, hyper)  # [P, 2]
    g_val = torch.func.grad(lambda t: F.cross_entropy(xva @ t.reshape(10, 65).T, yv))(theta)
    exact = -(torch.linalg.solve(H, g_val) @ B)
    both = torch.cat([got.grads["l2"], got.grads["label_smoothing"]])
    assert torch.allclose(both, exact, rtol=1e-8, atol=0)


def test_forward_mode_approaches_implicit_as_the_horizon_grows() -> None:
    task = DigitsLogReg(dtype=torch.float64, n_train=N, batch_size=N)
    halves = {"l2": {"low": ("classes.[0-4].*",), "high": ("classes.[5-9].*",)}}
    gaps = []
    for T in (10, 30, 90):
        schedule = logreg_schedule(task, T, halves, [0.05, 0.1])
        fwd = ForwardMode().hypergradient(task, schedule).grads
        imp = Implicit(tol=1e-12, max_iter=1000).hypergradient(task, schedule).grads
        a, b = (
            torch.cat([fwd["l2/low"], fwd["l2/high"]]),
            torch.cat([imp["l2/low"], imp["l2/high"]]),
        )
        gaps.append(float((a - b).norm() / b.norm()))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3


def test_an_unconverged_solve_is_a_warning(problem, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="metahpo"):
        _, metrics = at_the_end(problem, Implicit(max_iter=2, tol=1e-10))
    assert metrics["implicit_iterations"] == 2 and not metrics["implicit_converged"]
    assert "the cg solve did not converge: relative residual" in caplog.text


def test_a_diverging_neumann_series_is_one_line(problem) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        metahpo.ConfigError,
        match=r"^estimator\.alpha=10 makes the Neumann series diverge \(term \d+ is .* so alpha "
        r"must be below [0-9.e-]+\); lower it, or use estimator\.solver=cg$",
    ):
        at_the_end(problem, Implicit(solver="neumann", alpha=10.0))


def test_refuses_the_optimisers_hyperparameters(problem) -> None:  # type: ignore[no-untyped-def]
    task = problem[0]
    with pytest.raises(
        metahpo.ConfigError,
        match=r"^estimator=implicit differentiates hyperparameters of the training loss only "
        r"\(the optimiser's have no implicit derivative at an optimum\); schedule\.lr is the "
        r"optimiser's: set its learn=false, or use forward, exact_reverse, .* or es$",
    ):
        Implicit().hypergradient(task, logreg_schedule(task, lr_learned=True))
    adamw = logreg_schedule(task)
    adamw = HyperSchedule(
        adamw.horizon,
        {k: v for k, v in adamw.specs.items() if k != "momentum"},
        adamw.values,
        AdamW(),
        adamw.groups,
        adamw.loss,
    )
    with pytest.raises(metahpo.ConfigError, match=r"^estimator=implicit: the adamw optimizer's "):
        Implicit().check(adamw)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.damping=-1", r"^estimator\.damping=-1 must be a number >= 0"),
        ("estimator.max_iter=0", r"^estimator\.max_iter=0 must be an integer >= 1"),
        ("estimator.terms=0", r"^estimator\.terms=0 must be an integer >= 1"),
        ("estimator.alpha=0", r"^estimator\.alpha=0 must be a number > 0"),
        ("estimator.tol=0", r"^estimator\.tol=0 must be a number > 0"),
        ("estimator.solver=lu", r"^estimator\.solver='lu'"),
        ("estimator.hessian_batches=0", r"^estimator\.hessian_batches=0 must be"),
    ],
)
def test_bad_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message) as info:
        metahpo.compose(["estimator=implicit", override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["experiment=smoke", "schedule=loss", "estimator=implicit"],
            r"^estimator=implicit differentiates .* schedule\.lr is the",
        ),
        (
            ["experiment=logreg_l2", "horizon=20", "estimator.hessian_batches=50"],
            r"^estimator\.hessian_batches=50 must be at most the horizon \(20\)",
        ),
    ],
)
def test_refused_before_training(overrides: list[str], message: str) -> None:
    cfg = metahpo.compose(overrides)
    with pytest.raises(metahpo.ConfigError, match=message):
        metahpo.build.build(cfg)


ARGS = [
    "experiment=logreg_l2",
    "horizon=20",
    "task.n_train=200",
    "task.batch_size=100",
    "outer.steps=1",
    "progress=false",
    "final.seeds=[0]",
]


def test_results_json_carries_the_solve(tmp_path) -> None:  # type: ignore[no-untyped-def]
    metahpo.run(ARGS, tmp_path)
    entry = json.loads((tmp_path / "results.json").read_text())["history"][0]
    assert entry["implicit_iterations"] >= 1 and entry["implicit_residual"] >= 0
    assert "implicit_converged" in entry and entry["implicit_train_grad_norm"] > 0
    assert any(v != [0.0] for k, v in entry["hypergradient"].items() if k.startswith("l2/"))


@pytest.mark.slow
def test_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No state of its own: a resumed run continues from the checkpoint like any other."""
    first = metahpo.run(ARGS, tmp_path)
    again = metahpo.run([a.replace("outer.steps=1", "outer.steps=2") for a in ARGS], tmp_path)
    assert again["outer_steps"] == 2 and again["history"][0] == first["history"][0]
