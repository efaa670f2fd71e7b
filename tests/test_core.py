"""Schedules, the inner step, the tasks and the outer optimisers."""

from __future__ import annotations

import pytest
import torch

from metahpo.core import ConfigError
from metahpo.inner import FlatTask, fit
from metahpo.optim import SGD as InnerSGD
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from metahpo.outer import SGD, Adam, Rprop, SignDescent, clip_by_norm
from metahpo.schedule import HyperSchedule, HyperSpec, cosine_schedule, per_key
from metahpo.tasks.digits import Digits
from metahpo.tasks.quadratic import Quadratic
from metahpo.validation import check_arguments
from tests.conftest import make_schedule, small_digits


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("horizon", "n"), [(10, 1), (10, 3), (10, 10), (7, 4), (200, 10)])
def test_segment_index_is_floor_n_t_over_T(horizon: int, n: int) -> None:
    s = make_schedule(horizon, n)
    idx = s.segment_index("lr").tolist()
    assert idx == [n * t // horizon for t in range(horizon)]
    assert s.segment_starts("lr") == [idx.index(k) for k in range(n)]
    assert sorted(set(idx)) == list(range(n))  # every segment owns at least one step


def test_per_step_and_projection() -> None:
    specs = {n: HyperSpec(2, (0.0, 0.5)) for n in HYPERPARAMETERS}
    s = HyperSchedule(4, specs, {"lr": [0.1, 0.9], "momentum": -1.0, "weight_decay": [0.2, 0.3]})
    assert s.per_step("lr").tolist() == [0.1, 0.1, 0.9, 0.9]
    p = s.project()
    assert p.values["lr"].tolist() == [0.1, 0.5]
    assert p.values["momentum"].tolist() == [0.0, 0.0]
    assert s.values["lr"].tolist() == [0.1, 0.9]  # immutable: project returned a new one


def test_cosine_baseline_decays_to_zero() -> None:
    s = cosine_schedule(100, lr=0.1, momentum=0.9, weight_decay=5e-4)
    lr = s.per_step("lr")
    assert float(lr[0]) == pytest.approx(0.1)
    assert float(lr[-1]) < 1e-4
    assert bool((lr[1:] <= lr[:-1]).all())


# -- the inner step ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hps",
    [
        [(0.1, 0.9, 1e-2), (0.05, 0.5, 0.0), (0.2, 0.3, 1e-3), (0.1, 0.99, 5e-4)],
        [(0.1, 0.0, 1e-2), (0.05, 0.0, 0.0), (0.2, 0.0, 1e-3)],  # momentum 0 throughout
    ],
)
def test_sgd_step_is_torch_optim_sgd(hps: list[tuple[float, float, float]]) -> None:
    """Same trajectory as torch.optim.SGD with the hyperparameters changed every step."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, dtype=torch.float64, generator=g)
    target = torch.randn(6, dtype=torch.float64, generator=g)

    w = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.0)
    for lr, mu, wd in hps:
        for group in opt.param_groups:
            group.update(lr=lr, momentum=mu, weight_decay=wd)
        opt.zero_grad()
        ((w - target) ** 4).sum().backward()
        opt.step()

    theta, state = w0.clone(), InnerSGD().init(w0)
    for k, (lr, mu, wd) in enumerate(hps, 1):
        grad = 4 * (theta - target) ** 3
        h = {"lr": lr, "momentum": mu, "weight_decay": wd}
        h = {n: torch.tensor(v, dtype=torch.float64) for n, v in h.items()}
        theta, state = InnerSGD().step(theta, state, grad, h, k)
    torch.testing.assert_close(theta, w.detach(), rtol=1e-14, atol=1e-14)


def test_flat_task_roundtrip(digits_small) -> None:
    flat = FlatTask(digits_small)
    params, _ = digits_small.init_params()
    theta = flat.flatten(params)
    assert theta.shape == (flat.n_params,) and flat.n_params == 64 * 12 + 12 + 12 * 10 + 10
    back = flat.unflatten(theta)
    assert all(torch.equal(back[k], params[k]) for k in params)


# -- tasks -------------------------------------------------------------------------------------
def test_digits_splits_and_standardisation() -> None:
    task = small_digits(n_train=None, batch_size=128)
    sizes = {k: len(v[1]) for k, v in task.data.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360 and sizes["val"] == 288
    x = task.data["train"][0]
    assert float(x.mean(0).abs().max()) < 1e-10
    assert set(task.data["train"][1].unique().tolist()) == set(range(10))
    assert task.batches_per_epoch == sizes["train"] // 128


def test_seed_fixes_weights_and_batches() -> None:
    a, b, c = small_digits(seed=1), small_digits(seed=1), small_digits(seed=2)
    pa, pb, pc = a.init_params()[0], b.init_params()[0], c.init_params()[0]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["0.weight"], pc["0.weight"])
    assert torch.equal(a.batch(5)[1], b.batch(5)[1])
    assert not torch.equal(a.batch(5)[1], c.batch(5)[1])
    d = a.with_seed(2)
    assert torch.equal(d.init_params()[0]["0.weight"], pc["0.weight"])
    assert torch.equal(d.batch(5)[1], c.batch(5)[1])
    e = a.with_seed(2, keep_weights=True)  # another batch order, the same initial weights
    assert torch.equal(e.init_params()[0]["0.weight"], pa["0.weight"])
    assert torch.equal(e.batch(5)[1], c.batch(5)[1])


def test_epochs_are_permutations(digits_small) -> None:
    per_epoch = digits_small.batches_per_epoch
    seen = torch.cat([digits_small.batch(t)[1] for t in range(per_epoch)])
    assert len(seen) == per_epoch * digits_small.batch_size
    x_all = torch.cat([digits_small.batch(t)[0] for t in range(per_epoch)])
    assert len(torch.unique(x_all, dim=0)) == len(x_all)  # no example twice in an epoch


def test_training_learns_digits() -> None:
    task = small_digits(n_train=None, batch_size=64, hidden=(32,), activation="relu")
    flat, state = fit(
        task,
        make_schedule(100, 1).replace(
            {
                "lr": torch.tensor([0.1], dtype=torch.float64),
                "momentum": torch.tensor([0.9], dtype=torch.float64),
                "weight_decay": torch.tensor([5e-4], dtype=torch.float64),
            }
        ),
    )
    assert flat.evaluate(state, "test")["accuracy"] > 0.9


def test_bad_task_arguments() -> None:
    with pytest.raises(ConfigError, match="task.batch_size=1000"):
        small_digits(n_train=100, batch_size=1000)
    with pytest.raises(ConfigError, match="task.activation='swish'"):
        small_digits(activation="swish")
    # types and ranges: declared on the constructor, checked before it runs
    with pytest.raises(ConfigError, match=r"^task.val_fraction=1.5 must be a number > 0 and < 1$"):
        check_arguments("task", Digits, {"val_fraction": 1.5})
    with pytest.raises(ConfigError, match=r"^task.dim=0 must be an integer >= 1$"):
        check_arguments("task", Quadratic, {"dim": 0})


# -- outer optimisers --------------------------------------------------------------------------
def _schedule(values: list[float], bounds=(0.0, 1.0)) -> HyperSchedule:
    specs = {n: HyperSpec(len(values), bounds, learn=(n == "lr")) for n in HYPERPARAMETERS}
    return HyperSchedule(10, specs, {"lr": values, "momentum": 0.0, "weight_decay": 0.0})


def test_sign_descent_halves_on_flip_and_projects() -> None:
    opt = SignDescent({"lr": 0.1})
    s = _schedule([0.0, 0.5])
    state = opt.init(s)
    f64 = {"dtype": torch.float64}
    s, state = opt.step(s, {"lr": torch.tensor([-3.0, 2.0], **f64)}, state)
    assert s.values["lr"].tolist() == pytest.approx([0.1, 0.4])
    s, state = opt.step(s, {"lr": torch.tensor([-1.0, -2.0], **f64)}, state)  # second flips
    assert s.values["lr"].tolist() == pytest.approx([0.2, 0.45])
    assert state["step"]["lr"].tolist() == pytest.approx([0.1, 0.05])
    s, state = opt.step(s, {"lr": torch.tensor([5.0, 1.0], **f64)}, state)
    assert s.values["lr"].tolist() == pytest.approx([0.15, 0.425])
    low = _schedule([0.01])
    s2, _ = opt.step(low, {"lr": torch.tensor([1.0], **f64)}, opt.init(low))
    assert s2.values["lr"].tolist() == [0.0]  # projected to the lower bound
    assert opt.converged(s, s, {"step": {"lr": torch.tensor([1e-4, 1e-4])}}, 0.05)
    assert not opt.converged(s, s, {"step": {"lr": torch.tensor([1e-4, 0.1])}}, 0.05)
    assert opt.backtrack(state)["step"]["lr"].tolist() == pytest.approx([0.025, 0.0125])


def test_rprop_steps_are_fractions_of_the_bounds_and_grow_while_the_sign_holds() -> None:
    specs = {
        "lr": HyperSpec(2, (0.0, 2.0)),
        "momentum": HyperSpec(1, (0.0, 0.5)),
        "weight_decay": HyperSpec(1, (0.0, 0.01), learn=False),
    }
    s = HyperSchedule(10, specs, {"lr": [1.0, 1.0], "momentum": 0.25, "weight_decay": 0.0})
    opt = Rprop(step=0.1, grow=1.5, shrink=0.5, max_step=0.2, min_step=0.01)
    state = opt.init(s)
    assert set(state["step"]) == {"lr", "momentum"}  # learned keys only, whatever their names
    assert state["step"]["lr"].tolist() == pytest.approx([0.2, 0.2])  # 0.1 of width 2
    assert state["step"]["momentum"].tolist() == pytest.approx([0.05])  # 0.1 of width 0.5
    f64 = {"dtype": torch.float64}
    # the magnitude is ignored: 1e13 moves as far as 1e-3
    g = {"lr": torch.tensor([1e13, -1e-3], **f64), "momentum": torch.tensor([-2.0], **f64)}
    s1, state = opt.step(s, g, state)
    assert s1.values["lr"].tolist() == pytest.approx([0.8, 1.2])
    assert s1.values["momentum"].tolist() == pytest.approx([0.3])
    # lr[0] and momentum keep their sign: grow 1.5x; lr[1] flips: halves
    g2 = {"lr": torch.tensor([1.0, 1.0], **f64), "momentum": torch.tensor([-1.0], **f64)}
    s2, state = opt.step(s1, g2, state)
    assert state["step"]["lr"].tolist() == pytest.approx([0.3, 0.1])
    assert state["step"]["momentum"].tolist() == pytest.approx([0.075])
    assert s2.values["lr"].tolist() == pytest.approx([0.5, 1.1])
    assert s2.values["momentum"].tolist() == pytest.approx([0.375])
    assert opt.backtrack(state)["step"]["lr"].tolist() == pytest.approx([0.15, 0.05])
    s3, state = opt.step(s2, g2, state)  # 0.45 is capped at max_step: 0.2 of width 2
    assert state["step"]["lr"].tolist() == pytest.approx([0.4, 0.15])
    assert s3.values["lr"].tolist() == pytest.approx([0.1, 0.95])
    # converged once every step is below the fraction of its value (or at min_step)
    assert not opt.converged(s1, s2, state, 0.05)
    tiny = {"step": {"lr": torch.tensor([0.02, 0.02]), "momentum": torch.tensor([0.005])}}
    assert opt.converged(s1, s2, tiny, 0.0)


def test_rprop_settings_fail_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^outer.optimizer.step=1.5 must be a number > 0 and"):
        check_arguments("outer.optimizer", Rprop, {"step": 1.5})
    with pytest.raises(ConfigError, match=r"^outer.optimizer.grow=0.9 must be a number >= 1$"):
        check_arguments("outer.optimizer", Rprop, {"grow": 0.9})
    with pytest.raises(ConfigError, match=r"^outer.optimizer.min_step=0.5 must be .*=0.25$"):
        Rprop(min_step=0.5)
    with pytest.raises(ConfigError, match=r"^outer.optimizer.step has no entry for lr$"):
        Rprop(step={"momentum": 0.1}).init(_schedule([0.1]))
    with pytest.raises(ConfigError, match=r"schedule.lr.bounds=\[0.0, inf\] has no finite"):
        Rprop().init(_schedule([0.1], bounds=(0.0, float("inf"))))


def test_adam_and_sgd_move_against_the_gradient() -> None:
    g = {"lr": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    for opt in (Adam({"lr": 0.01}), SGD({"lr": 0.01})):
        s = _schedule([0.5, 0.5])
        new, _ = opt.step(s, g, opt.init(s))
        assert new.values["lr"].tolist() == pytest.approx([0.49, 0.51])


def test_clip_by_norm() -> None:
    g = {"lr": torch.tensor([3.0, 4.0]), "momentum": torch.tensor([0.3, 0.4])}
    c = clip_by_norm(g, 1.0)
    assert float(c["lr"].norm()) == pytest.approx(1.0)
    assert torch.equal(c["momentum"], g["momentum"])
    assert clip_by_norm(g, None)["lr"] is g["lr"]


def test_optimiser_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^outer.optimizer.step_size.lr=-0.1 must be a numb"):
        check_arguments("outer.optimizer", SignDescent, {"step_size": {"lr": -0.1}})
    with pytest.raises(ConfigError, match=r"^outer.optimizer.lr.momentum='x' must be a number"):
        check_arguments("outer.optimizer", Adam, {"lr": {"lr": 0.1, "momentum": "x"}})
    with pytest.raises(ConfigError, match=r"^outer.optimizer.betas=\[1.5, 0.9\] must be a list"):
        check_arguments("outer.optimizer", Adam, {"lr": {"lr": 0.1}, "betas": [1.5, 0.9]})
    with pytest.raises(ConfigError, match="no entry for lr"):
        SignDescent({"momentum": 0.1}).init(_schedule([0.1], bounds=(0.0, float("inf"))))
    with pytest.raises(ConfigError, match="no entry for lr"):
        SGD({"momentum": 0.1}).init(_schedule([0.1]))  # SGD's lr has no bounds fallback


def test_per_key_settings_fall_back_by_name_default_and_bounds() -> None:
    """A key takes its own entry, its hyperparameter's, ``default``'s, or a bounds fraction."""
    specs = {
        "lr/a": HyperSpec(1, (0.0, 1.0)),
        "lr/b": HyperSpec(1, (0.0, 1.0)),
        "momentum": HyperSpec(1, (0.0, 0.5)),
        "weight_decay": HyperSpec(1, (0.0, 0.01)),
    }
    groups = {"lr": {"a": ("0.*",), "b": ("2.*",)}}
    s = HyperSchedule(10, specs, dict.fromkeys(specs, 0.0), groups=groups)
    got = per_key("k", {"lr/a": 3.0, "lr": 2.0, "momentum": 1.0}, s, fraction=0.1)
    assert got == pytest.approx({"lr/a": 3.0, "lr/b": 2.0, "momentum": 1.0, "weight_decay": 1e-3})
    got = per_key("k", {"default": 5.0}, s)
    assert got == dict.fromkeys(specs, 5.0)


def test_validation_gradient_is_accumulated_chunk_by_chunk(digits_small) -> None:
    """Chunked (one chunk's activations at a time) and one-pass gradients agree."""
    from metahpo.inner import val_loss_and_grad

    params, buffers = digits_small.init_params()
    digits_small.eval_batch_size = 50  # 288 validation images: 6 chunks
    assert len(list(digits_small.val_loss_terms(params, buffers))) == 6
    loss, grads = val_loss_and_grad(digits_small, params, buffers)
    full = torch.func.grad_and_value(digits_small.val_loss)(params, buffers)
    assert loss == pytest.approx(float(full[1]), rel=1e-12)
    for k in params:
        torch.testing.assert_close(grads[k], full[0][k], rtol=1e-12, atol=1e-14)
