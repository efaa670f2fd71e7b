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

SCHEMA_VERSION = 3
# Versions this module reads: 2 added rejected steps and runs stopped by divergence, whose
# learned_schedule and final are null; 3 added final.difference (paired learned - baseline),
# sample standard deviations and the baseline cache.
READABLE = (1, 2, 3)


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


def selected_entry(results: dict[str, Any]) -> dict[str, Any] | None:
    """The history entry of the reported (learned) schedule: the plain-run score of the
    selected step; None when the run learned none (every schedule diverged)."""
    if results.get("learned_schedule") is None:
        return None
    for h in results.get("history", []):
        if h["outer_step"] == results.get("selected_outer_step") and not h.get("online"):
            return h
    return None


def selected_meta_loss(results: dict[str, Any]) -> float | None:
    """Meta-loss of the reported (learned) schedule (None when the run learned none)."""
    entry = selected_entry(results)
    return None if entry is None else entry.get("meta_loss")


def _run_costs(results: dict[str, Any]) -> tuple[int, int]:
    """An outer loop's modelled cost of one estimate and of one plain score, in inner-step
    equivalents, over all its inner seeds."""
    from types import SimpleNamespace

    from metahpo.estimators.auto import gradient_evaluations

    schedule = HyperSchedule.from_dict(results["horizon"], results["initial_schedule"])
    per_run, _ = gradient_evaluations(SimpleNamespace(name=results["estimator"]), schedule)
    seeds = len((results.get("outer_loop") or {}).get("seeds") or [0])
    return per_run * seeds, int(results["horizon"]) * seeds


def spent_curve(results: dict[str, Any]) -> list[float]:
    """Inner-step equivalents (plain training steps) spent up to and including each history
    entry: a search records them (``spent``); for an outer loop they are modelled, each estimate
    (rejected ones too) at :func:`metahpo.estimators.auto.gradient_evaluations` of its estimator
    and each plain score at the horizon, per inner seed (docs/baselines.md)."""
    history = results.get("history") or []
    if all("spent" in h for h in history):
        return [float(h["spent"]) for h in history]
    estimate, score = _run_costs(results)
    rejected: dict[int, int] = {}
    for r in results.get("rejections") or []:
        rejected[r["outer_step"]] = rejected.get(r["outer_step"], 0) + 1
    total, out = 0.0, []
    for h in history:
        total += rejected.pop(h["outer_step"], 0) * estimate  # tried before this entry
        total += estimate if h.get("hypergradient") is not None else score
        out.append(total)
    return out


def spent_total(results: dict[str, Any]) -> float:
    """Inner-step equivalents the whole run spent (:func:`spent_curve`'s last value, plus an
    outer loop's estimates rejected after its last entry)."""
    if results.get("search"):
        return float(results["search"]["spent"])
    curve = spent_curve(results)
    last = max((h["outer_step"] for h in results.get("history") or []), default=-1)
    late = sum(1 for r in results.get("rejections") or [] if r["outer_step"] > last)
    return (curve[-1] if curve else 0.0) + late * _run_costs(results)[0]


def schedule_scalars(values: dict[str, list[float]]) -> dict[str, float]:
    """A schedule's values as flat scalars, ``<type>/<segment>`` (``lr/3``), for trackers."""
    return {f"{n}/{i}": v for n, vals in values.items() for i, v in enumerate(vals)}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """A run's headline numbers, flat: the selected schedule and its scores, the final test
    metrics (learned, baseline, and their paired difference), costs.

    Keys (docs/tracking.md): ``meta_loss``, ``val_accuracy`` and ``<type>/<segment>`` of the
    selected (learned) schedule, which replace the last outer step's values of the same names;
    ``selected/outer_step``, ``selected/meta_loss``; ``learned/test_accuracy``,
    ``learned/test_loss`` (each with ``_std``, the sample standard deviation over the final
    seeds), the same for ``baseline/``; ``difference/test_accuracy`` and
    ``difference/test_loss`` (learned - baseline, paired per final seed; ``_std``,
    ``_ci95_low``, ``_ci95_high``); ``final_seeds``; ``outer_steps``, ``rejected_steps``,
    ``stopped``, ``wall_time_seconds``, ``estimator_seconds``, ``estimator_peak_memory_mb``;
    ``inner_step_equivalents`` (:func:`spent_total`).
    Missing values (an interrupted or diverged run has no final evaluation; regression has no
    accuracy; one final seed has no spread) are left out.
    """
    if not results:
        return {}
    out: dict[str, Any] = {}
    entry = selected_entry(results)
    if entry is not None:
        out["meta_loss"] = entry.get("meta_loss")
        out["val_accuracy"] = entry.get("val_accuracy")
        out.update(schedule_scalars(entry["schedule"]))
        out["selected/outer_step"] = results.get("selected_outer_step")
    final = results.get("final") or {}
    for label in ("learned", "baseline", "difference"):
        part = final.get(label) or {}
        for key in ("test_accuracy", "test_loss"):
            for suffix in ("", "_std"):
                out[f"{label}/{key}{suffix}"] = part.get(key + suffix)
            ci = part.get(f"{key}_ci95")
            if label == "difference" and ci is not None:
                out[f"{label}/{key}_ci95_low"], out[f"{label}/{key}_ci95_high"] = ci
    if final.get("learned"):
        out["final_seeds"] = len(final["learned"].get("per_seed", []))
    out["selected/meta_loss"] = selected_meta_loss(results)
    if results.get("history"):
        out["inner_step_equivalents"] = spent_total(results)
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
    """The learned schedule's values, rebuilt from ``learned_schedule`` and ``horizon``.

    ``results.json`` names the inner optimiser but not its settings (``optimizer.average``
    changes what ``lr`` means), so this schedule has none: enough to plot or tabulate; to
    retrain it, rebuild the optimiser from the run's ``config.yaml``
    (``scripts/retrain_seeds.run_schedules``)."""
    return HyperSchedule.from_dict(results["horizon"], results["learned_schedule"])


def baseline_schedule(results: dict[str, Any]) -> HyperSchedule:
    """The baseline schedule, rebuilt from the ``baseline`` config the run recorded."""
    from metahpo.build import baseline_from_config
    from metahpo.optim import Recorded

    config = OmegaConf.create(results["baseline_schedule"]["config"])
    names = [str(k) for k in config if k != "lr_decay"]
    return baseline_from_config(config, results["horizon"], Recorded(names))


def schedule_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The learned schedule as a table: one row per raw value (a segment, a knot, a family's
    parameter), with the inner steps it influences and the raw value it started from."""
    columns = ["key", "segment", "first_step", "last_step", "initial", "learned", "learn"]
    learned = learned_schedule(results)
    initial = HyperSchedule.from_dict(results["horizon"], results["initial_schedule"])
    rows = []
    for name, values in learned.values.items():
        supports = learned.supports(name)
        for i, value in enumerate(values.tolist()):
            rows.append(
                [
                    name,
                    i,
                    *supports[i],
                    float(initial.values[name][i]),
                    value,
                    learned.specs[name].learn,
                ]
            )
    return columns, rows
