"""The benchmark cannot rot: its entry point at the smoke size, and its naive baseline is exact.

No timing is asserted; the numbers only have to exist, be finite and be positive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.naive import NaiveForward
from metahpo.estimators.forward import ForwardMode
from tests.conftest import SHARING, assert_grads_close, make_schedule, small_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("learn", [("lr", "momentum", "weight_decay"), ("momentum",)])
def test_naive_baseline_computes_forward_modes_hypergradient(
    sharing: str, learn: tuple[str, ...]
) -> None:
    task = small_digits()  # float64
    schedule = make_schedule(9, SHARING[sharing], learn=learn)
    naive = NaiveForward().hypergradient(task, schedule)
    forward = ForwardMode().hypergradient(task, schedule)
    assert naive.meta_loss == forward.meta_loss
    assert_grads_close(naive.grads, forward.grads, rtol=1e-12)


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_tables_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeats", "2", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "benchmarks.json").read_text())
    assert {"meta", "tasks", "targets"} <= set(results)
    assert set(results["tasks"]) == {"digits", "lenet", "wrn"}
    for name, task in results["tasks"].items():
        lb = task["lower_bound"]
        assert _positive(lb["grad_seconds"]) and _positive(lb["hvp_seconds"]), name
        assert task["forward_setting"]["hvp"] in ("fwd_rev", "rev_rev")
        assert all(_positive(s) for s in task["formulations"]["seconds"].values())
        methods = {"plain", "forward", "naive", "exact_reverse", "truncated_reverse", "greedy"}
        assert set(task["cells"]) == methods
        for method, cells in task["cells"].items():
            assert [int(h) for h in cells] == task["horizons"]
            for cell in cells.values():
                t, mem = cell["time"], cell["memory"]
                assert len(t["seconds"]) == 2 and all(_positive(s) for s in t["seconds"])
                assert _positive(t["median"]) and _positive(t["per_step"])
                assert _positive(t["over_plain"]) and _positive(t["over_lower_bound"])
                assert "error" not in mem, (name, method, mem)
                assert _positive(mem["seconds"]) and mem["malloc"] >= 0
                assert mem["rss"] is None or mem["rss"] >= 0
                assert mem.get("torch") is None or mem["torch"] >= 0
        # the estimators that claim the exact hypergradient agree with forward mode here too
        for h, cell in task["cells"]["naive"].items():
            want = task["cells"]["forward"][h]["grads"]
            for k, v in cell["grads"].items():
                scale = max(abs(x) for x in want[k]) or 1.0
                assert max(abs(a - b) for a, b in zip(v, want[k], strict=True)) <= 1e-3 * scale
    md = (out / "benchmarks.md").read_text()
    assert "### Targets" in md and "| forward |" in md
    assert (out / "memory.png").stat().st_size > 0 and (out / "time.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(task["steps_by_columns"] for task in summary["tasks"].values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "mnist"], "--tasks: 'mnist' is unknown; allowed: digits, lenet, wrn"),
        (["--methods", "sgd"], "--methods: 'sgd' is unknown; allowed: plain, forward, naive"),
        (["--repeats", "0"], "argument --repeats: '0' is not a positive integer"),
        (["--device", "tpu"], "--device='tpu' is unknown; allowed: auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_options_fail_in_one_line(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("benchmarks: error: ") and message in err and "\n" not in err, err


def test_optimizer_step_benchmark_runs_every_path() -> None:
    """``python -m benchmarks.optimizer_step --quick``: every path timed for SGD and AdamW."""
    from benchmarks import optimizer_step

    out = optimizer_step.main(["--quick", "--repeats", "1"])
    rows = out["rows"]
    assert [(r["optimizer"], r["columns"]) for r in rows] == [
        ("sgd", 1),
        ("sgd", 5),
        ("adamw", 1),
        ("adamw", 5),
    ]
    for r in rows:
        paths = ["plain", "generic", "update_generic"]
        paths += ["specialised", "update_specialised"] if r["optimizer"] == "sgd" else []
        assert all(r[p] > 0 for p in paths), r
        assert ("specialised" in r) == (r["optimizer"] == "sgd")


def test_threads_benchmark_times_every_count_and_restores_torchs() -> None:
    """``python -m benchmarks.threads --quick``: each case at each thread count, interleaved."""
    import torch

    from benchmarks import threads

    before = torch.get_num_threads()
    out = threads.main(["--quick", "--repeats", "1", "--threads", "1", "2"])
    assert torch.get_num_threads() == before
    cases = {r["case"] for r in out["rows"]}
    assert len(cases) == 6 and len(out["rows"]) == 12
    assert all(r["min_s"] > 0 for r in out["rows"])
    assert all(r["ratio_to_first"] == 1.0 for r in out["rows"] if r["threads"] == 1)


def test_hvp_formulations_benchmark_times_every_variant_and_checks_bits() -> None:
    """``python -m benchmarks.hvp_formulations``: every variant per case, the two rev_rev
    variants bit-identical."""
    from benchmarks import hvp_formulations

    rows = hvp_formulations.measure(1, True, ("digits",))
    assert [(r["dtype"], r["columns"]) for r in rows] == [
        ("float32", 7), ("float32", 30), ("float64", 7), ("float64", 30)
    ]  # fmt: skip
    for r in rows:
        assert r["bit_identical"]
        assert set(r["min"]) == set(hvp_formulations.VARIANTS)
        assert all(s > 0 for s in r["min"].values())


def test_stochastic_tables_in_the_docs_are_the_json_files() -> None:
    """docs/estimators.md's PES, ES and EvoGrad tables are what benchmarks.stochastic's JSON
    files (docs/stochastic/) render to, row for row."""
    from benchmarks.stochastic import report

    docs = (ROOT / "docs" / "estimators.md").read_text()
    rows = [r for r in report(ROOT / "docs" / "stochastic").splitlines() if r.startswith("| ")]
    assert len(rows) >= 20
    missing = [r for r in rows if r not in docs]
    assert not missing, missing


def test_stochastic_benchmark_rejects_an_unknown_experiment(capsys) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.stochastic import main as stochastic

    with pytest.raises(SystemExit):
        stochastic(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_stochastic_benchmark_runs_at_the_smoke_size(tmp_path: Path) -> None:
    from benchmarks.stochastic import main as stochastic

    assert stochastic(["evograd_cost", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "evograd_cost.json").read_text())
    assert {r["task"] for r in result["rows"]} == {"digits", "lenet"}
    assert all(r["seconds_per_step"] > 0 and math.isfinite(r["peak_mib"]) for r in result["rows"])
