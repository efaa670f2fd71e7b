"""Sweeps through Hydra's launchers: every job writes its own complete results.json, and a
failing job is reported in one line and fails the sweep without stopping the other jobs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metahpo import compare

QUICK = ["task=quadratic", "experiment=smoke", "progress=false"]
PLUGINS = {
    "joblib_local": "hydra_plugins.hydra_joblib_launcher",
    "slurm_local": "hydra_plugins.hydra_submitit_launcher",
}


def sweep(launcher: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(PLUGINS[launcher])  # an optional extra; the dev extras install both
    return subprocess.run(
        [sys.executable, "-m", "metahpo", "-m", f"hydra/launcher={launcher}", *QUICK, *args,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip


def finished_runs(directory: Path) -> list[tuple[str, int, int, bool]]:
    return sorted(
        (r["estimator"], r["seed"], r["outer_steps"], r["final"] is not None)
        for r in (json.loads(p.read_text()) for p in directory.glob("*/results.json"))
    )


@pytest.mark.slow
def test_joblib_sweep_over_estimators_and_seeds(tmp_path: Path) -> None:
    proc = sweep("joblib_local", ["estimator=forward,truncated_reverse", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finished_runs(tmp_path / "sweep") == [
        ("forward", 0, 2, True),
        ("forward", 1, 2, True),
        ("truncated_reverse", 0, 2, True),
        ("truncated_reverse", 1, 2, True),
    ]
    # metahpo-compare reads the launcher's sweep directory like any other
    compare.main([str(tmp_path / "sweep")])
    rows = list(csv.DictReader((tmp_path / "sweep" / "comparison" / "report.csv").open()))
    assert sorted((r["estimator"], r["seed"]) for r in rows) == [
        ("forward", "0"),
        ("forward", "1"),
        ("truncated_reverse", "0"),
        ("truncated_reverse", "1"),
    ]


@pytest.mark.slow
def test_submitit_local_sweep_over_seeds(tmp_path: Path) -> None:
    proc = sweep("slurm_local", ["seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finished_runs(tmp_path / "sweep") == [("forward", 0, 2, True), ("forward", 1, 2, True)]
    assert len(list((tmp_path / "sweep").glob(".submitit/*/*_log.out"))) == 2  # submitit's logs


@pytest.mark.slow
def test_a_failing_job_in_another_process_fails_the_sweep(tmp_path: Path) -> None:
    proc = sweep("joblib_local", ["estimator=truncated_reverse", "estimator.K=300,5"], tmp_path)
    assert proc.returncode == 1
    assert (
        "metahpo: error: job 0 (task=quadratic experiment=smoke progress=False "
        "estimator=truncated_reverse estimator.K=300) failed: estimator.K=300 must be an integer "
        "from 1 to the horizon (20)"
    ) in proc.stderr.splitlines()
    assert finished_runs(tmp_path / "sweep") == [("truncated_reverse", 0, 2, True)]


def test_slurm_launcher_config_composes_with_our_defaults() -> None:
    """What `metahpo -m hydra/launcher=slurm` would hand submitit (no cluster needed)."""
    pytest.importorskip(PLUGINS["slurm_local"])
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metahpo.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.timeout_min, launcher.gpus_per_node, launcher.partition) == (240, 1, "gpu")
    assert launcher.array_parallelism == 64
