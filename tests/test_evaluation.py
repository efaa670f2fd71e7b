"""The final evaluation's statistics and the baseline cache shared by a sweep's jobs."""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from metahpo.evaluation import BaselineCache, ci95, crossed_ci95, paired_difference

T_975 = {1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263}


def test_ci95_is_the_student_t_interval() -> None:
    values = [1.0, 2.0, 4.0]
    half = T_975[2] * statistics.stdev(values) / math.sqrt(3)
    assert ci95(values) == pytest.approx([7 / 3 - half, 7 / 3 + half], rel=1e-12)
    assert ci95([1.0]) is None


def test_paired_difference_skips_diverged_seeds() -> None:
    learned = [
        {"seed": 0, "test_loss": 1.0, "test_accuracy": 0.5},
        {"seed": 1, "diverged": True},
        {"seed": 2, "test_loss": 2.0, "test_accuracy": 0.7},
    ]
    baseline = [{"seed": s, "test_loss": 0.5, "test_accuracy": 0.6} for s in (0, 1, 2)]
    diff = paired_difference(learned, baseline)
    assert [d["seed"] for d in diff["per_seed"]] == [0, 2]
    assert diff["test_loss"] == pytest.approx(1.0) and diff["test_accuracy"] == pytest.approx(0.0)
    assert diff["test_loss_ci95"] == pytest.approx([1.0 - T_975[1] * 0.5, 1.0 + T_975[1] * 0.5])
    assert diff["val_loss"] is None and diff["val_loss_ci95"] is None


def test_crossed_interval_counts_the_shared_final_seeds() -> None:
    # two outer seeds that agree exactly, three final seeds that do not: the spread between
    # runs is zero, yet the interval must not be
    values = {(s, f): d for s in (0, 1) for f, d in enumerate([1.0, 2.0, 6.0])}
    mean, ci = crossed_ci95(values)
    assert mean == pytest.approx(3.0)
    half = T_975[1] * math.sqrt(statistics.variance([1.0, 2.0, 6.0]) / 3)
    assert ci == pytest.approx([3.0 - half, 3.0 + half], rel=1e-12)
    # one outer seed: the run's own interval over its final seeds
    single = {(0, f): d for f, d in enumerate([1.0, 2.0, 6.0])}
    assert crossed_ci95(single)[1] == pytest.approx(ci95([1.0, 2.0, 6.0]), rel=1e-12)
    # one final seed: the interval over the outer seeds
    assert crossed_ci95({(0, 0): 1.0, (1, 0): 3.0})[1] == pytest.approx(ci95([1.0, 3.0]))
    assert crossed_ci95({(0, 0): 1.0}) == (1.0, None)


def _job(root: str, log: str, i: int) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        with open(log, "a") as f:
            f.write(f"{i}\n")
        time.sleep(1.0)  # long enough for the other job to arrive while this one computes
        return {"seed": 0, "test_loss": 0.25}

    return BaselineCache(Path(root)).get_or_compute({"seed": 0, "task": "t"}, compute)


def test_concurrent_jobs_compute_a_baseline_once(tmp_path: Path) -> None:
    log = tmp_path / "computed"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        out = pool.starmap(_job, [(str(tmp_path / "cache"), str(log), i) for i in range(3)])
    assert len(log.read_text().split()) == 1
    assert sorted(r["cached"] for r in out) == [False, True, True]
    assert all(r["test_loss"] == 0.25 for r in out)
    (entry,) = (tmp_path / "cache").glob("*.json")
    assert json.loads(entry.read_text())["key"] == {"seed": 0, "task": "t"}
    # another key (another seed, task, baseline...) is computed anew
    again = BaselineCache(tmp_path / "cache").get_or_compute(
        {"seed": 1, "task": "t"}, lambda: {"seed": 1, "test_loss": 0.5}
    )
    assert again == {"seed": 1, "test_loss": 0.5, "cached": False}
