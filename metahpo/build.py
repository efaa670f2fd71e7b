"""From a validated config to the objects of a run: task, schedules, estimator, optimiser, logger.

Plugins are named by ``_target_``, so a user's own estimator or task (in their own package) is a
new YAML file; nothing is registered anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from metahpo import distributed
from metahpo.core import ConfigError, HypergradientEstimator, Task
from metahpo.device import resolve_device, resolve_dtype
from metahpo.loggers import LoggerGroup, NullLogger
from metahpo.schedule import (
    HYPERPARAMETERS,
    HyperSchedule,
    HyperSpec,
    constant_schedule,
    cosine_schedule,
)


def _instantiate(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        # Hydra's import errors span lines ("Error loading 'x':", the cause, a hint): join them.
        lines = [ln.strip() for ln in str(cause or e).strip().splitlines() if ln.strip()]
        if not lines:
            lines = [type(cause or e).__name__]
        detail = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        raise ConfigError(
            f"{key}._target_={cfg.get('_target_')!r} could not be built: {detail}"
        ) from None


def schedule_from_config(cfg: DictConfig, horizon: int) -> HyperSchedule:
    """The schedule the outer loop starts from (``cfg`` is the ``schedule`` group)."""
    specs, values = {}, {}
    for name in HYPERPARAMETERS:
        c = cfg[name]
        specs[name] = HyperSpec(int(c.segments), (float(c.bounds[0]), float(c.bounds[1])), c.learn)
        init = c.init
        values[name] = (
            [float(v) for v in init] if not isinstance(init, int | float) else float(init)
        )
    return HyperSchedule(horizon, specs, values)


def baseline_from_config(cfg: DictConfig, horizon: int) -> HyperSchedule:
    """The hand-tuned schedule each run is compared with (``cfg`` is ``baseline``)."""
    values = {n: float(cfg[n]) for n in HYPERPARAMETERS}
    if cfg.lr_decay == "cosine":
        return cosine_schedule(horizon, **values)
    return constant_schedule(horizon, **values)


def _loggers(cfg: DictConfig) -> Any:
    """The ``logger`` group: one logger per entry (``{wandb: {...}, csv: {...}}``), a
    :class:`LoggerGroup` when several, :class:`NullLogger` when none; a node with its own
    ``_target_`` is one logger (a user's file in the older, flat form)."""
    if "_target_" in cfg:
        return _instantiate(cfg, "logger")
    made = [_instantiate(cfg[name], f"logger.{name}") for name in cfg]
    if not made:
        return NullLogger()
    return made[0] if len(made) == 1 else LoggerGroup(made)


@dataclass
class Setup:
    task: Task
    schedule: HyperSchedule
    baseline: HyperSchedule
    estimator: HypergradientEstimator
    optimizer: Any
    logger: Any


def build(cfg: DictConfig, *, seed: int | None = None) -> Setup:
    """Instantiate everything a run needs; raises ConfigError before any training."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    make_task = _instantiate(cfg.task, "task")
    try:
        task = make_task(seed=cfg.seed if seed is None else seed, device=device, dtype=dtype)
    except TypeError as e:
        raise ConfigError(f"task: {e}") from None
    estimator = _instantiate(cfg.estimator, "estimator")
    if not callable(getattr(estimator, "hypergradient", None)):
        raise ConfigError(
            f"estimator._target_={cfg.estimator._target_!r} has no hypergradient(task, schedule)"
        )
    schedule = schedule_from_config(cfg.schedule, cfg.horizon)
    # Settings that depend on the schedule (a window longer than the horizon...): an optional
    # ``check(schedule)`` on the estimator, so they fail here rather than at the first estimate.
    if callable(getattr(estimator, "check", None)):
        estimator.check(schedule)
    distributed.check(task, estimator, str(getattr(estimator, "name", cfg.estimator._target_)))
    optimizer = _instantiate(cfg.outer.optimizer, "outer.optimizer")
    # In a data-parallel run only rank 0 tracks the run.
    logger = _loggers(cfg.logger) if distributed.is_main() else NullLogger()
    return Setup(
        task=task,
        schedule=schedule,
        baseline=baseline_from_config(cfg.baseline, cfg.horizon),
        estimator=estimator,
        optimizer=optimizer,
        logger=logger,
    )
