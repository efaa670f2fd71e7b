"""The table of docs/baselines.md from run directories: hypergradient runs and black-box searches
side by side at their budgets, with the baseline and the learning-rate-free optimisers.

    python scripts/baselines_table.py multirun/baselines/forward multirun/baselines/budget

Per method (runs grouped by results.json's ``estimator``, ``search.budget`` and
``search.space``): inner-step equivalents spent and wall time (means over the outer seeds),
the reported schedule's meta-loss and test accuracy (mean ± sample sd over the outer seeds of
each run's mean over its final seeds; in brackets the root-mean-square sd over the final
seeds), and the inner-step equivalents each needed until its best meta-loss so far reached the
best black-box method's (``--target``; median over the seeds that reached it). Then the
baseline and every ``final.lr_free`` optimiser, mean ± sd over the final seeds (they do not
depend on the outer seed).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from metahpo.compare import find_runs
from metahpo.results import selected_meta_loss, spent_curve, spent_total


def _ms(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    if not values:
        return "n/a"
    mean = format(scale * statistics.fmean(values), fmt)
    return mean if len(values) < 2 else f"{mean} ± {format(scale * statistics.stdev(values), fmt)}"


def _reached(results: dict[str, Any], target: float) -> float | None:
    """Inner-step equivalents spent when the run's best meta-loss so far first was <= target."""
    key = "best_meta_loss" if results.get("search") else "meta_loss"
    best = math.inf
    for h, spent in zip(results["history"], spent_curve(results), strict=True):
        if h.get(key) is not None and not h.get("online") and not h.get("rejected"):
            best = min(best, h[key])
            if best <= target:
                return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--target", type=float, help="meta-loss to reach (default: best search's)")
    args = parser.parse_args()
    runs = find_runs(args.dirs)
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        search = run.results.get("search") or {}
        label = run.estimator
        if search:
            space = ", one value per key" if search["space"] == "constant" else ""
            label += f" (budget {search['budget']}{space})"
        groups.setdefault(label, []).append(run.results)
    means = {
        label: statistics.fmean(selected_meta_loss(r) for r in group)
        for label, group in groups.items()
    }
    searched = [m for label, m in means.items() if any(r.get("search") for r in groups[label])]
    target = args.target if args.target is not None else min(searched, default=math.inf)
    how = "--target" if args.target is not None else "the best search's, mean over its seeds"
    print(f"target meta-loss ({how}): {target:.4g}\n")
    print(
        "| method | outer seeds | inner-step equivalents | wall time (s) | meta-loss "
        "| test acc (%) | test loss | reached the target after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, group in sorted(groups.items(), key=lambda kv: means[kv[0]]):
        accs = [r["final"]["learned"]["test_accuracy"] for r in group]
        losses = [r["final"]["learned"]["test_loss"] for r in group]
        sds = [r["final"]["learned"]["test_accuracy_std"] or 0.0 for r in group]
        final_sd = math.sqrt(statistics.fmean(x * x for x in sds))
        reached = [x for x in (_reached(r, target) for r in group) if x is not None]
        when = "not reached"
        if reached:
            when = f"{statistics.median(reached):.3g} ({len(reached)}/{len(group)} seeds)"
        print(
            f"| {label} | {' '.join(str(r['seed']) for r in group)} "
            f"| {statistics.fmean(spent_total(r) for r in group):.3g} "
            f"| {_ms([r['wall_time_seconds'] for r in group], fmt='.1f')} "
            f"| {_ms([selected_meta_loss(r) for r in group], fmt='.4f')} "
            f"| {_ms(accs, 100)} ({100 * final_sd:.2f}) | {_ms(losses, fmt='.4f')} "
            f"| {when} |"
        )
    fixed: dict[str, list[dict[str, Any]]] = {}
    for run in runs:  # the same per final seed in every run of a task: take the first run's
        final = run.results["final"]
        fixed.setdefault("baseline (hand-tuned SGD)", final["baseline"]["per_seed"])
        for name, part in (final.get("lr_free") or {}).items():
            fixed.setdefault(name, part["per_seed"])
    for name, per_seed in fixed.items():
        ok = [r for r in per_seed if not r.get("diverged")]
        seeds = " ".join(str(r["seed"]) for r in per_seed)
        print(
            f"| {name} | final seeds {seeds} | 0 (no search) | | "
            f"| {_ms([r['test_accuracy'] for r in ok], 100)} "
            f"| {_ms([r['test_loss'] for r in ok], fmt='.4f')} | |"
        )


if __name__ == "__main__":
    main()
