"""The final evaluation: learned and baseline schedules retrained from scratch per final seed.

Per run it reports each schedule's mean and spread over the final seeds and the paired
learned-minus-baseline difference (the same seed trains both, so the difference removes the
seed's own luck) with a 95 % confidence interval over the seeds. The baseline's retraining does
not depend on the learned schedule, so in a sweep it is done once per task and final seed and
shared through a cache on disk (:class:`BaselineCache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from metahpo import distributed
from metahpo.core import DivergenceError, Task
from metahpo.inner import fit
from metahpo.schedule import HyperSchedule

log = logging.getLogger("metahpo")

METRICS = ("test_loss", "test_accuracy", "val_loss", "val_accuracy")
CACHE_VERSION = 1


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the spread is None for fewer than 2 values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def ci95(values: Sequence[float]) -> list[float] | None:
    """Student-t 95 % confidence interval of the mean of ``values``; None for fewer than 2."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = float(t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))
    return [mean - half, mean + half]


def retrain(
    task: Task, schedule: HyperSchedule, seed: int, lr_free: str | None = None
) -> dict[str, Any]:
    """Train ``schedule`` from scratch with ``seed`` (or, with ``lr_free``, that optimiser set
    from ``schedule``: :mod:`metahpo.lrfree`); test and validation loss and accuracy."""
    seeded = task.with_seed(int(seed))
    try:
        if lr_free is None:
            flat, state = fit(seeded, schedule)
        else:
            from metahpo.lrfree import fit_lr_free

            flat, state = fit_lr_free(seeded, lr_free, schedule)
    except DivergenceError:
        return {"seed": int(seed), "diverged": True}
    test, val = flat.evaluate(state, "test"), flat.evaluate(state, "val")
    return {
        "seed": int(seed),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
    }


