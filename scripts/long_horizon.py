"""The long-horizon study of docs/results.md and docs/outer.md: digits at T = 2000, hypergradient
methods (non-greedy and greedy, the default and the old outer loop) against random search, TPE
and Hyperband-TPE at equal budget, three outer seeds, each result retrained on three final seeds.

    .venv/bin/python scripts/long_horizon.py --out multirun/long            # run + report
    .venv/bin/python scripts/long_horizon.py --out multirun/long --report   # report only

Runs the real CLI (``python -m metahpo``) sequentially with one torch thread, each run in its own
directory ``<out>/<method>/s<seed>``; a rerun skips finished runs and resumes killed ones (the
outer loop and the searches both continue from their checkpoint.pt). The report writes
``docs/long_horizon.png`` (best meta-loss so far against inner-step equivalents, mean and band
over the outer seeds) and prints the Markdown tables of docs/results.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HORIZON = 2000
#: Exact reverse mode: the same hypergradient as forward mode (both exact), 4 gradient
#: evaluations per step instead of forward mode's 1 + 2 c_t (up to 61 with 30 columns).
FDS = ["estimator=exact_reverse"]
# averaged momentum (optimizer.average=true) and the baseline stated in that form
AVG = [
    "optimizer.average=true",
    "optimizer.baseline={lr: 1.0, momentum: 0.9, weight_decay: 5.0e-4}",
]
#: The budget of every method: outer.budget=32 inner runs of exact reverse (the default outer
#: loop's cap), 31 estimates x 4 x 2000 + one plain run of 2000 = 250,000 inner-step equivalents.
BUDGET = 31 * 4 * HORIZON + HORIZON
METHODS: dict[str, list[str]] = {
    "fds": FDS,  # non-greedy, the default outer loop (rprop, accept meta_loss, budget 32)
    "greedy": ["estimator=greedy"],  # W = 10, same outer loop and budget
    "tpe": ["search=tpe", f"search.budget={BUDGET}"],
    "hyperband": ["search=hyperband", f"search.budget={BUDGET}"],
    "random": ["search=random", f"search.budget={BUDGET}"],
    # the outer loop before issue 13 (the paper's sign steps, only diverged steps rejected)
    "fds_old": [*FDS, "outer=sign", "outer.accept=finite", "outer.budget=null"],
    # issue 13: the default loop with every estimate and the selection averaged over two inner
    # seeds (batch orders), within the same budget of 32 inner runs (2x the old loop's 16)
    "fds_2seeds": [*FDS, "outer.seeds=2"],
    # ... or averaged momentum (optimizer.average=true): lr is the effective step, so its bounds
    # [0, 1] cap the effective step at the baseline's (stated in that form: the same schedule)
    "fds_avg": [*FDS, *AVG],
    # ... with up to 31 outer steps: the whole budget of 32 inner runs (2x the old loop's 16)
    "fds_avg31": [*FDS, *AVG, "outer.steps=31"],
    # ... or with two seeds per estimate (15 steps x 2 + the last score = 32 inner runs)
    "fds_avg2s": [*FDS, *AVG, "outer.seeds=2"],
    # ... with the lr as 10 piecewise-linear knots (the last at step T - 1: it can anneal to 0);
    # momentum and weight decay stay 10 constant segments
    "fds_avglin": [*FDS, *AVG, "schedule.lr.param=linear"],
    "fds_avglin31": [*FDS, *AVG, "schedule.lr.param=linear", "outer.steps=31"],
    "fds_avglin2s": [*FDS, *AVG, "schedule.lr.param=linear", "outer.seeds=2"],
    # ... or as the warm-up + cosine family (peak, warm-up, final fraction; from 0, 0.1, 0)
    "fds_avgcos": [*FDS, *AVG, "schedule.lr.param=warmup_cosine"],
    "fds_avgcos2s": [*FDS, *AVG, "schedule.lr.param=warmup_cosine", "outer.seeds=2"],
}
SEEDS = (0, 1, 2)
LABELS = {
    "fds": "FDS, non-greedy (exact reverse, rprop)",
    "greedy": "greedy (W = 10, rprop)",
    "tpe": "TPE",
    "hyperband": "Hyperband-TPE",
    "random": "random search",
    "fds_old": "FDS, old outer loop (sign, accept finite)",
    "fds_2seeds": "FDS, rprop, 2 seeds per estimate",
    "fds_avg": "FDS, rprop, averaged momentum",
    "fds_avg31": "FDS, rprop, averaged momentum, 31 steps",
    "fds_avg2s": "FDS, rprop, averaged momentum, 2 seeds per estimate",
    "fds_avglin": "FDS, rprop, averaged momentum, lr as linear knots",
    "fds_avglin31": "FDS, rprop, averaged momentum, lr as linear knots, 31 steps",
    "fds_avglin2s": "FDS, rprop, averaged momentum, lr as linear knots, 2 seeds per estimate",
    "fds_avgcos": "FDS, rprop, averaged momentum, lr as warm-up + cosine",
    "fds_avgcos2s": "FDS, rprop, averaged momentum, lr as warm-up + cosine, 2 seeds per estimate",
}
BLACK_BOX = ("tpe", "hyperband", "random")


def run_one(method: str, seed: int, out: Path) -> None:
    run_dir = out / method / f"s{seed}"
    if (run_dir / "results.json").is_file():
        return
    cmd = [
        sys.executable, "-m", "metahpo", "threads=1", "progress=false", f"horizon={HORIZON}",
        *METHODS[method], f"seed={seed}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    print(" ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    print(f"  rc {proc.returncode}, {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], flush=True)


def _load(out: Path, method: str) -> list[dict[str, Any]]:
    from metahpo.results import load

    return [
        load(d / "results.json")
        for d in sorted((out / method).glob("s*"))
        if (d / "results.json").is_file()
    ]


def best_so_far(results: dict[str, Any]) -> list[tuple[float, float]]:
    """(inner-step equivalents spent, best meta-loss so far) after every scored entry: a
    search's best completed trial, an outer loop's best plain-run score (rejected and last
    iterates included; greedy's passes score the values it set online in that pass)."""
    from metahpo.results import spent_curve

    key = "best_meta_loss" if results.get("search") else "meta_loss"
    best, out = math.inf, []
    for h, spent in zip(results["history"], spent_curve(results), strict=True):
        value = h.get(key)
        if value is not None and math.isfinite(value):  # greedy's online passes too
            best = min(best, value)
        out.append((spent, best))
    return out


def value_at(curve: list[tuple[float, float]], budget: float) -> float:
    """The best meta-loss so far once ``budget`` inner-step equivalents were spent."""
    best = math.inf
    for spent, value in curve:
        if spent > budget:
            break
        best = value
    return best


def reached(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((spent for spent, value in curve if value <= target), None)


def _ms(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    if not values:
        return "n/a"
    mean = format(scale * statistics.fmean(values), fmt)
    return mean if len(values) < 2 else f"{mean} ± {format(scale * statistics.stdev(values), fmt)}"


def figure(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from metahpo.results import spent_total

    grid = np.linspace(0, BUDGET, 400)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, group in runs.items():
        curves = [best_so_far(r) for r in group]
        ys = np.array([[value_at(c, x) for x in grid] for c in curves])
        end = max(spent_total(r) for r in group)  # drawn up to the last seed's end
        ok = np.isfinite(ys).all(axis=0) & (grid <= end)
        if not ok.any():
            continue
        mean = ys[:, ok].mean(axis=0)
        (line,) = ax.plot(grid[ok], mean, label=f"{LABELS[method]} ({len(group)} seeds)")
        ax.fill_between(
            grid[ok], ys[:, ok].min(axis=0), ys[:, ok].max(axis=0),
            color=line.get_color(), alpha=0.2,
        )  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(top=0.3)
    ax.set_xlabel("inner-step equivalents (plain training steps)")
    ax.set_ylabel("best meta-loss so far (validation loss)")
    ax.set_title(f"digits, T = {HORIZON}: mean (line) and min-max (band) over outer seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, png: Path) -> str:
    from metahpo.results import selected_meta_loss, spent_total

    runs = {m: g for m in METHODS if (g := _load(out, m))}
    figure(runs, png)
    means = {m: statistics.fmean(selected_meta_loss(r) for r in g) for m, g in runs.items()}
    boxes = [m for m in BLACK_BOX if m in runs]
    target_method = min(boxes, key=means.__getitem__) if boxes else None
    target = means[target_method] if target_method else math.nan
    lines = [
        "Target: the best black-box method's mean meta-loss, "
        f"{LABELS.get(target_method or '', '-')} {target:.4f}. Budget of every method: "
        f"{BUDGET:,} inner-step equivalents.",
        "",
        "| method | outer seeds | spent | wall time (s) | meta-loss | learned test acc (%) "
        "| baseline (%) | learned - baseline (pp) | test loss, median (max) "
        "| reached the target after | N x faster |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reach = {
        m: [x for x in (reached(best_so_far(r), target) for r in g) if x is not None]
        for m, g in runs.items()
    }
    ref = (
        statistics.median(reach[target_method]) if target_method and reach[target_method] else None
    )
    for method, group in runs.items():
        learned = [r["final"]["learned"] for r in group]
        base = [r["final"]["baseline"] for r in group]
        final_sd = math.sqrt(
            statistics.fmean((x["test_accuracy_std"] or 0.0) ** 2 for x in learned)
        )
        diff = [a["test_accuracy"] - b["test_accuracy"] for a, b in zip(learned, base, strict=True)]
        losses = [x["test_loss"] for r in group for x in r["final"]["learned"]["per_seed"]]
        got = reach[method]
        when, faster = "not reached", ""
        if got:
            when = f"{statistics.median(got):,.0f} ({len(got)}/{len(group)})"
            if ref:
                faster = f"{ref / statistics.median(got):.2g}x"
        lines.append(
            f"| {LABELS[method]} | {' '.join(str(r['seed']) for r in group)} "
            f"| {statistics.fmean(spent_total(r) for r in group):,.0f} "
            f"| {_ms([r['wall_time_seconds'] for r in group], fmt='.0f')} "
            f"| {_ms([selected_meta_loss(r) for r in group], fmt='.4f')} "
            f"| {_ms([x['test_accuracy'] for x in learned], 100)} ({100 * final_sd:.2f}) "
            f"| {100 * statistics.fmean(b['test_accuracy'] for b in base):.2f} "
            f"| {_ms(diff, 100, '+.2f')} "
            f"| {statistics.median(losses):.4f} ({max(losses):.3g}) | {when} | {faster} |"
        )
    lines += [
        "",
        "Outer loops (docs/outer.md): learned vs baseline test accuracy (%), inner runs used",
        "",
        "| outer loop | outer seeds | learned | baseline | inner runs | rejected steps "
        "| selected meta-loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("fds_old", "fds", "greedy"):
        group = runs.get(method, [])
        if not group:
            continue
        lines.append(
            f"| {LABELS[method]} | {' '.join(str(r['seed']) for r in group)} "
            f"| {_ms([r['final']['learned']['test_accuracy'] for r in group], 100)} "
            f"| {_ms([r['final']['baseline']['test_accuracy'] for r in group], 100)} "
            f"| {' '.join(str(r['outer_loop']['inner_runs']) for r in group)} "
            f"| {' '.join(str(r['rejected_steps']) for r in group)} "
            f"| {_ms([selected_meta_loss(r) for r in group], fmt='.4f')} |"
        )
    per_seed = [
        f"{LABELS[m]}: learned per outer seed "
        + ", ".join(f"{100 * r['final']['learned']['test_accuracy']:.2f}" for r in g)
        for m, g in runs.items()
    ]
    return "\n".join([*lines, "", *per_seed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "multirun" / "long")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--report", action="store_true", help="only the report")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "long_horizon.png")
    args = parser.parse_args()
    if not args.report:
        for method in args.methods:
            for seed in args.seeds:
                run_one(method, seed, args.out)
    print(report(args.out, args.png))


if __name__ == "__main__":
    main()
