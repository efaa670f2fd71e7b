"""Configuration: where the Hydra configs live, composing them, and one-line validation.

Everything a user can get wrong is checked here before any training starts, and reported as a
:class:`ConfigError` whose message names the key and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import Field, StringConstraints

from metahpo.core import ConfigError
from metahpo.optim import Hyperparameter, InnerOptimizer
from metahpo.schedule_config import schedule_from_config
from metahpo.validation import (
    Accept,
    Allowed,
    Node,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Tolerance,
    check_arguments,
    check_model,
    check_node,
)

GROUPS = ("task", "estimator", "optimizer", "schedule", "outer", "logger", "search", "experiment")


def config_dir() -> Path:
    """The shipped configs: ``metahpo/configs`` in a wheel, ``configs/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"metahpo's configs are missing (looked in {here} and its parent)")


def options(group: str, extra: Sequence[Path] = ()) -> list[str]:
    """Names selectable for a config group (``estimator`` -> ``["forward", ...]``), also from
    the config directories ``extra`` (a user's own: :func:`search_dirs`)."""
    dirs = [config_dir(), *extra]
    return sorted({p.stem for d in dirs for p in (Path(d) / group).glob("*.yaml")})


def search_dirs(overrides: Sequence[str]) -> list[Path]:
    """The directories a ``hydra.searchpath=[file://...,pkg://...]`` override adds (those that
    exist; Hydra itself reports the others)."""
    import importlib.util

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    dirs: list[Path] = []
    for o in overrides:
        if not o.lstrip("+~").startswith("hydra.searchpath="):
            continue
        try:
            (parsed,) = OverridesParser.create().parse_overrides([o])
        except HydraException:
            continue
        value = parsed.value()
        for entry in value if isinstance(value, list) else [value]:
            scheme, _, rest = str(entry).rpartition("://")
            if scheme == "pkg":
                try:
                    spec = importlib.util.find_spec(rest.replace("/", "."))
                except (ImportError, ValueError):
                    spec = None
                dirs += [Path(p) for p in (spec and spec.submodule_search_locations) or []]
            elif scheme in ("file", ""):
                dirs.append(Path(rest).expanduser().resolve())
    return [d for d in dirs if d.is_dir()]


def check_overrides(overrides: Sequence[str]) -> None:
    """Reject unknown group options (``estimator=nope``) and unparsable overrides in one line.

    Options in a user's own config directories (``hydra.searchpath``) are allowed too.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = list(overrides)
    extra = search_dirs(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if not o.startswith("-")]
        )
    except HydraException:
        for o in overrides:  # the one that does not parse, and why
            try:
                OverridesParser.create().parse_overrides([o])
            except HydraException as e:
                why = str(e).strip().splitlines()[0].strip()
                raise ConfigError(
                    f"{o} cannot be parsed ({why}); quote a value with special characters: "
                    "key='...'"
                ) from None
        raise
    for o in parsed:
        group = o.key_or_group
        if not group:
            raise ConfigError(f"{o.input_line!r} names no key; an override is key=value")
        if group not in GROUPS or o.is_delete() or o.package:
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        # several options at once (logger=[wandb,csv]): each must exist
        values = [x for v in values for x in (v if isinstance(v, list) else [v])]
        allowed = options(group, extra)
        for v in values:
            if v is None and group == "experiment":
                continue
            if str(v) not in allowed:
                raise ConfigError(f"{group}={v!r} is unknown; allowed: {', '.join(allowed)}")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config the CLI would build from the same overrides (``["estimator=forward"]``)."""
    check_overrides(overrides)
    cfg = _compose(list(overrides))
    validate(cfg)
    return cfg


