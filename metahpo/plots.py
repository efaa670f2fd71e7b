"""Pictures of a run (its schedules, its meta-loss over outer steps) and of a comparison of
runs (meta-loss per estimator, learned schedules overlaid)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from metahpo import results as results_lib  # noqa: E402
from metahpo.schedule import HyperSchedule, split_key  # noqa: E402

LABELS = {"lr": "learning rate", "momentum": "momentum", "weight_decay": "weight decay"}
BAND = 0.2  # opacity of a band over seeds


def _label(name: str) -> str:
    """A hyperparameter's axis label (its own name when it has no longer one)."""
    return LABELS.get(name, name.replace("_", " "))


def _panels(n: int, rows: int = 1, width: float = 4.0, height: float = 3.2) -> tuple[Figure, Any]:
    """A grid of panels with room on the right for a legend outside the data."""
    fig, axes = plt.subplots(
        rows, max(n, 1), figsize=(width * max(n, 1) + 2.2, height * rows), squeeze=False
    )
    return fig, axes


def _legend_outside(fig: Figure, ax: Any) -> None:
    """The legend of ``ax``'s handles to the right of the figure, clear of every curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)


def plot_schedules(schedules: dict[str, HyperSchedule], path: Path, title: str = "") -> Path:
    """One panel per hyperparameter type, value per inner step, one line per named schedule
    (the baseline dashed in black)."""
    names = list(next(iter(schedules.values())).values) if schedules else []
    fig, axes = _panels(len(names))
    for ax, name in zip(axes[0], names, strict=False):
        for i, (label, sched) in enumerate(schedules.items()):
            own = _baseline_key(sched, name)  # a baseline may have one key for all groups
            if own is None:
                continue
            style = {"color": "black", "ls": "--", "lw": 1} if label == "baseline" else {}
            ax.step(
                range(sched.horizon),
                sched.per_step(own).numpy(),
                where="post",
                label=label,
                color=style.pop("color", f"C{i}"),
                **style,
            )
        ax.set_title(_label(name))
        ax.set_xlabel("inner step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_label(name))
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[0][0])
    return _save(fig, path, title)


def plot_history(
    history: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
    selected: int | None = None,
    baseline: float | None = None,
) -> Path:
    """Meta-loss (validation loss after the inner run) and validation accuracy per outer step,
    with the selected (reported) schedule's step starred and, when given, the baseline's
    validation loss (mean over the final seeds) as a dashed reference line."""
    history = [h for h in history if h.get("meta_loss") is not None]
    steps = [h["outer_step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(steps, [h["meta_loss"] for h in history], "o-", label="meta-loss (val loss)")
    chosen = [h for h in history if h["outer_step"] == selected and not h.get("online")]
    if chosen:
        ax.plot(selected, chosen[-1]["meta_loss"], "*", ms=16, color="tab:red", label="selected")
    if baseline is not None:
        ax.axhline(baseline, color="black", ls="--", lw=1, label="baseline val loss")
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
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=9)
    return _save(fig, path, title)


def _band(ax: Any, x: Sequence[float], ys: Sequence[Sequence[float]], **style: Any) -> None:
    """The mean of ``ys`` over seeds as a line and their range (min to max) as a band."""
    stacked = np.asarray(ys, dtype=float)
    label = style.pop("label", None)
    ax.plot(x, stacked.mean(axis=0), label=label, **style)
    if len(stacked) > 1:
        step = "post" if style.get("drawstyle") == "steps-post" else None
        ax.fill_between(
            x,
            stacked.min(axis=0),
            stacked.max(axis=0),
            color=style["color"],
            alpha=BAND,
            lw=0,
            step=step,
        )


def _curves(res: dict[str, Any]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Outer steps, cumulative seconds in hypergradients, meta-loss, and cumulative inner-step
    equivalents (:func:`metahpo.results.spent_curve`) of one run's history."""
    seconds = list(itertools.accumulate(h.get("seconds") or 0.0 for h in res["history"]))
    spent = results_lib.spent_curve(res)
    # a search's trials: the best meta-loss so far (its progress), as the accepted iterates are
    key = "best_meta_loss" if res.get("search") else "meta_loss"
    points = [
        (h["outer_step"], t, h[key], b)
        for h, t, b in zip(res["history"], seconds, spent, strict=True)
        if h.get(key) is not None
    ]
    if not points:
        return [], [], [], []
    steps, times, losses, budget = zip(*points, strict=True)
    return list(steps), list(times), list(losses), list(budget)


