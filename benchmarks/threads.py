"""Seconds per inner run against torch's CPU thread count (the ``threads`` key).

``python -m benchmarks.threads [--quick] [--out docs/benchmarks/threads.json]``

One plain training run (``fit``) and one forward-mode hypergradient (FDS, 7 and 30 columns) on
the default digits MLP (float32, T = 100), and the same for LeNet-5 on MNIST-shaped random
batches, with each thread count in turn, interleaved, repeated; min and median seconds per
setting, and each count's median relative to one thread. The machine's load at the time is part
of the result: on cores other jobs share, extra threads wait for each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.workloads import _synthetic
from metahpo.estimators.forward import ForwardMode
from metahpo.inner import fit
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import Digits
from metahpo.tasks.models import LeNet


def _schedule(horizon: int, columns: int) -> HyperSchedule:
    lr = columns - 2 if columns > 3 else 1
    segments = {"lr": lr, "momentum": 1, "weight_decay": 1} if columns > 3 else None
    segments = segments or {"lr": 1, "momentum": 1, "weight_decay": 1}
    values = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    specs = {k: HyperSpec(n, (0.0, 1.0)) for k, n in segments.items()}
    return HyperSchedule(horizon, specs, values)


def _cases(quick: bool) -> dict[str, Callable[[], Any]]:
    horizon = 5 if quick else 100
    digits = Digits()
    lenet = _synthetic("lenet", (1, 28, 28), lambda: LeNet(1, 28, 10), 64, torch.device("cpu"))
    out: dict[str, Callable[[], Any]] = {}
    for name, task in (("digits", digits), ("lenet", lenet)):
        plain = _schedule(horizon, 3)
        out[f"{name} plain run"] = lambda t=task, s=plain: fit(t, s)
        for c in (7, 30):
            s = _schedule(horizon, c)
            out[f"{name} forward {c} columns"] = lambda t=task, s=s: ForwardMode().hypergradient(
                t, s
            )
    return out


def measure(threads: list[int], repeats: int, quick: bool) -> dict[str, Any]:
    cases = _cases(quick)
    seconds: dict[str, dict[int, list[float]]] = {k: {n: [] for n in threads} for k in cases}
    before = torch.get_num_threads()
    try:
        for _ in range(repeats):
            for name, case in cases.items():
                for n in threads:  # interleaved: every count sees the same load
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    case()
                    seconds[name][n].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    rows = []
    for name, per in seconds.items():
        base = statistics.median(per[threads[0]])
        for n in threads:
            med = statistics.median(per[n])
            rows.append(
                {
                    "case": name,
                    "threads": n,
                    "min_s": min(per[n]),
                    "median_s": med,
                    "ratio_to_first": med / base,
                }
            )
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "repeats": repeats,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    first = result["rows"][0]["threads"]
    lines = [
        f"| case | threads | min (s) | median (s) | median / {first} thread(s) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['case']} | {r['threads']} | {r['min_s']:.3f} | {r['median_s']:.3f} | "
            f"{r['ratio_to_first']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="T = 5, for a smoke test")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = measure(args.threads, args.repeats, args.quick)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"load average {result['load_average']}, {result['cpus']} CPUs")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
