"""Tables, targets and plots from the benchmark's results (the dict written as benchmarks.json)."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20
READINGS = ("malloc", "rss", "torch")
FLAT_TOLERANCE = 0.05  # forward mode's peak at the longest horizon vs the shortest
NAIVE_TARGET = 2.0  # forward mode at least this much faster than naive...
NAIVE_MIN_COLUMNS = 5  # ...at this many active columns or more
LOWER_BOUND_TARGET = 1.3  # forward mode within this factor of its lower bound
SPEED_TASKS = ("digits", "lenet")  # where the speed targets apply


def pooled_steps(task: dict[str, Any], method: str) -> dict[int, list[float]]:
    """Step durations of ``method`` by active columns, pooled over every timed horizon."""
    out: dict[int, list[float]] = {}
    for cell in task["cells"].get(method, {}).values():
        for a, ds in cell.get("steps_by_columns", {}).items():
            out.setdefault(int(a), []).extend(ds)
    return out


def step_table(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Per number of active columns: median seconds per step of each method, lower bound."""
    lb = task["lower_bound"]
    plain = [d for ds in pooled_steps(task, "plain").values() for d in ds]
    fwd, naive = pooled_steps(task, "forward"), pooled_steps(task, "naive")
    rows = []
    for a in sorted(set(fwd) | set(naive)):
        row: dict[str, Any] = {
            "columns": a,
            "plain": statistics.median(plain) if plain else None,
            "lower_bound": lb["grad_seconds"] + a * lb["hvp_seconds"],
            "forward": statistics.median(fwd[a]) if a in fwd else None,
            "naive": statistics.median(naive[a]) if a in naive else None,
            "steps": len(fwd.get(a, [])),
        }
        if row["forward"] and row["naive"]:
            row["naive_over_forward"] = row["naive"] / row["forward"]
        if row["forward"]:
            row["forward_over_lower_bound"] = row["forward"] / row["lower_bound"]
        rows.append(row)
    return rows


def _memory(task: dict[str, Any], method: str) -> dict[int, dict[str, Any]]:
    return {
        int(h): c["memory"]
        for h, c in task["cells"].get(method, {}).items()
        if "memory" in c and "error" not in c["memory"] and "skipped" not in c["memory"]
    }


