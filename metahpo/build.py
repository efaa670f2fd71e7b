"""From a validated config to the objects of a run: task, schedules, estimator, optimiser, logger.

Plugins are named by ``_target_``, so a user's own estimator or task (in their own package) is a
new YAML file; nothing is registered anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metahpo import distributed
from metahpo.core import ConfigError, HypergradientEstimator, Task
from metahpo.device import DTYPES, resolve_device, resolve_dtype, set_threads
from metahpo.inner import resolve_groups
from metahpo.loggers import LoggerGroup, NullLogger
from metahpo.optim import InnerOptimizer
from metahpo.schedule import (
    HyperSchedule,
    constant_schedule,
    cosine_schedule,
)
from metahpo.schedule_config import schedule_from_config


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
        if "ModuleNotFoundError" in detail:  # a user's own package that is not on sys.path
            detail += (
                "; make its package importable: run from the directory that holds it "
                "(the metahpo command adds it), pip install -e it, or set PYTHONPATH"
            )
        raise ConfigError(
            f"{key}._target_={cfg.get('_target_')!r} could not be built: {detail}"
        ) from None


def optimizer_from_config(cfg: DictConfig) -> InnerOptimizer:
    """The inner optimiser (``cfg`` is the ``optimizer`` group; its ``baseline`` is not an
    argument of the class)."""
    args = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "baseline"])
    optimizer = _instantiate(args, "optimizer")
    if not isinstance(optimizer, InnerOptimizer):
        raise ConfigError(
            f"optimizer._target_={cfg._target_!r} is not a metahpo.optim.InnerOptimizer"
        )
    return optimizer


def baseline_from_config(
    cfg: DictConfig,
    horizon: int,
    optimizer: InnerOptimizer | None = None,
    own: DictConfig | None = None,
) -> HyperSchedule:
    """The hand-tuned schedule each run is compared with (``cfg`` is ``baseline``; ``own``,
    the optimiser config's ``baseline``, replaces its values when given)."""
    source = own if own is not None else cfg
    values = {str(n): float(v) for n, v in source.items() if n != "lr_decay"}
    if cfg.lr_decay == "cosine":
        return cosine_schedule(horizon, optimizer, **values)
    return constant_schedule(horizon, optimizer, **values)


def baseline_config(cfg: DictConfig) -> dict[str, Any]:
    """The baseline's settings in effect: ``optimizer.baseline`` when given, else ``baseline``
    (with ``baseline.lr_decay`` either way); what ``results.json`` records."""
    own = cfg.optimizer.get("baseline")
    base = OmegaConf.to_container(cfg.baseline, resolve=True)
    assert isinstance(base, dict)
    if own is None:
        return base
    values = OmegaConf.to_container(own, resolve=True)
    assert isinstance(values, dict)
    return {**values, "lr_decay": base["lr_decay"]}


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


@dataclass(frozen=True)
class Objects:
    """Plugins a Python caller already holds; each replaces what its config key would build
    (``metahpo.run(task=..., estimator=..., outer=...)``)."""

    task: Task | None = None
    estimator: HypergradientEstimator | None = None
    outer: Any = None

    def described(self) -> dict[str, Any]:
        """``{config key: node}`` recording each object by its class and ``name`` (in
        results.json and the checkpoint's fingerprint)."""
        out = {}
        for key, obj in (("task", self.task), ("estimator", self.estimator)):
            if obj is not None:
                out[key] = {"_target_": _class_path(obj), "name": str(getattr(obj, "name", ""))}
        if self.outer is not None:
            out["outer.optimizer"] = {"_target_": _class_path(self.outer)}
        return out


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def with_objects(cfg: DictConfig | Sequence[str] | None, objects: Objects) -> DictConfig:
    """The validated config of a run with ``objects``: composed from overrides when ``cfg`` is
    not a config; a task object's seed, device and dtype set in it; each object's node replaced
    by its description (:meth:`Objects.described`)."""
    from metahpo.config import compose, validate

    if cfg is None or not isinstance(cfg, DictConfig):
        if isinstance(cfg, str):
            raise ConfigError(f"cfg={cfg!r}: pass a list of overrides, a DictConfig or None")
        cfg = compose(list(cfg or ()))
    if objects.task is not None:
        task = objects.task
        if not isinstance(task, Task):
            raise ConfigError(f"task={type(task).__name__} object is not a metahpo Task")
        names = {v: k for k, v in DTYPES.items()}
        if task.dtype not in names:
            raise ConfigError(f"task.dtype={task.dtype} is unknown; allowed: {', '.join(DTYPES)}")
        cfg = OmegaConf.merge(
            cfg, {"seed": int(task.seed), "device": str(task.device), "dtype": names[task.dtype]}
        )  # type: ignore[assignment]
    if objects.estimator is not None and not callable(
        getattr(objects.estimator, "hypergradient", None)
    ):
        raise ConfigError(
            f"estimator={type(objects.estimator).__name__} object has no "
            "hypergradient(task, schedule)"
        )
    validate(cfg)
    described = objects.described()
    if not described:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, node in described.items():
            OmegaConf.update(cfg, key, node, merge=False)
    return cfg


@dataclass
class Setup:
    task: Task
    schedule: HyperSchedule
    baseline: HyperSchedule
    estimator: HypergradientEstimator
    optimizer: Any
    logger: Any


def build(cfg: DictConfig, *, seed: int | None = None, objects: Objects | None = None) -> Setup:
    """Instantiate everything a run needs (but ``objects``); raises ConfigError before any
    training."""
    objects = objects or Objects()
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    set_threads(cfg.get("threads"))
    if objects.task is not None:
        task = objects.task if seed is None else objects.task.with_seed(seed)
    else:
        make_task = _instantiate(cfg.task, "task")
        try:
            task = make_task(seed=cfg.seed if seed is None else seed, device=device, dtype=dtype)
        except ConfigError:
            raise
        except TypeError as e:
            raise ConfigError(f"task: {e}") from None
        except (ValueError, RuntimeError, OSError, LookupError) as e:
            # an error the task did not phrase (a library's words): one line naming the task
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"task._target_={cfg.task._target_!r} could not be built with these task.* "
                f"settings: {type(e).__name__}: {first}"
            ) from e
    estimator = objects.estimator
    if estimator is None:
        estimator = _instantiate(cfg.estimator, "estimator")
    if not callable(getattr(estimator, "hypergradient", None)):
        raise ConfigError(
            f"estimator._target_={cfg.estimator._target_!r} has no hypergradient(task, schedule)"
        )
    inner = optimizer_from_config(cfg.optimizer)
    from metahpo.estimators.auto import check_fits  # the memory model, one place

    check_fits(
        int(cfg.horizon), _n_keys(cfg.schedule), torch.empty((), dtype=dtype).itemsize, device
    )
    loss = getattr(task, "loss_hyperparameters", None) or {}
    plain = OmegaConf.to_container(cfg.schedule, resolve=True)
    assert isinstance(plain, dict)
    schedule = schedule_from_config(plain, cfg.horizon, inner, loss)
    # Parameter groups are matched against the task's parameter names now, before training.
    resolve_groups(schedule, *_names_and_sizes(task))
    # Settings that depend on the schedule (a window longer than the horizon...): an optional
    # ``check(schedule)`` on the estimator, so they fail here rather than at the first estimate.
    if callable(getattr(estimator, "check", None)):
        estimator.check(schedule)
    distributed.check(task, estimator, str(getattr(estimator, "name", cfg.estimator._target_)))
    optimizer = objects.outer
    if optimizer is None:
        optimizer = _instantiate(cfg.outer.optimizer, "outer.optimizer")
    # In a data-parallel run only rank 0 tracks the run.
    logger = _loggers(cfg.logger) if distributed.is_main() else NullLogger()
    return Setup(
        task=task,
        schedule=schedule,
        baseline=baseline_from_config(
            cfg.baseline, cfg.horizon, inner, cfg.optimizer.get("baseline")
        ),
        estimator=estimator,
        optimizer=optimizer,
        logger=logger,
    )


def _n_keys(cfg: DictConfig) -> int:
    """Schedule keys the ``schedule`` group makes (one per group of a grouped entry)."""
    return sum(len(c.groups) if c.get("groups") else 1 for c in cfg.values())


def _names_and_sizes(task: Task) -> tuple[list[str], list[int]]:
    params, _ = task.init_params()
    return list(params), [p.numel() for p in params.values()]
