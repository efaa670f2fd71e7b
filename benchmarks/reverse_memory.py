"""Memory and time of exact reverse, truncated reverse and forward mode as the horizon grows.

For each horizon, one hypergradient on digits (MLP 64-128-10, batch 128, 10 segments x 3 types)
per estimator, interleaved (horizon by horizon, estimator by estimator, repeat by repeat). Every
measurement runs in a fresh Python process after a warm-up hypergradient at a tiny horizon, so
that the peak (``Hypergradient.peak_memory``, metahpo.device.CostMeter) excludes one-time
library initialisation and nothing an earlier measurement left behind. Prints a Markdown table:
median seconds, largest peak memory, both as ratios to forward mode, and the largest relative
difference of each hypergradient from forward mode's (a sanity check; truncation shows its bias).

    python benchmarks/reverse_memory.py [--horizons 50 200 800] [--K 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ESTIMATORS = ("exact_reverse", "truncated_reverse", "forward")


def _estimator(name: str, K: int) -> object:
    from estimators.exact_reverse import ExactReverse
    from estimators.forward import ForwardMode
    from estimators.truncated_reverse import TruncatedReverse

    return {
        "exact_reverse": ExactReverse,
        "truncated_reverse": lambda: TruncatedReverse(K=K),
        "forward": ForwardMode,
    }[name]()


def _schedule(horizon: int, segments: int):  # type: ignore[no-untyped-def]
    from metahpo.schedule import HYPERPARAMETERS, HyperSchedule, HyperSpec

    specs = {n: HyperSpec(segments, (0.0, 1.0)) for n in HYPERPARAMETERS}
    return HyperSchedule(horizon, specs, {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3})


def worker(name: str, horizon: int, K: int, segments: int, dtype: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    from tasks.digits import Digits

    task = Digits(dtype=getattr(torch, dtype))
    warm = 6  # a tiny run first: lazy initialisation (torch.func...) is not measured
    _estimator(name, min(K, warm // 2)).hypergradient(task, _schedule(warm, min(segments, warm)))
    hg = _estimator(name, K).hypergradient(task, _schedule(horizon, segments))
    out = {
        "seconds": hg.seconds,
        "peak_memory": hg.peak_memory,
        "grads": {n: g.tolist() for n, g in hg.grads.items()},
    }
    print(json.dumps(out))


def measure(name: str, horizon: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--horizons",
        str(horizon),
        "--K",
        str(args.K),
        "--segments",
        str(args.segments),
        "--dtype",
        args.dtype,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rel_diff(got: dict[str, list[float]], want: dict[str, list[float]]) -> float:
    worst = 0.0
    for n in want:
        g, w = torch.tensor(got[n]), torch.tensor(want[n])
        scale = float(w.abs().max())
        if scale > 0:
            worst = max(worst, float((g - w).abs().max()) / scale)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizons", type=int, nargs="+", default=[50, 200, 800])
    p.add_argument("--K", type=int, default=50, help="truncated reverse's window")
    p.add_argument("--segments", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--worker", choices=ESTIMATORS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.horizons[0], args.K, args.segments, args.dtype)
        return

    print(
        f"digits MLP 64-128-10, batch 128, {args.segments} segments x 3 types, {args.dtype}, "
        f"truncated K={args.K}, {args.repeats} repeats, one fresh process per measurement"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    runs: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.repeats):
        for horizon in args.horizons:
            for name in ESTIMATORS:
                runs.setdefault((horizon, name), []).append(measure(name, horizon, args))

    print(
        "| T | estimator | peak MiB | memory / forward | median s | time / forward "
        "| max rel. diff of hypergradient to forward |"
    )
    print("|---|---|---|---|---|---|---|")
    for horizon in args.horizons:
        fwd = runs[horizon, "forward"]
        fwd_mem = max(r["peak_memory"] for r in fwd)
        fwd_s = statistics.median(r["seconds"] for r in fwd)
        for name in ESTIMATORS:
            rs = runs[horizon, name]
            mem = max(r["peak_memory"] for r in rs)
            sec = statistics.median(r["seconds"] for r in rs)
            diff = _rel_diff(rs[0]["grads"], fwd[0]["grads"])
            print(
                f"| {horizon} | {name} | {mem / 2**20:.1f} | {mem / max(fwd_mem, 1):.2f} "
                f"| {sec:.2f} | {sec / fwd_s:.2f} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
