"""The outer loop and the public entry points ``hypergradient(cfg)`` and ``run(cfg)``."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from metahpo import distributed
from metahpo.build import Objects, Setup, baseline_config, build, with_objects
from metahpo.config import check_writable
from metahpo.core import ConfigError, DivergenceError, Hypergradient, HypergradientEstimator, Task
from metahpo.device import CostMeter, rng_states, set_rng_states
from metahpo.evaluation import final_evaluation
from metahpo.inner import FlatTask, StepHook, fit
from metahpo.loggers import step_metrics
from metahpo.outer import clip_by_norm
from metahpo.plots import plot_history, plot_schedules
from metahpo.plugins import (
    check_converged,
    check_hypergradient,
    check_outer_step,
    nonfinite_message,
)
from metahpo.results import SCHEMA_VERSION
from metahpo.reverse import window_ends
from metahpo.schedule import HyperSchedule
from metahpo.validation import rise_limit

log = logging.getLogger("metahpo")
SEED_STRIDE = 1000  # outer.seeds=n averages over seed, seed + 1000, ..., seed + 1000 (n - 1)
CHECKPOINT_VERSION = 3


def hypergradient(
    cfg: DictConfig | Sequence[str] | None = None,
    *,
    task: Task | None = None,
    estimator: HypergradientEstimator | None = None,
) -> Hypergradient:
    """The configured estimator's hypergradient at the schedule's initial values.

    ``cfg``, ``task`` and ``estimator`` as for :func:`run`. Under torchrun, data-parallel over
    the launched ranks (docs/scaling.md).
    """
    objects = Objects(task=task, estimator=estimator)
    cfg = with_objects(cfg, objects)
    distributed.join(cfg)
    setup = build(cfg, objects=objects)
    return setup.estimator.hypergradient(setup.task, setup.schedule)


def meta_loss(
    task: Task,
    schedule: HyperSchedule,
    on_step: StepHook | None = None,
    window: int | None = None,
) -> dict[str, float | None]:
    """Validation loss and accuracy after a plain inner run with ``schedule`` (no derivatives;
    ``on_step`` as for :func:`metahpo.inner.train`). With ``window = W`` the meta-loss is the
    estimators' windowed objective (``estimator.window``): the sum of the validation losses
    after every ``W`` steps and at the end; ``final_val_loss`` is then the last term.

    Raises:
        DivergenceError: the run or its validation loss is not finite.
    """
    ends = set(window_ends(window, schedule.horizon)[:-1])
    earlier: list[float] = []

    def hook(t: int, before: Any, after: Any, batch: Any) -> None:
        if on_step is not None:
            on_step(t, before, after, batch)
        if t + 1 in ends:
            earlier.append(flat.evaluate(after, "val")["loss"])

    flat = FlatTask(task)  # one view trains and evaluates the window ends' states
    _, state = fit(task, schedule, on_step=hook if ends else on_step, flat=flat)
    out = flat.evaluate(state, "val")
    total = out["loss"] + sum(earlier)
    if not math.isfinite(total):
        raise DivergenceError("inner training diverged: the validation loss is not finite")
    scores: dict[str, float | None] = {"meta_loss": total, "val_accuracy": out["accuracy"]}
    if window is not None:
        scores["final_val_loss"] = out["loss"]
    return scores


def run(
    cfg: DictConfig | Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    *,
    task: Task | None = None,
    estimator: HypergradientEstimator | None = None,
    outer: Any = None,
) -> dict[str, Any]:
    """Learn the schedule, retrain with it and with the baseline, return (and write) results.

    ``cfg`` is a config from :func:`metahpo.compose`, or the overrides to compose one from
    (``["horizon=100", "outer.steps=5"]``; None: the defaults). Objects you already hold go in
    beside it, object first: ``task`` (any :class:`~metahpo.core.Task`), ``estimator`` (any
    :class:`~metahpo.core.HypergradientEstimator`) and ``outer`` (an outer optimiser) replace
    what the config's ``task``, ``estimator`` and ``outer.optimizer`` would build, with the same
    checkpoints, resume, selection, retraining, logging and outputs. A task object brings its
    own seed, device and dtype (the config's are set from it); results.json and the checkpoint's
    fingerprint record each object by its class and ``name``, so resuming with an object of
    another class is refused in one line.

    Writes into ``output_dir`` when given: ``results.json`` (schema in docs/outputs.md),
    ``schedules.png``, ``meta_loss.png``, ``config.yaml`` and ``checkpoint.pt`` (written
    atomically after every outer step). A directory that already holds a checkpoint is resumed
    from it, as is ``resume=<dir>``; a killed run continues where it stopped, with the same result.
    Under torchrun the run is data-parallel over the launched ranks and only rank 0 writes
    (docs/scaling.md).

    Raises:
        ConfigError: a bad config or an incompatible checkpoint, before any training.
        DivergenceError: no schedule the run visited trained to a finite loss; results.json
            still holds the history and the rejected steps.
    """
    objects = Objects(task=task, estimator=estimator, outer=outer)
    cfg = with_objects(cfg, objects)
    if cfg.search.name is not None:  # a black-box search instead of the outer loop
        from metahpo.search import search

        if estimator is not None or outer is not None:
            raise ConfigError(
                f"search={cfg.search.name}: a search uses neither an estimator nor an outer "
                "optimiser; pass task= only"
            )
        return search(cfg, output_dir, task=task)
    distributed.join(cfg)
    if distributed.world_size() > 1:
        cfg, output_dir = _rank_view(cfg, output_dir)
    out_dir = Path(output_dir) if output_dir is not None else None
    seed_everything(int(cfg.seed))  # global generators too: a plugin drawing from them repeats
    if out_dir is not None:
        check_writable(out_dir, "hydra.run.dir")
    setup = build(cfg, objects=objects)
    if str(cfg.device) == "auto" and setup.task.device.type == "cpu":
        log.warning("%s", _cpu_fallback(cfg, setup))
    loop = _OuterLoop(cfg, setup, out_dir)  # checks a checkpoint before anything is written
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    name = f"{_estimator_name(setup)}-{setup.task.name}-s{cfg.seed}"
    tags = [_estimator_name(setup), setup.task.name]
    setup.logger.start(OmegaConf.to_container(cfg, resolve=True), name, out_dir, tags=tags)
    results: dict[str, Any] = {}
    files: list[Path] = []
    failed = True
    try:
        try:
            loop.run()
        except KeyboardInterrupt:
            loop.stopped = "interrupted"
            results = _results(cfg, setup, loop, None, loop.wall())
            files = write_outputs(out_dir, results, setup, loop.learned)
            where = f" resume={out_dir}" if out_dir else ""
            log.warning(
                "interrupted after %d outer steps; continue with%s", len(loop.history), where
            )
            raise
        final = None if loop.learned is None else _final_evaluation(cfg, setup, loop.learned)
        results = _results(cfg, setup, loop, final, loop.wall())
        files = write_outputs(out_dir, results, setup, loop.learned)
        if loop.learned is None:
            where = f"; results so far: {out_dir / 'results.json'}" if out_dir else ""
            raise DivergenceError(f"{loop.message}{where}")
        if loop.message:
            log.warning("%s", loop.message)
        failed = False
    finally:
        setup.logger.finish(results, files, failed=failed)
    return results


def _cpu_fallback(cfg: DictConfig, setup: Setup) -> str:
    """The line ``device=auto`` prints when it finds no CUDA device: the run's estimated time on
    the CPU (estimators/auto.py's cost model and a probe of a few plain steps)."""
    from metahpo.estimators.auto import estimate_seconds

    budget = cfg.outer.budget
    outer_runs = (int(cfg.outer.steps) + 1) * int(cfg.outer.seeds)
    outer_runs = min(outer_runs, int(budget)) if budget is not None else outer_runs
    final_runs = 2 * len(cfg.final.seeds)
    seconds, how = estimate_seconds(
        setup.task, setup.schedule, setup.estimator, outer_runs, final_runs
    )
    return (
        f"device=auto found no CUDA device: running on the CPU, estimated "
        f"{_duration(seconds)} ({how}); set device=cpu to run here without this line"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _rank_view(cfg: DictConfig, output_dir: str | Path | None) -> tuple[DictConfig, Path | None]:
    """A data-parallel rank's config and run directory: rank 0 keeps both; the others write
    nothing, show no progress bar, and continue from the checkpoint rank 0 continues from."""
    own = Path(output_dir) / "checkpoint.pt" if output_dir is not None else None
    found = own is not None and own.is_file() and not cfg.resume and distributed.is_main()
    resume = distributed.broadcast(str(own) if found else None)  # rank 0's own directory's
    if distributed.is_main():
        return cfg, None if output_dir is None else Path(output_dir)
    overrides: dict[str, Any] = {"progress": False}
    if resume is not None:
        overrides["resume"] = resume
    return OmegaConf.merge(cfg, overrides), None  # type: ignore[return-value]


class _OuterLoop:
    """Hypergradient, step, log, checkpoint; rejects outer steps whose inner run diverges or,
    with ``outer.accept=meta_loss``, whose meta-loss rises above ``1 + outer.tolerance`` times
    the best accepted one.

    A rejected step leaves the hyperparameters where the last accepted step put them (the
    anchor) and retries from there with the outer step halved; ``outer.max_failures``
    consecutive rejections stop the run, which then reports the best schedule it visited.
    With ``outer.seeds=n`` every estimate is the mean over ``n`` inner seeds (initial weights
    and batch order); ``inner_runs`` counts the inner training runs (one per seed of every
    estimate or score) against ``outer.budget``.
    """

    def __init__(self, cfg: DictConfig, setup: Setup, out_dir: Path | None) -> None:
        self.cfg, self.setup, self.out_dir = cfg, setup, out_dir
        self.schedule = setup.schedule
        self.state = setup.optimizer.init(self.schedule)
        self.history: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.failures = 0  # consecutive rejections
        # The last accepted iterate, its optimiser state and (clipped) hypergradient: where a
        # rejected step goes back to. None at the start and after an online estimator's step.
        self.anchor: tuple[HyperSchedule, Any, dict[str, torch.Tensor]] | None = None
        self.done: str | None = None
        self.stopped = "max_steps"
        self.message: str | None = None
        self.k = 0
        self.inner_runs = 0
        self.started, self.wall_before = time.perf_counter(), 0.0  # earlier processes' time
        self.learned: HyperSchedule | None = self.schedule
        self.selected = 0
        n_seeds = int(cfg.outer.seeds)
        self.reduce = str(cfg.outer.get("reduce", "mean"))  # a user's outer file may omit it
        self.seeds = [int(cfg.seed) + SEED_STRIDE * i for i in range(n_seeds)]
        self.tasks = [setup.task] + [setup.task.with_seed(s) for s in self.seeds[1:]]
        own = out_dir / "checkpoint.pt" if out_dir is not None else None
        if cfg.resume:
            self._resume(Path(str(cfg.resume)))
        elif own is not None and own.is_file():
            self._resume(own, own_dir=True)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        if self.out_dir is None:
            return
        path = self.out_dir / "checkpoint.pt"
        anchor = None
        if self.anchor is not None:
            schedule, state, grads = self.anchor
            anchor = {"values": schedule.values, "state": state, "grads": grads}
        save_checkpoint(
            path,
            self.cfg,
            {
                "k": self.k,
                "values": self.schedule.values,
                "state": self.state,
                "history": self.history,
                "rejections": self.rejections,
                "failures": self.failures,
                "inner_runs": self.inner_runs,
                "wall_seconds": self.wall(),
                "anchor": anchor,
                "done": self.done,
                "message": self.message,
                "rng": rng_states(),
                "estimator": _estimator_state(self.setup.estimator),
            },
        )

    def _resume(self, path: Path, own_dir: bool = False) -> None:
        ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
        ckpt = load_checkpoint(path, self.cfg, own_dir)
        base = self.setup.schedule
        self.schedule = base.replace(ckpt["values"])
        self.state, self.history, self.k = ckpt["state"], ckpt["history"], ckpt["k"]
        self.rejections, self.failures = ckpt["rejections"], ckpt["failures"]
        self.inner_runs = ckpt["inner_runs"]
        self.wall_before = float(ckpt.get("wall_seconds", 0.0))
        anchor = ckpt["anchor"]
        if anchor is not None:
            self.anchor = (base.replace(anchor["values"]), anchor["state"], anchor["grads"])
        self.done, self.message = ckpt["done"], ckpt["message"]
        set_rng_states(ckpt["rng"])
        own = ckpt.get("estimator")
        if own is not None and callable(getattr(self.setup.estimator, "load_state_dict", None)):
            self.setup.estimator.load_state_dict(own)
        log.info("resumed from %s at outer step %d", ckpt_path, self.k)

    def wall(self) -> float:
        """Wall time of the run so far, summed over the processes that resumed it."""
        return self.wall_before + time.perf_counter() - self.started

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, setup = self.cfg, self.setup
        n_steps = int(cfg.outer.steps)
        bar = tqdm(
            total=n_steps,
            initial=min(self.k, n_steps),
            desc=f"{_estimator_name(setup)} on {setup.task.name}",
            unit="outer step",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        last = self.history[-1] if self.history else None
        if self.done is None and self.k < n_steps and last is not None:
            if last.get("hypergradient") is None and last["outer_step"] == self.k:
                # a finished run continued with more outer steps: its final score is not an
                # outer step (the end of this run scores its own last iterate)
                self.history.pop()
                self.inner_runs -= len(self.seeds)
        try:
            while self.done is None and self.k < n_steps:
                if not self._affordable(2 * len(self.seeds)):  # this estimate and a last score
                    self.done = "budget"
                    break
                try:
                    hg = self._hypergradient()
                    _check_finite(hg, setup.estimator)
                except DivergenceError as e:
                    self._reject(str(e))
                    self._checkpoint()
                    continue
                rise = self._rise(hg)
                if rise is not None:
                    self._reject(rise, meta_loss=hg.meta_loss)
                    self._checkpoint()
                    continue
                self.failures = 0
                entry = {"outer_step": self.k, **hg.to_dict(), "schedule": _values(self.schedule)}
                if hg.schedule is not None:
                    entry.update(online=True, schedule_after=_values(hg.schedule))
                self.history.append(entry)
                setup.logger.log(self.k, step_metrics(entry))
                bar.set_postfix(meta_loss=f"{hg.meta_loss:.4f}")
                bar.update(1)
                if hg.schedule is not None:
                    # An online estimator (greedy) moved the schedule during its run: the one it
                    # ended with is the next iterate; no outer step, no convergence test, and
                    # nothing to go back to (there is no outer step to halve).
                    new, converged, self.anchor = hg.schedule.project(), False, None
                else:
                    grads = clip_by_norm(hg.grads, cfg.outer.clip)
                    self.anchor = (self.schedule, self.state, grads)
                    new, self.state = check_outer_step(
                        setup.optimizer.step(self.schedule, grads, self.state),
                        self.schedule,
                        setup.optimizer,
                    )
                    converged = check_converged(
                        setup.optimizer.converged(
                            self.schedule, new, self.state, float(cfg.outer.stop_fraction)
                        ),
                        setup.optimizer,
                    )
                self.schedule, self.k = new, self.k + 1
                if converged:
                    self.done = "converged"
                self._checkpoint()
        finally:
            bar.close()
        self.stopped = self.done or "max_steps"
        self._select()
        self._checkpoint()

    def _affordable(self, runs: int) -> bool:
        budget = self.cfg.outer.budget
        return budget is None or self.inner_runs + runs <= int(budget)

    def _hypergradient(self) -> Hypergradient:
        """The estimator's answer at the current schedule, reduced over ``outer.seeds``.

        ``outer.reduce=mean``: meta-losses, hypergradients and metrics are means over the seeds;
        ``max``: the answer (meta-loss, hypergradient, metrics) of the seed with the highest
        meta-loss, so the loop descends the worst seed's validation loss. An online estimator's
        moved schedules are averaged value by value either way. Every seed's run is counted,
        diverged too. Each answer is checked (metahpo/plugins.py), and its ``seconds`` and
        ``peak_memory`` are the runner's own measurement of the call, the same for every
        estimator.
        """
        estimator, answers = self.setup.estimator, []
        for task in self.tasks:
            self.inner_runs += 1
            with CostMeter(task.device) as cost:
                answer = estimator.hypergradient(task, self.schedule)
            hg = check_hypergradient(answer, self.schedule, estimator)
            hg.seconds, hg.peak_memory = cost.seconds, cost.peak
            _check_finite(hg, estimator)  # a diverged seed rejects the step
            answers.append(hg)
        if len(answers) == 1:
            return answers[0]
        n = len(answers)
        moved = None
        if answers[0].schedule is not None:  # online: the moved schedules are always averaged
            moved = answers[0].schedule.replace(
                {m: sum(a.schedule.values[m] for a in answers) / n for m in self.schedule.learned}
            )
        seed_losses = [a.meta_loss for a in answers]
        if self.reduce == "max":  # the worst seed's answer: the subgradient of the max
            worst = max(answers, key=lambda a: a.meta_loss)  # the first of equal ones
            loss, grads, metrics = worst.meta_loss, dict(worst.grads), dict(worst.metrics)
        else:
            loss = statistics.fmean(seed_losses)
            grads = {m: sum(a.grads[m] for a in answers) / n for m in answers[0].grads}
            metrics = {
                k: statistics.fmean(a.metrics[k] for a in answers)
                for k, v in answers[0].metrics.items()
                if isinstance(v, int | float) and all(a.metrics.get(k) is not None for a in answers)
            }
        metrics["seed_meta_losses"] = seed_losses
        return Hypergradient(
            meta_loss=loss,
            grads=grads,
            seconds=sum(a.seconds for a in answers),
            peak_memory=max(a.peak_memory for a in answers),
            inner_steps=sum(a.inner_steps for a in answers),
            metrics=metrics,
            schedule=moved,
        )

    def _rise(self, hg: Hypergradient) -> str | None:
        """Why ``outer.accept=meta_loss`` rejects this estimate, or None to accept it.

        Only an outer step can be rejected this way (there is an anchor to go back to); an
        online estimator's schedule is its own run's result, with no outer step to shrink.
        """
        if self.anchor is None:
            return None
        limit = self._limit()
        if limit is None or hg.meta_loss <= limit[0]:
            return None
        return (
            f"the meta-loss rose to {hg.meta_loss:.6g}, above {limit[0]:.6g} "
            f"(outer.tolerance={self.cfg.outer.tolerance} over the best accepted {limit[1]:.6g})"
        )

    def _limit(self) -> tuple[float, float] | None:
        """(Highest acceptable meta-loss, best accepted one); None unless accept=meta_loss."""
        if self.cfg.outer.accept != "meta_loss":
            return None
        best = min(
            (
                h["meta_loss"]
                for h in self.history
                if not h.get("online") and h["meta_loss"] is not None and not h.get("rejected")
            ),
            default=None,
        )
        if best is None:
            return None
        return rise_limit(best, float(self.cfg.outer.tolerance)), best

    def _reject(self, reason: str, meta_loss: float | None = None) -> None:
        """Count a rejected outer step; retry from the anchor with a halved step, or stop."""
        self.failures += 1
        self.rejections.append(
            {
                "outer_step": self.k,
                "reason": reason,
                "schedule": _values(self.schedule),
                **({"meta_loss": meta_loss} if meta_loss is not None else {}),
            }
        )
        self.setup.logger.log(self.k, {"rejected_steps": len(self.rejections)})
        limit = int(self.cfg.outer.max_failures)
        if self.anchor is None:
            # Nothing to shorten: the starting schedule (or an online estimator's last one)
            # diverges, and the same run again would diverge the same way.
            self.done = "diverged"
            origin = "the run started from" if not self.k else "it reached"
            # a finite meta-loss with a non-finite hypergradient: the estimator's own failure
            hint = (
                "check the estimator's numerics (float64: dtype=float64)"
                if reason.startswith("estimator ")
                else "lower schedule.*.init or the schedule's upper bounds"
            )
            self.message = f"{reason}, with the schedule {origin} ({self.schedule}); {hint}"
            return
        schedule, state, grads = self.anchor
        if self.failures >= limit:
            self.schedule = schedule  # the last accepted iterate
            if meta_loss is not None:  # no shorter step lowers the meta-loss: a local minimum
                self.done = "no_progress"
                log.info(
                    "stopped after %d consecutive rejected outer steps (outer.max_failures=%d): "
                    "no shorter step keeps the meta-loss down",
                    self.failures,
                    limit,
                )
                return
            self.done = "diverged"
            self.message = (
                f"{reason}: stopped after {self.failures} consecutive rejected outer steps "
                f"(outer.max_failures={limit}) at outer step {self.k}; lower the outer step "
                "sizes or the schedule's upper bounds"
            )
            return
        log.warning(
            "outer step %d rejected (%s); retrying from the last accepted schedule with halved "
            "outer steps (%d/%d)",
            self.k,
            reason,
            self.failures,
            limit,
        )
        state = self.setup.optimizer.backtrack(state)
        self.anchor = (schedule, state, grads)  # a further rejection halves again
        self.schedule, self.state = self.setup.optimizer.step(schedule, grads, state)

    def _select(self) -> None:
        """Score the last iterate with a plain run, then pick the schedule to report.

        Entries of online estimators are not candidates: their meta-loss comes from a run whose
        schedule moved, not from a plain run of their ``schedule``; so an online estimator's
        learned schedule is its last iterate (with its plain-run score). A run stopped by
        divergence is not scored again: its current schedule is the last accepted iterate
        (already in the history) or the one that just diverged. Under ``outer.accept=meta_loss``
        a last iterate scored above the acceptance limit is marked ``rejected`` and is no
        candidate (``select: last`` then reports the last accepted iterate).
        """
        last = self.history[-1] if self.history else None
        fresh = last is None or last.get("online") or last["schedule"] != _values(self.schedule)
        if fresh and self.stopped != "diverged" and self._affordable(len(self.seeds)):
            start = time.perf_counter()
            try:
                per_seed = []
                # the estimator's own objective (its window's sum, if it has one)
                window = getattr(self.setup.estimator, "window", None)
                for task in self.tasks:
                    self.inner_runs += 1
                    per_seed.append(meta_loss(task, self.schedule, window=window))
                scores: dict[str, Any]
                if self.reduce == "max":  # the worst seed's scores, as in its estimates
                    worst = max(per_seed, key=lambda s: s["meta_loss"])
                    scores = {
                        "meta_loss": worst["meta_loss"],
                        "val_accuracy": worst["val_accuracy"],
                    }
                else:
                    scores = {
                        "meta_loss": statistics.fmean(s["meta_loss"] for s in per_seed),
                        "val_accuracy": _mean_or_none([s["val_accuracy"] for s in per_seed]),
                    }
                if len(per_seed) > 1:
                    scores["seed_meta_losses"] = [s["meta_loss"] for s in per_seed]
            except DivergenceError:  # reported, never selected
                scores = {"meta_loss": None, "val_accuracy": None, "diverged": True}
            limit = self._limit()
            if limit is not None and scores["meta_loss"] is not None:
                # the acceptance rule holds for the last iterate too: never its candidate
                if scores["meta_loss"] > limit[0]:
                    scores["rejected"] = True
            self.history.append(
                {
                    "outer_step": self.k,
                    **scores,
                    "hypergradient": None,
                    "seconds": time.perf_counter() - start,
                    "schedule": _values(self.schedule),
                }
            )
        scored = [
            h
            for h in self.history
            if h["meta_loss"] is not None and not h.get("online") and not h.get("rejected")
        ]
        candidates = scored if self.cfg.outer.select == "best" else scored[-1:]
        if not candidates:
            self.learned = None
            self.message = self.message or (
                "inner training diverged with every schedule the run visited"
            )
            return
        best = min(candidates, key=lambda h: h["meta_loss"])
        self.selected = best["outer_step"]
        self.learned = self.setup.schedule.replace(
            {n: torch.tensor(v, dtype=torch.float64) for n, v in best["schedule"].items()}
        )


#: How results.json's ``outer_loop.selection`` names each ``outer.reduce``.
_REDUCED = {"mean": "mean over", "max": "max (worst seed) over"}


def _mean_or_none(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


#: Keys a resumed run may change (docs/reliability.md): more or fewer outer steps or inner
#: runs, where it runs and reports, and the final evaluation after the outer loop.
RESUMABLE = ("outer.steps", "outer.budget", "progress", "resume", "device", "final", "logger")
RESUMABLE += ("distributed", "threads")


def save_checkpoint(path: Path, cfg: DictConfig, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, fsync, rename), stamped with
    the checkpoint version and ``cfg``'s fingerprint (what a resuming config must share)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"version": CHECKPOINT_VERSION, "fingerprint": _fingerprint(cfg), **state}, tmp)
    with open(tmp, "rb+") as f:  # on disk before the rename makes it the checkpoint
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: DictConfig, own_dir: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (a run directory or its checkpoint.pt) that ``cfg`` resumes;
    ConfigError (one line, naming ``resume`` or ``hydra.run.dir`` when ``own_dir``) if it is
    missing, unreadable, of another version or made with another config."""
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    key = "hydra.run.dir" if own_dir else "resume"
    where = f"{key}={str(path.parent if own_dir else path)!r}"
    if not ckpt_path.is_file():
        raise ConfigError(f"{where}: no checkpoint.pt there")
    try:
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{where}: {ckpt_path.name} is unreadable ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{where}: {ckpt_path.name} is not a metahpo checkpoint of version "
            f"{CHECKPOINT_VERSION}; start a new run directory"
        )
    mine = _fingerprint(cfg)
    for name, old in ckpt["fingerprint"].items():
        if mine.get(name) != old:
            hint = " (this directory holds another run; choose a new one)" if own_dir else ""
            raise ConfigError(
                f"{where}: the checkpoint was made with {name}={old!r}, this config has "
                f"{name}={mine.get(name)!r}{hint}"
            )
    return ckpt


def _fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint must share with the config that resumes it, flattened by key: every
    key but the :data:`RESUMABLE` ones."""
    out: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key, value in data.items():
        flatten(str(key), value)
    return {
        k: v for k, v in out.items() if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)
    }


def _check_finite(hg: Hypergradient, estimator: Any) -> None:
    message = nonfinite_message(hg, estimator)
    if message is not None:
        raise DivergenceError(message)


def _final_evaluation(cfg: DictConfig, setup: Setup, learned: HyperSchedule) -> dict[str, Any]:
    """Retrain learned and baseline schedules per final seed (metahpo/evaluation.py)."""
    return final_evaluation(cfg, setup.task, learned, setup.baseline)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA's too) from ``seed``."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _estimator_state(estimator: Any) -> Any:
    """An estimator's own state for the checkpoint (its random generator...), when it exposes
    ``state_dict()`` (and ``load_state_dict(state)`` to restore it on resume)."""
    state_dict = getattr(estimator, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def _estimator_name(setup: Setup) -> str:
    return str(getattr(setup.estimator, "name", type(setup.estimator).__name__))


def _values(schedule: HyperSchedule) -> dict[str, list[float]]:
    return {n: v.tolist() for n, v in schedule.values.items()}


def _results(
    cfg: DictConfig,
    setup: Setup,
    loop: _OuterLoop,
    final: dict[str, Any] | None,
    wall: float,
) -> dict[str, Any]:
    return {
        **results_header(cfg, setup, _estimator_name(setup)),
        "stopped": loop.stopped,
        "outer_steps": loop.k,
        "rejected_steps": len(loop.rejections),
        "rejections": loop.rejections,
        "stop_message": loop.message,
        "selected_outer_step": loop.selected,
        "outer_loop": {
            "optimizer": str(cfg.outer.optimizer._target_),
            "accept": str(cfg.outer.accept),
            "tolerance": float(cfg.outer.tolerance),
            "seeds": loop.seeds,
            "reduce": loop.reduce,
            "selection": f"{cfg.outer.select}: lowest meta-loss, {_REDUCED[loop.reduce]} "
            f"{len(loop.seeds)} inner seed(s)"
            if cfg.outer.select == "best"
            else "last: the last iterate",
            "budget": cfg.outer.budget,
            "inner_runs": loop.inner_runs,
        },
        "learned_schedule": loop.learned.to_dict() if loop.learned is not None else None,
        **results_schedules(cfg, setup),
        "history": loop.history,
        "final": final,
        "estimator_seconds": sum(h["seconds"] for h in loop.history if h.get("hypergradient")),
        "estimator_peak_memory_mb": _steady_peak(loop.history),
        "wall_time_seconds": wall,
    }


def results_header(cfg: DictConfig, setup: Setup, name: str) -> dict[str, Any]:
    """The first keys of results.json: what ran (``name``: the estimator's or search's), where."""
    return {
        "schema_version": SCHEMA_VERSION,
        "estimator": name,
        "task": setup.task.name,
        "seed": int(cfg.seed),
        "horizon": int(cfg.horizon),
        "device": str(setup.task.device),
        "dtype": str(cfg.dtype),
        "world_size": distributed.world_size(),
    }


def results_schedules(cfg: DictConfig, setup: Setup) -> dict[str, Any]:
    """results.json's initial schedule, inner optimiser and baseline."""
    return {
        "initial_schedule": setup.schedule.to_dict(),
        "optimizer": str(cfg.optimizer._target_),
        "baseline_schedule": {"config": baseline_config(cfg)},
    }


def _steady_peak(history: list[dict[str, Any]]) -> float | None:
    """Largest per-step peak, leaving out the first step's one-time library initialisation."""
    peaks = [h["peak_memory_mb"] for h in history if h.get("hypergradient")]
    return max(peaks[1:] or peaks, default=None)


def write_outputs(
    out_dir: Path | None, results: dict[str, Any], setup: Setup, learned: HyperSchedule | None
) -> list[Path]:
    """results.json, schedules.png and meta_loss.png into ``out_dir`` (nothing when None)."""
    if out_dir is None:
        return []
    path = out_dir / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    title = f"{results['estimator']} on {results['task']} (T={results['horizon']})"
    files = [path]
    files.append(
        plot_schedules(
            {
                label: schedule
                for label, schedule in (
                    ("initial", setup.schedule),
                    ("learned", learned),
                    ("baseline", setup.baseline),
                )
                if schedule is not None
            },
            out_dir / "schedules.png",
            title,
        )
    )
    if results["history"]:
        files.append(
            plot_history(
                results["history"],
                out_dir / "meta_loss.png",
                title,
                selected=results["selected_outer_step"],
                baseline=((results.get("final") or {}).get("baseline") or {}).get("val_loss"),
            )
        )
    return files


def format_table(results: dict[str, Any]) -> str:
    """The learned-vs-baseline table printed at the end of a run: mean ± sample standard
    deviation over the final seeds, then the paired learned - baseline difference with its
    95 % confidence interval over the same seeds."""
    final = results.get("final") or {}
    n = len((final.get("learned") or {}).get("per_seed", []))

    def acc(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    def loss(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    def cell(r: dict[str, Any], key: str, fmt: Any, signed: bool = False) -> str:
        value, sd = r.get(key), r.get(f"{key}_std")
        if value is None:
            return "n/a" if r else "diverged"
        text = fmt(value)
        text = ("+" if signed and value >= 0 else "") + text
        ci = r.get(f"{key}_ci95")
        if ci is not None:
            return f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]"
        return text if sd is None or signed else f"{text} ± {fmt(sd)}"

    rows = [f"{'schedule':<18} {'test acc (%)':>22} {'test loss':>28}"]
    parts = [("learned", final.get("learned")), ("baseline", final.get("baseline"))]
    parts += list((final.get("lr_free") or {}).items())  # beside the baseline
    for title, part in [*parts, ("learned - baseline", final.get("difference"))]:
        r = part or {}
        signed = title == "learned - baseline"
        rows.append(
            f"{title:<18} {cell(r, 'test_accuracy', acc, signed):>22} "
            f"{cell(r, 'test_loss', loss, signed):>28}"
        )
    rows.append(
        f"mean ± sample sd over {n} final seed(s); difference: paired per seed, "
        "[95% CI] over the seeds"
    )
    search = results.get("search")
    if search is not None:
        spent = (
            f"{search['trials']} trials ({search['completed']} completed, {search['pruned']} "
            f"pruned, {search['diverged']} diverged), {search['spent']} of {search['budget']} "
            "inner-step equivalents"
        )
    else:
        spent = f"{results['outer_steps']} outer steps ({results['stopped']})"
    rows.append(
        f"{results['estimator']} on {results['task']}: {spent}, wall time "
        f"{results['wall_time_seconds']:.1f} s"
        + (
            f", {results['rejected_steps']} rejected step(s)"
            if results["rejected_steps"] and search is None
            else ""
        )
    )
    return "\n".join(rows)
