"""``metahpo-compare``: compare runs on disk in one report, optionally logged to W&B too.

Given run directories (each with a ``results.json``) or multirun directories (runs below them),
writes into ``--out``:

- ``report.md``: mean and spread over seeds per estimator and task, then one row per run, and
  the plots;
- ``report.csv``: one row per run; ``summary.csv``: one row per estimator and task, with the
  mean and spread of every number;
- ``meta_loss.png``: meta-loss against outer step and against time, per estimator;
- ``schedules.png``: the learned schedules overlaid, per hyperparameter.

Spread is the population standard deviation over seeds, as results.json's ``_std`` fields. A
run's test accuracy and loss are already means over its ``final.seeds``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metahpo import results as results_lib
from metahpo.loggers import WandbLogger, sweep_group
from metahpo.plots import plot_meta_loss_comparison, plot_schedule_comparison


@dataclass(frozen=True)
class Metric:
    """A number of the report: its CSV column, its ``results.summary`` key, and how the
    markdown shows it (header, format of a value and of a spread, scale)."""

    column: str
    key: str
    header: str
    fmt: str
    spread_fmt: str
    scale: float = 1.0

    def show(self, value: float | None, spread: float | None = None) -> str:
        """``value`` (or ``value ± spread``) as the markdown shows it; ``n/a`` for None."""
        if value is None:
            return "n/a"
        text = format(self.scale * value, self.fmt)
        if spread is not None:
            text += f" ± {format(self.scale * spread, self.spread_fmt)}"
        return text


def _accuracy(column: str, key: str, header: str) -> Metric:
    return Metric(column, key, header, fmt=".2f", spread_fmt=".2f", scale=100.0)


def _loss(column: str, key: str, header: str) -> Metric:
    return Metric(column, key, header, fmt=".4g", spread_fmt=".2g")


METRICS = (
    _accuracy("learned_test_accuracy", "learned/test_accuracy", "learned acc (%)"),
    _accuracy("baseline_test_accuracy", "baseline/test_accuracy", "baseline acc (%)"),
    _loss("learned_test_loss", "learned/test_loss", "learned test loss"),
    _loss("baseline_test_loss", "baseline/test_loss", "baseline test loss"),
    _loss("meta_loss", "selected/meta_loss", "meta-loss"),
    Metric("outer_steps", "outer_steps", "outer steps", fmt="g", spread_fmt=".2g"),
    Metric("wall_time_seconds", "wall_time_seconds", "wall time (s)", fmt=".1f", spread_fmt=".1f"),
    Metric("peak_memory_mb", "estimator_peak_memory_mb", "peak memory (MB)", ".1f", ".1f"),
)
# Config keys that never tell two runs' methods apart.
_NOT_A_SETTING = ("seed", "final.seeds", "progress", "resume", "logger.", "hydra.")


@dataclass
class Run:
    """One run directory: its results and the label it is compared under."""

    path: Path
    results: dict[str, Any]
    label: str = ""

    @property
    def estimator(self) -> str:
        return str(self.results["estimator"])

    @property
    def task(self) -> str:
        return str(self.results["task"])

    @property
    def seed(self) -> int:
        return int(self.results["seed"])


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """The runs in ``paths``: each a run directory, or a directory with runs below it.

    Raises:
        ValueError: a path is missing, holds no results.json, or one is unreadable.
    """
    found: dict[Path, Run] = {}
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory")
        files = [path / "results.json"] if (path / "results.json").is_file() else []
        files = files or sorted(path.glob("**/results.json"))
        if not files:
            raise ValueError(
                f"{path} has no results.json: give a run directory or a multirun directory"
            )
        for f in files:
            found.setdefault(f.resolve().parent, Run(f.parent, results_lib.load(f)))
    runs = list(found.values())
    _label(runs)
    return sorted(runs, key=lambda r: (r.task, r.label, r.seed, str(r.path)))


def _settings(run: Run) -> dict[str, str]:
    """The run's resolved config as ``{dotted key: value}``, without seeds and tracking."""
    path = run.path / "config.yaml"
    if not path.is_file():
        return {}
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(OmegaConf.load(path), resolve=True), "")
    return {k: v for k, v in flat.items() if not k.startswith(_NOT_A_SETTING)}


