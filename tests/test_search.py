"""Black-box searches (metahpo/search.py) and learning-rate-free baselines (metahpo/lrfree.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import metahpo
from metahpo.build import build
from metahpo.compare import find_runs, summary_rows, write_report
from metahpo.estimators.auto import gradient_evaluations
from metahpo.evaluation import retrain
from metahpo.search import rungs, search_budget

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