def aggregate(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (``_std``) over the seeds that did not diverge."""
    ok = [r for r in per_seed if not r.get("diverged")]
    agg: dict[str, Any] = {"diverged_seeds": len(per_seed) - len(ok)}
    for key in METRICS:
        agg[key], agg[f"{key}_std"] = mean_sd([r[key] for r in ok if r.get(key) is not None])
    return agg


def paired_difference(
    learned: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Learned minus baseline per final seed, over the seeds where neither diverged: mean,
    sample standard deviation, 95 % confidence interval (``_ci95``), and ``per_seed``."""
    base = {r["seed"]: r for r in baseline if not r.get("diverged")}
    pairs = [(r, base[r["seed"]]) for r in learned if not r.get("diverged") and r["seed"] in base]
    per_seed = [
        {"seed": a["seed"], **{k: a[k] - b[k] for k in METRICS if a.get(k) is not None}}
        for a, b in pairs
    ]
    out: dict[str, Any] = {}
    for key in METRICS:
        diffs = [d[key] for d in per_seed if key in d]
        out[key], out[f"{key}_std"] = mean_sd(diffs)
        out[f"{key}_ci95"] = ci95(diffs)
    return {**out, "per_seed": per_seed}


def crossed_ci95(values: dict[tuple[int, int], float]) -> tuple[float | None, list[float] | None]:
    """Mean and 95 % confidence interval of values indexed by (outer seed, final seed).

    Runs of one sweep share their final seeds, so the two seeds are crossed factors and the
    final seeds' luck is common to all runs: the spread between runs alone would miss it. The
    variance of the mean is estimated as var(outer-seed means) / S + var(final-seed means) / F
    (which counts their interaction twice: conservative), with a Student t of min(S, F) - 1
    degrees of freedom (also conservative); with one outer seed this is the run's own interval
    over its final seeds, with one final seed the interval over the outer seeds.
    """
    if not values:
        return None, None
    rows: dict[int, list[float]] = {}
    cols: dict[int, list[float]] = {}
    for (outer, final), v in values.items():
        rows.setdefault(outer, []).append(v)
        cols.setdefault(final, []).append(v)
    mean = statistics.fmean(values.values())
    row_means = [statistics.fmean(v) for v in rows.values()]
    col_means = [statistics.fmean(v) for v in cols.values()]
    parts = [
        (len(m), statistics.variance(m) / len(m)) for m in (row_means, col_means) if len(m) > 1
    ]
    if not parts:
        return mean, None
    from scipy.stats import t

    df = min(n for n, _ in parts) - 1
    half = float(t.ppf(0.975, df)) * math.sqrt(sum(v for _, v in parts))
    return mean, [mean - half, mean + half]


def final_evaluation(
    cfg: DictConfig, task: Task, learned: HyperSchedule, baseline: HyperSchedule
) -> dict[str, Any]:
    """``final`` of results.json: ``learned`` and ``baseline`` (aggregates and ``per_seed``)
    and their paired ``difference``; with ``final.lr_free``, ``lr_free``: per optimiser its
    aggregates and ``per_seed`` (set from the baseline, cached with it)."""
    seeds = [int(s) for s in cfg.final.seeds]
    learned_runs = [retrain(task, learned, s) for s in seeds]
    cache = BaselineCache.from_config(cfg)

    def fixed(s: int, lr_free: str | None = None) -> dict[str, Any]:
        """The baseline's (or a learning-rate-free optimiser's) run with seed ``s``."""
        if cache is None:
            return {**retrain(task, baseline, s, lr_free), "cached": False}
        key = cache.key(cfg, task, baseline, s)
        if lr_free is not None:
            key["lr_free"] = lr_free
        return cache.get_or_compute(key, lambda: retrain(task, baseline, s, lr_free))

    baseline_runs = [fixed(s) for s in seeds]
    lr_free = {}
    for name in OmegaConf.select(cfg, "final.lr_free") or ():
        runs = [fixed(s, str(name)) for s in seeds]
        lr_free[str(name)] = {**aggregate(runs), "per_seed": runs}
    return {
        "learned": {**aggregate(learned_runs), "per_seed": learned_runs},
        "baseline": {
            **aggregate(baseline_runs),
            "per_seed": baseline_runs,
            "cache": str(cache.root) if cache is not None else None,
        },
        "difference": paired_difference(learned_runs, baseline_runs),
        **({"lr_free": lr_free} if lr_free else {}),
    }


class BaselineCache:
    """The baseline's per-seed retraining results on disk, shared by the jobs of a sweep.

    One JSON file per key: everything the result depends on (the resolved task config, horizon,
    dtype, device, the inner optimiser's config, the baseline schedule's values, the seed,
    torch's version). A job takes an
    exclusive lock on the key before looking, so concurrent jobs (joblib, SLURM on a shared
    file system) compute each entry once; the file appears by an atomic rename.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_config(cls, cfg: DictConfig) -> BaselineCache | None:
        """``final.baseline_cache``: a directory; ``auto``: ``<sweep dir>/.baseline_cache`` in
        a Hydra multirun, else no cache; ``null``: no cache. Data-parallel runs never cache
        (every rank must retrain together)."""
        where = OmegaConf.select(cfg, "final.baseline_cache")
        if where is None or distributed.world_size() > 1:
            return None
        if where == "auto":
            from metahpo.loggers import _hydra_sweep_dir

            sweep = _hydra_sweep_dir()
            return cls(Path(sweep) / ".baseline_cache") if sweep else None
        return cls(Path(str(where)))

    @staticmethod
    def key(cfg: DictConfig, task: Task, baseline: HyperSchedule, seed: int) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "task": OmegaConf.to_container(cfg.task, resolve=True),
            "horizon": int(cfg.horizon),
            "dtype": str(cfg.dtype),
            "device": str(task.device),
            "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True)
            if OmegaConf.select(cfg, "optimizer") is not None
            else None,
            "baseline": baseline.to_dict(),
            "seed": int(seed),
            "torch": torch.__version__,
        }

    def get_or_compute(self, key: dict[str, Any], compute: Any) -> dict[str, Any]:
        """The cached result for ``key`` (``cached: true``), else ``compute()`` stored."""
        text = json.dumps(key, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        path = self.root / f"{digest}.json"
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / f"{digest}.lock"):
            if path.is_file():
                try:
                    stored = json.loads(path.read_text())
                    if stored.get("key") == json.loads(text):
                        return {**stored["result"], "cached": True}
                except (OSError, ValueError):
                    pass  # unreadable: compute again and overwrite
            result = compute()
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": json.loads(text), "result": result}, indent=1))
            os.replace(tmp, path)
        return {**result, "cached": False}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (none where the platform has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still keeps the file whole
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: at worst computed twice
            log.debug("no lock on %s (%s)", path, e)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)