def _label(runs: list[Run]) -> None:
    """Label each run by its estimator, plus the settings that differ between runs of the same
    estimator and task (``truncated_reverse (estimator.K=5)``), so they are not pooled."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.estimator, run.task), []).append(run)
    for group in groups.values():
        settings = [_settings(r) for r in group]
        keys = sorted({k for s in settings for k in s})
        varying = [k for k in keys if len({s.get(k) for s in settings}) > 1]
        for run, s in zip(group, settings, strict=True):
            extra = ", ".join(f"{k}={s.get(k)}" for k in varying)
            run.label = f"{run.estimator} ({extra})" if extra else run.estimator


def run_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: estimator label, task, seed, every metric (None when missing), path."""
    rows = []
    for run in runs:
        s = results_lib.summary(run.results)
        row: dict[str, Any] = {"estimator": run.label, "task": run.task, "seed": run.seed}
        row.update({m.column: s.get(m.key) for m in METRICS})
        row["run_dir"] = str(run.path)
        rows.append(row)
    return rows


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per estimator and task: the seeds, and each metric's mean and spread over them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["estimator"], row["task"]), []).append(row)
    out = []
    for (estimator, task), group in groups.items():
        agg: dict[str, Any] = {
            "estimator": estimator,
            "task": task,
            "seeds": " ".join(str(r["seed"]) for r in group),
        }
        for m in METRICS:
            values = [r[m.column] for r in group if r[m.column] is not None]
            agg[f"{m.column}_mean"] = statistics.fmean(values) if values else None
            agg[f"{m.column}_std"] = statistics.pstdev(values) if values else None
        out.append(agg)
    return out


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The mean ± spread table."""
    header = ["estimator", "task", "seeds", *(m.header for m in METRICS)]
    rows = [
        [
            s["estimator"],
            s["task"],
            s["seeds"],
            *(m.show(s[f"{m.column}_mean"], s[f"{m.column}_std"]) for m in METRICS),
        ]
        for s in summary
    ]
    return _markdown(header, rows)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return path


def write_report(runs: Sequence[Run], out: Path) -> list[Path]:
    """Write report.md, report.csv, summary.csv, meta_loss.png and schedules.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = run_rows(runs)
    summary = summary_rows(rows)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run.results)
    title = ", ".join(sorted({r.task for r in runs}))
    plots = [
        plot_meta_loss_comparison(by_label, out / "meta_loss.png", f"meta-loss: {title}"),
        plot_schedule_comparison(by_label, out / "schedules.png", f"learned schedules: {title}"),
    ]
    run_table = _markdown(
        ["estimator", "task", "seed", *(m.header for m in METRICS), "run"],
        [
            [
                r["estimator"],
                r["task"],
                str(r["seed"]),
                *(m.show(r[m.column]) for m in METRICS),
                r["run_dir"],
            ]
            for r in rows
        ],
    )
    text = "\n\n".join(
        [
            "# metahpo comparison",
            f"{len(runs)} runs. Mean ± spread over seeds (population standard deviation); "
            "a run's test accuracy and loss are means over its `final.seeds`; the meta-loss is "
            "the reported schedule's validation loss; peak memory is the estimator's.",
            summary_markdown(summary),
            "## Runs",
            run_table,
            "## Plots",
            "![meta-loss per estimator](meta_loss.png)",
            "![learned schedules](schedules.png)",
        ]
    )
    (out / "report.md").write_text(text + "\n")
    return [
        out / "report.md",
        _write_csv(out / "report.csv", rows),
        _write_csv(out / "summary.csv", summary),
        *plots,
    ]


def log_to_wandb(
    logger: WandbLogger, runs: Sequence[Run], files: Sequence[Path], out: Path
) -> None:
    """Log the comparison's tables and plots as one W&B run (job type ``compare``), in the
    group of the runs' multirun when they are one multirun's; a W&B failure only warns."""
    rows = run_rows(runs)
    summary = summary_rows(rows)
    parents = {r.path.resolve().parent for r in runs}
    sweep = parents.pop() if len(parents) == 1 else None
    logger.start(
        {"runs": [str(r.path) for r in runs]},
        "compare",
        out,
        tags=["compare", *sorted({r.estimator for r in runs}), *sorted({r.task for r in runs})],
        job_type="compare",
        # Hydra writes multirun.yaml into a sweep's directory
        group=sweep_group(sweep) if sweep and (sweep / "multirun.yaml").is_file() else None,
    )
    logger.media(
        [f for f in files if f.suffix == ".png"],
        {
            "comparison/runs": (list(rows[0]), [list(r.values()) for r in rows]),
            "comparison/summary": (list(summary[0]), [list(s.values()) for s in summary]),
        },
    )
    logger.finish()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``metahpo-compare``."""
    parser = argparse.ArgumentParser(
        prog="metahpo-compare",
        description="Compare metahpo runs: a markdown and CSV report, and plots.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="run or multirun directories"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="report directory (default: DIR/comparison for one DIR, else ./comparison)",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables and plots to W&B (WANDB_* variables as for logger=wandb)",
    )
    parser.add_argument("--group", help="W&B group with --wandb (default: the runs' sweep)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = find_runs(args.dirs)
        # W&B settings (WANDB_MODE...) are checked before anything is written
        logger = WandbLogger(group=args.group) if args.wandb else None
    except ValueError as e:  # also ConfigError
        parser.exit(2, f"metahpo-compare: error: {e}\n")
    out = args.out or (args.dirs[0] / "comparison" if len(args.dirs) == 1 else Path("comparison"))
    files = write_report(runs, out)
    print(summary_markdown(summary_rows(run_rows(runs))))
    if logger is not None:
        log_to_wandb(logger, runs, files, out)
    print(f"{len(runs)} runs compared; report, tables and plots: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
