"""Experiment trackers: a no-op one and Weights & Biases, which can never stop or lose a run.

Both have one interface, called by :func:`metahpo.run` and by ``metahpo-compare``:
``start(config, name, output_dir, tags)``, ``log(step, metrics)`` per outer step,
``media(images, tables)``, and ``finish(results, files, failed)``, which always runs.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from metahpo import results as results_lib
from metahpo.core import ConfigError

log = logging.getLogger("metahpo")

MODES = ("online", "offline", "disabled")
# A table for ``media``: column names and rows.
Table = tuple[Sequence[str], Sequence[Sequence[Any]]]


def step_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """One history entry as flat scalars: meta-loss, validation accuracy, seconds, peak memory,
    the hypergradient's norm (``hypergrad_norm/<key>``) and values (``hypergrad/<key>/<i>``)
    per schedule key, and the value of every segment (``<key>/<i>``)."""
    m = {
        k: entry[k]
        for k in ("meta_loss", "val_accuracy", "seconds", "peak_memory_mb")
        if entry.get(k) is not None
    }
    for n, g in (entry.get("hypergradient") or {}).items():
        m[f"hypergrad_norm/{n}"] = math.sqrt(sum(x * x for x in g))
        m.update({f"hypergrad/{n}/{i}": x for i, x in enumerate(g)})
    for n, vals in entry["schedule"].items():
        m.update({f"{n}/{i}": v for i, v in enumerate(vals)})
    return m


class NullLogger:
    """Logs nothing; the run directory still gets results.json and plots."""

    def start(
        self,
        config: dict[str, Any],
        name: str,
        output_dir: Path | None,
        tags: Sequence[str] = (),
        job_type: str = "train",
        group: str | None = None,
    ) -> None:
        pass

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def media(self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None) -> None:
        pass

    def finish(
        self,
        results: dict[str, Any] | None = None,
        files: Sequence[Path] = (),
        failed: bool = False,
    ) -> None:
        pass


def resolve_mode(mode: str | None) -> tuple[str, str]:
    """The W&B mode to use and why: ``logger.mode`` when set; else ``WANDB_MODE``; else
    ``online`` when an API key is available, ``offline`` when not.

    Raises:
        ConfigError: ``logger.mode`` or ``WANDB_MODE`` is not one of online, offline, disabled.
    """
    if mode is not None:
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        return mode, "logger.mode"
    env = os.environ.get("WANDB_MODE")
    if env:
        env = {"dryrun": "offline", "run": "online"}.get(env, env)  # wandb's old names
        if env not in MODES:
            raise ConfigError(f"WANDB_MODE={env!r} is unknown; allowed: {', '.join(MODES)}")
        return env, "WANDB_MODE"
    if _has_api_key():
        return "online", "API key"
    return "offline", "no API key found"


def _has_api_key() -> bool:
    """``WANDB_API_KEY`` is set, or the netrc file has an entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return host is not None and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun: its sweep directory's last two path parts
    (``multirun/2026-11-22/01-29-02`` -> ``2026-11-22-01-29-02``), shared by all its jobs."""
    path = Path(sweep_dir).resolve()
    return f"{path.parent.name}-{path.name}" if path.parent.name else path.name


def _hydra_sweep_dir() -> str | None:
    """The sweep directory when this process runs a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


