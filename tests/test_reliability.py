"""Nothing is lost to a killed job, a diverging inner run or a typo (docs/reliability.md)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import metahpo
import metahpo.runner
from metahpo.core import ConfigError, DivergenceError, Hypergradient
from metahpo.estimators.forward import ForwardMode

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["task=quadratic", "experiment=smoke", "progress=false"]
# Figures that measure the machine rather than the run.
TIMINGS = {"seconds", "peak_memory_mb", "wall_time_seconds", "estimator_seconds"}
TIMINGS |= {"estimator_peak_memory_mb"}


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


# -- bad input: every row of the table in docs/reliability.md -----------------------------------
def _table_rows() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "reliability.md").read_text()
    return re.findall(r"^\| \d+ \| `([^`]+)` \| `([^`]+)` \|$", text, flags=re.MULTILINE)


ROWS = _table_rows()


def test_the_table_documents_enough_bad_inputs() -> None:
    assert len(ROWS) >= 15
    assert len({overrides for overrides, _ in ROWS}) == len(ROWS)


@pytest.fixture(scope="module")
def resume_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "empty").mkdir()
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    metahpo.run(metahpo.compose(QUICK), tmp / "quadratic-run")
    return tmp


@pytest.mark.parametrize(("overrides", "message"), ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_table(
    overrides: str, message: str, resume_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def trap(self: Any) -> None:
        raise AssertionError("the outer loop started")

    if "tests.plugins." not in overrides:  # a broken plugin's result comes from the loop
        monkeypatch.setattr(metahpo.runner._OuterLoop, "run", trap)
    with pytest.raises(ConfigError) as err:
        metahpo.run(metahpo.compose(overrides.replace("{tmp}", str(resume_dirs)).split()))
    assert str(err.value).replace(str(resume_dirs), "{tmp}") == message


def test_cli_rejects_a_missing_key_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", "outer.nope=1", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "metahpo: error: outer.nope is not a key of this config; keys under outer: accept, "
        "budget, clip, max_failures, optimizer, reduce, seeds, select, steps, stop_fraction, "
        "tolerance"
    )
    assert not (tmp_path / "run").exists()


def test_more_outer_steps_resume_and_wall_time_adds_up(tmp_path: Path) -> None:
    # outer.steps is a change a resume allows (docs/reliability.md); the wall time of the
    # earlier process is carried in the checkpoint and added to this one's
    first = metahpo.run(metahpo.compose([*QUICK, "outer.steps=1"]), tmp_path)
    assert first["outer_steps"] == 1
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["wall_seconds"] <= first["wall_time_seconds"]  # the final evaluation
    start = time.perf_counter()
    out = metahpo.run(metahpo.compose([*QUICK, "outer.steps=2"]), tmp_path)
    second = time.perf_counter() - start
    assert out["outer_steps"] == 2 and out["history"][0] == first["history"][0]
    assert ckpt["wall_seconds"] < out["wall_time_seconds"] <= ckpt["wall_seconds"] + second


def test_an_unwritable_run_directory_stops_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as err:
        metahpo.run(metahpo.compose(QUICK), blocker / "run")
    assert str(err.value).startswith(f"hydra.run.dir={str(blocker / 'run')!r} is not a writable ")
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", *QUICK, f"hydra.run.dir={blocker}/run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"metahpo: error: {err.value}"]


def test_a_directory_of_another_run_is_not_overwritten(tmp_path: Path) -> None:
    metahpo.run(metahpo.compose(QUICK), tmp_path)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        metahpo.run(metahpo.compose([*QUICK, "seed=3"]), tmp_path)
    assert str(err.value) == (
        f"hydra.run.dir={str(tmp_path)!r}: the checkpoint was made with seed=0, this config has "
        "seed=3 (this directory holds another run; choose a new one)"
    )
    assert (tmp_path / "config.yaml").read_text() == before


# -- divergence ---------------------------------------------------------------------------------
def test_a_diverging_learning_rate_is_rejected_and_the_run_finishes(tmp_path: Path) -> None:
    # From lr 0, a sign step of 9 overflows the 200-step run: rejected, halved, accepted.
    cfg = metahpo.compose(
        [*QUICK, "horizon=200", "schedule.lr.segments=1", "schedule.lr.init=0.0",
         "schedule.lr.bounds=[0,10]", "outer.steps=3", "outer=sign",
         "outer.optimizer.step_size.lr=9.0",
         "outer.optimizer.halve_on_flip=false", "schedule.momentum.learn=false",
         "schedule.weight_decay.learn=false"]
    )  # fmt: skip
    out = metahpo.run(cfg, tmp_path)
    assert out["rejected_steps"] == len(out["rejections"]) >= 1
    rejected = out["rejections"][0]
    assert rejected["outer_step"] == 1 and "not finite" in rejected["reason"]
    assert rejected["schedule"]["lr"] == [9.0]
    lrs = [h["schedule"]["lr"][0] for h in out["history"]]
    # the rejected value never becomes an iterate; the retry is half a step from the last one
    assert 9.0 not in lrs
    assert lrs[:2] == [0.0, 9.0 / 2 ** rejected_count(out, 1)]
    assert all(math.isfinite(h["meta_loss"]) for h in out["history"])
    assert out["stopped"] in ("max_steps", "converged") and out["stop_message"] is None
    final = out["final"]["learned"]
    assert final["diverged_seeds"] == 0 and math.isfinite(final["test_loss"])
    assert json.loads((tmp_path / "results.json").read_text())["rejected_steps"] == len(
        out["rejections"]
    )


def rejected_count(out: dict[str, Any], step: int) -> int:
    return sum(r["outer_step"] == step for r in out["rejections"])


def test_a_nan_hypergradient_stops_after_max_failures_with_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ForwardMode.hypergradient
    calls = {"n": 0}

    def nan_after_first(self: ForwardMode, task: Any, schedule: Any) -> Hypergradient:
        calls["n"] += 1
        hg = original(self, task, schedule)
        if calls["n"] > 1:  # e.g. forward-mode tangents overflowing while the weights do not
            hg.grads["momentum"] = torch.full_like(hg.grads["momentum"], float("nan"))
        return hg

    monkeypatch.setattr(ForwardMode, "hypergradient", nan_after_first)
    out = metahpo.run(metahpo.compose([*QUICK, "outer.steps=10", "outer.max_failures=3"]), tmp_path)
    assert out["stopped"] == "diverged" and out["rejected_steps"] == 3
    assert "3 consecutive rejected outer steps (outer.max_failures=3)" in out["stop_message"]
    assert out["rejections"][0]["reason"].startswith(
        "estimator metahpo.estimators.forward.ForwardMode returned a non-finite hypergradient of "
        "momentum at a finite meta-loss ("
    )
    assert out["outer_steps"] == 1 and calls["n"] == 4
    # the learned schedule is the best accepted one, retrained and evaluated as usual
    assert out["learned_schedule"]["lr"]["values"] in [h["schedule"]["lr"] for h in out["history"]]
    assert math.isfinite(out["final"]["learned"]["test_loss"])
    assert json.loads((tmp_path / "results.json").read_text())["stopped"] == "diverged"


def test_a_diverging_start_writes_results_and_raises_one_line(tmp_path: Path) -> None:
    cfg = metahpo.compose(
        [*QUICK, "horizon=200", "schedule.lr.bounds=[0,10]", "schedule.lr.init=9.0"]
    )
    with pytest.raises(DivergenceError) as err:
        metahpo.run(cfg, tmp_path)
    text = str(err.value)
    assert "\n" not in text and text.startswith("inner training diverged")
    assert "with the schedule the run started from" in text and "results.json" in text
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["stopped"] == "diverged" and partial["rejected_steps"] == 1
    assert partial["final"] is None and partial["learned_schedule"] is None


# -- determinism and resume ---------------------------------------------------------------------
def test_same_config_twice_gives_identical_results(tmp_path: Path) -> None:
    args = ["experiment=smoke", "progress=false", "outer.steps=3", "final.seeds=[0,1]"]
    a = metahpo.run(metahpo.compose(args), tmp_path / "a")
    b = metahpo.run(metahpo.compose(args), tmp_path / "b")
    assert a["history"][0]["meta_loss"] > 0  # a real run, on digits
    assert without_timings(a) == without_timings(b)


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["progress=false", "horizon=60", "outer.steps=5", "outer.stop_fraction=0"]
    args += ["final.seeds=[0]"]
    # the new outer loop's state too: two seeds per estimate, inner runs counted against a
    # budget, and Rprop steps large enough that meta-loss rejections happen (at steps 3 and 4)
    args += ["outer=rprop", "outer.accept=meta_loss", "outer.tolerance=0.0", "outer.seeds=2"]
    args += ["outer.optimizer.step=0.3", "outer.optimizer.grow=2.0", "outer.optimizer.max_step=1"]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "metahpo", *args, f"hydra.run.dir={run_dir}"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint, deadline = killed / "checkpoint.pt", time.monotonic() + 600
    seen = 0.0
    try:
        while True:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            stamp = checkpoint.stat().st_mtime if checkpoint.is_file() else seen
            if stamp != seen:
                seen = stamp
                ckpt = torch.load(checkpoint, weights_only=False)
                if ckpt["k"] >= 2 and ckpt["rejections"]:  # killed between a rejection and
                    break  # its retry: the anchor, halved steps and run count must carry over
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(checkpoint, weights_only=False)
    assert 2 <= ckpt["k"] < 5 and ckpt["done"] is None and ckpt["failures"] >= 1
    assert ckpt["anchor"] is not None and ckpt["inner_runs"] >= 2 * (ckpt["k"] + 1)
    assert not (killed / "results.json").exists()

    again = subprocess.run(command(killed), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout + again.stderr
    straight = subprocess.run(
        command(tmp_path / "straight"), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed = json.loads((killed / "results.json").read_text())
    uninterrupted = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert resumed["outer_steps"] == 5 and resumed["rejected_steps"] >= 1
    assert resumed["outer_loop"]["inner_runs"] == uninterrupted["outer_loop"]["inner_runs"]
    assert resumed["learned_schedule"] == uninterrupted["learned_schedule"]
    assert resumed["final"] == uninterrupted["final"]
    assert without_timings(resumed) == without_timings(uninterrupted)


# -- meta-loss-aware acceptance ---------------------------------------------------------------
# On the quadratic task with the lr alone (momentum 0), the meta-loss is 0.0117 at lr 0.5, 0.005
# at lr 1.25 and 118.8 at lr 2.0 (finite: the run stays finite but overshoots). A sign step of
# 1.5 from lr 0.5 lands on 2.0.
RISE = [
    *QUICK, "schedule.lr.segments=1", "schedule.lr.init=0.5", "schedule.lr.bounds=[0,4]",
    "schedule.momentum.learn=false", "schedule.momentum.init=0.0",
    "schedule.weight_decay.learn=false", "outer=sign", "outer.optimizer.step_size.lr=1.5",
    "outer.optimizer.halve_on_flip=false", "outer.steps=2", "outer.stop_fraction=0",
]  # fmt: skip


def test_a_rising_meta_loss_is_taken_by_the_old_rule(tmp_path: Path) -> None:
    out = metahpo.run(metahpo.compose([*RISE, "outer.accept=finite"]), tmp_path)
    lrs = [h["schedule"]["lr"][0] for h in out["history"]]
    losses = [h["meta_loss"] for h in out["history"]]
    assert lrs[:2] == [0.5, 2.0] and out["rejected_steps"] == 0
    assert losses[1] > 1000 * losses[0]  # the jump the new rule exists for


def test_meta_loss_acceptance_rejects_a_rising_step_and_halves_it(tmp_path: Path) -> None:
    out = metahpo.run(metahpo.compose([*RISE, "outer.accept=meta_loss"]), tmp_path)
    assert out["rejected_steps"] == 1
    rejected = out["rejections"][0]
    assert rejected["outer_step"] == 1 and rejected["schedule"]["lr"] == [2.0]
    assert rejected["meta_loss"] > 100 and "meta-loss rose to" in rejected["reason"]
    assert "outer.tolerance=0.1" in rejected["reason"]
    lrs = [h["schedule"]["lr"][0] for h in out["history"]]
    assert lrs[:2] == [0.5, 0.5 + 1.5 / 2]  # back to the anchor, half the step
    losses = [h["meta_loss"] for h in out["history"]]
    assert losses[1] < losses[0] and max(losses) == losses[0]
    assert out["outer_loop"]["accept"] == "meta_loss" and out["outer_loop"]["inner_runs"] == 4
    assert out["stopped"] == "max_steps"


@pytest.mark.parametrize("accept", ["finite", "meta_loss"])
def test_a_rising_last_iterate_is_never_reported_under_meta_loss_acceptance(
    accept: str, tmp_path: Path
) -> None:
    # one estimate at lr 0.5, then the loop ends: the step to 2.0 is only scored
    cfg = [*RISE, "outer.steps=1", "outer.select=last", f"outer.accept={accept}"]
    out = metahpo.run(metahpo.compose(cfg), tmp_path)
    last = out["history"][-1]
    assert last["schedule"]["lr"] == [2.0] and last["meta_loss"] > 100
    assert last.get("rejected", False) == (accept == "meta_loss")
    expected = [0.5] if accept == "meta_loss" else [2.0]
    assert out["learned_schedule"]["lr"]["values"] == expected


def test_repeated_meta_loss_rejections_stop_without_error(tmp_path: Path) -> None:
    # tolerance 0 and a step that always overshoots: every retry is worse than the start
    cfg = metahpo.compose(
        [*RISE, "outer.accept=meta_loss", "outer.tolerance=0.0", "schedule.lr.init=1.0",
         "outer.optimizer.step_size.lr=3.0", "outer.max_failures=2", "outer.steps=5"]
    )  # fmt: skip
    out = metahpo.run(cfg, tmp_path)
    assert out["stopped"] == "no_progress" and out["stop_message"] is None
    assert out["rejected_steps"] == 2 and out["outer_steps"] == 1
    assert out["learned_schedule"]["lr"]["values"] == [1.0]
    assert math.isfinite(out["final"]["learned"]["test_loss"])


def test_seeds_average_the_estimate_and_count_inner_runs(tmp_path: Path) -> None:
    args = [*QUICK, "outer.steps=2", "outer.seeds=2", "final.seeds=[0]"]
    out = metahpo.run(metahpo.compose(args), tmp_path)
    setup = metahpo.runner.build(metahpo.compose(args))
    first = [
        setup.estimator.hypergradient(task, setup.schedule)
        for task in (setup.task, setup.task.with_seed(1000))
    ]
    entry = out["history"][0]
    assert entry["seed_meta_losses"] == [hg.meta_loss for hg in first]
    assert entry["meta_loss"] == pytest.approx((first[0].meta_loss + first[1].meta_loss) / 2)
    mean = (first[0].grads["lr"] + first[1].grads["lr"]) / 2
    assert entry["hypergradient"]["lr"] == pytest.approx(mean.tolist())
    loop = out["outer_loop"]
    assert loop["seeds"] == [0, 1000] and "mean over 2 inner seed(s)" in loop["selection"]
    # two estimates and the last iterate's score, each on two seeds
    assert loop["inner_runs"] == 2 * (out["outer_steps"] + out["rejected_steps"]) + 2


def test_the_budget_caps_inner_runs(tmp_path: Path) -> None:
    args = [*QUICK, "outer.steps=10", "outer.seeds=2", "outer.budget=7", "final.seeds=[0]"]
    out = metahpo.run(metahpo.compose(args), tmp_path)
    # 2 runs per estimate; the third estimate would leave no room for the final score
    assert out["stopped"] == "budget" and out["outer_steps"] + out["rejected_steps"] == 2
    assert out["outer_loop"]["inner_runs"] == 6 <= 7


def test_greedy_with_seeds_averages_the_schedules_it_moved(tmp_path: Path) -> None:
    # greedy moves its schedule inside its run: no outer step to accept or reject; with two
    # seeds the next iterate is the mean of the two moved schedules
    args = ["estimator=greedy", "experiment=smoke", "progress=false", "outer.seeds=2"]
    args += ["estimator.update=gradient", "outer.accept=meta_loss", "outer.tolerance=0.0"]
    out = metahpo.run(metahpo.compose(args), tmp_path)
    setup = metahpo.runner.build(metahpo.compose(args))
    moved = [
        setup.estimator.hypergradient(task, setup.schedule).schedule
        for task in (setup.task, setup.task.with_seed(1000))
    ]
    first = out["history"][0]
    assert first["online"] and out["rejected_steps"] == 0
    for name in ("lr", "momentum"):
        mean = (moved[0].values[name] + moved[1].values[name]) / 2
        assert first["schedule_after"][name] == pytest.approx(mean.tolist())
    assert moved[0].values["lr"].tolist() != moved[1].values["lr"].tolist()
    assert out["history"][1]["schedule"] == first["schedule_after"]
    last = out["history"][-1]  # the last iterate, scored by plain runs on both seeds
    assert last["hypergradient"] is None and len(last["seed_meta_losses"]) == 2
    assert out["outer_loop"]["inner_runs"] == 2 * len(out["history"])
