"""``python -m benchmarks``: the whole benchmark, or a part of it, in one run.

For every task, in this order: the parts of a forward-mode step timed alone (the lower bound),
forward mode's Hessian-vector product formulations (the fastest is used below), then, horizon
by horizon, every method's peak memory in a fresh process and its time over interleaved
repeats. Cells whose estimated time or memory exceeds the budget are skipped and say why.
Writes ``benchmarks.json``, ``benchmarks.md`` (tables) and two PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from benchmarks import report
from benchmarks.memory import MemoryRunner, rss_reset_supported
from benchmarks.timing import (
    lower_bound,
    lower_bound_parts,
    run_once,
    steps_by_columns,
    time_formulations,
    time_methods,
)
from benchmarks.workloads import METHODS, TASKS, Workload, workloads
from metahpo.core import ConfigError
from metahpo.device import resolve_device
from metahpo.estimators.forward import ForwardMode

GROWS_WITH_HORIZON = {"exact_reverse"}  # memory extrapolated linearly in T; others flat
MARGIN = 1.25  # on extrapolated time and memory


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``benchmarks: error: --option ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> Parser:
    p = Parser(prog="benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models and horizons (smoke test)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"any of {', '.join(TASKS)}")
    p.add_argument(
        "--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}"
    )
    p.add_argument("--horizons", nargs="+", type=_positive(), default=None)
    p.add_argument("--repeats", type=_positive(), default=3, help="timed runs")
    p.add_argument("--threads", type=_positive(), default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--budget-seconds",
        type=_positive(float),
        default=150.0,
        help="skip the timed runs of a cell whose repeats would take longer (estimate)",
    )
    p.add_argument(
        "--budget-memory-seconds",
        type=_positive(float),
        default=300.0,
        help="skip the memory run of a cell that would take longer (estimate)",
    )
    p.add_argument(
        "--budget-mib",
        type=_positive(float),
        default=3072.0,
        help="skip a cell whose estimated peak memory exceeds this",
    )
    p.add_argument(
        "--budget-profile-seconds",
        type=_positive(float),
        default=60.0,
        help="skip the profiled run (torch's allocation counters, CPU) above this estimate",
    )
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--no-torch-memory", action="store_true", help="skip the profiled runs (CPU)")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"), help="output directory")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw the tables and plots from an earlier benchmarks.json",
    )
    return p


def _positive(kind: type = int) -> Any:
    """An argparse type: a positive int (or float); the error names the value."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            what = "integer" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {what}")
        return value

    return parse


def _check_choices(p: Parser, option: str, given: list[str], allowed: tuple[str, ...]) -> None:
    for name in given:
        if name not in allowed:
            p.error(f"{option}: {name!r} is unknown; allowed: {', '.join(allowed)}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _check_choices(p, "--tasks", args.tasks, TASKS)
    _check_choices(p, "--methods", args.methods, METHODS)
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        p.error(str(e).replace("device=", "--device=", 1))
    if args.report is not None:
        if not args.report.is_file():
            p.error(f"--report: {str(args.report)!r} is not a file")
        results = json.loads(args.report.read_text())
        report.write(results, args.report.parent)
        args.report.write_text(json.dumps(results, indent=1) + "\n")
        print(f"tables and plots redrawn in {args.report.parent}")
        return 0
    torch.set_num_threads(args.threads)
    results = run(args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write(results, args.out)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {args.out / 'benchmarks.json'}, {args.out / 'benchmarks.md'}")
    return 0


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_start": os.getloadavg()[0],
            "quick": args.quick,
            "repeats": args.repeats,
            "budget_seconds": args.budget_seconds,
            "budget_memory_seconds": args.budget_memory_seconds,
            "budget_profile_seconds": args.budget_profile_seconds,
            "budget_mib": args.budget_mib,
            "rss_reset": rss_reset_supported(),
        },
        "tasks": {},
    }
    runner = None if args.no_memory else MemoryRunner()
    for name in args.tasks:
        workload = workloads(args.quick)[name]
        results["tasks"][name] = run_task(workload, args, device, runner)
    results["meta"]["load_average_end"] = os.getloadavg()[0]
    results["meta"]["wall_seconds"] = time.perf_counter() - start
    return results