def check_composes(overrides: Sequence[str]) -> None:
    """Compose and validate the first job of ``overrides`` (a sweep's first values).

    The CLI calls this before Hydra runs, so that a key missing from the config
    (``outer.nope=1``) is one line rather than Hydra's multi-line report, and a bad value stops
    before Hydra creates the run directory.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    first = []
    for o in OverridesParser.create().parse_overrides(
        [o for o in overrides if not o.startswith("-")]
    ):
        if o.is_hydra_override() and o.key_or_group != "hydra.searchpath":
            continue
        key = o.get_key_element()  # with its +, ++ or ~
        if o.is_delete():
            first.append(key)
        elif o.is_sweep_override():
            first.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        else:
            first.append(f"{key}={o.get_value_element_as_str()}")
    validate(_compose(first))


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            return hydra_compose("config", overrides=overrides)
    except HydraException as e:
        raise _one_line(e, overrides) from None
    except ValueError as e:  # Hydra's own checks of the defaults list
        raise ConfigError(f"could not compose the config: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def _one_line(error: Exception, overrides: list[str]) -> ConfigError:
    """Hydra's composition error as one line naming the key and the keys that do exist."""
    text = str(error)
    missing = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Could not (?:append to|delete from) config\. .*?'([^']+)'", text
    )
    if missing:
        key = missing.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if not o.lstrip("+~").startswith(key)]
        try:
            node = OmegaConf.select(_compose(rest), parent) if parent else _compose(rest)
        except ConfigError:
            node = None
        known = ", ".join(sorted(str(k) for k in node)) if isinstance(node, DictConfig) else ""
        where = f" under {parent}" if parent else ""
        # a plugin's own node: task, estimator, or one logger's entry (logger.wandb)
        top = parent.split(".")[0]
        plugin = leaf and (top in ("task", "estimator") or (top == "logger" and "." in parent))
        hint = f" (an argument the class accepts but the file omits: +{key}=...)" if plugin else ""
        if parent == "logger":  # the flat keys of before the logger group
            first = known.split(", ")[0] if known else "<tracker>"
            hint = f" (a tracker's keys are logger.<tracker>.<key>: logger.{first}.{leaf}=...)"
            if not known:
                hint += "; no tracker is selected: logger=wandb, tensorboard, csv or a list"
        known = known or "none"
        return ConfigError(f"{key} is not a key of this config; keys{where}: {known}{hint}")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return ConfigError(f"could not compose the config: {lines[0] if lines else type(error)}")


# -- validation -------------------------------------------------------------------------------
class _Outer(Node):
    optimizer: dict[str, Any]  # a plugin: checked against its class
    steps: NonNegativeInt
    stop_fraction: NonNegative
    clip: Annotated[Positive | None, Field(description="null: no clipping")]
    select: Literal["best", "last"]
    max_failures: PositiveInt
    accept: Accept
    tolerance: Annotated[
        Tolerance,
        Field(
            description="the meta-loss rise allowed over the best accepted one, as a fraction of it"
        ),
    ]
    seeds: Annotated[PositiveInt, Field(description="inner seeds averaged per outer step")]
    reduce: Annotated[
        Literal["mean", "max"],
        Field(description="how estimates and scores combine the seeds; max: the worst seed's"),
    ] = "mean"
    budget: Annotated[PositiveInt | None, Field(description="inner runs; null: no cap")]


class _Final(Node):
    seeds: Annotated[list[NonNegativeInt], at.MinLen(1)]
    lr_free: Annotated[
        list[Literal["schedulefree_sgd", "prodigy"]],
        Field(description="learning-rate-free optimisers retrained beside the baseline"),
    ] = []
    baseline_cache: Annotated[
        Annotated[str, at.MinLen(1)] | None, Allowed("auto, a directory or null (no cache)")
    ]


class _Search(Node):
    name: Annotated[Annotated[str, at.MinLen(1)] | None, Field(description="null: no search")]
    budget: Annotated[
        PositiveInt | None,
        Field(description="inner-step equivalents; null: the hypergradient run's outer.budget"),
    ]
    space: Literal["schedule", "constant"]
    sampler: dict[str, Any] | None  # plugins: checked against their classes
    pruner: dict[str, Any] | None


class _Distributed(Node):
    backend: Literal["auto", "gloo", "nccl"]
    timeout: Annotated[Positive, Field(description="seconds")]


class _Config(Node):
    """The keys metahpo itself reads; plugins' keys are checked against their classes."""

    seed: NonNegativeInt
    horizon: Annotated[PositiveInt, Field(description="inner steps per run")]
    device: Annotated[
        str,
        StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$"),
        Allowed("auto, cpu, cuda or cuda:N"),
    ]
    dtype: Literal["float32", "float64"]
    threads: Annotated[
        PositiveInt | None, Field(description="torch's CPU threads; null: torch's default")
    ]
    progress: bool
    resume: str | None
    final: _Final
    distributed: _Distributed
    outer: _Outer
    task: dict[str, Any]
    estimator: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    logger: dict[str, Any]
    baseline: dict[str, Any]
    search: _Search