def _baseline_val_loss(group: Sequence[dict[str, Any]]) -> float | None:
    values = [((r.get("final") or {}).get("baseline") or {}).get("val_loss") for r in group]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def plot_meta_loss_comparison(
    runs: Mapping[str, Sequence[dict[str, Any]]], path: Path, title: str = ""
) -> Path:
    """Meta-loss against outer step (left), against the time spent in hypergradients (or a
    search's trials) so far (middle) and against the inner-step equivalents spent so far
    (right, log; :func:`metahpo.results.spent_curve`): one row per task, one colour per label
    (estimator) with the mean over its runs (outer-loop seeds) as a line and their range as a
    band; the baseline's validation loss (mean over final seeds) as a dashed black line.

    Args:
        runs: label -> the results dicts of its runs.
    """
    tasks = _tasks(runs)
    styles = _styles(runs)
    fig, axes = _panels(3, rows=len(tasks), width=5.0, height=3.6)
    for (ax_step, ax_time, ax_spent), task in zip(axes, tasks, strict=True):
        for label, group in sorted(runs.items()):
            mine = [_curves(r) for r in group if r["task"] == task]
            mine = [c for c in mine if c[0]]
            if not mine:
                continue
            n = min(len(c[0]) for c in mine)  # runs stopped early: the steps all of them have
            steps = mine[0][0][:n]
            style = {**styles[label], "marker": "o", "ms": 3}
            legend = f"{label} (mean, range over {len(mine)} seed{'s' if len(mine) > 1 else ''})"
            _band(ax_step, steps, [c[2][:n] for c in mine], label=legend, **style)
            times = np.mean([c[1][:n] for c in mine], axis=0)
            _band(ax_time, list(times), [c[2][:n] for c in mine], **style)
            spent = np.mean([c[3][:n] for c in mine], axis=0)
            _band(ax_spent, list(spent), [c[2][:n] for c in mine], **style)
        baseline = _baseline_val_loss([r for g in runs.values() for r in g if r["task"] == task])
        for ax in (ax_step, ax_time, ax_spent):
            if baseline is not None:
                ax.axhline(
                    baseline,
                    color="black",
                    ls="--",
                    lw=1,
                    label="baseline val loss" if ax is ax_step else None,
                )
            ax.set_yscale("log")
            ax.set_ylabel(f"{task}: meta-loss (val loss, log)")
            ax.grid(alpha=0.3, which="both")
        ax_step.set_xlabel("outer step")
        ax_step.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_time.set_xlabel("time in hypergradients or trials (s, mean over seeds)")
        ax_spent.set_xscale("log")
        ax_spent.set_xlabel("inner-step equivalents spent (log, mean over seeds)")
    _legend_outside(fig, axes[0][0])
    return _save(fig, path, title)


def plot_schedule_comparison(
    runs: Mapping[str, Sequence[dict[str, Any]]], path: Path, title: str = ""
) -> Path:
    """Learned schedules: one panel per task and hyperparameter type, one colour per label
    (estimator) with the mean over its runs (outer-loop seeds) as a line and their range as a
    band; the baseline dashed in black.

    Args:
        runs: label -> the results dicts of its runs.
    """
    tasks = _tasks(runs)
    styles = _styles(runs)
    names: list[str] = []
    for group in runs.values():
        for r in group:
            for n in r.get("learned_schedule") or {}:
                if n not in names:
                    names.append(n)
    fig, axes = _panels(len(names), rows=len(tasks))
    for row, task in zip(axes, tasks, strict=True):
        baselines: dict[str, HyperSchedule] = {}
        for label, group in sorted(runs.items()):
            # a run stopped by divergence before any accepted step learned no schedule
            mine = [r for r in group if r["task"] == task and r.get("learned_schedule")]
            if not mine:
                continue
            learned = [results_lib.learned_schedule(r) for r in mine]
            for res in mine:
                key = repr((res["horizon"], res["baseline_schedule"]))
                baselines.setdefault(key, results_lib.baseline_schedule(res))
            horizon = learned[0].horizon
            same = [s for s in learned if s.horizon == horizon]
            n = len(same)
            legend = f"{label} (mean, range over {n} seed{'s' if n > 1 else ''})"
            for ax, name in zip(row, names, strict=False):
                ys = [s.per_step(name).numpy() for s in same if name in s.values]
                if ys:
                    _band(
                        ax,
                        list(range(horizon)),
                        ys,
                        drawstyle="steps-post",
                        label=legend,
                        **styles[label],
                    )
        for j, baseline in enumerate(baselines.values()):
            for ax, name in zip(row, names, strict=False):
                own = _baseline_key(baseline, name)
                if own is not None:
                    ax.step(
                        range(baseline.horizon),
                        baseline.per_step(own).numpy(),
                        where="post",
                        color="black",
                        ls="--",
                        lw=1,
                        label="baseline" if j == 0 else None,
                    )
        for ax, name in zip(row, names, strict=False):
            ax.set_title(f"{task}: {_label(name)}")
            ax.set_xlabel("inner step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(_label(name))
            ax.grid(alpha=0.3)
    _legend_outside(fig, axes[0][0])
    return _save(fig, path, title)


def _baseline_key(baseline: HyperSchedule, key: str) -> str | None:
    """A schedule's key for another's key: the same, or for a group's key (``lr/conv``) the
    hyperparameter's one key (``lr``); None when it has neither."""
    for own in (key, split_key(key)[0]):
        if own in baseline.values:
            return own
    return None


def _tasks(runs: Mapping[str, Sequence[dict[str, Any]]]) -> list[str]:
    return sorted({r["task"] for group in runs.values() for r in group})


def _styles(runs: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """A label's colour, line style and width, the same in every comparison plot; earlier
    labels are drawn wider and later ones dashed, so that a curve equal to another (two exact
    estimators) still shows."""
    labels = sorted(runs)
    dashes = ["-", "--", "-.", ":"]
    return {
        label: {
            "color": f"C{i % 10}",
            "lw": 1.4 + 0.8 * (len(labels) - 1 - i),
            "ls": dashes[i % len(dashes)],
        }
        for i, label in enumerate(labels)
    }


def _save(fig: Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
