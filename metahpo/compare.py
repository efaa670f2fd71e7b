"""``metahpo-compare``: compare runs on disk in one report, optionally logged to W&B too.

Given run directories (each with a ``results.json``) or multirun directories (runs below them),
writes into ``--out``:

- ``report.md``: mean and spread over seeds per estimator and task, then one row per run, and
  the plots;
- ``report.csv``: one row per run; ``summary.csv``: one row per estimator and task, with the
  mean and spread of every number;
- ``meta_loss.png``: meta-loss against outer step and against time, per estimator;
- ``schedules.png``: the learned schedules overlaid, per hyperparameter.

Two spreads, never mixed: over the outer-loop seeds (``seed``: a whole run again, from a new
initial state of the outer loop) and over the final seeds (``final.seeds``: the retraining of a
fixed schedule); learned - baseline differences are paired per final seed, with 95 %
confidence intervals (docs/tracking.md).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metahpo import results as results_lib
from metahpo.evaluation import crossed_ci95, mean_sd
from metahpo.loggers import WandbLogger, sweep_group
from metahpo.plots import plot_meta_loss_comparison, plot_schedule_comparison


@dataclass(frozen=True)
class Metric:
    """A number of the report: its CSV column, its ``results.summary`` key, and how the
    markdown shows it (header, format of a value and of a spread, scale).

    ``per_final_seed``: the run's value is a mean over its final seeds, with a spread over them
    (``<key>_std``); ``paired``: a learned - baseline difference, with a 95 % confidence
    interval (``<key>_ci95_low``, ``_ci95_high``).
    """

    column: str
    key: str
    header: str
    fmt: str
    spread_fmt: str
    scale: float = 1.0
    per_final_seed: bool = False
    paired: bool = False

    def show(self, value: float | None, spread: float | None = None) -> str:
        """``value`` (or ``value ± spread``) as the markdown shows it; ``n/a`` for None."""
        if value is None:
            return "n/a"
        text = format(self.scale * value, ("+" if self.paired else "") + self.fmt)
        if spread is not None:
            text += f" ± {format(self.scale * spread, self.spread_fmt)}"
        return text

    def show_ci(self, ci: Sequence[float | None]) -> str:
        lo, hi = ci
        if lo is None or hi is None:
            return ""
        f = "+" + self.fmt
        return f" [{format(self.scale * lo, f)}, {format(self.scale * hi, f)}]"


def _final(column: str, key: str, header: str, accuracy: bool, paired: bool = False) -> Metric:
    fmt, spread = (".2f", ".2f") if accuracy else (".4g", ".2g")
    return Metric(
        column,
        key,
        header,
        fmt,
        spread,
        scale=100.0 if accuracy else 1.0,
        per_final_seed=not paired,
        paired=paired,
    )


METRICS = (
    _final("learned_test_accuracy", "learned/test_accuracy", "learned acc (%)", True),
    _final("baseline_test_accuracy", "baseline/test_accuracy", "baseline acc (%)", True),
    _final(
        "difference_test_accuracy",
        "difference/test_accuracy",
        "learned − baseline acc (pp)",
        True,
        True,
    ),
    _final("learned_test_loss", "learned/test_loss", "learned test loss", False),
    _final("baseline_test_loss", "baseline/test_loss", "baseline test loss", False),
    _final(
        "difference_test_loss", "difference/test_loss", "learned − baseline test loss", False, True
    ),
    Metric("meta_loss", "selected/meta_loss", "meta-loss", fmt=".4g", spread_fmt=".2g"),
    Metric("outer_steps", "outer_steps", "outer steps", fmt="g", spread_fmt=".2g"),
    Metric(
        "inner_step_equivalents", "inner_step_equivalents", "inner-step equivalents", ".3g", ".2g"
    ),
    Metric("wall_time_seconds", "wall_time_seconds", "wall time (s)", fmt=".1f", spread_fmt=".1f"),
    Metric("peak_memory_mb", "estimator_peak_memory_mb", "peak memory (MB)", ".1f", ".1f"),
)
# Config keys that never tell two runs' methods apart.
_NOT_A_SETTING = (
    "seed",
    "final.seeds",
    "final.baseline_cache",
    "final.lr_free",
    "search.sampler.seed",  # ${seed}
    "progress",
    "resume",
    "logger.",
    "hydra.",
)


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
    ignored = _NOT_A_SETTING if run.results.get("search") else (*_NOT_A_SETTING, "search.")
    return {k: v for k, v in flat.items() if not k.startswith(ignored)}


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


def _final_seeds(results: dict[str, Any]) -> str:
    per_seed = ((results.get("final") or {}).get("learned") or {}).get("per_seed", [])
    return " ".join(str(r["seed"]) for r in per_seed)


def run_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: estimator label, task, outer-loop seed, final seeds, every metric with
    its spread over the final seeds (``_sd_final``) or, for a paired difference, its 95 %
    confidence interval over them (``_ci95_low``, ``_ci95_high``); None when missing; path."""
    rows = []
    for run in runs:
        s = results_lib.summary(run.results)
        row: dict[str, Any] = {
            "estimator": run.label,
            "task": run.task,
            "seed": run.seed,
            "final_seeds": _final_seeds(run.results),
        }
        for m in METRICS:
            row[m.column] = s.get(m.key)
            if m.per_final_seed or m.paired:
                row[f"{m.column}_sd_final"] = s.get(f"{m.key}_std")
            if m.paired:
                row[f"{m.column}_ci95_low"] = s.get(f"{m.key}_ci95_low")
                row[f"{m.column}_ci95_high"] = s.get(f"{m.key}_ci95_high")
        row["run_dir"] = str(run.path)
        rows.append(row)
    return rows


