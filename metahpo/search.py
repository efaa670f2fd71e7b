"""Black-box search over a schedule's values with Optuna: what a user would run instead of
hypergradients, at the same budget (docs/baselines.md).

``metahpo search=random|tpe|hyperband`` replaces the outer loop by a search over the same space
(every learned segment of the composed ``schedule``, in its bounds; ``search.space=constant``:
one value per learned key). Each trial trains one plain inner run (:func:`metahpo.inner.fit`)
with the schedule the sampler proposes and is scored by the meta-objective, the validation loss
at the end of the run; with a pruner (``search=hyperband``: TPE and Hyperband, BOHB's recipe)
the run reports its validation loss at the pruner's rungs and may be stopped there. The best
completed trial is the learned schedule, retrained and compared with the baseline as the
runner does (:func:`metahpo.evaluation.final_evaluation`), into the same results.json.

The budget is counted in inner-step equivalents, one per plain training step (a gradient
evaluation and an update); a pruned trial counts the steps it ran. ``search.budget=null`` gives
the search what the configured hypergradient run may spend: ``outer.budget`` inner runs, each
estimate costing the gradient evaluations :func:`metahpo.estimators.auto.gradient_evaluations`
counts, the last a plain score. A trial starts only while a whole run still fits, so the
search never spends more than its budget.

After every trial the study (its trials, the sampler's and pruner's state) and the trials'
record are written atomically to ``checkpoint.pt`` in the run directory; running again there,
or with ``resume=<dir>``, continues from the last finished trial (a trial cut short by a kill
is drawn and run again) and ends with the result of an uninterrupted search.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from metahpo import distributed
from metahpo.build import Objects, Setup, _instantiate, build
from metahpo.config import check_writable
from metahpo.core import ConfigError, DivergenceError, Task
from metahpo.device import rng_states, set_rng_states
from metahpo.evaluation import final_evaluation
from metahpo.inner import FlatTask, InnerState
from metahpo.runner import (
    load_checkpoint,
    meta_loss,
    results_header,
    results_schedules,
    save_checkpoint,
    seed_everything,
    write_outputs,
)
from metahpo.schedule import HyperSchedule
from metahpo.validation import check_node

log = logging.getLogger("metahpo")


def search_budget(cfg: DictConfig, setup: Setup) -> tuple[int, str]:
    """The search's budget in inner-step equivalents, and how it was set."""
    if cfg.search.budget is not None:
        return int(cfg.search.budget), "search.budget"
    from metahpo.estimators.auto import gradient_evaluations

    per_run, modelled = gradient_evaluations(setup.estimator, setup.schedule)
    runs, horizon = int(cfg.outer.budget), int(cfg.horizon)
    return (runs - 1) * per_run + horizon, (
        f"outer.budget={runs} inner runs of estimator={modelled}: {runs - 1} estimates x "
        f"{per_run} gradient evaluations + one plain score of {horizon} steps"
    )


def rungs(pruner: DictConfig | None, horizon: int) -> list[int]:
    """Inner steps after which a trial reports its validation loss: the pruner's rungs
    ``min_resource x reduction_factor^k`` below the horizon (none without a pruner)."""
    if pruner is None:
        return []
    step, factor, out = int(pruner.min_resource), int(pruner.reduction_factor), []
    while step < horizon:
        out.append(step)
        step *= factor
    return out


def propose(trial: Any, schedule: HyperSchedule, space: str) -> HyperSchedule:
    """The schedule of an Optuna trial: every learned raw value (``space=schedule``, parameters
    ``<key>/<index>``: segments, knots, a family's values) or one value per learned key
    (``constant``; a key whose raw values have different bounds, such as ``warmup_cosine``'s,
    keeps one per raw value) drawn in its raw bounds; keys that are not learned keep their
    values."""
    values = {}
    for key in schedule.learned:
        lo, hi = (b.tolist() for b in schedule.raw_bounds(key))
        n = len(lo)
        if space == "constant" and len(set(lo)) == len(set(hi)) == 1:
            drawn = [trial.suggest_float(key, lo[0], hi[0])] * n
        else:
            drawn = [trial.suggest_float(f"{key}/{i}", lo[i], hi[i]) for i in range(n)]
        values[key] = torch.tensor(drawn, dtype=torch.float64)
    return schedule.replace(values)