def check_writable(path: str | Path, key: str) -> None:
    """Raise ConfigError unless ``path`` is (or can be made) a directory this process writes."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".metahpo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{key}={str(path)!r} is not a writable directory ({type(e).__name__}: "
            f"{e.strerror or e}); choose one you can write"
        ) from None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` with every interpolation resolved; ConfigError naming a key that cannot be."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split(".") if key else []:
            raw = raw.get(part) if isinstance(raw, dict) else raw
        reason = str(getattr(e, "msg", e)).strip().splitlines()
        raise ConfigError(
            f"{key or 'config'}={raw!r} cannot be resolved ({reason[0] if reason else type(e)}); "
            "an interpolation names an existing key, ${key} or ${oc.env:VAR,default}"
        ) from None
    assert isinstance(data, dict)
    return data


def validate(cfg: DictConfig) -> None:
    """Check every value the run depends on; raise ConfigError naming the first bad key.

    metahpo's own keys are typed by :class:`_Config`; every plugin's arguments by its own
    constructor's signature (:mod:`metahpo.validation`); relations between keys here.
    """
    for key in ("task", "estimator", "optimizer", "schedule", "outer", "logger", "baseline"):
        if OmegaConf.select(cfg, key, throw_on_resolution_failure=False) is None:
            raise ConfigError(f"{key} is missing from the config; pick one with {key}=<name>")
    data = resolved(cfg)
    for group in ("task", "estimator", "optimizer"):
        if isinstance(data.get(group), dict) and "_target_" not in data[group]:
            raise ConfigError(f"{group}._target_ is missing: a {group} config names its class")
    if isinstance(data.get("outer"), dict):
        node = data["outer"].get("optimizer")
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(
                "outer.optimizer._target_ is missing: name the outer optimiser's class"
            )
    check_model("", _Config, data)
    horizon = int(data["horizon"])
    optimizer = optimizer_class(cfg)
    check_arguments(
        "optimizer", optimizer, {k: v for k, v in data["optimizer"].items() if k != "baseline"}
    )
    check_node("task", data["task"])
    check_node("estimator", data["estimator"])
    check_node("outer.optimizer", data["outer"]["optimizer"])
    logger = data["logger"]
    if "_target_" in logger:  # a user's file in the older, flat form
        check_node("logger", logger)
    for name, node in ({} if "_target_" in logger else logger).items():
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(
                f"logger.{name}._target_ is missing: each entry of logger names its class"
            )
        check_node(f"logger.{name}", node)
    schedule_from_config(
        data["schedule"], horizon, optimizer, _loss_hyperparameters(data["task"]["_target_"])
    )
    _validate_baseline(cfg, optimizer)
    if data["search"]["name"] is not None:
        from metahpo.search import check_search  # it imports this module

        check_search(data["search"], horizon, data["outer"])
    decay = OmegaConf.select(cfg, "baseline.lr_decay")
    if decay not in ("constant", "cosine"):
        raise ConfigError(f"baseline.lr_decay={decay!r} is unknown; allowed: constant, cosine")
    outer = data["outer"]
    if outer["budget"] is not None and outer["budget"] < 2 * outer["seeds"]:
        raise ConfigError(
            f"outer.budget={outer['budget']} must be an integer >= {2 * outer['seeds']} or null "
            f"(inner runs; an outer step and a score take 2 x outer.seeds={outer['seeds']})"
        )


def optimizer_class(cfg: DictConfig) -> type[InnerOptimizer]:
    """The class ``optimizer._target_`` names (its hyperparameters are class attributes)."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "optimizer._target_")
    try:
        cls = get_class(str(target))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"optimizer._target_={target!r} could not be imported: {first}") from None
    if not (isinstance(cls, type) and issubclass(cls, InnerOptimizer)):
        raise ConfigError(f"optimizer._target_={target!r} is not a metahpo.optim.InnerOptimizer")
    return cls


def _loss_hyperparameters(target: str) -> dict[str, Hyperparameter]:
    """The training-loss hyperparameters the task class ``target`` declares (``{}``: none)."""
    from hydra.utils import get_class

    try:
        return dict(getattr(get_class(str(target)), "loss_hyperparameters", None) or {})
    except Exception:  # a factory function, or a class that fails later with its own line
        return {}


def _validate_baseline(cfg: DictConfig, optimizer: type[InnerOptimizer]) -> None:
    own = OmegaConf.select(cfg, "optimizer.baseline")
    where = "optimizer.baseline" if own is not None else "baseline"
    values = own if own is not None else cfg.baseline
    if not isinstance(values, DictConfig):
        shown = OmegaConf.to_container(values) if isinstance(values, ListConfig) else repr(values)
        raise ConfigError(f"{where}={shown} must be a mapping of hyperparameter values")
    for name in values:
        if own is None and name == "lr_decay":
            continue
        if name not in optimizer.hyperparameters:
            hint = "" if own is not None else " (set optimizer.baseline for this optimizer)"
            raise ConfigError(
                f"{where}.{name} is not a hyperparameter of the {optimizer.name} optimizer; "
                f"allowed: {', '.join(optimizer.hyperparameters)}{hint}"
            )
        if not _is_number(values[name]):
            raise ConfigError(
                f"{where}.{name}={values[name]!r} must be a number "
                f"{optimizer.hyperparameters[str(name)].domain()}".replace(" any number", "")
            )
        optimizer.check_value(f"{where}.{name}", str(name), float(values[name]))