def _paired_values(run: Run, key: str) -> dict[tuple[int, int], float]:
    """The run's learned - baseline ``key`` per final seed, indexed (outer seed, final seed)."""
    per_seed = ((run.results.get("final") or {}).get("difference") or {}).get("per_seed", [])
    return {(run.seed, d["seed"]): d[key] for d in per_seed if d.get(key) is not None}


def summary_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per estimator and task: the outer-loop seeds and final seeds, and per metric its mean
    over the runs, the sample standard deviation of the runs' values over the outer-loop seeds
    (``_sd_outer``) and, for final metrics, the spread over final seeds within a run
    (``_sd_final``: root mean square of the runs' sample standard deviations). A paired
    difference's mean is over every (outer seed, final seed) pair, with a 95 % confidence
    interval over both seeds (``_ci95_low``, ``_ci95_high``;
    :func:`metahpo.evaluation.crossed_ci95`)."""
    groups: dict[tuple[str, str], list[tuple[Run, dict[str, Any]]]] = {}
    for run, row in zip(runs, run_rows(runs), strict=True):
        groups.setdefault((row["estimator"], row["task"]), []).append((run, row))
    out = []
    for (estimator, task), members in groups.items():
        group = [row for _, row in members]
        agg: dict[str, Any] = {
            "estimator": estimator,
            "task": task,
            "seeds": " ".join(str(r["seed"]) for r in group),
            "final_seeds": " ".join(sorted({r["final_seeds"] for r in group})),
        }
        for m in METRICS:
            values = [r[m.column] for r in group if r[m.column] is not None]
            agg[f"{m.column}_mean"], agg[f"{m.column}_sd_outer"] = mean_sd(values)
            if m.per_final_seed or m.paired:
                sds = [r[f"{m.column}_sd_final"] for r in group]
                sds = [x for x in sds if x is not None]
                agg[f"{m.column}_sd_final"] = (
                    math.sqrt(statistics.fmean(x * x for x in sds)) if sds else None
                )
            if m.paired:
                field = m.key.split("/", 1)[1]
                pairs = {k: v for run, _ in members for k, v in _paired_values(run, field).items()}
                mean, ci = crossed_ci95(pairs)
                agg[f"{m.column}_mean"] = mean
                agg[f"{m.column}_ci95_low"], agg[f"{m.column}_ci95_high"] = ci or (None, None)
        out.append(agg)
    return out


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _summary_cell(m: Metric, s: dict[str, Any]) -> str:
    """``mean ± sd outer (± sd final)``; a difference ``mean [CI]``."""
    mean, outer = s[f"{m.column}_mean"], s[f"{m.column}_sd_outer"]
    if mean is None:
        return "n/a"
    if m.paired:
        return m.show(mean) + m.show_ci((s[f"{m.column}_ci95_low"], s[f"{m.column}_ci95_high"]))
    text = m.show(mean)
    if outer is not None:
        text += f" ± {format(m.scale * outer, m.spread_fmt)} (outer)"
    final = s.get(f"{m.column}_sd_final")
    if final is not None:
        text += f" ± {format(m.scale * final, m.spread_fmt)} (final)"
    return text


def summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """The summary table: per estimator and task, mean ± spreads, paired differences with CI."""
    header = ["estimator", "task", "outer seeds", "final seeds", *(m.header for m in METRICS)]
    rows = [
        [
            s["estimator"],
            s["task"],
            s["seeds"],
            s["final_seeds"],
            *(_summary_cell(m, s) for m in METRICS),
        ]
        for s in summary
    ]
    return _markdown(header, rows)


def _run_cell(m: Metric, r: dict[str, Any]) -> str:
    value = r[m.column]
    if value is None:
        return "n/a"
    if m.paired:
        return m.show(value) + m.show_ci((r[f"{m.column}_ci95_low"], r[f"{m.column}_ci95_high"]))
    return m.show(value, r.get(f"{m.column}_sd_final"))


EXPLAINED = (
    "Per estimator and task, over its runs: mean over the runs ± sample standard deviation "
    "over the outer-loop seeds (`seed`: the runs' means over their final seeds) ± spread over "
    "the final seeds (`final.seeds`, the retraining seeds; root mean square of each run's "
    "sample standard deviation). **learned − baseline** is paired: both schedules are "
    "retrained with the same final seed, the difference is taken per seed and averaged over all "
    "(outer seed, final seed) pairs; shown with its 95 % confidence interval over both seeds "
    "(crossed: var of outer-seed means / S + var of final-seed means / F, Student t with "
    "min(S, F) − 1 degrees of freedom; conservative). The meta-loss is the reported "
    "schedule's validation loss; peak memory is the estimator's."
)


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
    summary = summary_rows(runs)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run.results)
    title = ", ".join(sorted({r.task for r in runs}))
    plots = [
        plot_meta_loss_comparison(by_label, out / "meta_loss.png", f"meta-loss: {title}"),
        plot_schedule_comparison(by_label, out / "schedules.png", f"learned schedules: {title}"),
    ]
    run_table = _markdown(
        ["estimator", "task", "seed", "final seeds", *(m.header for m in METRICS), "run"],
        [
            [
                r["estimator"],
                r["task"],
                str(r["seed"]),
                r["final_seeds"],
                *(_run_cell(m, r) for m in METRICS),
                r["run_dir"],
            ]
            for r in rows
        ],
    )
    text = "\n\n".join(
        [
            "# metahpo comparison",
            f"{len(runs)} runs. {EXPLAINED}",
            summary_markdown(summary),
            "## Runs",
            "Per run: mean ± sample standard deviation over its final seeds; learned − baseline "
            "with its 95 % confidence interval over them.",
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
    summary = summary_rows(runs)
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
    print(summary_markdown(summary_rows(runs)))
    if logger is not None:
        log_to_wandb(logger, runs, files, out)
    print(f"{len(runs)} runs compared; report, tables and plots: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