class WandbLogger:
    """One W&B run per metahpo run: the resolved config; per outer step the metrics of
    :func:`step_metrics`; at the end the plots as images, the learned schedule as a table and
    the headline numbers (:func:`metahpo.results.summary`) as the run summary.

    A failing W&B call (no network, a bad key, a full disk) never stops or loses the run: the
    first failure is reported in one warning, W&B is left alone for the rest of the run
    (apart from one silent attempt to finish it), and results.json is written as always.

    Args:
        project: W&B project; ``None``: ``WANDB_PROJECT``, else ``metahpo``.
        entity: team or user; ``None``: ``WANDB_ENTITY``, else your default entity.
        mode: ``online``, ``offline`` (``wandb sync`` uploads later) or ``disabled``;
            ``None``: ``WANDB_MODE``, else online with an API key and offline without.
        group: group of runs; ``None``: ``WANDB_RUN_GROUP``, else in a multirun the sweep
            directory's name (:func:`sweep_group`), so a sweep's runs are side by side.
        tags: extra tags (``[]``: ``WANDB_TAGS``, comma-separated); the estimator and task
            names are always added.
        dir: where W&B writes its files; ``None``: the run's output directory.
    """

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        mode: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        dir: str | None = None,
    ) -> None:
        self.mode, self.mode_reason = resolve_mode(mode)
        self.project = project or os.environ.get("WANDB_PROJECT") or "metahpo"
        self.entity = entity
        self.group = group or os.environ.get("WANDB_RUN_GROUP") or None
        env_tags = os.environ.get("WANDB_TAGS", "")
        self.tags = list(tags) or [t.strip() for t in env_tags.split(",") if t.strip()]
        self.dir = dir
        self.run: Any = None
        self.broken = False
        self.where = "the run directory"

    def start(
        self,
        config: dict[str, Any],
        name: str,
        output_dir: Path | None,
        tags: Sequence[str] = (),
        job_type: str = "train",
        group: str | None = None,
    ) -> None:
        """Start the W&B run (closing any previous one of this process, as in a sweep).

        Args:
            config: logged as the run's config.
            name: the run's display name.
            output_dir: where W&B writes unless ``dir`` was given.
            tags: added to the configured tags.
            job_type: W&B job type (``train``; ``compare`` for metahpo-compare).
            group: the group when neither ``group`` nor ``WANDB_RUN_GROUP`` names one;
                ``None``: in a Hydra multirun, its sweep directory's name.
        """
        self.broken, self.run = False, None
        self.where = str(output_dir) if output_dir else "the dict metahpo.run returns"
        if group is None and (sweep_dir := _hydra_sweep_dir()) is not None:
            group = sweep_group(sweep_dir)
        group = self.group or group
        directory = self.dir or (str(output_dir) if output_dir else None)

        def init() -> Any:
            import wandb

            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.project,
                entity=self.entity,
                mode=self.mode,
                group=group,
                tags=list(dict.fromkeys([*self.tags, *tags])),
                job_type=job_type,
                name=name,
                config=config,
                dir=directory,
                reinit="finish_previous",
            )
            if self.mode == "offline":
                why = f" ({self.mode_reason})" if self.mode_reason == "no API key found" else ""
                log.info("wandb: offline%s; upload with `wandb sync %s`", why, Path(run.dir).parent)
            return run

        self.run = self._call("init", init)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one outer step's scalars at W&B step ``step``."""
        if self.run is not None:
            self._call("log", self.run.log, metrics, step=step)

    def media(self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None) -> None:
        """Log PNGs as images (``plots/<file stem>``) and tables (``name: (columns, rows)``)."""
        if self.run is None or self.broken:
            return

        def send() -> None:
            import wandb

            data: dict[str, Any] = {
                f"plots/{p.stem}": wandb.Image(str(p))
                for p in images
                if p.suffix == ".png" and p.is_file()
            }
            for key, (columns, rows) in (tables or {}).items():
                data[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            if data:
                self.run.log(data)

        self._call("media", send)

    def finish(
        self,
        results: dict[str, Any] | None = None,
        files: Sequence[Path] = (),
        failed: bool = False,
    ) -> None:
        """Log the plots, the learned schedule and the summary; finish the W&B run.

        Args:
            results: the run's results dict (empty or None when the run failed early).
            files: files the run wrote; PNGs among them are logged as images.
            failed: the run raised; W&B marks it failed (exit code 1).
        """
        if self.run is None:
            return
        if results and results.get("learned_schedule"):
            rows = self._call("table", results_lib.schedule_rows, results)
            self.media(files, {"tables/learned_schedule": rows} if rows else None)
        else:
            self.media(files)
        if results:
            self._call("summary", lambda: self.run.summary.update(results_lib.summary(results)))
        run, self.run = self.run, None
        if self.broken:  # release W&B's process; its failure was reported already
            try:
                run.finish(exit_code=1)
            except Exception as e:
                log.debug("wandb finish after an earlier failure: %s", e)
        else:
            self._call("finish", run.finish, exit_code=1 if failed else 0)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, unless W&B failed before; a failure warns once, never raises."""
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.broken = True
            cause = str(e).strip().splitlines()
            log.warning(
                "W&B %s failed (%s%s); W&B logging is off for the rest of this run, "
                "results stay in %s",
                what,
                type(e).__name__,
                f": {cause[0]}" if cause else "",
                self.where,
            )
            return None