def search(
    cfg: DictConfig, output_dir: str | Path | None = None, *, task: Task | None = None
) -> dict[str, Any]:
    """Run the configured search (``cfg.search``), retrain its best schedule and the baseline
    on the final seeds, return (and write into ``output_dir``) results.json's dict.

    Deterministic: the sampler is seeded from ``seed`` and every trial trains on the inner
    seed ``seed`` (as the hypergradient run's estimates do).

    Raises:
        ConfigError: a bad config, before any training.
        DivergenceError: every completed trial diverged; results.json still holds the trials.
    """
    import optuna

    if distributed.world_size() > 1:
        raise ConfigError(
            f"search={cfg.search.name} runs in one process; launch it without torchrun"
        )
    out_dir = Path(output_dir) if output_dir is not None else None
    seed_everything(int(cfg.seed))
    if out_dir is not None:
        check_writable(out_dir, "hydra.run.dir")
    setup = build(cfg, objects=Objects(task=task))
    budget, how = search_budget(cfg, setup)
    if out_dir is not None:
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    name = str(cfg.search.name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = _instantiate(cfg.search.sampler, "search.sampler")
    pruner = cfg.search.pruner
    study = optuna.create_study(
        study_name=f"metahpo-{name}-s{cfg.seed}",  # Hyperband's brackets hash it: fixed
        direction="minimize",
        sampler=sampler,
        pruner=_instantiate(pruner, "search.pruner") if pruner is not None else None,
    )
    setup.logger.start(
        OmegaConf.to_container(cfg, resolve=True),
        f"{name}-{setup.task.name}-s{cfg.seed}",
        out_dir,
        tags=[name, setup.task.name, "search"],
    )
    started, wall_before = time.perf_counter(), 0.0
    trials = _Trials(setup, rungs(pruner, int(cfg.horizon)))
    own = out_dir / "checkpoint.pt" if out_dir is not None else None
    if cfg.resume or (own is not None and own.is_file()):
        where = Path(str(cfg.resume)) if cfg.resume else own
        # an outer loop's checkpoint differs in search.name: the fingerprint check rejects it
        ckpt = load_checkpoint(where, cfg, own_dir=not cfg.resume)  # type: ignore[arg-type]
        study, wall_before = ckpt["study"], float(ckpt["wall_seconds"])
        trials.history, trials.rejections = ckpt["history"], ckpt["rejections"]
        trials.spent, trials.best = ckpt["spent"], ckpt["best"]
        set_rng_states(ckpt["rng"])
        log.info("resumed from %s after %d trials", where, len(trials.history))

    def checkpoint() -> None:
        if out_dir is not None:
            save_checkpoint(
                out_dir / "checkpoint.pt",
                cfg,
                {
                    "study": study,
                    "history": trials.history,
                    "rejections": trials.rejections,
                    "spent": trials.spent,
                    "best": trials.best,
                    "wall_seconds": wall_before + time.perf_counter() - started,
                    "rng": rng_states(),
                },
            )

    results: dict[str, Any] = {}
    files: list[Path] = []
    failed = True
    bar = tqdm(
        total=budget,
        initial=trials.spent,
        desc=f"{name} on {setup.task.name}",
        unit="step",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        while trials.spent + setup.schedule.horizon <= budget:
            start = time.perf_counter()  # the sampler's time counts towards the trial's
            trial = study.ask()
            schedule = propose(trial, setup.schedule, str(cfg.search.space))
            trials.run(study, trial, schedule, start)
            checkpoint()
            bar.update(trials.history[-1]["inner_steps"])
            if trials.best is not None:
                bar.set_postfix(best_meta_loss=f"{trials.best:.4f}", trials=len(trials.history))
        bar.close()
        best = min(trials.completed(), key=lambda h: h["meta_loss"], default=None)
        learned = None
        if best is not None:
            learned = setup.schedule.replace(
                {n: torch.tensor(v, dtype=torch.float64) for n, v in best["schedule"].items()}
            )
        final = None
        if learned is not None:
            final = final_evaluation(cfg, setup.task, learned, setup.baseline)
        message = None if learned is not None else "inner training diverged in every trial"
        history = trials.history
        results = {
            **results_header(cfg, setup, name),
            "stopped": "budget",
            "outer_steps": len(history),
            "rejected_steps": len(trials.rejections),
            "rejections": trials.rejections,
            "stop_message": message,
            "selected_outer_step": best["outer_step"] if best is not None else None,
            "outer_loop": None,
            "search": {
                "method": name,
                "sampler": str(cfg.search.sampler._target_),
                "pruner": str(pruner._target_) if pruner is not None else None,
                "space": str(cfg.search.space),
                "budget": budget,
                "budget_from": how,
                "spent": trials.spent,
                "trials": len(history),
                "completed": len(trials.completed()),
                "pruned": sum(1 for h in history if h.get("pruned")),
                "diverged": len(trials.rejections),
                "rungs": trials.rungs,
            },
            "learned_schedule": learned.to_dict() if learned is not None else None,
            **results_schedules(cfg, setup),
            "history": history,
            "final": final,
            "estimator_seconds": sum(h["seconds"] for h in history),
            "estimator_peak_memory_mb": None,
            "wall_time_seconds": wall_before + time.perf_counter() - started,
        }
        files = write_outputs(out_dir, results, setup, learned)
        if message is not None:
            raise DivergenceError(message)
        failed = False
    finally:
        setup.logger.finish(results, files, failed=failed)
    return results


class _Trials:
    """The trials of one search: each a plain inner run, told to the study, in ``history``;
    ``spent`` counts their inner steps (a pruned trial's up to where it stopped)."""

    def __init__(self, setup: Setup, rungs: list[int]) -> None:
        self.setup, self.rungs = setup, rungs
        self.probe = FlatTask(setup.task)  # evaluates the validation loss at the rungs
        self.history: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.spent = 0
        self.best: float | None = None

    def completed(self) -> list[dict[str, Any]]:
        return [h for h in self.history if h["meta_loss"] is not None]

    def run(self, study: Any, trial: Any, schedule: HyperSchedule, start: float) -> None:
        """Train ``schedule`` as ``trial`` of ``study``, tell the study its outcome, record it
        (``seconds`` since ``start``)."""
        import optuna
        from optuna.trial import TrialState

        ran = 0
        reports: dict[str, float] = {}

        def on_step(t: int, before: InnerState, after: InnerState, batch: Any) -> None:
            nonlocal ran
            ran = t + 1
            if ran in self.rungs:
                loss = self.probe.evaluate(after, "val")["loss"]
                reports[str(ran)] = loss
                trial.report(loss if math.isfinite(loss) else math.inf, ran)
                if not math.isfinite(loss) or trial.should_prune():
                    raise optuna.TrialPruned()

        values = {n: v.tolist() for n, v in schedule.values.items()}
        entry: dict[str, Any] = {"outer_step": trial.number, "meta_loss": None}
        try:
            scores = meta_loss(self.setup.task, schedule, on_step)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            entry.update(val_accuracy=None, pruned=True)
        except DivergenceError as e:
            study.tell(trial, state=TrialState.FAIL)
            entry.update(val_accuracy=None, diverged=True)
            self.rejections.append(
                {"outer_step": trial.number, "reason": str(e), "schedule": values}
            )
        else:
            study.tell(trial, scores["meta_loss"])
            entry.update(scores)
            loss = float(scores["meta_loss"])  # type: ignore[arg-type]
            self.best = loss if self.best is None else min(self.best, loss)
        self.spent += ran
        entry.update(
            hypergradient=None,
            seconds=time.perf_counter() - start,
            inner_steps=ran,
            spent=self.spent,
            best_meta_loss=self.best,
            schedule=values,
            **({"reports": reports} if reports else {}),
        )
        self.history.append(entry)
        self.setup.logger.log(
            trial.number,
            {k: entry[k] for k in ("meta_loss", "best_meta_loss", "spent") if entry[k] is not None},
        )


def check_search(search: dict[str, Any], horizon: int, outer: dict[str, Any]) -> None:
    """Raise ConfigError (one line) for a search's bad plugins, budget or seeds (compose calls
    this before any training)."""
    for key in ("sampler", "pruner"):
        node = search[key]
        if node is None and key == "pruner":
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(f"search.{key}._target_ is missing: name an Optuna {key}'s class")
        check_node(f"search.{key}", node)
    pruner = search["pruner"]
    if pruner is not None and not all(k in pruner for k in ("min_resource", "reduction_factor")):
        raise ConfigError(
            f"search.pruner._target_={pruner['_target_']!r}: set search.pruner.min_resource "
            "and reduction_factor (the inner steps where trials report: min_resource x "
            "reduction_factor^k); HyperbandPruner and SuccessiveHalvingPruner take them"
        )
    budget = search["budget"]
    if budget is not None and budget < horizon:
        raise ConfigError(
            f"search.budget={budget} must be an integer >= {horizon} (one inner run of "
            f"horizon={horizon} steps) or null (the hypergradient run's)"
        )
    if budget is None and outer["budget"] is None:
        raise ConfigError(
            "search.budget=null matches the hypergradient run's outer.budget, which is null: "
            "set search.budget (inner-step equivalents) or outer.budget"
        )
    if outer["seeds"] != 1:
        raise ConfigError(
            f"outer.seeds={outer['seeds']}: a search scores each trial on one inner seed (seed); "
            "set outer.seeds=1"
        )
