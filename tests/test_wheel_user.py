"""A wheel in a fresh virtual environment, used from a directory outside the repository with a
user's own task, estimator and outer optimiser (tests/user_project): through a config directory
on the CLI (``--config-dir`` and ``hydra.searchpath``) and through the user's own
``@hydra.main`` app over ``pkg://metahpo.configs``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = Path(__file__).resolve().parent / "user_project"
SETTINGS = ["task=blobs", "estimator=central", "outer=halving", "schedule=constant",
            "final.seeds=[0]", "progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (no dependencies) into a new venv that reuses this environment's
    packages (torch, hydra...) through a path entry: nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp.glob("metahpo-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # this environment's packages, after the venv's own (its .pth files are not run: the
    # editable metahpo of the checkout stays out)
    (Path(purelib) / "reuse.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(PROJECT, tmp_path / "project")
    return tmp_path / "project"


def _check(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "blobs" and results["estimator"] == "central_differences"
    assert results["outer_loop"]["optimizer"] == "mypkg.plugins.HalvingGD"
    assert results["outer_steps"] == 2 and results["final"]["learned"]["test_loss"] > 0


@pytest.mark.slow
def test_cli_from_a_wheel_with_a_users_config_dir(venv: Path, project: Path) -> None:
    metahpo = str(venv / "bin" / "metahpo")
    where = _run([metahpo, "--docs"], project)
    assert Path(where.stdout.strip(), "extending.md").is_file(), where.stderr
    assert str(venv) in where.stdout
    proc = _run([metahpo, "--config-dir", "myconfigs", *SETTINGS, "hydra.run.dir=run1"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(project / "run1")
    search = f"hydra.searchpath=[file://{project / 'myconfigs'}]"
    proc = _run([metahpo, search, *SETTINGS, "hydra.run.dir=run2"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(project / "run2")
    bad = _run([metahpo, "--config-dir", "myconfigs", "task=blobz"], project)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "metahpo: error: task='blobz' is unknown; allowed: blobs, cifar10, digits, digits_logreg, "
        "fashion_mnist, mnist, quadratic, svhn"
    )


@pytest.mark.slow
def test_a_users_own_hydra_app_over_pkg_metahpo_configs(venv: Path, project: Path) -> None:
    proc = _run([str(venv / "bin" / "python"), "app.py", "hydra.run.dir=run"], project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "task": "blobs", "estimator": "central_differences"
    }  # fmt: skip
    _check(project / "run")
