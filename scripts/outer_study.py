"""The outer-loop study behind docs/outer.md: old vs new outer loop, learned vs baseline.

Runs the real CLI (``python -m metahpo``) sequentially with one torch thread, each run in its own
directory (a rerun skips finished runs and resumes killed ones), and rewrites the summary after
every run. Usage (from the repository root)::

    .venv/bin/python scripts/outer_study.py --out study            # the whole grid
    .venv/bin/python scripts/outer_study.py --out study --only digits --variants new

The ``mnist28`` experiment is ``experiment=mnist_lenet`` at T=220 on scikit-learn's digits
upscaled to 28x28 and written as MNIST IDX files (tests/vision_files.py), not on MNIST itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPERIMENTS: dict[str, list[str]] = {
    "digits": [],  # `make run`
    # experiment=mnist_lenet at T=220 (about 10 epochs) on the digits stand-in, <= 10 outer steps
    "mnist28": [
        "experiment=mnist_lenet",
        "device=cpu",
        "horizon=220",
        "task.root={data}",
        "task.download=false",
    ],
    "digits_long": ["horizon=2000", "outer.steps=10"],
}
# old: the outer loop before issue 13 (the paper's sign steps, only diverged steps rejected);
# new: the shipped default of each experiment (docs/outer.md); the rest: ablations on digits.
OLD = ["outer=sign", "outer.accept=finite", "outer.seeds=1", "outer.budget=null"]
AVG = [
    "optimizer.average=true",
    "optimizer.baseline={lr: 0.5, momentum: 0.9, weight_decay: 5.0e-4}",
    "estimator=exact_reverse",
]
LOG_LR = ["schedule.lr.param=log", "schedule.lr.init=1.0e-3", "schedule.lr.bounds=[1.0e-4,1.0]"]
VARIANTS: dict[str, dict[str, list[str]]] = {
    "old": {
        "mnist28": [
            *OLD,
            "outer.optimizer.step_size={lr: 0.1, momentum: 0.3, weight_decay: 4.0e-4}",
            "outer.steps=10",
        ],
        "digits": OLD,
        "digits_long": OLD,
    },
    "new": {
        "mnist28": [],  # the shipped experiment file
        "digits": ["outer=rprop"],
        "digits_long": ["outer=rprop", "outer.budget=22"],
    },
    # the first try on mnist28: rprop's digits settings (1 seed, tolerance 0.1, step 0.05)
    "new-v1": {
        "mnist28": [
            "outer.optimizer.step=0.05",
            "outer.tolerance=0.1",
            "outer.seeds=1",
        ]
    },
    # the shipped loop with exact reverse instead of forward mode: the same exact hypergradient
    # (to float32 rounding), 2-3x cheaper on LeNet with 7 columns (docs/estimators.md)
    "new-rev": {"mnist28": ["estimator=exact_reverse"]},
    # issue 13, image task: SGD with averaged momentum (optimizer.average=true), so lr is the
    # effective step and momentum only averages; the same baseline stated in that form (lr
    # 0.05 / (1 - 0.9) = 0.5: the identical trajectory); exact reverse, the same hypergradient
    # as forward mode and cheaper on LeNet with 7 columns (docs/estimators.md)
    "avg": {"mnist28": [*AVG]},
    # ... and a learning rate that can anneal: 5 knots linear in between (the last at step T-1)
    "avg-linear": {"mnist28": [*AVG, "schedule.lr.param=linear"]},
    # ... or 10 constant lr segments
    "avg-10seg": {"mnist28": [*AVG, "schedule.lr.segments=10"]},
    # issue 13, image task: the learning rate in log space (from 1e-3, bounds [1e-4, 1]): Rprop's
    # steps become relative (10 % of the log-width: x2.5 at first), so the lr approaches the edge
    # of stability from below in a few growing steps instead of jumping to 0.1 at step 1
    "log-lr": {"mnist28": [*LOG_LR, "estimator=exact_reverse"]},
    # ... with a smoother meta-objective: the sum of the validation losses at steps 55, 110, 165
    # and 220 (estimator.window=55), so a schedule whose training spikes anywhere scores worse
    "log-lr-win": {"mnist28": [*LOG_LR, "estimator=exact_reverse", "estimator.window=55"]},
    # ... in the averaged form (optimizer.average=true: lr is the effective step, so its upper
    # bound 1 caps the effective step, which plain SGD's lr / (1 - momentum) does not)
    "avg-log-lr": {"mnist28": [*AVG, *LOG_LR]},
    # ... or the shipped loop with three seeds per estimate and selection (the same budget of 22
    # inner runs, so about seven estimates): a fragile schedule fails more often on three seeds
    "rev-3seeds": {"mnist28": ["estimator=exact_reverse", "outer.seeds=3"]},
    # ... or the worst of three seeds (outer.reduce=max): every estimate, score and the
    # selection use the highest seed's meta-loss (and that seed's hypergradient), so a schedule
    # that fails on one seed in three scores as that failure
    "rev-3seeds-max": {"mnist28": ["estimator=exact_reverse", "outer.seeds=3", "outer.reduce=max"]},
    "log-lr-3seeds": {"mnist28": [*LOG_LR, "estimator=exact_reverse", "outer.seeds=3"]},
    "log-lr-max": {
        "mnist28": [*LOG_LR, "estimator=exact_reverse", "outer.seeds=3", "outer.reduce=max"]
    },
    "sign+accept": {"digits": ["outer=sign", "outer.accept=meta_loss"]},
    "rprop-finite": {"digits": ["outer=rprop", "outer.accept=finite"]},
    "rprop+2seeds": {"digits": ["outer=rprop", "outer.seeds=2", "outer.budget=32"]},
    # parameterisations and loss hyperparameters (docs/parameterisations.md), the new loop
    **{
        f"schedule-{name}": {"digits": [f"schedule={name}"], "mnist28": [f"schedule={name}"]}
        for name in ("log", "linear", "warmup_cosine", "loss")
    },
}
SEEDS = (0, 1, 2)


def run_one(exp: str, variant: str, seed: int, out: Path, data: Path, extra: list[str]) -> Path:
    run_dir = out / exp / variant / f"s{seed}"
    if (run_dir / "results.json").is_file() and not (run_dir / "checkpoint.pt").is_file():
        return run_dir
    if (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        if results.get("final") is not None:
            return run_dir
    args = [
        a.replace("{data}", str(data)) for a in EXPERIMENTS[exp] + VARIANTS[variant][exp] + extra
    ]
    cmd = [sys.executable, "-m", "metahpo", *args, f"seed={seed}", "progress=false"]
    cmd.append(f"hydra.run.dir={run_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir / "log.txt", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    print(f"{exp} {variant} seed {seed}: {time.time() - start:.0f} s", flush=True)
    return run_dir


def summarise(out: Path) -> str:
    lines = []
    summary = {}
    for exp in EXPERIMENTS:
        rows = []
        for variant in VARIANTS:
            if exp not in VARIANTS[variant]:
                continue
            found = []
            for seed in SEEDS:
                path = out / exp / variant / f"s{seed}" / "results.json"
                if path.is_file():
                    r = json.loads(path.read_text())
                    if r.get("final"):
                        found.append(r)
            if not found:
                continue
            cell = {"runs": len(found)}
            for label in ("learned", "baseline"):
                accs = [
                    s["test_accuracy"]
                    for r in found
                    for s in r["final"][label]["per_seed"]
                    if not s.get("diverged")
                ]
                div = sum(r["final"][label]["diverged_seeds"] for r in found)
                cell[label] = (
                    100 * statistics.fmean(accs),
                    100 * statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                    len(accs),
                    div,
                )
            cell["inner_runs"] = [r["outer_loop"]["inner_runs"] for r in found]
            cell["outer_steps"] = [r["outer_steps"] for r in found]
            cell["rejected"] = [r["rejected_steps"] for r in found]
            cell["minutes"] = statistics.fmean(r["wall_time_seconds"] for r in found) / 60
            summary.setdefault(exp, {})[variant] = cell
            la, ba = cell["learned"], cell["baseline"]
            rows.append(
                f"| {variant} | {len(found)} | {la[0]:.2f} ± {la[1]:.2f} ({la[2]} retrainings"
                + (f", {la[3]} diverged" if la[3] else "")
                + f") | {ba[0]:.2f} ± {ba[1]:.2f} | {cell['inner_runs']} | {cell['rejected']} "
                f"| {cell['minutes']:.1f} |"
            )
        if rows:
            lines += [
                f"### {exp}",
                "",
                "| outer loop | outer seeds | learned test acc % | baseline test acc % "
                "| inner runs per seed | rejected steps | minutes per run |",
                "|---|---|---|---|---|---|---|",
                *rows,
                "",
            ]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def history(run_dir: Path) -> str:
    """One run's meta-loss history in order: accepted estimates, rejections, the last score."""
    r = json.loads((run_dir / "results.json").read_text())
    rows = [
        (h["outer_step"], 0, h)
        for h in r["history"]
        if h.get("hypergradient") is not None or h.get("online")
    ]
    rows += [(x["outer_step"], -1, x) for x in r["rejections"]]  # before that step's accepted one
    last = [h for h in r["history"] if h.get("hypergradient") is None and not h.get("online")]
    rows.sort(key=lambda row: (row[0], row[1]))
    lines = [f"{'step':>4}  {'meta-loss':>10}  {'':<22}  schedule"]
    for step, kind, h in rows:
        what = "rejected" if kind < 0 else "accepted"
        loss = h.get("meta_loss")
        shown = {k: [round(v, 4) for v in vals] for k, vals in h["schedule"].items()}
        mark = " <- selected" if kind == 0 and step == r["selected_outer_step"] else ""
        lines.append(
            f"{step:>4}  {loss if loss is not None else float('nan'):>10.4f}  "
            f"{what + mark:<22}  {shown}"
        )
    for h in last:
        what = "last iterate, scored" + (" (rejected)" if h.get("rejected") else "")
        mark = " <- selected" if h["outer_step"] == r["selected_outer_step"] else ""
        lines.append(f"{h['outer_step']:>4}  {h['meta_loss']:>10.4f}  {what + mark}")
    return "\n".join(lines)


