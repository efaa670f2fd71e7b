"""Forward mode, exact reverse and checkpointed reverse side by side: seconds and peak memory.

``python -m benchmarks.checkpointed [--task digits|lenet] [--horizons 200 800] [--columns 1 10 30]
[--out DIR]``

On the digits MLP (64-128-10, batch 128, float32, CPU, one thread) or, with ``--task lenet``,
LeNet on an MNIST-format stand-in (scikit-learn's 8x8 digits upscaled to 20x20 in a 28x28
frame, written as MNIST IDX files to a temporary root and read by
``metahpo.tasks.mnist.MNIST``; batch 128), for every horizon and
number of learned columns: a plain training run (the denominator of the time ratios), forward
mode, exact reverse (higher), checkpointed reverse at its default stretch round(sqrt(T)) and at
a memory budget of a quarter of exact reverse's measured peak, and what ``estimator=auto``
picks with no budget and with that budget. Every figure comes from one run in one process, one
method after the other (CostMeter: wall time and sampled peak heap above the start; the least
time and the largest peak over ``--repeats`` runs of each, as the machine may be shared). The
hypergradients of the three exact estimators are compared as well (max relative difference).
Writes ``checkpointed.json`` and a markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from metahpo.device import CostMeter
from metahpo.estimators.auto import Auto
from metahpo.estimators.checkpointed_reverse import (
    CheckpointedReverse,
    graph_bytes_per_step,
    state_bytes,
)
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.inner import FlatTask, Steps, fit
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.taskbase import SupervisedTask
from metahpo.tasks.digits import Digits
from metahpo.tasks.mnist import MNIST

VALUES = {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3}
# learned columns -> segments per type (lr, momentum, weight decay; 0: fixed, one segment)
COLUMNS = {1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1), 10: (6, 2, 2), 30: (20, 5, 5)}
MIB = 2**20


def schedule(horizon: int, columns: int) -> HyperSchedule:
    specs = {
        n: HyperSpec(s, (0.0, 1.0)) if s else HyperSpec(1, (0.0, 1.0), learn=False)
        for n, s in zip(VALUES, COLUMNS[columns], strict=True)
    }
    return HyperSchedule(horizon, specs, VALUES)


REPEATS = [1]  # set by --repeats


def metered(fn: Any) -> tuple[Any, float, float]:
    """Result, least seconds and largest peak MiB over ``REPEATS[0]`` runs (the machine is
    shared: the least time is the one least disturbed)."""
    seconds, peak = [], []
    for _ in range(REPEATS[0]):
        with CostMeter(torch.device("cpu")) as cost:
            out = fn()
        seconds.append(cost.seconds)
        peak.append(cost.peak / MIB)
    return out, min(seconds), max(peak)


def write_digits_idx(root: Path) -> None:
    """scikit-learn's digits (0..16, 8x8) as MNIST IDX files in ``<root>/MNIST/raw``: scaled to
    0..255, upscaled bilinearly to 20x20 and centred in a 28x28 frame (MNIST's layout); the
    first 1437 digits are the training file, the other 360 the test file."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    small = torch.as_tensor(x.reshape(-1, 1, 8, 8) * (255.0 / 16.0), dtype=torch.float32)
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear")
    frame = torch.zeros(len(x), 28, 28, dtype=torch.uint8)
    frame[:, 4:24, 4:24] = big[:, 0].clamp(0, 255).round().to(torch.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    labels = torch.as_tensor(y, dtype=torch.uint8)
    for prefix, part in (("train", slice(0, 1437)), ("t10k", slice(1437, None))):
        for kind, arr in (("images-idx3", frame[part]), ("labels-idx1", labels[part])):
            head = struct.pack(">I", 0x0800 + arr.dim()) + struct.pack(f">{arr.dim()}I", *arr.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(head + arr.numpy().tobytes())


def make_task(name: str, root: Path) -> SupervisedTask:
    if name == "lenet":
        write_digits_idx(root)
        return MNIST(root=root, download=False, batch_size=128)
    return Digits(hidden=(128,), batch_size=128)


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


BUDGET_FRACTION = [0.25]  # set by --budget-fraction
EXACT = [True]  # --no-exact: exact reverse is not run (its peak is modelled)


def cell(
    task: SupervisedTask, horizon: int, columns: int, reverse: dict[str, Any]
) -> dict[str, Any]:
    s = schedule(horizon, columns)
    row: dict[str, Any] = {"T": horizon, "columns": columns}
    _, row["plain_s"], row["plain_mb"] = metered(lambda: fit(task, s))
    fwd, row["forward_s"], row["forward_mb"] = metered(lambda: ForwardMode().hypergradient(task, s))
    methods: list[tuple[str, Any]] = [("checkpointed", CheckpointedReverse)]
    if EXACT[0]:
        methods.insert(0, ("exact_reverse", ExactReverse))
    else:  # its tape would not fit: its peak by the model (state + T graphs), not run
        flat = FlatTask(task)
        state = state_bytes(Steps(flat, s).init_state(flat))
        row["exact_reverse_s"] = None
        row["exact_reverse_mb"] = (state + horizon * graph_bytes_per_step(flat, s)) / MIB
        row["exact_reverse_modelled"] = True
    for name, make in methods:
        hg, row[f"{name}_s"], row[f"{name}_mb"] = metered(
            lambda make=make: make().hypergradient(task, s)
        )
        row[f"{name}_vs_forward"] = rel(hg.grads, fwd.grads)
        if name == "checkpointed":
            row["stretch"] = hg.metrics["stretch"]
    budget = max(1.0, row["exact_reverse_mb"] * BUDGET_FRACTION[0])
    reverse.setdefault(horizon, budget)  # one budget per horizon (from its first cell)
    budget = reverse[horizon]
    est = CheckpointedReverse(memory_mb=budget)
    hg, row["budgeted_s"], row["budgeted_mb"] = metered(lambda: est.hypergradient(task, s))
    row["budget_mb"], row["budgeted_stretch"] = budget, hg.metrics["stretch"]
    row["budgeted_vs_forward"] = rel(hg.grads, fwd.grads)
    for label, mb in (("auto", None), ("auto_budget", budget)):
        for suffix, calibrate in (("", False), ("_measured", True)):
            choice, _ = Auto(memory_mb=mb, calibrate=calibrate).pick(task, s)
            row[label + suffix] = choice.name
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| T | cols | plain s | forward s (x plain) | exact rev. s | ckpt s (k) | ckpt/exact | "
        "forward MiB | exact MiB | ckpt MiB | budget MiB: ckpt MiB, s (k) | fastest "
        "| auto: constants, measured | auto in budget: constants, measured |\n|" + "---|" * 14
    )
    lines = [head]
    for r in rows:
        times = {
            "forward": r["forward_s"],
            "exact_reverse": r["exact_reverse_s"],
            "checkpointed_reverse": r["checkpointed_s"],
        }
        times = {n: t for n, t in times.items() if t is not None}
        exact = r["exact_reverse_s"]
        exact_s = "not run" if exact is None else f"{exact:.2f}"
        ratio = "-" if exact is None else f"{r['checkpointed_s'] / exact:.2f}"
        modelled = " (model)" if r.get("exact_reverse_modelled") else ""
        lines.append(
            f"| {r['T']} | {r['columns']} | {r['plain_s']:.2f} | {r['forward_s']:.2f} "
            f"({r['forward_s'] / r['plain_s']:.1f}x) | {exact_s} | "
            f"{r['checkpointed_s']:.2f} ({r['stretch']}) | "
            f"{ratio} | {r['forward_mb']:.1f} | "
            f"{r['exact_reverse_mb']:.1f}{modelled} | {r['checkpointed_mb']:.1f} | "
            f"{r['budget_mb']:.1f}: "
            f"{r['budgeted_mb']:.1f}, {r['budgeted_s']:.2f} ({r['budgeted_stretch']}) | "
            f"{min(times, key=times.__getitem__)} | {r['auto']}, {r.get('auto_measured', '-')} | "
            f"{r['auto_budget']}, {r.get('auto_budget_measured', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("digits", "lenet"), default="digits")
    p.add_argument("--horizons", type=int, nargs="+", default=[200, 800])
    p.add_argument("--columns", type=int, nargs="+", default=[1, 10, 30], choices=COLUMNS)
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (least time)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/checkpointed"))
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=0.25,
        help="checkpointed reverse's memory_mb as a fraction of exact reverse's peak",
    )
    p.add_argument(
        "--no-exact",
        action="store_true",
        help="do not run exact reverse (its tape would not fit); its peak is modelled",
    )
    args = p.parse_args(argv)
    REPEATS[0] = args.repeats
    BUDGET_FRACTION[0] = args.budget_fraction
    EXACT[0] = not args.no_exact
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    task = make_task(args.task, Path(tmp.name))
    fit(task, schedule(20, 1))  # warm-up
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    budgets: dict[str, Any] = {}
    for horizon in args.horizons:
        for columns in sorted(args.columns, reverse=True):
            rows.append(cell(task, horizon, columns, budgets))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - started
    (args.out / "checkpointed.json").write_text(
        json.dumps(
            {"task": args.task, "rows": rows, "seconds": total, "repeats": args.repeats}, indent=1
        )
    )
    (args.out / "checkpointed.md").write_text(table(rows))
    print(table(rows))
    print(f"total {total:.0f} s")


if __name__ == "__main__":
    main()
