"""The long-horizon study of docs/results.md and docs/outer.md: digits at T = 2000, hypergradient
methods (non-greedy and greedy, the default and the old outer loop) against random search, TPE
and Hyperband-TPE at equal budget, three outer seeds, each result retrained on three final seeds.

    .venv/bin/python scripts/long_horizon.py --out multirun/long            # run + report
    .venv/bin/python scripts/long_horizon.py --out multirun/long --report   # report only

Runs the real CLI (``python -m metahpo``) sequentially with one torch thread, each run in its own
directory ``<out>/<method>/s<seed>``; a rerun skips finished runs and resumes killed ones (the
outer loop and the searches both continue from their checkpoint.pt). The report writes
``docs/long_horizon.png`` (best meta-loss so far against inner-step equivalents, mean and band
over the outer seeds) and prints the Markdown tables of docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HORIZON = 2000
#: Exact reverse mode: the same hypergradient as forward mode (both exact), 4 gradient
#: evaluations per step instead of forward mode's 1 + 2 c_t (up to 61 with 30 columns).
FDS = ["estimator=exact_reverse"]
#: The budget of every method: outer.budget=32 inner runs of exact reverse (the default outer
#: loop's cap), 31 estimates x 4 x 2000 + one plain run of 2000 = 250,000 inner-step equivalents.
BUDGET = 31 * 4 * HORIZON + HORIZON
METHODS: dict[str, list[str]] = {
    "fds": FDS,  # non-greedy, the default outer loop (rprop, accept meta_loss, budget 32)
    "greedy": ["estimator=greedy"],  # W = 10, same outer loop and budget
    "tpe": ["search=tpe", f"search.budget={BUDGET}"],
    "hyperband": ["search=hyperband", f"search.budget={BUDGET}"],
    "random": ["search=random", f"search.budget={BUDGET}"],
    # the outer loop before issue 13 (the paper's sign steps, only diverged steps rejected)
    "fds_old": [*FDS, "outer=sign", "outer.accept=finite", "outer.budget=null"],
}
SEEDS = (0, 1, 2)


def run_one(method: str, seed: int, out: Path) -> None:
    run_dir = out / method / f"s{seed}"
    if (run_dir / "results.json").is_file():
        return
    cmd = [
        sys.executable, "-m", "metahpo", "threads=1", "progress=false", f"horizon={HORIZON}",
        *METHODS[method], f"seed={seed}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    print(" ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    print(f"  rc {proc.returncode}, {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "multirun" / "long")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--report", action="store_true", help="only the report")
    args = parser.parse_args()
    if not args.report:
        for method in args.methods:
            for seed in args.seeds:
                run_one(method, seed, args.out)


if __name__ == "__main__":
    main()
