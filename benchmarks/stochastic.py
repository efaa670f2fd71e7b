"""The stochastic estimators measured: PES against truncation, ES and EvoGrad against exact
references, and the three loss-hyperparameter learners on noisy-label digits.

``python -m benchmarks.stochastic {pes_bias,es_cosine,evograd_cosine,evograd_cost,noisy_labels,
edge,edge_long,guard,es_batch} [--quick]
[--out docs/stochastic]``; ``python -m benchmarks.stochastic report`` prints the tables of
docs/estimators.md from the JSON files.

All on CPU, one thread, small budgets (stated in each JSON's ``setup`` and in
docs/estimators.md):

- ``pes_bias``: quadratic task, one learned learning rate for the whole run (momentum 0.5
  fixed), T = 12: for each window K, the exact gradient of the sum of the window-end
  validation losses (``estimator=forward estimator.window=K``), truncated reverse mode over
  each window from its start held constant, and PES with 256 pairs (its standard error from
  the spread over pairs). Writes ``pes_bias.json`` and ``pes_bias.png``.
- ``es_cosine``: float64 digits MLP (64-32-10, batch 64), T = 40, lr / momentum / weight decay
  in 2 segments each; cosine similarity of ES (sigma 1e-3 of each bounds width) with forward
  mode's hypergradient against the number of pairs, 3 seeds, in raw units and scaled by each
  raw value's bounds width (ES's noise is isotropic in the scaled units; weight decay's narrow
  bounds make its raw-unit estimate far noisier than the learning rate's).
- ``evograd_cosine``: the same digits MLP with the optimiser fixed (lr 0.1, momentum 0.5),
  label smoothing in 3 segments and an L2 per group (hidden, out) learned, T = 30; cosine of
  EvoGrad's summed per-step estimates with ``greedy`` W = 1's exact one-step hypergradients
  against K and sigma (tau 0.05), 3 seeds; seconds and peak memory per inner step of both.
- ``evograd_cost``: seconds and peak memory per inner step of ``greedy`` W = 1 and EvoGrad
  (K = 2, 4, 8) on the digits MLP (64-128-10) and LeNet (MNIST-format digits stand-in), batch
  128, float32, T = 20, label smoothing and L2 learned.
- ``noisy_labels``: digits (default MLP, float32) with 30 % of the training labels flipped;
  ``schedule=loss`` with the optimiser fixed at the baseline (lr 0.1, momentum 0.9, weight
  decay 5e-4, one segment each), label smoothing (5 segments) and L2 learned from zero by
  ``evograd``, ``greedy`` (W = 10) and ``forward``; test accuracy of the learned schedule
  retrained against the same schedule with the loss hyperparameters fixed at their defaults
  (zero), 3 seeds (mean and standard deviation), estimator seconds and peak memory.
- ``edge``: digits (default MLP, float32), T = 400, from lr 0.6 / momentum 0.9 / weight decay
  5e-4 in 2 segments each, where forward mode's hypergradient is about 1e11: 6 outer steps
  of forward mode, ES (4 pairs) and PES (4 pairs, K = 50), about equal wall time per step;
  the learned schedule's validation loss and test accuracy (retrained), the largest
  hypergradient entry seen, rejected steps, 3 seeds; and PES with ``estimator.accept=meta_loss``
  (``pes_guard``).
- ``edge_long``: the same at T = 2000 (the issue's T >= 2000), 5 outer steps, PES windows of
  250 steps; also reports each run's stop reason and the guard's online rejections.
- ``guard``: ``estimator.accept`` finite vs meta_loss for greedy (W = 10) and PES (4 pairs,
  K = 20) on digits, T = 200, from the default schedule: what the guard costs where nothing is
  unstable.
- ``es_batch``: seconds per ES estimate with the samples one by one and batched with
  ``torch.func.vmap`` (digits MLP float32 and the quadratic, T = 100, 2, 4 and 8 pairs), and
  the largest relative difference between the two estimates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from metahpo.device import CostMeter
from metahpo.estimators.es import EvolutionStrategies
from metahpo.estimators.evograd import EvoGrad
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.greedy import Greedy
from metahpo.estimators.pes import persistent_es
from metahpo.inner import FlatTask
from metahpo.reverse import window_hypergradient
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import Digits
from metahpo.tasks.quadratic import Quadratic

OUT = Path("docs/stochastic")
SEEDS = (0, 1, 2)


def cosine(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    keys: list[str],
    scale: dict[str, torch.Tensor] | None = None,
) -> float:
    """Cosine similarity of two hypergradients over ``keys`` (each entry times ``scale``)."""
    w = scale or {k: torch.ones_like(a[k]) for k in keys}
    x = torch.cat([a[k] * w[k] for k in keys])
    y = torch.cat([b[k] * w[k] for k in keys])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


# -- PES against truncation ---------------------------------------------------------------------
def pes_bias(quick: bool) -> dict[str, Any]:
    horizon, pairs = 12, 32 if quick else 256
    task = Quadratic(n_train=32, batch_size=8)
    specs = {
        "lr": HyperSpec(1, (0.0, 1.0)),
        "momentum": HyperSpec(1, (0.0, 0.99), learn=False),
        "weight_decay": HyperSpec(1, (0.0, 1.0), learn=False),
    }
    schedule = HyperSchedule(horizon, specs, {"lr": 0.2, "momentum": 0.5, "weight_decay": 0.0})
    flat = FlatTask(task)
    rows = []
    for K in (1, 2, 3, 4, 6, 12):
        exact = float(ForwardMode(window=K).hypergradient(task, schedule).grads["lr"][0])
        state, truncated = flat.init_state(schedule.optimizer), 0.0
        for begin in range(0, horizon, K):
            window = window_hypergradient(flat, schedule, state, min(begin + K, horizon))
            truncated += float(window.grads["lr"][0])
            state = window.state
        start = time.perf_counter()
        out = persistent_es(task, schedule, K, 0.01, pairs, torch.Generator().manual_seed(K))
        seconds = time.perf_counter() - start
        pes, se = float(out.total["lr"][0]), float(out.stderr["lr"][0])
        rows.append(
            {
                "K": K,
                "exact": exact,
                "truncated": truncated,
                "pes": pes,
                "pes_stderr": se,
                "pes_within_3se": abs(pes - exact) <= 3 * se,
                "truncated_off_by_se": abs(truncated - exact) / se,
                "pes_seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    setup = {
        "task": "quadratic dim 5, n_train 32, batch 8, float64",
        "schedule": "one learned lr (init 0.2, bounds [0, 1]); momentum 0.5, no decay",
        "horizon": horizon,
        "objective": "sum of validation losses after steps K, 2K, ..., T",
        "pes": {"pairs": pairs, "sigma": 0.01},
        "exact": "estimator=forward estimator.window=K",
        "truncated": "reverse mode over each window, its start held constant",
    }
    return {"setup": setup, "rows": rows}


def plot_pes_bias(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ks = [r["K"] for r in rows]
    x = range(len(ks))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(x, [r["exact"] for r in rows], "k_", markersize=18, mew=2, label="exact")
    ax.plot(x, [r["truncated"] for r in rows], "rs", label="truncated reverse")
    ax.errorbar(
        x,
        [r["pes"] for r in rows],
        yerr=[3 * r["pes_stderr"] for r in rows],
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="PES (± 3 s.e.)",
    )
    ax.set_xticks(list(x), [str(k) for k in ks])
    ax.set_xlabel("window K (T = 12)")
    ax.set_ylabel("d/d lr of the sum of window losses")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- ES against forward mode on digits -----------------------------------------------------------
def small_digits(seed: int) -> Digits:
    return Digits(seed=seed, dtype=torch.float64, hidden=(32,), batch_size=64)


def es_cosine(quick: bool) -> dict[str, Any]:
    horizon = 40
    specs = {
        "lr": HyperSpec(2, (0.0, 1.0)),
        "momentum": HyperSpec(2, (0.0, 0.99)),
        "weight_decay": HyperSpec(2, (0.0, 0.01)),
    }
    values = {"lr": [0.1, 0.05], "momentum": [0.5, 0.3], "weight_decay": [1e-3, 5e-4]}
    schedule = HyperSchedule(horizon, specs, values)
    keys = list(specs)
    pair_counts = (1, 2, 4) if quick else (1, 2, 4, 8, 16, 32, 64)
    seeds = SEEDS[:1] if quick else SEEDS
    widths = {k: hi - lo for k, (lo, hi) in ((k, schedule.raw_bounds(k)) for k in keys)}
    per_seed: dict[int, list[float]] = {p: [] for p in pair_counts}
    scaled: dict[int, list[float]] = {p: [] for p in pair_counts}
    seconds: dict[int, list[float]] = {p: [] for p in pair_counts}
    for seed in seeds:
        task = small_digits(seed)
        exact = ForwardMode().hypergradient(task, schedule)
        for p in pair_counts:
            start = time.perf_counter()
            es = EvolutionStrategies(sigma=1e-3, pairs=p).hypergradient(task, schedule)
            seconds[p].append(time.perf_counter() - start)
            per_seed[p].append(cosine(es.grads, exact.grads, keys))
            scaled[p].append(cosine(es.grads, exact.grads, keys, widths))
            print(seed, p, per_seed[p][-1], scaled[p][-1], flush=True)
    rows = [
        {
            "pairs": p,
            "cosine_mean": statistics.fmean(per_seed[p]),
            "cosine_std": statistics.stdev(per_seed[p]) if len(per_seed[p]) > 1 else None,
            "per_seed": per_seed[p],
            "scaled_cosine_mean": statistics.fmean(scaled[p]),
            "scaled_cosine_std": statistics.stdev(scaled[p]) if len(scaled[p]) > 1 else None,
            "scaled_per_seed": scaled[p],
            "seconds_mean": statistics.fmean(seconds[p]),
        }
        for p in pair_counts
    ]
    setup = {
        "task": "digits MLP 64-32-10, batch 64, float64",
        "horizon": horizon,
        "schedule": "lr, momentum, weight decay: 2 segments each (6 raw values)",
        "sigma": 1e-3,
        "seeds": list(seeds),
        "reference": "estimator=forward (exact)",
        "scaled": "cosine of the hypergradients times each raw value's bounds width (the "
        "coordinates in which ES's noise is isotropic)",
    }
    return {"setup": setup, "rows": rows}


# -- EvoGrad against greedy W = 1 ----------------------------------------------------------------
LOSS_KEYS = ["label_smoothing", "l2/hidden", "l2/out"]


def loss_schedule(task: Digits, horizon: int) -> HyperSchedule:
    specs = {
        "lr": HyperSpec(1, (0.0, 1.0), learn=False),
        "momentum": HyperSpec(1, (0.0, 0.99), learn=False),
        "label_smoothing": HyperSpec(3, (0.0, 0.5)),
        "l2/hidden": HyperSpec(2, (0.0, 1.0)),
        "l2/out": HyperSpec(1, (0.0, 1.0)),
    }
    values = {
        "lr": [0.1],
        "momentum": [0.5],
        "label_smoothing": [0.05, 0.1, 0.2],
        "l2/hidden": [1e-2, 3e-2],
        "l2/out": [2e-2],
    }
    groups = {"l2": {"hidden": ("0.*",), "out": ("2.*",)}}
    return HyperSchedule(horizon, specs, values, None, groups, task.loss_hyperparameters)


def metered(fn: Any) -> tuple[Any, float, float]:
    with CostMeter(torch.device("cpu")) as cost:
        out = fn()
    return out, cost.seconds, cost.peak / 2**20


def evograd_cosine(quick: bool) -> dict[str, Any]:
    horizon = 30
    Ks = (2, 4) if quick else (2, 4, 8, 16)
    sigmas = (1e-3, 1e-2) if quick else (1e-3, 1e-2, 1e-1)
    seeds = SEEDS[:1] if quick else SEEDS
    cos: dict[tuple[int, float], list[float]] = {(k, s): [] for k in Ks for s in sigmas}
    cost: dict[str, list[tuple[float, float]]] = {}
    for seed in seeds:
        task = small_digits(seed)
        schedule = loss_schedule(task, horizon)
        exact, sec, mib = metered(lambda: Greedy(W=1).hypergradient(task, schedule))  # noqa: B023
        cost.setdefault("greedy W=1", []).append((sec / horizon, mib))
        for k in Ks:
            for s in sigmas:
                evo, sec, mib = metered(
                    lambda: EvoGrad(K=k, sigma=s).hypergradient(task, schedule)  # noqa: B023
                )
                cos[(k, s)].append(cosine(evo.grads, exact.grads, LOSS_KEYS))
                cost.setdefault(f"evograd K={k}", []).append((sec / horizon, mib))
                print(seed, k, s, cos[(k, s)][-1], flush=True)
    rows = [
        {
            "K": k,
            "sigma": s,
            "cosine_mean": statistics.fmean(v),
            "cosine_std": statistics.stdev(v) if len(v) > 1 else None,
            "per_seed": v,
        }
        for (k, s), v in cos.items()
    ]
    costs = [
        {
            "estimator": name,
            "seconds_per_step": min(c[0] for c in v),
            "peak_mib": statistics.median(c[1] for c in v),
        }
        for name, v in cost.items()
    ]
    setup = {
        "task": "digits MLP 64-32-10, batch 64, float64",
        "horizon": horizon,
        "schedule": "lr 0.1, momentum 0.5 fixed; label smoothing 3 segments, L2 hidden 2, out 1",
        "tau": 0.05,
        "seeds": list(seeds),
        "reference": "greedy W=1 (exact one-step hypergradients), summed over steps",
        "cost": "least seconds per inner step and median sampled peak heap (MiB above the "
        "start of the call) over the calls (for EvoGrad: every sigma and seed)",
    }
    return {"setup": setup, "rows": rows, "cost": costs}


def evograd_cost(quick: bool) -> dict[str, Any]:
    import tempfile

    from benchmarks.checkpointed import make_task

    horizon, repeats = (5, 1) if quick else (20, 2)
    Ks = (2,) if quick else (2, 4, 8)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in ("digits", "lenet"):
            task = make_task(name, Path(root))
            specs = {
                "lr": HyperSpec(1, (0.0, 1.0), learn=False),
                "momentum": HyperSpec(1, (0.0, 0.99), learn=False),
                "label_smoothing": HyperSpec(1, (0.0, 0.5)),
                "l2": HyperSpec(1, (0.0, 0.01)),
            }
            values = {"lr": 0.05, "momentum": 0.9, "label_smoothing": 0.05, "l2": 1e-3}
            schedule = HyperSchedule(horizon, specs, values, None, None, task.loss_hyperparameters)
            arms: dict[str, Any] = {"greedy W=1": Greedy(W=1)}
            arms.update({f"evograd K={k}": EvoGrad(K=k) for k in Ks})
            for arm, est in arms.items():
                calls = [
                    metered(lambda: est.hypergradient(task, schedule))  # noqa: B023
                    for _ in range(repeats)
                ]
                rows.append(
                    {
                        "task": name,
                        "estimator": arm,
                        "seconds_per_step": min(c[1] for c in calls) / horizon,
                        "peak_mib": statistics.median(c[2] for c in calls),
                    }
                )
                print(rows[-1], flush=True)
    setup = {
        "tasks": "digits MLP 64-128-10 and LeNet on the MNIST-format digits stand-in "
        "(benchmarks.checkpointed), batch 128, float32",
        "horizon": horizon,
        "schedule": "lr 0.05, momentum 0.9 fixed; label smoothing and L2, one segment each",
        "cost": f"least seconds per inner step and median sampled peak heap over {repeats} calls",
    }
    return {"setup": setup, "rows": rows}


# -- noisy-label digits ----------------------------------------------------------------------------
def noisy_labels(quick: bool) -> dict[str, Any]:
    import metahpo
    from metahpo.inner import fit

    horizon = 60 if quick else 200
    steps = 2 if quick else 8
    seeds = SEEDS[:1] if quick else SEEDS
    base = [
        "task=digits",
        "task.label_noise=0.3",
        "schedule=loss",
        f"horizon={horizon}",
        "threads=1",
        "progress=false",
        f"outer.steps={steps}",
        "schedule.lr.segments=1",
        "schedule.lr.init=0.1",
        "schedule.lr.learn=false",
        "schedule.momentum.segments=1",
        "schedule.momentum.init=0.9",
        "schedule.momentum.learn=false",
        "schedule.weight_decay.segments=1",
        "schedule.weight_decay.init=5e-4",
        "schedule.weight_decay.learn=false",
    ]
    arms = {
        "evograd": ["estimator=evograd"],
        "greedy": ["estimator=greedy", "estimator.W=10", "estimator.step_size={}"],
        "forward": ["estimator=forward"],
    }
    per: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        common = [*base, f"seed={seed}", f"final.seeds=[{seed}]"]
        # the fixed default: the starting schedule (loss hyperparameters at zero), retrained
        cfg = metahpo.compose(common)
        from metahpo.build import build

        setup = build(cfg)
        flat, state = fit(setup.task, setup.schedule)
        acc = flat.evaluate(state, "test")["accuracy"]
        per.setdefault("fixed default", {}).setdefault("test_accuracy", []).append(acc)
        for name, extra in arms.items():
            start = time.perf_counter()
            r = metahpo.run(metahpo.compose([*common, *extra]))
            entry = per.setdefault(name, {})
            entry.setdefault("test_accuracy", []).append(r["final"]["learned"]["test_accuracy"])
            entry.setdefault("wall_seconds", []).append(time.perf_counter() - start)
            entry.setdefault("estimator_seconds", []).append(r["estimator_seconds"])
            entry.setdefault("peak_mib", []).append(r["estimator_peak_memory_mb"])
            ls = r["learned_schedule"]
            entry.setdefault("label_smoothing", []).append(ls["label_smoothing"]["values"])
            entry.setdefault("l2", []).append(ls["l2"]["values"])
            print(seed, name, entry["test_accuracy"][-1], flush=True)
    rows = []
    for name, entry in per.items():
        row: dict[str, Any] = {"arm": name}
        for key, v in entry.items():
            if isinstance(v[0], float):
                row[key] = statistics.fmean(v)
                row[key + "_std"] = statistics.stdev(v) if len(v) > 1 else None
            row[key + "_per_seed"] = v
        rows.append(row)
    setup = {
        "task": "digits MLP 64-128-10 (relu, float32), 30 % of training labels flipped "
        "(label_noise_seed 0); validation and test clean",
        "horizon": horizon,
        "outer_steps": steps,
        "schedule": "schedule=loss: lr 0.1, momentum 0.9, weight decay 5e-4 fixed; label "
        "smoothing (5 segments, [0, 0.2]) and L2 ([0, 0.01]) learned from zero",
        "estimators": {k: " ".join(v) for k, v in arms.items()},
        "seeds": list(seeds),
    }
    return {"setup": setup, "rows": rows}


# -- from the edge of stability ------------------------------------------------------------------
def edge(quick: bool) -> dict[str, Any]:
    return _edge(80 if quick else 400, 2 if quick else 6, 50, quick)


def edge_long(quick: bool) -> dict[str, Any]:
    """``edge`` at T = 2000 (the issue's T >= 2000), 5 outer steps, PES windows of 250 steps
    (8 windows, as at T = 400)."""
    return _edge(200 if quick else 2000, 1 if quick else 5, 25 if quick else 250, quick)


def _edge(horizon: int, steps: int, window: int, quick: bool) -> dict[str, Any]:
    import metahpo

    seeds = SEEDS[:1] if quick else SEEDS
    base = [
        "task=digits",
        f"horizon={horizon}",
        "threads=1",
        "progress=false",
        f"outer.steps={steps}",
        "outer.budget=null",
        "schedule.lr.segments=2",
        "schedule.lr.init=0.6",
        "schedule.momentum.segments=2",
        "schedule.momentum.init=0.9",
        "schedule.weight_decay.segments=2",
        "schedule.weight_decay.init=5e-4",
    ]
    arms = {
        "forward": ["estimator=forward"],
        "es": ["estimator=es", "estimator.pairs=4", "estimator.sigma=0.01"],
        "pes": [
            "estimator=pes",
            "estimator.pairs=4",
            "estimator.sigma=0.01",
            f"estimator.K={window}",
        ],
        "pes_guard": [
            "estimator=pes",
            "estimator.pairs=4",
            "estimator.sigma=0.01",
            f"estimator.K={window}",
            "estimator.accept=meta_loss",
        ],
    }
    per: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for seed in seeds:
        for name, extra in arms.items():
            over = [*base, *extra, f"seed={seed}", f"final.seeds=[{seed}]"]
            start = time.perf_counter()
            r = metahpo.run(metahpo.compose(over))
            wall = time.perf_counter() - start
            history = [h for h in r["history"] if h.get("hypergradient")]
            biggest = max(
                (abs(x) for h in history for g in h["hypergradient"].values() for x in g),
                default=0.0,
            )
            losses = [h["meta_loss"] for h in r["history"] if h.get("meta_loss") is not None]
            per[name].append(
                {
                    "seed": seed,
                    "start_meta_loss": losses[0] if losses else None,
                    "learned_val_loss": r["final"]["learned"]["val_loss"],
                    "test_accuracy": r["final"]["learned"]["test_accuracy"],
                    "baseline_test_accuracy": r["final"]["baseline"]["test_accuracy"],
                    "max_abs_hypergradient": biggest,
                    "rejected_steps": r["rejected_steps"],
                    "stopped": r["stopped"],
                    "outer_steps": r["outer_steps"],
                    "online_rejections": sum(
                        len(h.get("online_rejections", [])) for h in r["history"]
                    ),
                    "estimator_seconds": r["estimator_seconds"],
                    "wall_seconds": wall,
                    "learned_schedule": {k: v["values"] for k, v in r["learned_schedule"].items()},
                }
            )
            print(seed, name, per[name][-1]["test_accuracy"], f"{wall:.0f} s", flush=True)
    rows = []
    for name, runs in per.items():
        row: dict[str, Any] = {"arm": name, "runs": runs}
        for key in ("learned_val_loss", "test_accuracy", "estimator_seconds"):
            v = [x[key] for x in runs]
            row[key] = statistics.fmean(v)
            row[key + "_std"] = statistics.stdev(v) if len(v) > 1 else None
        row["max_abs_hypergradient"] = max(x["max_abs_hypergradient"] for x in runs)
        row["rejected_steps"] = sum(x["rejected_steps"] for x in runs)
        rows.append(row)
    setup = {
        "task": "digits MLP 64-128-10 (relu, float32)",
        "horizon": horizon,
        "outer_steps": steps,
        "start": "lr 0.6, momentum 0.9, weight decay 5e-4, 2 segments each (forward mode's "
        "hypergradient there: ~1e11)",
        "outer": "default (rprop, accept meta_loss 0.1) for forward and es; pes online",
        "estimators": {k: " ".join(v) for k, v in arms.items()},
        "seeds": list(seeds),
    }
    return {"setup": setup, "rows": rows}


# -- the online guard, where nothing is unstable ---------------------------------------------------
def guard(quick: bool) -> dict[str, Any]:
    """``estimator.accept`` finite vs meta_loss for greedy (W = 10) and PES (4 pairs, K = 20) on
    digits, T = 200, from the default schedule (lr, momentum, weight decay from zero, 10
    segments each): does the guard cost anything where no step is unstable?"""
    import metahpo

    horizon = 40 if quick else 200
    steps = 1 if quick else 4
    seeds = SEEDS[:1] if quick else SEEDS
    base = [
        "task=digits",
        f"horizon={horizon}",
        "threads=1",
        "progress=false",
        f"outer.steps={steps}",
        "outer.budget=null",
    ]
    arms = {
        "greedy": ["estimator=greedy", "estimator.W=10"],
        "pes": ["estimator=pes", "estimator.pairs=4", "estimator.K=20"],
    }
    rows = []
    for name, extra in arms.items():
        for accept in ("finite", "meta_loss"):
            runs = []
            for seed in seeds:
                over = [*base, *extra, f"estimator.accept={accept}", f"seed={seed}"]
                start = time.perf_counter()
                r = metahpo.run(metahpo.compose([*over, f"final.seeds=[{seed}]"]))
                runs.append(
                    {
                        "seed": seed,
                        "learned_val_loss": r["final"]["learned"]["val_loss"],
                        "test_accuracy": r["final"]["learned"]["test_accuracy"],
                        "online_rejections": sum(
                            len(h.get("online_rejections", [])) for h in r["history"]
                        ),
                        "windows": sum(
                            len(h.get("greedy_windows", h.get("pes_windows", [])))
                            for h in r["history"]
                        ),
                        "wall_seconds": time.perf_counter() - start,
                    }
                )
                print(name, accept, seed, runs[-1]["test_accuracy"], flush=True)
            row: dict[str, Any] = {"arm": name, "accept": accept, "runs": runs}
            for key in ("learned_val_loss", "test_accuracy", "wall_seconds"):
                v = [x[key] for x in runs]
                row[key] = statistics.fmean(v)
                row[key + "_std"] = statistics.stdev(v) if len(v) > 1 else None
            row["online_rejections"] = sum(x["online_rejections"] for x in runs)
            row["windows"] = sum(x["windows"] for x in runs)
            rows.append(row)
    setup = {
        "task": "digits MLP 64-128-10 (relu, float32)",
        "horizon": horizon,
        "outer_steps": steps,
        "schedule": "default: lr, momentum, weight decay from zero, 10 segments each",
        "estimators": {k: " ".join(v) for k, v in arms.items()},
        "tolerance": 0.1,
        "seeds": list(seeds),
    }
    return {"setup": setup, "rows": rows}


# -- ES batched over samples -----------------------------------------------------------------------
def es_batch(quick: bool) -> dict[str, Any]:
    """Seconds per ES estimate with the samples run one by one and batched with vmap, on the
    digits MLP (float32, batch 128) and the quadratic, T = 100, 2 segments of lr, momentum and
    weight decay; the largest relative difference between the two estimates."""
    horizon = 20 if quick else 100
    pair_counts = (2,) if quick else (2, 4, 8)
    repeats = 1 if quick else 3
    tasks = {
        "digits MLP 64-128-10 float32": lambda: Digits(seed=0),
        "quadratic dim 5 float64": lambda: Quadratic(seed=0),
    }
    specs = {
        n: HyperSpec(2, b)
        for n, b in [("lr", (0.0, 1.0)), ("momentum", (0.0, 0.99)), ("weight_decay", (0.0, 0.01))]
    }
    values = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    schedule = HyperSchedule(horizon, specs, values)
    rows = []
    for name, make in tasks.items():
        task = make()
        for pairs in pair_counts:
            best: dict[bool, float] = {}
            grads = {}
            for batch in (False, True):
                est = EvolutionStrategies(sigma=0.01, pairs=pairs, batch=batch)
                est.hypergradient(task, schedule)  # warm-up (and the chunk's probe)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    hg = est.hypergradient(task, schedule)
                    times.append(time.perf_counter() - start)
                best[batch] = min(times)
                grads[batch] = torch.cat([hg.grads[k] for k in specs])
                chunk = hg.metrics["es_batch"]
            diff = float(((grads[True] - grads[False]).abs() / grads[False].abs().max()).max())
            rows.append(
                {
                    "task": name,
                    "pairs": pairs,
                    "seconds_sequential": best[False],
                    "seconds_batched": best[True],
                    "speedup": best[False] / best[True],
                    "runs_per_vmap": chunk,
                    "max_relative_difference": diff,
                }
            )
            print(rows[-1], flush=True)
    setup = {
        "horizon": horizon,
        "schedule": "lr 0.1, momentum 0.9, weight decay 5e-4, 2 segments each",
        "sigma": 0.01,
        "timing": f"best of {repeats} after a warm-up, one CPU thread; each estimate is "
        "2 pairs + 1 runs (the centre always on its own)",
    }
    return {"setup": setup, "rows": rows}


def _pm(mean: float, std: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A markdown table (with a blank line after it) from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return [*lines, *("| " + " | ".join(row) + " |" for row in rows), ""]


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def report(out: Path) -> str:
    """Markdown tables of the JSON files in ``out`` (those that exist)."""
    parts: list[str] = []
    if r := _load(out, "pes_bias"):
        header = ["K", "exact", "truncated", "PES ± s.e.", "PES within 3 s.e."]
        parts += _table(
            [*header, "truncated off by (s.e.)"],
            (
                [
                    str(x["K"]),
                    f"{x['exact']:.2f}",
                    f"{x['truncated']:.2f}",
                    f"{x['pes']:.2f} ± {x['pes_stderr']:.2f}",
                    "yes" if x["pes_within_3se"] else "no",
                    f"{x['truncated_off_by_se']:.1f}",
                ]
                for x in r["rows"]
            ),
        )
    if r := _load(out, "es_cosine"):
        parts += _table(
            ["pairs", "cosine (raw units)", "cosine (scaled by bounds)", "seconds"],
            (
                [
                    str(x["pairs"]),
                    _pm(x["cosine_mean"], x["cosine_std"], 2),
                    _pm(x["scaled_cosine_mean"], x["scaled_cosine_std"], 2),
                    f"{x['seconds_mean']:.1f}",
                ]
                for x in r["rows"]
            ),
        )
    if r := _load(out, "evograd_cosine"):
        sigmas = sorted({x["sigma"] for x in r["rows"]})
        parts += _table(
            ["K", *(f"sigma {s:g}" for s in sigmas)],
            (
                [
                    str(k),
                    *(
                        _pm(x["cosine_mean"], x["cosine_std"], 2)
                        for s in sigmas
                        for x in r["rows"]
                        if x["K"] == k and x["sigma"] == s
                    ),
                ]
                for k in sorted({x["K"] for x in r["rows"]})
            ),
        )
        parts += _table(
            ["estimator", "ms per inner step", "peak MiB"],
            (
                [c["estimator"], f"{1e3 * c['seconds_per_step']:.1f}", f"{c['peak_mib']:.2f}"]
                for c in r["cost"]
            ),
        )
    if r := _load(out, "evograd_cost"):
        parts += _table(
            ["task", "estimator", "ms per inner step", "peak MiB"],
            (
                [
                    c["task"],
                    c["estimator"],
                    f"{1e3 * c['seconds_per_step']:.1f}",
                    f"{c['peak_mib']:.1f}",
                ]
                for c in r["rows"]
            ),
        )
    if r := _load(out, "noisy_labels"):
        rows = []
        for x in r["rows"]:
            secs = (
                _pm(x["estimator_seconds"], x.get("estimator_seconds_std"), 1)
                if "estimator_seconds" in x
                else "-"
            )
            ls = x.get("label_smoothing_per_seed")
            l2 = x.get("l2_per_seed")
            rows.append(
                [
                    x["arm"],
                    _pm(x["test_accuracy"], x.get("test_accuracy_std"), 4),
                    secs,
                    f"{x['peak_mib']:.1f}" if "peak_mib" in x else "-",
                    "; ".join("[" + ", ".join(f"{v:.3f}" for v in s) + "]" for s in ls)
                    if ls
                    else "0",
                    ", ".join(f"{s[0]:.4f}" for s in l2) if l2 else "0",
                ]
            )
        header = ["arm", "test accuracy", "estimator seconds (run)", "peak MiB"]
        parts += _table([*header, "label smoothing", "L2"], rows)
    if r := _load(out, "edge"):
        header = ["arm", "learned val loss", "test accuracy", "largest abs hypergradient"]
        parts += _table(
            [*header, "rejected steps", "estimator seconds"],
            (
                [*_edge_cells(x), _pm(x["estimator_seconds"], x["estimator_seconds_std"], 1)]
                for x in r["rows"]
            ),
        )
    if r := _load(out, "edge_long"):
        rows = []
        for x in r["rows"]:
            wall = [y["wall_seconds"] for y in x["runs"]]
            spread = statistics.stdev(wall) if len(wall) > 1 else None
            rows.append(
                [
                    *_edge_cells(x),
                    str(sum(y.get("online_rejections", 0) for y in x["runs"])),
                    ", ".join(str(y.get("stopped")) for y in x["runs"]),
                    _pm(statistics.fmean(wall), spread, 0),
                ]
            )
        header = ["arm (T = 2000)", "learned val loss", "test accuracy"]
        header += ["largest abs hypergradient", "rejected outer steps", "online rejections"]
        parts += _table([*header, "stopped", "wall seconds"], rows)
    if r := _load(out, "guard"):
        header = ["estimator", "accept", "learned val loss", "test accuracy"]
        parts += _table(
            [*header, "online rejections / windows", "wall seconds"],
            (
                [
                    x["arm"],
                    x["accept"],
                    _pm(x["learned_val_loss"], x["learned_val_loss_std"], 4),
                    _pm(x["test_accuracy"], x["test_accuracy_std"], 4),
                    f"{x['online_rejections']} / {x['windows']}",
                    _pm(x["wall_seconds"], x["wall_seconds_std"], 0),
                ]
                for x in r["rows"]
            ),
        )
    if r := _load(out, "es_batch"):
        header = ["task", "pairs", "seconds, one by one", "seconds, vmap", "speed-up"]
        parts += _table(
            [*header, "runs per vmap", "largest relative difference"],
            (
                [
                    x["task"],
                    str(x["pairs"]),
                    f"{x['seconds_sequential']:.3f}",
                    f"{x['seconds_batched']:.3f}",
                    f"{x['speedup']:.2f}x",
                    str(x["runs_per_vmap"]),
                    f"{x['max_relative_difference']:.1e}",
                ]
                for x in r["rows"]
            ),
        )
    return "\n".join(parts)


def _edge_cells(x: dict[str, Any]) -> list[str]:
    """The arm, loss, accuracy, hypergradient and rejection cells both edge tables share."""
    return [
        x["arm"],
        _pm(x["learned_val_loss"], x["learned_val_loss_std"], 3),
        _pm(x["test_accuracy"], x["test_accuracy_std"], 4),
        f"{x['max_abs_hypergradient']:.3g}",
        str(x["rejected_steps"]),
    ]


EXPERIMENTS = {
    "pes_bias": pes_bias,
    "es_cosine": es_cosine,
    "evograd_cosine": evograd_cosine,
    "evograd_cost": evograd_cost,
    "noisy_labels": noisy_labels,
    "edge": edge,
    "edge_long": edge_long,
    "guard": guard,
    "es_batch": es_batch,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stochastic")
    parser.add_argument("experiment", choices=[*sorted(EXPERIMENTS), "report"])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.experiment == "report":
        print(report(args.out))
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        result = EXPERIMENTS[args.experiment](args.quick)
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = time.perf_counter() - start
    result["quick"] = args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.experiment}.json"
    path.write_text(json.dumps(result, indent=1, default=_json) + "\n")
    if args.experiment == "pes_bias":
        plot_pes_bias(result, args.out / "pes_bias.png")
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    return 0


def _json(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x))


if __name__ == "__main__":
    raise SystemExit(main())
