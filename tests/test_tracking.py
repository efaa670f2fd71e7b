"""Experiment tracking: W&B runs read back from their files, metahpo-compare's report, and W&B
failures that never cost a run its results."""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import wandb
from omegaconf import OmegaConf

import metahpo
from metahpo import compare
from metahpo import results as results_lib
from metahpo.core import ConfigError, DivergenceError
from metahpo.loggers import resolve_mode, step_metrics, sweep_group
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from tests.wandb_files import read_run

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["task=quadratic", "experiment=smoke", "progress=false", "outer.steps=3"]
# Two estimators x two outer-loop seeds on digits, each retrained with the same two final
# seeds: the baseline's retraining is shared through the sweep's cache.
SWEEP = [
    "experiment=smoke",
    "task.n_train=256",
    "progress=false",
    "estimator=forward,greedy",
    "seed=0,1",
    "final.seeds=[0,1]",
]
TRACKERS = "logger=[wandb,tensorboard,csv]"


def _env(root: Path, **extra: str) -> dict[str, str]:
    """This environment without any W&B settings or credentials: no API key, no mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "NETRC": str(root / "no-netrc"), "WANDB_SILENT": "true", **extra}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``metahpo -m ...`` with W&B, TensorBoard and CSV, no API key and no W&B mode: offline
    W&B runs."""
    root = tmp_path_factory.mktemp("tracking")
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", "-m", *SWEEP, TRACKERS]
        + [f"hydra.sweep.dir={root / 'sweep'}"],
        capture_output=True,
        text=True,
        cwd=root,
        env=_env(root),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "cli.log").write_text(proc.stdout + proc.stderr)
    return root / "sweep"


def _runs(sweep: Path) -> list[Path]:
    runs = sorted(p for p in sweep.iterdir() if (p / "results.json").is_file())
    assert len(runs) == 4
    return runs


@pytest.mark.slow  # shares one ~25 s sweep
def test_sweep_runs_are_in_wandb_as_in_results_json(sweep: Path) -> None:
    cli_log = (sweep.parent / "cli.log").read_text()
    for run in _runs(sweep):
        results = json.loads((run / "results.json").read_text())
        (wb_dir,) = (run / "wandb").glob("offline-run-*")
        assert f"wandb: offline (no API key found); upload with `wandb sync {wb_dir}`" in cli_log
        logged = read_run(wb_dir)

        steps = [h for h in results["history"] if h["hypergradient"] is not None]
        *rows, final_row = [h for h in logged["history"] if "meta_loss" in h]
        assert len(rows) == len(steps) == results["outer_steps"] == 2
        for row, h in zip(rows, steps, strict=True):
            assert row["_step"] == h["outer_step"]
            for key in ("meta_loss", "val_accuracy", "seconds", "peak_memory_mb"):
                assert row[key] == h[key]
            for n in HYPERPARAMETERS:
                assert [row[f"{n}/{i}"] for i in range(2)] == h["schedule"][n]
                assert [row[f"hypergrad/{n}/{i}"] for i in range(2)] == h["hypergradient"][n]
                norm = math.hypot(*h["hypergradient"][n])
                assert row[f"hypergrad_norm/{n}"] == pytest.approx(norm, rel=1e-12)

        # the summary and the final row: the selected schedule and the final metrics, not the
        # last outer step's values
        summary = results_lib.summary(results)
        selected = next(
            h
            for h in results["history"]
            if h["outer_step"] == results["selected_outer_step"] and not h.get("online")
        )
        assert final_row["_step"] == results["outer_steps"]
        for numbers in (logged["summary"], final_row):
            assert {k: numbers[k] for k in summary} == summary
            assert numbers["meta_loss"] == selected["meta_loss"]
            assert numbers["val_accuracy"] == selected["val_accuracy"]
            for n, spec in results["learned_schedule"].items():
                assert [numbers[f"{n}/{i}"] for i in range(2)] == spec["values"]
            for label in ("learned", "baseline", "difference"):
                for key in ("test_accuracy", "test_loss"):
                    part = results["final"][label]
                    assert numbers[f"{label}/{key}"] == part[key]
                    assert numbers[f"{label}/{key}_std"] == part[f"{key}_std"]
            ci = results["final"]["difference"]["test_accuracy_ci95"]
            assert [numbers[f"difference/test_accuracy_ci95_{e}"] for e in ("low", "high")] == ci
        assert logged["summary"]["selected/meta_loss"] == selected["meta_loss"]
        assert logged["summary"]["estimator_peak_memory_mb"] == results["estimator_peak_memory_mb"]

        assert logged["config"] == OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
        assert logged["config"]["seed"] == results["seed"]
        assert logged["group"] == sweep_group(sweep) == f"{sweep.parent.name}-sweep"
        assert logged["tags"] == [results["estimator"], "digits"]
        assert logged["job_type"] == "train" and logged["exit_code"] == 0
        files = wb_dir / "files"
        for name in ("schedules", "meta_loss"):
            assert logged["summary"][f"plots/{name}._type"] == "image-file"
            assert (files / logged["summary"][f"plots/{name}.path"]).read_bytes()[:8] == PNG
        table = json.loads((files / logged["summary"]["tables/learned_schedule.path"]).read_text())
        columns, data = results_lib.schedule_rows(results)
        assert table["columns"] == columns and table["data"] == data
        assert [r[5] for r in data if r[0] == "lr"] == results["learned_schedule"]["lr"]["values"]