def more_seeds(run_dir: Path, seeds: list[int]) -> None:
    """Retrain a finished run's learned schedule and its baseline with more final seeds, into
    ``more_seeds.json`` beside its results (``scripts/retrain_seeds.py`` prints them instead;
    one torch thread)."""
    import torch

    from metahpo.evaluation import retrain
    from scripts.retrain_seeds import run_schedules

    torch.set_num_threads(1)
    task, learned, baseline = run_schedules(run_dir)
    path = run_dir / "more_seeds.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    for label, schedule in (("learned", learned), ("baseline", baseline)):
        for seed in seeds:
            if str(seed) not in out.setdefault(label, {}):
                out[label][str(seed)] = retrain(task, schedule, seed)
                path.write_text(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--data", type=Path, help="the digits IDX root (default: OUT/digits28)")
    parser.add_argument("--history", type=Path, help="print one run's meta-loss history")
    parser.add_argument("--summary", action="store_true", help="only rewrite the summary")
    parser.add_argument(
        "--more-seeds", nargs="*", type=int, help="retrain finished runs with these final seeds"
    )
    parser.add_argument("extra", nargs="*", help="overrides added to every run")
    args = parser.parse_args()
    if args.history:
        print(history(args.history))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "digits28"
    if not (data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file():
        from tests.vision_files import write_digits_as_mnist

        print("digits as MNIST IDX files:", write_digits_as_mnist(data), flush=True)
    if args.more_seeds:
        for exp in args.only:
            for variant in args.variants:
                for seed in args.seeds:
                    run_dir = args.out / exp / variant / f"s{seed}"
                    if exp in VARIANTS[variant] and (run_dir / "results.json").is_file():
                        more_seeds(run_dir, args.more_seeds)
                        print("more final seeds:", run_dir, flush=True)
        return
    if not args.summary:
        # seed by seed, so that a cut-short study has every experiment at its first seeds
        for seed in args.seeds:
            for exp in EXPERIMENTS:
                for variant in args.variants:
                    if exp not in args.only or exp not in VARIANTS[variant]:
                        continue
                    run_one(exp, variant, seed, args.out, data.resolve(), args.extra)
                    print(summarise(args.out), flush=True)
    print(summarise(args.out))


if __name__ == "__main__":
    main()
