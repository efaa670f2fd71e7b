"""``outer.reduce``: the mean of the seeds' estimates (the default) or the worst seed's."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

import metahpo
import metahpo.runner
from metahpo.core import ConfigError, Hypergradient, Task
from metahpo.schedule import HyperSchedule

QUICK = ["task=quadratic", "experiment=smoke", "progress=false", "final.seeds=[0]"]
TWO = [*QUICK, "outer.steps=1", "outer.seeds=2"]  # seeds 0 and 1000


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "peak_memory_mb")} for h in history]


def single(seed: int) -> dict:
    """The first estimate of a one-seed run with ``seed``."""
    out = metahpo.run(metahpo.compose([*QUICK, "outer.steps=1", f"seed={seed}"]))
    return out["history"][0]


def test_max_reports_the_worst_seed_and_its_hypergradient_mean_is_unchanged() -> None:
    a, b = single(0), single(1000)
    assert a["meta_loss"] != b["meta_loss"]
    worst = max(a, b, key=lambda h: h["meta_loss"])
    out = metahpo.run(metahpo.compose([*TWO, "outer.reduce=max"]))
    first = out["history"][0]
    assert first["seed_meta_losses"] == [a["meta_loss"], b["meta_loss"]]
    assert first["meta_loss"] == worst["meta_loss"]
    assert first["hypergradient"] == worst["hypergradient"]  # exactly that seed's
    assert first["val_accuracy"] == worst["val_accuracy"]
    assert out["outer_loop"]["reduce"] == "max"
    assert "max (worst seed) over 2 inner seed(s)" in out["outer_loop"]["selection"]
    last = out["history"][-1]  # the last iterate's score: the worst seed's too
    assert last["hypergradient"] is None and last["meta_loss"] == max(last["seed_meta_losses"])

    mean = metahpo.run(metahpo.compose(TWO))  # the default: the mean, as before
    entry = mean["history"][0]
    assert entry["meta_loss"] == statistics.fmean([a["meta_loss"], b["meta_loss"]])
    for name, grad in entry["hypergradient"].items():
        pair = [torch.tensor(h["hypergradient"][name], dtype=torch.float64) for h in (a, b)]
        both = pair[0] + pair[1]
        assert grad == (both / 2).tolist()
    assert mean["outer_loop"]["reduce"] == "mean"
    assert mean["outer_loop"]["selection"] == "best: lowest meta-loss, mean over 2 inner seed(s)"


class Scripted:
    """Meta-losses per (outer step, seed) from a table, zero hypergradients (so the schedule
    stays and the last iterate needs no new score)."""

    name = "scripted"
    LOSSES = {0: [1.0, 1.0], 1: [0.2, 1.2], 2: [0.8, 0.9]}  # mean picks step 1, max step 2

    def __init__(self) -> None:
        self.calls = 0

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        step, which = divmod(self.calls, 2)
        self.calls += 1
        assert task.seed == [0, 1000][which]
        grads = {m: torch.zeros_like(v) for m, v in schedule.values.items()}
        return Hypergradient(meta_loss=self.LOSSES[step][which], grads=grads)


@pytest.mark.parametrize(("reduce", "selected"), [("mean", 1), ("max", 2)])
def test_selection_picks_by_the_reduced_score(reduce: str, selected: int) -> None:
    args = [*QUICK, "outer.steps=3", "outer.seeds=2", "outer.accept=finite"]
    args += ["outer.stop_fraction=0", f"outer.reduce={reduce}"]
    out = metahpo.run(metahpo.compose(args), estimator=Scripted())
    losses = [h["meta_loss"] for h in out["history"]]
    combine = statistics.fmean if reduce == "mean" else max
    assert losses == [combine(v) for v in Scripted.LOSSES.values()]
    assert out["selected_outer_step"] == selected


def test_a_bad_reduce_is_one_line_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        metahpo.run(metahpo.compose([*QUICK, "outer.reduce=median"]), tmp_path / "run")
    text = str(err.value)
    assert "\n" not in text and text.startswith("outer.reduce='median'")
    assert "mean, max" in text
    assert not (tmp_path / "run").exists()


def test_resume_with_reduce_max(tmp_path: Path) -> None:
    args = [*QUICK, "outer.seeds=2", "outer.reduce=max"]
    first = metahpo.run(metahpo.compose([*args, "outer.steps=1"]), tmp_path / "run")
    out = metahpo.run(metahpo.compose([*args, "outer.steps=2"]), tmp_path / "run")  # resumes
    straight = metahpo.run(metahpo.compose([*args, "outer.steps=2"]), tmp_path / "straight")
    assert out["history"][0] == first["history"][0] and out["outer_steps"] == 2
    assert untimed(out["history"]) == untimed(straight["history"])
    assert out["learned_schedule"] == straight["learned_schedule"]
    assert out["outer_loop"]["inner_runs"] == straight["outer_loop"]["inner_runs"]
    with pytest.raises(ConfigError, match="outer.reduce='max', this config has outer.reduce="):
        metahpo.run(metahpo.compose([*QUICK, "outer.seeds=2", "outer.steps=3"]), tmp_path / "run")


def test_greedy_with_max_still_averages_the_moved_schedules() -> None:
    args = [*QUICK, "estimator=greedy", "outer.steps=1", "outer.seeds=2", "outer.reduce=max"]
    args += ["estimator.update=gradient"]
    out = metahpo.run(metahpo.compose(args))
    setup = metahpo.runner.build(metahpo.compose(args))
    answers = [
        setup.estimator.hypergradient(task, setup.schedule)
        for task in (setup.task, setup.task.with_seed(1000))
    ]
    first = out["history"][0]
    assert answers[0].meta_loss != answers[1].meta_loss
    assert first["online"] and first["meta_loss"] == max(a.meta_loss for a in answers)
    mean = (answers[0].schedule.values["lr"] + answers[1].schedule.values["lr"]) / 2
    assert first["schedule_after"]["lr"] == mean.tolist()
