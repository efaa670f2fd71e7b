"""Black-box searches (metahpo/search.py) and learning-rate-free baselines (metahpo/lrfree.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import metahpo
from metahpo.build import build
from metahpo.compare import find_runs, summary_rows, write_report
from metahpo.estimators.auto import gradient_evaluations
from metahpo.evaluation import retrain
from metahpo.search import _Trials, rungs, search_budget

QUICK = ["experiment=smoke", "progress=false", "threads=1", "task.n_train=256"]
METHODS = ("random", "tpe", "hyperband")


def _search(method: str, *overrides: str) -> dict:
    return metahpo.run([*QUICK, f"search={method}", "search.budget=120", *overrides])


def test_every_method_runs_from_the_cli_and_metahpo_compare_reads_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metahpo",
            "-m",
            *QUICK,
            "search=none,random,tpe,hyperband",
            "search.budget=100",
            "final.lr_free=[schedulefree_sgd,prodigy]",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of 100 inner-step equivalents" in proc.stdout
    assert "prodigy" in proc.stdout and "schedulefree_sgd" in proc.stdout
    runs = find_runs([sweep])
    assert sorted(r.label for r in runs) == ["forward", "hyperband_tpe", "random_search", "tpe"]
    for run in runs:
        final = run.results["final"]
        assert set(final["lr_free"]) == {"schedulefree_sgd", "prodigy"}
        assert len(final["lr_free"]["prodigy"]["per_seed"]) == 1
    write_report(runs, tmp_path / "report")
    rows = {s["estimator"]: s for s in summary_rows(runs)}
    for name in ("hyperband_tpe", "random_search", "tpe"):
        assert rows[name]["meta_loss_mean"] is not None
        assert rows[name]["learned_test_accuracy_mean"] is not None
    assert "hyperband_tpe" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("method", METHODS)
def test_a_search_spends_its_budget_exactly_counting_pruned_steps(method: str) -> None:
    out = _search(method)
    history, info = out["history"], out["search"]
    steps = [h["inner_steps"] for h in history]
    assert info["spent"] == sum(steps) <= info["budget"] == 120
    assert info["spent"] + out["horizon"] > 120  # stopped only when no whole run fits
    assert [h["spent"] for h in history][-1] == info["spent"]
    pruned = [h for h in history if h.get("pruned")]
    if method == "hyperband":
        assert pruned and all(h["inner_steps"] in info["rungs"] for h in pruned)
        assert info["rungs"] == [8]
    else:
        assert not pruned and steps == [out["horizon"]] * len(history)
    best = min(h["meta_loss"] for h in history if h["meta_loss"] is not None)
    assert out["history"][out["selected_outer_step"]]["meta_loss"] == best
    learned = out["learned_schedule"]["lr"]["values"]
    assert learned == out["history"][out["selected_outer_step"]]["schedule"]["lr"]


@pytest.mark.parametrize("method", METHODS)
def test_the_inner_steps_a_search_trains_are_its_spent_budget(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted in the inner loop itself (every step's hook), not by the search's own record."""
    import metahpo.runner

    trained = {"steps": 0}
    original = metahpo.runner.fit

    def counting_fit(task, schedule, on_step=None, **kw):  # type: ignore[no-untyped-def]
        def hook(t, before, after, batch):  # type: ignore[no-untyped-def]
            trained["steps"] += 1
            if on_step is not None:
                on_step(t, before, after, batch)

        return original(task, schedule, on_step=hook, **kw)

    monkeypatch.setattr(metahpo.runner, "fit", counting_fit)
    out = _search(method, "search.budget=100")
    assert trained["steps"] == out["search"]["spent"] <= 100 < trained["steps"] + out["horizon"]


@pytest.mark.parametrize("method", ["tpe", "hyperband"])
def test_a_search_is_deterministic_and_seeded(method: str) -> None:
    a, b = _search(method), _search(method)
    drop = ("seconds", "wall_time_seconds", "estimator_seconds")
    for x in (a, b):
        for key in drop[1:]:
            x.pop(key)
        for h in x["history"]:
            h.pop("seconds")
    assert a == b
    other = _search(method, "seed=1")
    assert other["history"][0]["schedule"] != a["history"][0]["schedule"]


def test_constant_space_draws_one_value_per_key() -> None:
    out = _search("random", "search.space=constant", "search.budget=40")
    for values in out["history"][0]["schedule"].values():
        assert len(values) == 2 and values[0] == values[1]


