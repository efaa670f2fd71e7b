"""docs/extending.md works as written: a user's own estimator, inner optimiser and task, from
their own package."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import metahpo
from metahpo.build import build
from tests.conftest import assert_grads_close

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture
def user_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write the doc's code blocks to a package and a config directory of the user's."""
    blocks = re.findall(r"```(python|yaml)\n(.*?)```", DOC.read_text(), flags=re.S)
    written = 0
    for _lang, body in blocks:
        target = re.search(r"^# (mypkg/\S+\.py|configs/\S+\.yaml)", body, flags=re.M)
        if not target:
            continue
        rel = target.group(1).replace("configs/", "myconfigs/", 1)
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        written += 1
    assert written == 8
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("mypkg")]:
        del sys.modules[name]


def test_user_estimator_and_task_from_their_own_config_dir(user_project: Path) -> None:
    search = f"hydra.searchpath=[file://{user_project / 'myconfigs'}]"
    common = [
        search,
        "task=wine",
        "dtype=float64",
        "horizon=12",
        "schedule=constant",
        "schedule.lr.init=0.1",
        "schedule.momentum.init=0.5",
    ]
    cfg = metahpo.compose([*common, "estimator=central_differences", "estimator.eps=1e-5"])
    setup = build(cfg)
    assert setup.task.name == "wine"
    theirs = setup.estimator.hypergradient(setup.task, setup.schedule)
    ours = metahpo.hypergradient(metahpo.compose([*common, "estimator=forward"]))
    assert theirs.meta_loss == pytest.approx(ours.meta_loss, rel=1e-12)
    assert_grads_close(theirs.grads, ours.grads, rtol=1e-6)


def test_user_optimiser_from_their_own_config_dir(user_project: Path) -> None:
    """The doc's SmoothLion: its schedule file, forward mode equal to exact reverse."""
    search = f"hydra.searchpath=[file://{user_project / 'myconfigs'}]"
    common = [search, "task=wine", "dtype=float64", "horizon=8", "optimizer=smooth_lion"]
    setup = build(metahpo.compose([*common, "estimator=forward"]))
    assert setup.schedule.keys == ("lr", "temperature")
    assert setup.schedule.values["temperature"].tolist() == [1e-3]  # the class's default
    assert setup.baseline.optimizer.name == "smooth_lion"
    fwd = setup.estimator.hypergradient(setup.task, setup.schedule)
    rev = metahpo.hypergradient(metahpo.compose([*common, "estimator=exact_reverse"]))
    assert float(fwd.grads["temperature"].abs().max()) > 0
    assert_grads_close(fwd.grads, rev.grads, rtol=1e-10)


def test_the_docs_estimator_passes_check_estimator(user_project: Path) -> None:
    """The doc's own check: ``metahpo.testing.check_estimator`` on its CentralDifferences."""
    from mypkg.zero_order import CentralDifferences  # written by the fixture

    from metahpo.testing import check_estimator

    result = check_estimator(CentralDifferences(eps=1e-5), rtol=1e-5)
    assert result.error_vs_central < 1e-5 and result.error_vs_forward < 1e-5


def test_objects_first_example_runs_as_written(tmp_path: Path) -> None:
    section = DOC.read_text().split("### Objects first", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert code is not None
    body = code.group(1).replace('"runs/objects"', repr(str(tmp_path / "run")))
    scope: dict[str, object] = {}
    exec(compile(body, "extending.md", "exec"), scope)  # noqa: S102
    out, hg = scope["out"], scope["hg"]
    assert (tmp_path / "run" / "results.json").is_file()
    assert len(out["final"]["learned"]["per_seed"]) == 2  # type: ignore[index]
    assert hg.grads["lr"].shape == (out["learned_schedule"]["lr"]["segments"],)  # type: ignore[attr-defined,index]


def test_users_parameterisation_is_exact_in_every_estimator(user_project: Path) -> None:
    common = [
        "task=digits",
        "dtype=float64",
        "task.n_train=96",
        "task.batch_size=32",
        "task.hidden=[12]",
        "task.activation=tanh",
        "horizon=9",
        "schedule=lr_only",
        "schedule.lr.segments=1",
        "schedule.lr.param=mypkg.power_decay.PowerDecay",
        "schedule.lr.init=[0.1,1.5]",
        "schedule.lr.bounds=[1.0e-3,1.0]",
    ]
    setup = build(metahpo.compose([*common, "estimator=forward"]))
    assert type(setup.schedule.param("lr")).__name__ == "PowerDecay"
    lr = setup.schedule.per_step("lr")
    assert float(lr[0]) == pytest.approx(0.1) and float(lr[-1]) == pytest.approx(0.1 / 9**1.5)
    forward = setup.estimator.hypergradient(setup.task, setup.schedule)
    exact = metahpo.hypergradient(metahpo.compose([*common, "estimator=exact_reverse"]))
    assert_grads_close(forward.grads, exact.grads, rtol=1e-10)
    from tests.conftest import central_differences

    assert_grads_close(forward.grads, central_differences(setup.task, setup.schedule), rtol=1e-6)
    with pytest.raises(metahpo.ConfigError, match=r"^schedule\.lr: power_decay needs"):
        metahpo.compose(
            [*common[:-2], "schedule.lr.init=[0.1,9.0]", "schedule.lr.bounds=[1.0e-3,1.0]"]
        )