def run_task(
    workload: Workload, args: argparse.Namespace, device: torch.device, runner: MemoryRunner | None
) -> dict[str, Any]:
    """Lower bound, formulations, then every horizon's memory and time for one task."""
    print(f"\n== {workload.name}: {workload.label}", flush=True)
    task = workload.build(device)
    n_params = sum(p.numel() for p in task.model.parameters())
    parts = lower_bound_parts(task, repeats=max(10, 3 * args.repeats))
    print(
        f"  gradient {parts['grad_seconds'] * 1e3:.2f} ms ({parts['grad_formulation']}), "
        f"one Hessian-vector product {parts['hvp_seconds'] * 1e3:.2f} ms "
        f"({parts['hvp_formulation']})",
        flush=True,
    )
    formulations = time_formulations(task, workload.columns, repeats=max(5, args.repeats))
    setting = formulations["best"]
    forward = ForwardMode(hvp=setting["hvp"], chunk_size=setting["chunk_size"])
    print(f"  formulations at {workload.columns} columns: {formulations['seconds']}", flush=True)
    methods = [m for m in METHODS if m in args.methods]
    for m in methods:  # warm-up: lazy initialisation is not timed
        run_once(m, task, workload, min(4, workload.horizons[0]), forward)

    horizons = sorted(args.horizons or workload.horizons)
    cells: dict[str, dict[str, Any]] = {m: {} for m in methods}
    all_rounds: list[dict[str, Any]] = [parts]
    for horizon in horizons:
        plan = {m: _plan(m, cells[m], horizon, args, workload.limits.get(m)) for m in methods}
        for m in methods:
            if plan[m]["memory"] is None and runner is not None:
                spec = {
                    "task": workload.name,
                    "quick": args.quick,
                    "method": m,
                    "horizon": horizon,
                    "threads": args.threads,
                    "device": str(device),
                    "forward": setting,
                    "torch_memory": not args.no_torch_memory,
                    "budget_profile_seconds": args.budget_profile_seconds,
                }
                mem = runner.measure(spec, timeout=3 * args.budget_memory_seconds + 120)
                print(f"  {workload.name} T={horizon} {m} memory: {_mib(mem)}", flush=True)
                cells[m].setdefault(horizon, {})["memory"] = mem
            elif plan[m]["memory"] is not None:
                cells[m].setdefault(horizon, {})["memory"] = {"skipped": plan[m]["memory"]}
        timed = [m for m in methods if plan[m]["time"] is None]
        for m in methods:
            if plan[m]["time"] is not None:
                cells[m].setdefault(horizon, {})["time"] = {"skipped": plan[m]["time"]}
        if not timed:
            continue
        got, rounds = time_methods(timed, task, workload, horizon, forward, args.repeats)
        all_rounds += rounds
        lb = statistics.median(lower_bound(p, workload, horizon) for p in rounds)
        for m, t in got.items():
            cells[m].setdefault(horizon, {})["time"] = _summary(t.seconds, horizon, lb)
            cells[m][horizon]["grads"] = t.grads
            cells[m][horizon]["steps_by_columns"] = {
                str(a): d for a, d in sorted(steps_by_columns(t, workload, horizon).items())
            }
        _add_plain_ratios(cells, horizon)
    return {
        "label": workload.label,
        "parameters": n_params,
        "columns": workload.columns,
        "horizons": horizons,
        "lower_bound": _pooled(all_rounds),
        "formulations": formulations,
        "forward_setting": setting,
        "cells": {m: {str(h): c for h, c in cs.items()} for m, cs in cells.items()},
    }


def _pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The lower bound's parts as medians over every round they were timed in."""
    med = {k: statistics.median(r[k] for r in rounds) for k in ("grad_seconds", "hvp_seconds")}
    names = [r["hvp_formulation"] for r in rounds]
    grads = [r["grad_formulation"] for r in rounds]
    return {
        **med,
        "hvp_formulation": max(set(names), key=names.count),
        "grad_formulation": max(set(grads), key=grads.count),
        "rounds": len(rounds),
    }


def _summary(seconds: list[float], horizon: int, lb: float) -> dict[str, Any]:
    """Median, spread, per step, and the ratio to forward mode's lower bound (same rounds)."""
    med = statistics.median(seconds)
    return {
        "seconds": seconds,
        "median": med,
        "min": min(seconds),
        "max": max(seconds),
        "per_step": med / horizon,
        "lower_bound": lb,
        "over_lower_bound": med / lb if lb > 0 else None,
    }


def _add_plain_ratios(cells: dict[str, dict[Any, Any]], horizon: int) -> None:
    plain = cells.get("plain", {}).get(horizon, {}).get("time", {}).get("median")
    for cs in cells.values():
        t = cs.get(horizon, {}).get("time", {})
        if plain and "median" in t:
            t["over_plain"] = t["median"] / plain


def _plan(
    method: str,
    done: dict[int, dict[str, Any]],
    horizon: int,
    args: argparse.Namespace,
    limit: int | None,
) -> dict[str, str | None]:
    """Why (if at all) to skip ``method``'s memory run and timed runs at ``horizon``.

    ``limit``: the task's longest horizon for this method (:class:`Workload`). Otherwise
    estimates from the largest horizon measured so far: time per step times the horizon, and
    peak memory, linear in the horizon for exact reverse and flat for the others, both with a
    25 % margin.
    """
    plan: dict[str, str | None] = {"memory": None, "time": None}
    if limit is not None and horizon > limit:
        reason = f"T > {limit}, this task's longest for {method} (whole run near half an hour)"
        return {"memory": reason, "time": reason}
    if not done:
        return plan
    last = max(done)
    t = done[last].get("time", {}).get("median") or done[last].get("memory", {}).get("seconds")
    if t is None:
        reason = done[last].get("time", {}).get("skipped") or "a shorter horizon was skipped"
        return {"memory": f"as T={last}: {reason}", "time": f"as T={last}: {reason}"}
    one_run = t / last * horizon * MARGIN
    if one_run * args.repeats > args.budget_seconds:
        plan["time"] = (
            f"est. {one_run * args.repeats:.0f} s for {args.repeats} runs > "
            f"--budget-seconds {args.budget_seconds:g}"
        )
    mem = done[last].get("memory", {})
    peak = max(mem.get("rss") or 0, mem.get("malloc") or 0)
    grow = horizon / last if method in GROWS_WITH_HORIZON else 1.0
    est_mib = peak * grow * MARGIN / 2**20
    if one_run > args.budget_memory_seconds:
        plan["memory"] = (
            f"est. {one_run:.0f} s > --budget-memory-seconds {args.budget_memory_seconds:g}"
        )
    elif est_mib > args.budget_mib:
        plan["memory"] = f"est. {est_mib:.0f} MiB > --budget-mib {args.budget_mib:g}"
    if plan["memory"] and "MiB" in plan["memory"] and plan["time"] is None:
        plan["time"] = plan["memory"]
    return plan


def _mib(mem: dict[str, Any]) -> str:
    if "error" in mem:
        return f"failed: {mem['error']}"
    parts = [f"{k} {mem[k] / 2**20:.1f} MiB" for k in ("rss", "malloc", "torch") if mem.get(k)]
    return ", ".join(parts) + f" ({mem['seconds']:.2f} s)"
