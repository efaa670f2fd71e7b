"""``estimator=auto``'s cost model against the measured side-by-side runs.

``python -m benchmarks.auto_model [--results DIR ...] [--out FILE]``

For each results file of :mod:`benchmarks.checkpointed` (``checkpointed.json``: seconds of a
plain run, forward mode, exact reverse and checkpointed reverse per horizon and number of
columns), on the same task (digits MLP or LeNet, built as that benchmark builds it): the
per-step rates :func:`metahpo.estimators.auto.measure_rates` measures on the model (the
least of 5 rounds), and for every cell the time each candidate should take by the model, in
plain runs, with the fitted constants (``calibrate=false``) and with the measured rates,
beside what was measured; and the pick of each against the measured fastest. The rates are
timed now, the cells were timed when their benchmark ran: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.checkpointed import make_task, schedule
from metahpo.estimators.auto import Rates, measure_rates, started_columns

DEFAULT = [
    Path("docs/benchmarks/checkpointed/checkpointed.json"),
    Path("docs/benchmarks/checkpointed_3200/checkpointed.json"),
    Path("docs/benchmarks/checkpointed_lenet/checkpointed.json"),
    Path("docs/benchmarks/checkpointed_lenet_800/checkpointed.json"),
]
NAMES = {"forward": "forward_s", "exact_reverse": "exact_reverse_s"}


def modelled(row: dict[str, Any], rates: Rates) -> dict[str, float]:
    """Each candidate's time in plain runs by the model (forward and exact reverse: the picks
    without a memory budget)."""
    s = schedule(row["T"], row["columns"])
    cols = started_columns(s)
    return {
        "forward": sum(1 + rates.per_column * c for c in cols) / len(cols),
        "exact_reverse": rates.reverse,
    }


def compare(path: Path, rates_by_task: dict[str, Rates]) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    out = []
    for row in data["rows"]:
        measured = {n: row[k] / row["plain_s"] for n, k in NAMES.items()}
        fastest = min(measured, key=measured.__getitem__)
        cell: dict[str, Any] = {
            "file": str(path),
            "task": data.get("task", "digits"),
            "T": row["T"],
            "columns": row["columns"],
            "measured": measured,
            "fastest": fastest,
        }
        for label, rates in (
            ("constants", Rates()),
            ("measured_rates", rates_by_task[data.get("task", "digits")]),
        ):
            m = modelled(row, rates)
            cell[label] = {"model": m, "pick": min(m, key=m.__getitem__)}
        out.append(cell)
    return out


def table(cells: list[dict[str, Any]]) -> str:
    lines = [
        "| task | T | cols | measured forward / exact (x plain) | fastest | constants: model, pick "
        "| measured rates: model, pick |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        m = c["measured"]
        parts = []
        for label in ("constants", "measured_rates"):
            mod = c[label]["model"]
            ok = "" if c[label]["pick"] == c["fastest"] else " (wrong)"
            parts.append(
                f"{mod['forward']:.1f} / {mod['exact_reverse']:.1f}, {c[label]['pick']}{ok}"
            )
        lines.append(
            f"| {c['task']} | {c['T']} | {c['columns']} | {m['forward']:.1f} / "
            f"{m['exact_reverse']:.1f} | {c['fastest']} | {parts[0]} | {parts[1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, nargs="+", default=DEFAULT)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/auto_model.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    files = [f for f in args.results if f.exists()]
    rates: dict[str, Rates] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted({json.loads(f.read_text()).get("task", "digits") for f in files}):
            task = make_task(name, Path(tmp) / name)
            rates[name] = measure_rates(task, schedule(200, 30))
            print(name, rates[name], flush=True)
    cells = [c for f in files for c in compare(f, rates)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rates": {n: vars(r) for n, r in rates.items()}, "cells": cells}, indent=1)
    )
    print(table(cells))


if __name__ == "__main__":
    main()
