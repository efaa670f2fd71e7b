"""The two pictures of a run: the learned schedules, and the meta-loss over outer steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from metahpo.schedule import HYPERPARAMETERS, HyperSchedule  # noqa: E402

LABELS = {"lr": "learning rate", "momentum": "momentum", "weight_decay": "weight decay"}


def plot_schedules(schedules: dict[str, HyperSchedule], path: Path, title: str = "") -> Path:
    """One panel per hyperparameter type, value per inner step, one line per named schedule."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes, HYPERPARAMETERS, strict=True):
        for label, sched in schedules.items():
            ax.step(range(sched.horizon), sched.per_step(name).numpy(), where="post", label=label)
        ax.set_title(LABELS[name])
        ax.set_xlabel("inner step")
        ax.grid(alpha=0.3)
    axes[0].legend()
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


def _save(fig: Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
