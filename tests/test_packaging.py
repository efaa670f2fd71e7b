"""What is installed lives under ``metahpo``: a user's own ``tasks.py`` or ``estimators/`` in the
working directory changes nothing, and the built-in configs name ``metahpo.*`` classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

import metahpo.estimators.forward
import metahpo.tasks.digits
from metahpo.config import config_dir

ROOT = Path(__file__).resolve().parents[1]


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def test_builtin_modules_and_config_targets_live_under_metahpo() -> None:
    assert metahpo.estimators.forward.__name__ == "metahpo.estimators.forward"
    assert metahpo.tasks.digits.Digits.__module__ == "metahpo.tasks.digits"
    targets = []
    for path in sorted(config_dir().rglob("*.yaml")):
        targets += _targets(OmegaConf.to_container(OmegaConf.load(path)))
    assert len(targets) > 20
    # search/ names Optuna's samplers and pruners (the baselines extra) directly
    libraries = ("metahpo.", "hydra_plugins.", "optuna.")
    outside = [t for t in targets if not t.startswith(libraries)]
    assert outside == []


def test_a_local_tasks_py_and_estimators_folder_change_nothing(tmp_path: Path) -> None:
    """The user's project has its own ``tasks.py`` (invoke, celery) and ``estimators/``: both
    would stop the run if imported; the CLI run from there is untouched by them."""
    (tmp_path / "tasks.py").write_text("raise SystemExit('the local tasks.py was imported')\n")
    (tmp_path / "estimators").mkdir()
    (tmp_path / "estimators" / "__init__.py").write_text(
        "raise SystemExit('the local estimators/ was imported')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = tmp_path / "run"
    args = ["task=quadratic", "experiment=smoke", "progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "quadratic" and results["outer_steps"] == 2
    config = OmegaConf.load(out / "config.yaml")
    assert config.task._target_ == "metahpo.tasks.quadratic.Quadratic"
    # the local module is what a plain ``import tasks`` finds there: the names do collide
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('tasks').origin)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(probe.stdout.strip()) == tmp_path / "tasks.py"


def test_the_install_exposes_no_top_level_tasks_or_estimators(tmp_path: Path) -> None:
    """From outside the checkout only ``metahpo`` is importable (editable install or wheel)."""
    code = (
        "import importlib.util as u, metahpo.tasks.digits, metahpo.estimators.forward;"
        "print(u.find_spec('tasks'), u.find_spec('estimators'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None", "None"]