def _times(task: dict[str, Any], method: str) -> dict[int, dict[str, Any]]:
    return {
        int(h): c["time"]
        for h, c in task["cells"].get(method, {}).items()
        if "time" in c and "median" in c["time"]
    }


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue, per task: the figures, and whether it is met."""
    out: dict[str, Any] = {}
    for name, task in results["tasks"].items():
        t: dict[str, Any] = {}
        mem = _memory(task, "forward")
        if len(mem) >= 2:
            lo, hi = min(mem), max(mem)
            ratios = {
                r: mem[hi][r] / mem[lo][r] for r in READINGS if mem[lo].get(r) and mem[hi].get(r)
            }
            t["forward_memory_flat"] = {
                "horizons": [lo, hi],
                "ratio": ratios,
                "met": {r: abs(v - 1) <= FLAT_TOLERANCE for r, v in ratios.items()},
            }
        exact = _memory(task, "exact_reverse")
        if len(exact) >= 2:
            lo, hi = min(exact), max(exact)
            t["exact_reverse_growth"] = {
                "horizons": [lo, hi],
                "ratio": exact[hi]["malloc"] / max(exact[lo]["malloc"], 1),
                "mib_per_step": (exact[hi]["malloc"] - exact[lo]["malloc"]) / (hi - lo) / MIB,
            }
        fwd, naive = _times(task, "forward"), _times(task, "naive")
        t["forward_over_lower_bound"] = {
            str(h): v["over_lower_bound"] for h, v in sorted(fwd.items())
        }
        t["naive_over_forward"] = {
            str(h): naive[h]["median"] / fwd[h]["median"] for h in sorted(fwd) if h in naive
        }
        rows = [r for r in step_table(task) if r["columns"] >= NAIVE_MIN_COLUMNS]
        per_step = [r["naive_over_forward"] for r in rows if "naive_over_forward" in r]
        if name in SPEED_TASKS:
            t["naive_target_met"] = bool(per_step) and min(per_step) >= NAIVE_TARGET
            over = list(t["forward_over_lower_bound"].values())
            t["lower_bound_target_met"] = bool(over) and max(over) <= LOWER_BOUND_TARGET
        t["naive_over_forward_per_step_min"] = min(per_step) if per_step else None
        out[name] = t
    return out


# -- markdown --------------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"`{meta['command']}` ({meta['date']}; torch {meta['torch']}, {meta['device']}, "
        f"{meta['threads']} thread(s), {meta['cpus']} CPUs, load average "
        f"{meta['load_average_start']:.1f} at start and {meta['load_average_end']:.1f} at end, "
        f"{meta['repeats']} timed repeats, {meta['wall_seconds'] / 60:.1f} min in all)",
        "",
    ]
    for name, task in results["tasks"].items():
        lb, form = task["lower_bound"], task["formulations"]
        setting = task["forward_setting"]
        lines += [
            f"### {name}: {task['label']}",
            "",
            f"{task['parameters']:,} parameters. Lower bound per step: one gradient "
            f"{lb['grad_seconds'] * 1e3:.2f} ms ({lb['grad_formulation']}) plus "
            f"{lb['hvp_seconds'] * 1e3:.2f} ms per active column ({lb['hvp_formulation']}). "
            f"Forward mode runs with `hvp={setting['hvp']}, chunk_size={setting['chunk_size']}`, "
            f"the fastest of these at {form['columns']} columns (median s per step's gradient and "
            "products):",
            "",
            "| formulation | " + " | ".join(form["seconds"]) + " |",
            "|---" * (len(form["seconds"]) + 1) + "|",
            "| seconds | " + " | ".join(f"{v:.4f}" for v in form["seconds"].values()) + " |",
            "",
            "| method | T | s / hypergradient, median [min, max] | s / step | / plain "
            "| / lower bound | malloc MiB | RSS MiB | torch MiB | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, cells in task["cells"].items():
            for h, c in cells.items():
                tm, mem = c.get("time", {}), c.get("memory", {})
                both = "skipped" in tm and tm["skipped"] == mem.get("skipped")
                notes = [
                    f"skipped: {tm['skipped']}" if both else "",
                    f"time skipped: {tm['skipped']}" if "skipped" in tm and not both else "",
                    f"memory skipped: {mem['skipped']}" if "skipped" in mem and not both else "",
                    f"memory failed: {mem['error']}" if "error" in mem else "",
                    f"torch: {mem['torch_skipped']}" if "torch_skipped" in mem else "",
                ]
                timing = (
                    f"{tm['median']:.3g} [{tm['min']:.3g}, {tm['max']:.3g}]"
                    if "median" in tm
                    else "-"
                )
                lines.append(
                    f"| {method} | {h} | {timing} | {_f(tm.get('per_step'))} "
                    f"| {_f(tm.get('over_plain'), '.2f')} "
                    f"| {_f(tm.get('over_lower_bound'), '.2f') if method == 'forward' else '-'} "
                    f"| {_mib(mem.get('malloc'))} | {_mib(mem.get('rss'))} "
                    f"| {_mib(mem.get('torch'))} | {'; '.join(n for n in notes if n)} |"
                )
        lines += [
            "",
            "Seconds per step by active columns (medians pooled over horizons):",
            "",
            "| active columns | plain | lower bound | forward | naive | naive / forward "
            "| forward / lower bound | steps |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in step_table(task):
            lines.append(
                f"| {r['columns']} | {_f(r['plain'], '.4f')} | {r['lower_bound']:.4f} "
                f"| {_f(r['forward'], '.4f')} | {_f(r['naive'], '.4f')} "
                f"| {_f(r.get('naive_over_forward'), '.2f')} "
                f"| {_f(r.get('forward_over_lower_bound'), '.2f')} | {r['steps']} |"
            )
        lines.append("")
    lines += targets_markdown(results)
    return "\n".join(lines) + "\n"


def targets_markdown(results: dict[str, Any]) -> list[str]:
    lines = [
        "### Targets",
        "",
        "| task | forward peak, longest / shortest T (malloc, RSS, torch) "
        "| exact reverse peak growth | naive / forward, per step at >= 5 columns (min) "
        "| naive / forward per hypergradient | forward / lower bound |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in results["targets"].items():
        flat = t.get("forward_memory_flat")
        flat_s = (
            f"T={flat['horizons'][0]}->{flat['horizons'][1]}: "
            + ", ".join(
                f"{k} {v:.3f} ({'met' if flat['met'][k] else 'missed'})"
                for k, v in flat["ratio"].items()
            )
            if flat
            else "-"
        )
        ex = t.get("exact_reverse_growth")
        ex_s = (
            f"T={ex['horizons'][0]}->{ex['horizons'][1]}: x{ex['ratio']:.1f} "
            f"({ex['mib_per_step']:.3f} MiB/step)"
            if ex
            else "-"
        )
        met = t.get("naive_target_met")
        naive_s = _f(t.get("naive_over_forward_per_step_min"), ".2f") + (
            "" if met is None else (" (met)" if met else " (missed)")
        )
        per_h = ", ".join(f"T={h}: {v:.2f}" for h, v in t["naive_over_forward"].items()) or "-"
        lb_met = t.get("lower_bound_target_met")
        lb_s = ", ".join(f"T={h}: {v:.2f}" for h, v in t["forward_over_lower_bound"].items())
        lb_s = (lb_s or "-") + ("" if lb_met is None else (" (met)" if lb_met else " (missed)"))
        lines.append(f"| {name} | {flat_s} | {ex_s} | {naive_s} | {per_h} | {lb_s} |")
    return lines + [""]


# -- plots -----------------------------------------------------------------------------------------
COLOURS = {
    "plain": "0.5",
    "forward": "C0",
    "naive": "C1",
    "exact_reverse": "C3",
    "truncated_reverse": "C2",
    "greedy": "C4",
}


def plots(results: dict[str, Any], out: Path) -> None:
    """``memory.png`` (peak against horizon) and ``time.png`` (seconds against horizon)."""
    names = list(results["tasks"])
    for kind in ("memory", "time"):
        fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            task = results["tasks"][name]
            for method in task["cells"]:
                if kind == "memory":
                    if method == "plain":
                        continue
                    mem = _memory(task, method)
                    hs = sorted(mem)
                    ys = [mem[h]["malloc"] / MIB for h in hs]
                    rss = [(mem[h].get("rss") or float("nan")) / MIB for h in hs]
                    ax.plot(hs, ys, "o-", color=COLOURS[method], label=method)
                    ax.plot(hs, rss, ":", color=COLOURS[method], alpha=0.6)
                else:
                    tm = _times(task, method)
                    hs = sorted(tm)
                    med = [tm[h]["median"] for h in hs]
                    err = [
                        [tm[h]["median"] - tm[h]["min"] for h in hs],
                        [tm[h]["max"] - tm[h]["median"] for h in hs],
                    ]
                    ax.errorbar(hs, med, yerr=err, fmt="o-", color=COLOURS[method], label=method)
            if kind == "time":
                fwd = _times(task, "forward")
                hs = sorted(fwd)
                ax.plot(hs, [fwd[h]["lower_bound"] for h in hs], "k--", label="lower bound")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps T")
            ax.set_ylabel(
                "peak MiB (solid: allocator, dotted: RSS)"
                if kind == "memory"
                else "seconds per hypergradient"
            )
            ax.set_title(name)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=110)
        plt.close(fig)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without the raw step durations and hypergradients: small enough to commit.

    Each task gets its ``step_table`` (medians by active columns) instead.
    """
    out = copy.deepcopy(results)
    for name, task in out["tasks"].items():
        task["steps_by_columns"] = step_table(results["tasks"][name])
        for cells in task["cells"].values():
            for cell in cells.values():
                cell.pop("steps_by_columns", None)
                cell.pop("grads", None)
    return out


def write(results: dict[str, Any], out: Path) -> None:
    """``benchmarks.md``, ``summary.json`` and the two plots into ``out``.

    ``results["targets"]`` is refreshed on the way.
    """
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)  # derived: always from the figures at hand
    (out / "benchmarks.md").write_text(markdown(results))
    (out / "summary.json").write_text(json.dumps(summary(results), indent=1) + "\n")
    plots(results, out)
