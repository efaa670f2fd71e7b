"""Pictures of a run (its schedules, its meta-loss over outer steps) and of a comparison of
runs (meta-loss per estimator, learned schedules overlaid)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from metahpo import results as results_lib  # noqa: E402
from metahpo.schedule import HyperSchedule, split_key  # noqa: E402

LABELS = {"lr": "learning rate", "weight_decay": "weight decay"}  # else the name itself


def panels(schedules: Sequence[HyperSchedule]) -> list[str]:
    """The hyperparameter names the schedules have, in order: one panel each."""
    return list(dict.fromkeys(split_key(k)[0] for s in schedules for k in s.keys))


def _keys_of(schedule: HyperSchedule, name: str) -> list[tuple[str, str]]:
    """``(key, suffix)`` of ``name``'s keys: ``[("lr", "")]`` or one per group."""
    return [
        (k, f" {split_key(k)[1]}" if "/" in k else "")
        for k in schedule.keys
        if split_key(k)[0] == name
    ]


def _grid(n_rows: int, n_panels: int) -> tuple[Figure, Any]:
    cols = max(1, min(n_panels, 5))
    return plt.subplots(n_rows, n_panels, figsize=(4.3 * cols, 3.6 * n_rows), squeeze=False)


def plot_schedules(schedules: dict[str, HyperSchedule], path: Path, title: str = "") -> Path:
    """One panel per hyperparameter, value per inner step, one line per named schedule (and
    per group of a per-group hyperparameter)."""
    names = panels(list(schedules.values()))
    fig, axes = _grid(1, len(names))
    for ax, name in zip(axes[0], names, strict=True):
        for label, sched in schedules.items():
            for key, suffix in _keys_of(sched, name):
                ax.step(
                    range(sched.horizon),
                    sched.per_step(key).numpy(),
                    where="post",
                    label=label + suffix,
                )
        ax.set_title(LABELS.get(name, name))
        ax.set_xlabel("inner step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path, title)


def plot_history(
    history: Sequence[dict[str, Any]], path: Path, title: str = "", selected: int | None = None
) -> Path:
    """Meta-loss (validation loss after the inner run) and validation accuracy per outer step,
    with the selected (reported) schedule's step starred."""
    history = [h for h in history if h.get("meta_loss") is not None]
    steps = [h["outer_step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [h["meta_loss"] for h in history], "o-", label="meta-loss (val loss)")
    chosen = [h for h in history if h["outer_step"] == selected and not h.get("online")]
    if chosen:
        ax.plot(selected, chosen[-1]["meta_loss"], "*", ms=16, color="tab:red", label="selected")
    ax.set_xlabel("outer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation loss (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    accs = [h.get("val_accuracy") for h in history]
    if all(a is not None for a in accs):
        ax2 = ax.twinx()
        ax2.plot(steps, accs, "s--", color="tab:orange", label="val accuracy")
        ax2.set_ylabel("validation accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right")
    return _save(fig, path, title)


def plot_meta_loss_comparison(
    runs: Mapping[str, Sequence[dict[str, Any]]], path: Path, title: str = ""
) -> Path:
    """Meta-loss against outer step (left) and against the time spent in hypergradients so far
    (right): one row per task, one colour per label (estimator), one line per run (seed).

    Args:
        runs: label -> the results dicts of its runs.
    """
    tasks = _tasks(runs)
    styles = _styles(runs)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.8 * len(tasks)), squeeze=False)
    for (ax_step, ax_time), task in zip(axes, tasks, strict=True):
        for label, group in sorted(runs.items()):  # widest lines first
            for i, res in enumerate(r for r in group if r["task"] == task):
                # seconds accumulate over every entry: the last one scores the final iterate
                seconds = list(
                    itertools.accumulate(h.get("seconds") or 0.0 for h in res["history"])
                )
                points = [
                    (h["outer_step"], t, h["meta_loss"])
                    for h, t in zip(res["history"], seconds, strict=True)
                    if h.get("meta_loss") is not None
                ]
                if not points:
                    continue
                steps, times, losses = zip(*points, strict=True)
                style = dict(marker="o", ms=3, alpha=0.85, **styles[label])
                name = _legend_name(label, group, task) if i == 0 else None
                ax_step.plot(steps, losses, label=name, **style)
                ax_time.plot(times, losses, **style)
        ax_step.set_xlabel("outer step")
        ax_step.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_time.set_xlabel("time in hypergradients (s)")
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylabel(f"{task}: meta-loss (val loss)")
            ax.grid(alpha=0.3, which="both")
        ax_step.legend(fontsize=8)
    return _save(fig, path, title)


def plot_schedule_comparison(
    runs: Mapping[str, Sequence[dict[str, Any]]], path: Path, title: str = ""
) -> Path:
    """Learned schedules overlaid: one panel per task and hyperparameter, one colour per
    label (estimator), one line per run; the baseline dashed in black.

    Args:
        runs: label -> the results dicts of its runs.
    """
    tasks = _tasks(runs)
    styles = _styles(runs)
    every = [
        results_lib.learned_schedule(r)
        for g in runs.values()
        for r in g
        if r.get("learned_schedule")
    ]
    names = panels(every)
    fig, axes = _grid(len(tasks), max(1, len(names)))
    for row, task in zip(axes, tasks, strict=True):
        panel = dict(zip(names, row, strict=False))
        baselines: dict[str, HyperSchedule] = {}
        for label, group in sorted(runs.items()):  # widest lines first
            # a run stopped by divergence before any accepted step learned no schedule
            mine = [r for r in group if r["task"] == task and r.get("learned_schedule")]
            for i, res in enumerate(mine):
                learned = results_lib.learned_schedule(res)
                key = repr((res["horizon"], res["baseline_schedule"]))
                baselines.setdefault(key, results_lib.baseline_schedule(res))
                for name, ax in panel.items():
                    for j, (key, _) in enumerate(_keys_of(learned, name)):
                        ax.step(
                            range(learned.horizon),
                            learned.per_step(key).numpy(),
                            where="post",
                            alpha=0.85,
                            label=_legend_name(label, group, task) if i == 0 and j == 0 else None,
                            **styles[label],
                        )
        for j, baseline in enumerate(baselines.values()):
            for name, ax in panel.items():
                if name not in baseline.keys:
                    continue
                ax.step(
                    range(baseline.horizon),
                    baseline.per_step(name).numpy(),
                    where="post",
                    color="black",
                    ls="--",
                    lw=1,
                    label="baseline" if j == 0 else None,
                )
        for name, ax in panel.items():
            ax.set_title(f"{task}: {LABELS.get(name, name)}")
            ax.set_xlabel("inner step")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    return _save(fig, path, title)


def _tasks(runs: Mapping[str, Sequence[dict[str, Any]]]) -> list[str]:
    return sorted({r["task"] for group in runs.values() for r in group})


def _styles(runs: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """A label's colour and line width, the same in every comparison plot; earlier labels are
    drawn wider, so that a curve equal to a later one (two exact estimators) still shows."""
    labels = sorted(runs)
    return {
        label: {"color": f"C{i % 10}", "lw": 1.2 + 0.9 * (len(labels) - 1 - i)}
        for i, label in enumerate(labels)
    }


def _legend_name(label: str, group: Sequence[dict[str, Any]], task: str) -> str:
    n = sum(r["task"] == task for r in group)
    return f"{label} ({n} run{'s' if n > 1 else ''})"


def _save(fig: Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
