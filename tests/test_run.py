"""End to end: the outer loop, results.json, plots, checkpoints, W&B files, the CLI, the wheel."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import metahpo
from metahpo.estimators.forward import ForwardMode
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS

QUICK = ["task=quadratic", "experiment=smoke", "progress=false"]
ROOT = Path(__file__).resolve().parents[1]


def test_public_api_hypergradient_matches_the_estimator() -> None:
    cfg = metahpo.compose(["task=quadratic", "schedule.lr.init=0.1", "schedule.momentum.init=0.5"])
    hg = metahpo.hypergradient(cfg)
    assert hg.grads["lr"].shape == (cfg.schedule.lr.segments,)
    from metahpo.build import build

    setup = build(cfg)
    again = ForwardMode().hypergradient(setup.task, setup.schedule)
    assert hg.meta_loss == again.meta_loss
    for n in HYPERPARAMETERS:
        assert torch.equal(hg.grads[n], again.grads[n])


def test_run_writes_documented_results(tmp_path: Path) -> None:
    cfg = metahpo.compose([*QUICK, "outer.steps=4", "final.seeds=[0,1]"])
    out = metahpo.run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(out))
    assert out["schema_version"] == 3
    assert (out["estimator"], out["task"], out["seed"], out["horizon"]) == (
        "forward",
        "quadratic",
        0,
        20,
    )
    assert out["stopped"] in ("max_steps", "converged")
    steps = [h for h in out["history"] if h["hypergradient"] is not None]
    assert len(steps) == out["outer_steps"] <= 4
    for h in steps:
        assert set(h) >= {"meta_loss", "hypergradient", "seconds", "peak_memory_mb", "schedule"}
        assert len(h["hypergradient"]["lr"]) == 2
    # from all-zero hyperparameters the meta-loss falls
    assert min(h["meta_loss"] for h in out["history"]) < 0.5 * out["history"][0]["meta_loss"]
    assert out["learned_schedule"]["lr"]["values"] == next(
        h["schedule"]["lr"] for h in out["history"] if h["outer_step"] == out["selected_outer_step"]
    )
    for label in ("learned", "baseline"):
        final = out["final"][label]
        assert len(final["per_seed"]) == 2 and final["test_loss"] > 0
        assert final["test_accuracy"] is None  # regression
    assert out["final"]["learned"]["test_loss"] < out["history"][0]["meta_loss"]
    # mean ± sample sd over the final seeds, and the paired difference with its t interval
    learned, baseline = (out["final"][k]["per_seed"] for k in ("learned", "baseline"))
    losses = [r["test_loss"] for r in learned]
    assert out["final"]["learned"]["test_loss_std"] == pytest.approx(
        abs(losses[0] - losses[1]) / math.sqrt(2), rel=1e-12
    )
    pairs = [a["test_loss"] - b["test_loss"] for a, b in zip(learned, baseline, strict=True)]
    diff = out["final"]["difference"]
    assert [d["seed"] for d in diff["per_seed"]] == [0, 1]
    assert [d["test_loss"] for d in diff["per_seed"]] == pairs
    mean = (pairs[0] + pairs[1]) / 2
    half = 12.706204736174707 * abs(pairs[0] - pairs[1]) / 2  # t(0.975, 1) * sd / sqrt(2)
    assert diff["test_loss"] == pytest.approx(mean, rel=1e-12)
    assert diff["test_loss_ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9)
    assert out["final"]["baseline"]["cache"] is None  # not a sweep: nothing shared
    for name in ("schedules.png", "meta_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "horizon: 20" in (tmp_path / "config.yaml").read_text()
    assert out["wall_time_seconds"] > 0


def test_digits_reports_accuracy(tmp_path: Path) -> None:
    cfg = metahpo.compose(["experiment=smoke", "progress=false", "task.n_train=256"])
    out = metahpo.run(cfg, tmp_path)
    for label in ("learned", "baseline"):
        assert 0.0 < out["final"][label]["test_accuracy"] <= 1.0
    assert all(0.0 <= h["val_accuracy"] <= 1.0 for h in out["history"])
    assert "learned" in metahpo.runner.format_table(out)


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    args = [*QUICK, "outer.steps=4"]
    straight = metahpo.run(metahpo.compose(args), tmp_path / "straight")

    calls = {"n": 0}
    original = ForwardMode.hypergradient

    def killed_at_third(self, task, schedule):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, task, schedule)

    monkeypatch.setattr(ForwardMode, "hypergradient", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        metahpo.run(metahpo.compose(args), tmp_path / "killed")
    partial = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert partial["stopped"] == "interrupted" and len(partial["history"]) == 2
    monkeypatch.setattr(ForwardMode, "hypergradient", original)

    resumed = metahpo.run(
        metahpo.compose([*args, f"resume={tmp_path / 'killed'}"]), tmp_path / "resumed"
    )
    assert resumed["learned_schedule"] == straight["learned_schedule"]
    assert [h["meta_loss"] for h in resumed["history"]] == pytest.approx(
        [h["meta_loss"] for h in straight["history"]], rel=1e-12
    )


def test_resume_rejects_a_different_schedule_shape(tmp_path: Path) -> None:
    metahpo.run(metahpo.compose([*QUICK, "outer.steps=1"]), tmp_path / "a")
    cfg = metahpo.compose([*QUICK, "schedule.lr.segments=4", f"resume={tmp_path / 'a'}"])
    with pytest.raises(
        metahpo.ConfigError,
        match="checkpoint was made with schedule.lr.segments=2, this config has schedule.lr.seg",
    ):
        metahpo.run(cfg)
    with pytest.raises(metahpo.ConfigError, match="no checkpoint.pt there"):
        metahpo.run(metahpo.compose([*QUICK, f"resume={tmp_path / 'missing'}"]))


def test_object_first_run_equals_the_config_run_and_resumes(tmp_path: Path) -> None:
    """Objects in hand (a task, an estimator, an outer optimiser) give the config run's result,
    with its checkpoint, resume and outputs; another task class cannot resume it."""
    from metahpo.outer import Rprop
    from metahpo.tasks.quadratic import Quadratic

    args = [*QUICK, "outer.steps=3", "seed=3"]
    by_config = metahpo.run(metahpo.compose(args), tmp_path / "config")
    # the objects differ from what the config names (seed 0 there; forward mode with chunks)
    objects = dict(
        task=Quadratic(seed=3, n_train=64, batch_size=16),
        estimator=ForwardMode(chunk_size=1),
        outer=Rprop(),
    )
    cfg = [*QUICK, "outer.steps=2"]
    first = metahpo.run(cfg, tmp_path / "objects", **objects)
    assert (tmp_path / "objects" / "checkpoint.pt").is_file()
    saved = OmegaConf.load(tmp_path / "objects" / "config.yaml")
    assert saved.task._target_ == "metahpo.tasks.quadratic.Quadratic"
    assert saved.estimator == {
        "_target_": "metahpo.estimators.forward.ForwardMode",
        "name": "forward",
    }
    assert (first["seed"], first["dtype"]) == (3, "float64")
    more = metahpo.run([*QUICK, "outer.steps=3"], tmp_path / "objects", **objects)
    assert len(more["history"]) == len(by_config["history"])
    assert [h["meta_loss"] for h in more["history"]] == pytest.approx(
        [h["meta_loss"] for h in by_config["history"]], rel=1e-12
    )
    for key, entry in by_config["learned_schedule"].items():
        assert more["learned_schedule"][key]["values"] == pytest.approx(entry["values"], rel=1e-12)
    assert more["final"]["learned"]["test_loss"] == pytest.approx(
        by_config["final"]["learned"]["test_loss"], rel=1e-12
    )

    class OtherTask(Quadratic):
        pass

    with pytest.raises(metahpo.ConfigError, match=r"checkpoint was made with task\._target_="):
        metahpo.run(
            [*QUICK, "outer.steps=3"], tmp_path / "objects", task=OtherTask(seed=3), outer=Rprop()
        )
    with pytest.raises(metahpo.ConfigError, match=r"^estimator=int object has no hypergradient"):
        metahpo.run(QUICK, estimator=3)  # type: ignore[arg-type]


def _cli(args: list[str], cwd: Path, module: bool = True) -> subprocess.CompletedProcess[str]:
    exe = (
        [sys.executable, "-m", "metahpo"]
        if module
        else [str(Path(sys.executable).with_name("metahpo"))]
    )
    proc = subprocess.run([*exe, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("module", [True, False], ids=["python -m metahpo", "metahpo"])
def test_cli_run_prints_the_table_and_writes_the_run(tmp_path: Path, module: bool) -> None:
    proc = _cli([*QUICK, f"hydra.run.dir={tmp_path}/run"], tmp_path, module=module)
    assert "learned" in proc.stdout and "baseline" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "quadratic"
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def test_cli_multirun_gives_one_run_per_value(tmp_path: Path) -> None:
    _cli(["-m", *QUICK, "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    seeds = sorted(
        json.loads(p.read_text())["seed"] for p in (tmp_path / "sweep").glob("*/results.json")
    )
    assert seeds == [0, 1]


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_from_them(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("metahpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "metahpo/configs/config.yaml" in names
    assert "metahpo/configs/estimator/forward.yaml" in names
    assert "metahpo/estimators/forward.py" in names and "metahpo/tasks/digits.py" in names
    assert {n.split("/")[0] for n in names} == {
        "metahpo",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert not any("__pycache__" in n for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import metahpo, metahpo.config as c; "
        "print(c.config_dir()); print(metahpo.compose(['task=quadratic']).horizon); "
        "import metahpo.estimators.forward as f; print(f.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == str(site / "metahpo" / "configs") and lines[1] == "50"
    assert lines[2] == str(site / "metahpo" / "estimators" / "forward.py")


def test_a_failing_sweep_job_is_reported_and_the_sweep_goes_on(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", "-m", *QUICK, "estimator=truncated_reverse",
         "estimator.K=300,5", f"hydra.sweep.dir={tmp_path}/sweep"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("metahpo: error")]
    assert errors[0].startswith("metahpo: error in job 0 (")
    assert "estimator.K=300 must be an integer from 1 to the horizon (20)" in errors[0]
    assert errors[-1].startswith("metahpo: error: 1 sweep job(s) failed")
    assert not (tmp_path / "sweep" / "0" / "results.json").exists()
    assert json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())["outer_steps"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_auto_on_a_cpu_says_so_with_the_estimated_time(tmp_path: Path, caplog) -> None:
    import logging
    import re

    with caplog.at_level(logging.WARNING, logger="metahpo"):
        metahpo.run([*QUICK, "device=auto"], tmp_path / "auto")
    lines = [r.getMessage() for r in caplog.records if "device=auto" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    found = re.search(
        r"estimated ([\d.]+) (s|min|h|days) \(a plain inner step ([\d.e+-]+) ms", lines[0]
    )
    assert found and float(found.group(3)) > 0, lines[0]
    assert "x 20 steps x (3 estimates at ~" in lines[0]  # smoke: 2 outer steps + the last score
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metahpo"):
        metahpo.run([*QUICK, "device=cpu"], tmp_path / "cpu")
    assert not [r for r in caplog.records if "device=auto" in r.getMessage()]


@pytest.mark.parametrize("experiment", ["mnist_lenet", "svhn_lenet", "cifar10_wrn"])
def test_gpu_experiments_are_marked_and_their_cpu_line_gives_the_cost(
    experiment: str, monkeypatch
) -> None:
    """The paper-scale recipes are marked for a GPU by ``device: auto``; on a CPU the one line
    prices the whole run from the probe (stubbed here at WRN-16-1's measured 0.532 s a plain
    step, docs/benchmarks.md) and the cost model: days, not minutes."""
    from types import SimpleNamespace

    import metahpo.estimators.auto as auto
    from metahpo.build import optimizer_from_config
    from metahpo.runner import _cpu_fallback
    from metahpo.schedule_config import schedule_from_config

    cfg = metahpo.compose([f"experiment={experiment}"])
    assert cfg.device == "auto"
    plain = OmegaConf.to_container(cfg.schedule, resolve=True)
    schedule = schedule_from_config(plain, cfg.horizon, optimizer_from_config(cfg.optimizer), {})
    monkeypatch.setattr(auto, "plain_step_seconds", lambda task, schedule, steps=3: 0.532)
    monkeypatch.setattr(auto, "measure_rates", lambda task, schedule, **kw: auto.Rates())
    line = _cpu_fallback(
        cfg, SimpleNamespace(task=None, schedule=schedule, estimator=ForwardMode())
    )
    assert "\n" not in line and line.startswith("device=auto found no CUDA device")
    runs = min((cfg.outer.steps + 1) * cfg.outer.seeds, cfg.outer.budget)
    cost, _ = auto.relative_cost(ForwardMode(), schedule)
    days = 0.532 * cfg.horizon * (cost * runs + 2 * len(cfg.final.seeds)) / 86400
    assert f"estimated {days:.1f} days (a plain inner step 532 ms x {cfg.horizon} steps" in line
    assert days > 1
