"""Reading a run's results (the ``results.json`` dict): headline numbers and its schedules.

One place interprets the schema of docs/outputs.md for everything downstream of a run: the W&B
summary, ``metahpo-compare`` and its plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metahpo.schedule import HyperSchedule

SCHEMA_VERSION = 2
# Versions this module reads: 2 added rejected steps and runs stopped by divergence, whose
# learned_schedule and final are null.
READABLE = (1, 2)


def load(path: Path) -> dict[str, Any]:
    """``results.json`` at ``path``.

    Raises:
        ValueError: the file is not JSON, or not a metahpo results file of a known schema.
    """
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    version = results.get("schema_version") if isinstance(results, dict) else None
    if version not in READABLE:
        allowed = ", ".join(map(str, READABLE))
        raise ValueError(f"{path}: schema_version={version!r} is unknown; allowed: {allowed}")
    return results


def selected_meta_loss(results: dict[str, Any]) -> float | None:
    """Meta-loss of the reported (learned) schedule: the plain-run score of the selected step;
    None when the run learned none (every schedule diverged)."""
    if results.get("learned_schedule") is None:
        return None
    for h in results.get("history", []):
        if h["outer_step"] == results.get("selected_outer_step") and not h.get("online"):
            return h.get("meta_loss")
    return None


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """A run's headline numbers, flat: final test metrics (learned and baseline), costs.

    Keys: ``learned/test_accuracy`` (and ``_std``), ``learned/test_loss`` (and ``_std``), the
    same for ``baseline/``; ``selected/meta_loss``, ``outer_steps``, ``rejected_steps``,
    ``stopped``, ``wall_time_seconds``, ``estimator_seconds``, ``estimator_peak_memory_mb``.
    Missing values (an interrupted or diverged run has no final evaluation; regression has no
    accuracy) are left out.
    """
    if not results:
        return {}
    out: dict[str, Any] = {}
    final = results.get("final") or {}
    for label in ("learned", "baseline"):
        for key in ("test_accuracy", "test_loss"):
            for suffix in ("", "_std"):
                value = (final.get(label) or {}).get(key + suffix)
                if value is not None:
                    out[f"{label}/{key}{suffix}"] = value
    out["selected/meta_loss"] = selected_meta_loss(results)
    for key in (
        "outer_steps",
        "rejected_steps",
        "stopped",
        "wall_time_seconds",
        "estimator_seconds",
        "estimator_peak_memory_mb",
    ):
        out[key] = results.get(key)
    return {k: v for k, v in out.items() if v is not None}


def learned_schedule(results: dict[str, Any]) -> HyperSchedule:
    """The learned schedule, rebuilt from ``learned_schedule`` and ``horizon``."""
    return HyperSchedule.from_dict(results["horizon"], results["learned_schedule"])


def baseline_schedule(results: dict[str, Any]) -> HyperSchedule:
    """The baseline schedule, rebuilt from the ``baseline`` config the run recorded."""
    from metahpo.build import baseline_from_config
    from metahpo.optim import Recorded

    config = OmegaConf.create(results["baseline_schedule"]["config"])
    names = [str(k) for k in config if k != "lr_decay"]
    return baseline_from_config(config, results["horizon"], Recorded(names))


def schedule_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The learned schedule as a table: one row per segment, with its inner steps and the
    initial value it started from."""
    columns = ["key", "segment", "first_step", "last_step", "initial", "learned", "learn"]
    learned = learned_schedule(results)
    initial = HyperSchedule.from_dict(results["horizon"], results["initial_schedule"])
    rows = []
    for name, values in learned.values.items():
        starts = [*learned.segment_starts(name), learned.horizon]
        for i, value in enumerate(values.tolist()):
            rows.append(
                [
                    name,
                    i,
                    starts[i],
                    starts[i + 1] - 1,
                    float(initial.values[name][i]),
                    value,
                    learned.specs[name].learn,
                ]
            )
    return columns, rows