def test_a_null_budget_is_the_hypergradient_runs() -> None:
    cfg = metahpo.compose([*QUICK, "search=tpe", "outer.budget=4"])
    setup = build(cfg)
    per_run, name = gradient_evaluations(setup.estimator, setup.schedule)
    # smoke: 20 steps, 2 segments of 3 learned keys: 3 columns started, then 6
    assert (per_run, name) == (10 * (1 + 2 * 3) + 10 * (1 + 2 * 6), "forward")
    budget, how = search_budget(cfg, setup)
    assert budget == 3 * per_run + 20
    assert how.startswith("outer.budget=4 inner runs of estimator=forward")
    cfg = metahpo.compose([*QUICK, "search=hyperband", "search.budget=1000", "horizon=200"])
    assert rungs(cfg.search.pruner, 200) == [8, 24, 72]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search=nope", r"^search='nope' is unknown; allowed: hyperband, none, random, tpe$"),
        ("search.budget=0", r"^search\.budget=0 must be"),
        ("search.budget=5", r"^search\.budget=5 must be an integer >= 20 \(one inner run"),
        ("search.space=log", r"^search\.space='log' is unknown; allowed: schedule, constant$"),
        ("final.lr_free=[adam]", r"^final\.lr_free"),
    ],
)
def test_bad_search_input_is_one_line(override: str, message: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=message) as e:
        metahpo.compose([*QUICK, "search=tpe", override])
    assert "\n" not in str(e.value)


def test_the_cli_reports_a_bad_search_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", "search=tpe", "search.budget=0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("metahpo: error: search.budget=0 must be")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["schedulefree_sgd", "prodigy"])
def test_lr_free_optimisers_train_through_the_inner_loop(name: str) -> None:
    setup = build(metahpo.compose(QUICK))
    first = retrain(setup.task, setup.baseline, 0, name)
    assert first == retrain(setup.task, setup.baseline, 0, name)  # deterministic
    assert first["test_accuracy"] > 0.3  # ten classes: far above chance after 20 steps
    assert first != retrain(setup.task, setup.baseline, 0)  # not the baseline's SGD
    json.dumps(first)


TIMINGS = ("seconds", "wall_time_seconds", "estimator_seconds", "peak_memory_mb")


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.parametrize("method", ["random", "hyperband"])
def test_an_interrupted_search_resumes_to_the_uninterrupted_result(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*QUICK, f"search={method}", "search.budget=100", "final.seeds=[0]"]
    straight = metahpo.run(metahpo.compose(args), tmp_path / "straight")
    assert straight["search"]["trials"] >= 5

    calls = {"n": 0}
    original = _Trials.run

    def killed_at_third(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(_Trials, "run", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        metahpo.run(metahpo.compose(args), tmp_path / "killed")
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(_Trials, "run", original)
    # the sampler's state went on with the study: the third trial is drawn again, as before
    again = metahpo.run(metahpo.compose(args), tmp_path / "killed")
    assert _without_timings(again) == _without_timings(straight)
    other = metahpo.run(metahpo.compose([*args, f"resume={tmp_path / 'killed'}"]), tmp_path / "c")
    assert _without_timings(other) == _without_timings(straight)


def test_a_search_does_not_resume_another_runs_checkpoint(tmp_path: Path) -> None:
    metahpo.run(metahpo.compose([*QUICK, "outer.steps=1", "final.seeds=[0]"]), tmp_path / "fds")
    with pytest.raises(metahpo.ConfigError, match=r"^resume=.*search\.name=None") as e:
        metahpo.run(
            metahpo.compose([*QUICK, "search=tpe", "search.budget=40", f"resume={tmp_path}/fds"])
        )
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_sigkilled_search_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    args = [*QUICK, "search=hyperband", "search.budget=1200", "final.seeds=[0]"]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "metahpo", *args, f"hydra.run.dir={run_dir}"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint, deadline = killed / "checkpoint.pt", time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline
            if checkpoint.is_file():
                try:
                    ckpt = torch.load(checkpoint, weights_only=False)
                except Exception:  # noqa: BLE001 (read while being replaced)
                    ckpt = {"history": []}
                if len(ckpt["history"]) >= 3:
                    break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()
    ckpt = torch.load(checkpoint, weights_only=False)
    assert ckpt["spent"] < 1200 - 20 and ckpt["spent"] == sum(
        h["inner_steps"] for h in ckpt["history"]
    )

    again = subprocess.run(command(killed), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout + again.stderr
    straight = subprocess.run(
        command(tmp_path / "straight"), capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed = json.loads((killed / "results.json").read_text())
    uninterrupted = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert resumed["search"]["spent"] <= 1200 and resumed["search"]["pruned"] > 0
    assert _without_timings(resumed) == _without_timings(uninterrupted)