def _expected_rows(results: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(step, metrics) a tracker got: each outer step's, then the summary one step later."""
    steps = [h for h in results["history"] if h["hypergradient"] is not None]
    rows = [(h["outer_step"], step_metrics(h)) for h in steps]
    return [*rows, (results["outer_steps"], results_lib.summary(results))]


@pytest.mark.slow  # shares one ~25 s sweep
def test_sweep_runs_are_in_tensorboard_as_in_results_json(sweep: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in _runs(sweep):
        results = json.loads((run / "results.json").read_text())
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        expected: dict[str, list[tuple[int, float]]] = {}
        for step, metrics in _expected_rows(results):
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    expected.setdefault(key, []).append((step, value))
        assert set(events.Tags()["scalars"]) == set(expected)
        for key, points in expected.items():
            got = [(e.step, e.value) for e in events.Scalars(key)]
            assert [s for s, _ in got] == [s for s, _ in points], key
            # TensorBoard stores float32
            assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30)
        # the last value of a schedule entry is the learned schedule's, as in W&B
        for n, spec in results["learned_schedule"].items():
            assert [events.Scalars(f"{n}/{i}")[-1].value for i in range(2)] == pytest.approx(
                spec["values"], rel=1e-6
            )
        assert {"config", "summary"} <= set(events.Tags()["tensors"]) | {
            t.rsplit("/", 1)[0] for t in events.Tags()["tensors"]
        }
        assert set(events.Tags()["images"]) == {"plots/schedules", "plots/meta_loss"}


@pytest.mark.slow  # shares one ~25 s sweep
def test_sweep_runs_are_in_csv_as_in_results_json(sweep: Path) -> None:
    for run in _runs(sweep):
        results = json.loads((run / "results.json").read_text())
        rows = _csv(run / "csv" / "metrics.csv")
        expected = _expected_rows(results)
        assert [int(r["step"]) for r in rows] == [step for step, _ in expected]
        for row, (_, metrics) in zip(rows, expected, strict=True):
            assert {k: v for k, v in row.items() if v != "" and k != "step"} == {
                k: str(v) for k, v in metrics.items()
            }
        summary = dict((r["key"], r["value"]) for r in _csv(run / "csv" / "summary.csv"))
        assert summary == {k: str(v) for k, v in results_lib.summary(results).items()}
        table = list(csv.reader((run / "csv" / "tables_learned_schedule.csv").open()))
        columns, data = results_lib.schedule_rows(results)
        assert table == [columns, *([str(x) for x in r] for r in data)]


@pytest.fixture(scope="module")
def report(sweep: Path) -> Path:
    out = sweep.parent / "report"
    exe = Path(sys.executable).with_name("metahpo-compare")
    proc = subprocess.run(
        [str(exe), str(sweep), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 runs compared" in proc.stdout
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _numbers(results: dict[str, Any]) -> dict[str, float]:
    """What the report should say about one run, straight from its results.json."""
    final = results["final"]
    out = {
        "meta_loss": next(
            h["meta_loss"]
            for h in results["history"]
            if h["outer_step"] == results["selected_outer_step"] and not h.get("online")
        ),
        "outer_steps": results["outer_steps"],
        "wall_time_seconds": results["wall_time_seconds"],
        "peak_memory_mb": results["estimator_peak_memory_mb"],
    }
    for label in ("learned", "baseline", "difference"):
        for key in ("test_accuracy", "test_loss"):
            out[f"{label}_{key}"] = final[label][key]
            out[f"{label}_{key}_sd_final"] = final[label][f"{key}_std"]
        for key in ("test_accuracy", "test_loss"):
            if label == "difference":
                low, high = final[label][f"{key}_ci95"]
                out[f"{label}_{key}_ci95_low"], out[f"{label}_{key}_ci95_high"] = low, high
    return out


@pytest.mark.slow  # shares one ~25 s sweep
def test_compare_report_matches_the_runs(sweep: Path, report: Path) -> None:
    by_estimator: dict[str, list[dict[str, Any]]] = {}
    rows = _csv(report / "report.csv")
    assert len(rows) == 4
    for row in rows:
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert (row["estimator"], row["task"]) == (results["estimator"], "digits")
        assert int(row["seed"]) == results["seed"] and row["final_seeds"] == "0 1"
        expected = _numbers(results)
        assert {k: float(row[k]) for k in expected} == expected
        by_estimator.setdefault(row["estimator"], []).append(results)
    assert sorted(by_estimator) == ["forward", "greedy"]

    # the baseline was retrained once per final seed for the whole sweep, from its cache
    every = [r for group in by_estimator.values() for r in group]
    computed = [p["seed"] for r in every for p in r["final"]["baseline"]["per_seed"]]
    fresh = [
        p["seed"] for r in every for p in r["final"]["baseline"]["per_seed"] if not p["cached"]
    ]
    assert sorted(fresh) == [0, 1] and len(computed) == 8
    assert len(list((sweep / ".baseline_cache").glob("*.json"))) == 2
    baselines = {json.dumps(r["final"]["baseline"]["per_seed"][0]["test_loss"]) for r in every}
    assert len(baselines) == 1

    summary = {s["estimator"]: s for s in _csv(report / "summary.csv")}
    text = (report / "report.md").read_text()
    for estimator, group in by_estimator.items():
        s = summary[estimator]
        assert (s["seeds"], s["final_seeds"]) == ("0 1", "0 1")
        for label in ("learned", "baseline"):
            for key in ("test_accuracy", "test_loss"):
                column = f"{label}_{key}"
                means = [r["final"][label][key] for r in group]
                sds = [r["final"][label][f"{key}_std"] for r in group]
                assert float(s[f"{column}_mean"]) == pytest.approx(statistics.fmean(means))
                assert float(s[f"{column}_sd_outer"]) == pytest.approx(
                    statistics.stdev(means), abs=1e-15
                )
                rms = math.sqrt(statistics.fmean(x * x for x in sds))
                assert float(s[f"{column}_sd_final"]) == pytest.approx(rms, rel=1e-12)
        # the paired difference over all (outer seed, final seed) pairs, with the crossed
        # interval computed by hand: outer-seed means and final-seed means
        d = {
            (r["seed"], p["seed"]): p["test_accuracy"]
            for r in group
            for p in r["final"]["difference"]["per_seed"]
        }
        assert len(d) == 4
        mean = statistics.fmean(d.values())
        outer = [statistics.fmean(d[o, f] for f in (0, 1)) for o in (0, 1)]
        final = [statistics.fmean(d[o, f] for o in (0, 1)) for f in (0, 1)]
        half = 12.706204736174707 * math.sqrt(
            statistics.variance(outer) / 2 + statistics.variance(final) / 2
        )
        assert float(s["difference_test_accuracy_mean"]) == pytest.approx(mean, rel=1e-12)
        low, high = (
            float(s["difference_test_accuracy_ci95_low"]),
            float(s["difference_test_accuracy_ci95_high"]),
        )
        assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-9)
        assert half > 0  # the final seeds' spread is counted even where the runs agree
        shown = f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
        assert f" | {shown} | " in text
        accs = [100 * r["final"]["learned"]["test_accuracy"] for r in group]
        rms = math.sqrt(
            statistics.fmean((100 * r["final"]["learned"]["test_accuracy_std"]) ** 2 for r in group)
        )
        cell = (
            f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} (outer) "
            f"± {rms:.2f} (final)"
        )
        assert f"| {estimator} | digits | 0 1 | 0 1 | {cell} |" in text
    assert "(outer)" in text and "(final)" in text and "95 % confidence interval" in text

    for name in ("meta_loss", "schedules"):
        image = matplotlib.image.imread(report / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 1000
        assert image[..., :3].std() > 0.05  # not a blank canvas
        assert f"]({name}.png)" in text


@pytest.mark.slow  # shares one ~25 s sweep
def test_compare_logs_tables_and_plots_to_wandb(
    sweep: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(sweep), "--out", str(tmp_path / "bad"), "--wandb"])
    assert exit_.value.code == 2 and not (tmp_path / "bad").exists()  # checked before writing
    err = capsys.readouterr().err
    allowed = "allowed: online, offline, disabled"
    assert err == f"metahpo-compare: error: WANDB_MODE='sometimes' is unknown; {allowed}\n"

    monkeypatch.setenv("WANDB_MODE", "offline")
    compare.main([str(sweep), "--out", str(tmp_path), "--wandb"])
    (wb_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_run(wb_dir)
    assert logged["job_type"] == "compare" and logged["exit_code"] == 0
    assert logged["group"] == sweep_group(sweep)  # beside the sweep's runs
    assert logged["tags"] == ["compare", "forward", "greedy", "digits"]
    table = json.loads((wb_dir / "files" / logged["summary"]["comparison/runs.path"]).read_text())
    rows = _csv(tmp_path / "report.csv")
    assert table["columns"] == list(rows[0])
    column = table["columns"].index("learned_test_accuracy")
    assert [r[column] for r in table["data"]] == [float(r["learned_test_accuracy"]) for r in rows]
    assert logged["summary"]["comparison/summary.nrows"] == 2
    for name in ("meta_loss", "schedules"):
        assert logged["summary"][f"plots/{name}._type"] == "image-file"


@pytest.mark.slow  # shares one ~25 s sweep
def test_compare_keeps_runs_with_other_settings_apart(sweep: Path, tmp_path: Path) -> None:
    runs = _runs(sweep)
    greedy = [
        r for r in runs if json.loads((r / "results.json").read_text())["estimator"] == "greedy"
    ]
    for name, src in (("a0", greedy[0]), ("a1", greedy[1]), ("b0", greedy[0])):
        shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("wandb"))
    config = tmp_path / "b0" / "config.yaml"
    config.write_text(config.read_text().replace("W: 10", "W: 5"))
    labels = {r.path.name: r.label for r in compare.find_runs([tmp_path])}
    assert labels == {
        "a0": "greedy (estimator.W=10)",
        "a1": "greedy (estimator.W=10)",
        "b0": "greedy (estimator.W=5)",
    }


def test_compare_rejects_a_directory_without_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    cases = {
        "empty": "has no results.json: give a run directory or a multirun directory",
        "missing": "is not a directory",
        "broken": "results.json is not valid JSON",
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            compare.main([str(tmp_path / name)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"metahpo-compare: error: {tmp_path / name}")
        assert message in err and err.count("\n") == 1


# -- where W&B settings come from ------------------------------------------------------------
def test_wandb_mode_comes_from_config_then_environment_then_the_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode(None) == ("offline", "no API key found")
    netrc.write_text("machine api.wandb.ai login user password not-a-real-key\n")
    assert resolve_mode(None) == ("online", "API key")
    netrc.write_text("machine example.org login user password not-a-real-key\n")
    assert resolve_mode(None)[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    assert resolve_mode(None)[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == ("disabled", "WANDB_MODE")
    assert resolve_mode("offline") == ("offline", "logger.wandb.mode")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE='sometimes' is unknown; allowed: online"):
        resolve_mode(None)
    with pytest.raises(
        ConfigError, match=r"^logger.wandb.mode='on' is unknown; allowed: online, off"
    ):
        resolve_mode("on")


class FakeRun:
    """Stands in for ``wandb.init``'s run: records what the logger asks of it."""

    def __init__(self, fail: str = "", **init: Any) -> None:
        self.init, self.fail, self.calls = init, fail, []
        self.dir = "/nowhere/files"
        self.summary = self

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name == self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self._record("log", step)

    def update(self, data: dict[str, Any]) -> None:
        self._record("summary", data)

    def finish(self, exit_code: int = 0) -> None:
        self._record("finish", exit_code)


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, fail: str = "") -> list[FakeRun]:
    runs: list[FakeRun] = []

    def init(**kwargs: Any) -> FakeRun:
        runs.append(FakeRun(fail, **kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_wandb_settings_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _fake_wandb(monkeypatch)
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "from-env",
        "WANDB_RUN_GROUP": "env-group",
        "WANDB_TAGS": "a, b",
    }.items():
        monkeypatch.setenv(key, value)
    metahpo.run(metahpo.compose([*QUICK, "outer.steps=1", "logger=wandb"]))
    metahpo.run(
        metahpo.compose(
            [
                *QUICK,
                "outer.steps=1",
                "logger=wandb",
                "logger.wandb.project=mine",
                "logger.wandb.tags=[x]",
            ]
            + ["logger.wandb.group=mine", "logger.wandb.mode=disabled"]
        )
    )
    env_run, config_run = (r.init for r in runs)
    assert (env_run["project"], env_run["group"], env_run["mode"]) == (
        "from-env",
        "env-group",
        "offline",
    )
    assert env_run["tags"] == ["a", "b", "forward", "quadratic"]
    assert env_run["name"] == "forward-quadratic-s0" and env_run["job_type"] == "train"
    assert env_run["config"]["task"]["_target_"] == "metahpo.tasks.quadratic.Quadratic"
    assert (config_run["project"], config_run["group"], config_run["mode"]) == (
        "mine",
        "mine",
        "disabled",
    )
    assert config_run["tags"] == ["x", "forward", "quadratic"]


def test_a_failed_run_still_finishes_its_wandb_run_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _fake_wandb(monkeypatch)
    cfg = metahpo.compose(
        [*QUICK, "horizon=200", "schedule.lr.bounds=[0,10]", "schedule.lr.init=9.0"]
        + ["logger=wandb", "logger.wandb.mode=offline"]
    )
    with pytest.raises(DivergenceError):
        metahpo.run(cfg)
    (log, final_row, summary, finish) = runs[0].calls
    assert log == ("log", 0) and final_row == ("log", 1) and finish == ("finish", 1)
    assert summary[0] == "summary" and summary[1]["stopped"] == "diverged"
    assert summary[1]["rejected_steps"] == 1 and "learned/test_loss" not in summary[1]


# -- W&B failures never cost the run ---------------------------------------------------------
_COSTS = ("seconds", "peak_memory_mb", "estimator_seconds", "estimator_peak_memory_mb")


def _without_costs(results: dict[str, Any]) -> dict[str, Any]:
    """Results without timings and memory, which differ between two runs of the same config."""
    out = {k: v for k, v in results.items() if k not in (*_COSTS, "wall_time_seconds")}
    out["history"] = [{k: v for k, v in h.items() if k not in _COSTS} for h in results["history"]]
    return out


@pytest.fixture(scope="module")
def untracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("untracked")
    return metahpo.run(metahpo.compose([*QUICK, "logger=none"]), out)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _check_intact(out_dir: Path, returned: dict[str, Any], untracked: dict[str, Any]) -> None:
    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(returned))
    assert on_disk["final"]["learned"]["test_loss"] > 0 and on_disk["stopped"] == "max_steps"
    assert _without_costs(on_disk) == _without_costs(json.loads(json.dumps(untracked)))
    for name in ("schedules.png", "meta_loss.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG


def test_wandb_failing_at_init_keeps_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    untracked: dict[str, Any],
) -> None:
    def no_network(**kwargs: Any) -> None:
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", no_network)
    out = metahpo.run(
        metahpo.compose([*QUICK, "logger=wandb", "logger.wandb.mode=online"]), tmp_path
    )
    assert _warnings(caplog) == [
        "W&B init failed (ConnectionError: api.wandb.ai unreachable); W&B logging is off for "
        f"the rest of this run, results stay in {tmp_path}"
    ]
    _check_intact(tmp_path, out, untracked)


def test_wandb_failing_mid_run_keeps_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    untracked: dict[str, Any],
) -> None:
    calls = []
    log = wandb.Run.log

    def disk_full_at_second_step(self: Any, data: dict[str, Any], **kw: Any) -> None:
        calls.append(kw.get("step"))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        log(self, data, **kw)

    monkeypatch.setattr(wandb.Run, "log", disk_full_at_second_step)
    cfg = metahpo.compose(
        [*QUICK, "logger=wandb", "logger.wandb.mode=offline", f"logger.wandb.dir={tmp_path}"]
    )
    out = metahpo.run(cfg, tmp_path / "run")
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith("W&B log failed (OSError: [Errno 28] No space left on device)")
    assert warnings[0].endswith(f"results stay in {tmp_path / 'run'}")
    assert calls == [0, 1]  # nothing more was sent after the failure
    _check_intact(tmp_path / "run", out, untracked)
    (wb_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_run(wb_dir)  # what W&B got before the failure, marked failed
    assert [h["meta_loss"] for h in logged["history"]] == [out["history"][0]["meta_loss"]]
    assert logged["exit_code"] == 1


def test_wandb_failing_at_the_summary_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runs = _fake_wandb(monkeypatch, fail="summary")
    out = metahpo.run(
        metahpo.compose([*QUICK, "logger=wandb", "logger.wandb.mode=offline"]), tmp_path
    )
    assert [c[0] for c in runs[0].calls] == ["log"] * 4 + ["summary", "finish"]
    assert runs[0].calls[3] == ("log", 3)  # the final row, one after outer steps 0-2
    assert runs[0].calls[-1] == ("finish", 1)  # W&B's copy is incomplete
    assert len(_warnings(caplog)) == 1 and "W&B summary failed (OSError" in _warnings(caplog)[0]
    assert json.loads((tmp_path / "results.json").read_text())["outer_steps"] == 3
    assert out["final"] is not None


def test_a_failing_tracker_warns_once_and_the_others_carry_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, untracked: dict[str, Any]
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the CSV logger wants its directory")
    cfg = metahpo.compose(
        [*QUICK, "logger=[csv,tensorboard]", f"logger.csv.dir={blocked}"]
        + [f"logger.tensorboard.dir={tmp_path / 'tb'}"]
    )
    out = metahpo.run(cfg, tmp_path / "run")
    (warning,) = _warnings(caplog)
    assert warning.startswith("CSV start failed (NotADirectoryError")
    assert warning.endswith(
        f"CSV logging is off for the rest of this run, results stay in {tmp_path / 'run'}"
    )
    _check_intact(tmp_path / "run", out, untracked)
    (events,) = (tmp_path / "tb").glob("forward-quadratic-s0/events.out.tfevents.*")
    assert events.stat().st_size > 0
