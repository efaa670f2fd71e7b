"""Retrain the learned and the baseline schedule of finished runs on more final seeds.

    .venv/bin/python scripts/retrain_seeds.py RUN_DIR [RUN_DIR ...] --seeds 3 4 5 6 7 8 9
    .venv/bin/python scripts/retrain_seeds.py RUN_DIR --lr-end 0 --set baseline.lr_decay=cosine

Each RUN_DIR holds a ``results.json`` and the ``config.yaml`` it was run with (the task is
rebuilt from it; ``--set`` overrides its keys, e.g. the baseline's decay). ``--lr-end`` replaces
the learned lr's last value, a check of annealing (with ``param: linear``: the lr at the last
step, reached linearly from the knot before it). Prints per run and seed test accuracy / test
loss / validation loss of the learned and the baseline schedule, and the mean ± sd over every
(run, seed) pair. Extra evidence beside a run's own ``final`` block; one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from collections.abc import Sequence

    from metahpo.core import Task
    from metahpo.schedule import HyperSchedule


def run_schedules(
    run: Path, overrides: Sequence[str] = (), lr_end: float | None = None
) -> tuple[Task, HyperSchedule, HyperSchedule]:
    """(task, learned schedule, baseline schedule) of a finished run, rebuilt from its
    ``config.yaml`` (with ``overrides``, ``key=value`` each) and ``results.json`` (the learned
    one with the run's inner optimiser; ``lr_end``, when given, as its lr's last value)."""
    from metahpo.build import build, optimizer_from_config
    from metahpo.results import load
    from metahpo.schedule import HyperSchedule

    cfg = OmegaConf.merge(OmegaConf.load(run / "config.yaml"), OmegaConf.from_dotlist(overrides))
    assert isinstance(cfg, DictConfig)
    setup = build(cfg)
    results = load(run / "results.json")
    inner = optimizer_from_config(cfg.optimizer)
    learned = copy.deepcopy(results["learned_schedule"])
    if lr_end is not None:
        param = learned["lr"].get("param")
        if param != "linear":
            raise ValueError(f"--lr-end needs schedule.lr.param=linear, the run has {param!r}")
        learned["lr"]["values"][-1] = lr_end
    return setup.task, HyperSchedule.from_dict(results["horizon"], learned, inner), setup.baseline


def main() -> None:
    from metahpo.evaluation import retrain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(3, 10)))
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    parser.add_argument("--lr-end", type=float, help="the learned lr's last value (param linear)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    acc: dict[str, list[float]] = {"learned": [], "baseline": []}
    baseline_done: dict[int, dict] = {}
    for run in args.runs:
        task, learned, baseline = run_schedules(run, args.set, args.lr_end)
        for seed in args.seeds:
            row = {"learned": retrain(task, learned, seed)}
            if not args.no_baseline:
                if seed not in baseline_done:  # the baseline does not depend on the run
                    baseline_done[seed] = retrain(task, baseline, seed)
                row["baseline"] = baseline_done[seed]
            for label, r in row.items():
                if r.get("diverged"):
                    print(f"{run} seed {seed} {label}: diverged", flush=True)
                    continue
                acc[label].append(100 * r["test_accuracy"])
                print(
                    f"{run} seed {seed} {label}: test acc {100 * r['test_accuracy']:.2f} "
                    f"test loss {r['test_loss']:.4g} val loss {r['val_loss']:.4g}",
                    flush=True,
                )
    for label, values in acc.items():
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{label}: {statistics.fmean(values):.2f} ± {sd:.2f} ({len(values)} retrainings)")


if __name__ == "__main__":
    main()
