"""Experiment trackers: none, Weights & Biases, TensorBoard and CSV, alone or several at once
(:class:`LoggerGroup`); none of them can stop or lose a run.

All have one interface, called by :func:`metahpo.run` and by ``metahpo-compare``:
``start(config, name, output_dir, tags)``, ``log(step, metrics)`` per outer step,
``media(images, tables)``, and ``finish(results, files, failed)``, which always runs. At the
finish each logs :func:`metahpo.results.summary` (the selected schedule, its scores and the
final metrics) as its run summary and as one last history row, one step after the last outer
step, so a tracker's "last value" of ``meta_loss`` or ``lr/3`` is the learned schedule's.
"""

from __future__ import annotations

import csv
import logging
import math
import netrc
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
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
    m.update(results_lib.schedule_scalars(entry["schedule"]))
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
    """The W&B mode to use and why: ``logger.wandb.mode`` when set; else ``WANDB_MODE``; else
    ``online`` when an API key is available, ``offline`` when not.

    Raises:
        ConfigError: ``logger.wandb.mode`` or ``WANDB_MODE`` is not online, offline or disabled.
    """
    if mode is not None:
        if mode not in MODES:
            raise ConfigError(f"logger.wandb.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        return mode, "logger.wandb.mode"
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
        mode: Literal["online", "offline", "disabled"] | None = None,
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
        self.guard = _Guard("W&B")
        self.last_step = -1  # the largest step logged; the final row goes one after it

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
        self.run, self.last_step = None, -1
        self.guard.reset(output_dir)
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

        self.run = self.guard.call("init", init)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one outer step's scalars at W&B step ``step``."""
        self.last_step = max(self.last_step, step)
        if self.run is not None:
            self.guard.call("log", self.run.log, metrics, step=step)

    def _media_data(
        self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None
    ) -> dict[str, Any]:
        import wandb

        data: dict[str, Any] = {
            f"plots/{p.stem}": wandb.Image(str(p))
            for p in images
            if p.suffix == ".png" and p.is_file()
        }
        for key, (columns, rows) in (tables or {}).items():
            data[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        return data

    def media(self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None) -> None:
        """Log PNGs as images (``plots/<file stem>``) and tables (``name: (columns, rows)``)."""
        if self.run is None or self.guard.broken:
            return

        def send() -> None:
            data = self._media_data(images, tables)
            if data:
                self.run.log(data)

        self.guard.call("media", send)

    def finish(
        self,
        results: dict[str, Any] | None = None,
        files: Sequence[Path] = (),
        failed: bool = False,
    ) -> None:
        """Log the final row (the selected schedule, its scores and the final metrics, with the
        plots and the learned schedule's table) one step after the last outer step, set the
        same numbers as the run summary, and finish the W&B run.

        Args:
            results: the run's results dict (empty or None when the run failed early).
            files: files the run wrote; PNGs among them are logged as images.
            failed: the run raised; W&B marks it failed (exit code 1).
        """
        if self.run is None:
            return
        tables = None
        if results and results.get("learned_schedule"):
            rows = self.guard.call("table", results_lib.schedule_rows, results)
            tables = {"tables/learned_schedule": rows} if rows else None
        summary = results_lib.summary(results) if results else {}

        def final_row() -> None:
            data = {**summary, **self._media_data(files, tables)}
            if data:
                self.run.log(data, step=self.last_step + 1)

        self.guard.call("final row", final_row)
        if summary:
            # W&B's own summary keeps each key's last logged value; set it all explicitly
            self.guard.call("summary", lambda: self.run.summary.update(summary))
        run, self.run = self.run, None
        self.last_step = -1
        if self.guard.broken:  # release W&B's process; its failure was reported already
            try:
                run.finish(exit_code=1)
            except Exception as e:
                log.debug("wandb finish after an earlier failure: %s", e)
        else:
            self.guard.call("finish", run.finish, exit_code=1 if failed else 0)


def _schedule_table(results: dict[str, Any] | None) -> dict[str, Table] | None:
    """``tables/learned_schedule`` when the run learned a schedule."""
    if not results or not results.get("learned_schedule"):
        return None
    return {"tables/learned_schedule": results_lib.schedule_rows(results)}


def _numbers_only(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are real numbers (TensorBoard scalars), as floats."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def _log_dir(own: str | None, output_dir: Path | None, sub: str, name: str) -> Path:
    """``own/name`` when a directory was configured, else ``output_dir/sub``, else
    ``./sub/name``."""
    if own:
        return Path(own) / name
    return output_dir / sub if output_dir is not None else Path(sub) / name


class TensorBoardLogger:
    """TensorBoard event files written by torch's ``SummaryWriter``: the config as text; per
    outer step every scalar of :func:`step_metrics`; at the end the summary (the selected
    schedule, its scores, the final metrics) as one last step of scalars and as
    ``summary/<key>`` text, and the plots as images. A failure warns once, never raises.

    Args:
        dir: parent directory of the event files (a subdirectory per run name); ``None``:
            ``<run dir>/tensorboard``.
    """

    def __init__(self, dir: str | None = None) -> None:
        self.dir = dir
        self.writer: Any = None
        self.last_step = -1
        self.guard = _Guard("TensorBoard")

    def start(
        self,
        config: dict[str, Any],
        name: str,
        output_dir: Path | None,
        tags: Sequence[str] = (),
        job_type: str = "train",
        group: str | None = None,
    ) -> None:
        self.last_step, self.writer = -1, None
        self.guard.reset(output_dir)

        def open_writer() -> Any:
            import yaml
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(_log_dir(self.dir, output_dir, "tensorboard", name)))
            text = yaml.safe_dump(config, sort_keys=False)
            writer.add_text("config", "```\n" + text + "```")
            if tags:
                writer.add_text("tags", ", ".join(tags))
            return writer

        self.writer = self.guard.call("start", open_writer)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.last_step = max(self.last_step, step)
        if self.writer is not None:
            self.guard.call("log", self._scalars, step, metrics)

    def _scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in _numbers_only(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)

    def media(self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None) -> None:
        """PNGs as images (``plots/<file stem>``), tables as markdown text."""
        if self.writer is None:
            return

        def send() -> None:
            import matplotlib.image

            step = self.last_step + 1
            for p in images:
                if p.suffix == ".png" and p.is_file():
                    image = matplotlib.image.imread(str(p))[..., :3]
                    self.writer.add_image(f"plots/{p.stem}", image, step, dataformats="HWC")
            for key, (columns, rows) in (tables or {}).items():
                lines = ["| " + " | ".join(map(str, columns)) + " |", "|---" * len(columns) + "|"]
                lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
                self.writer.add_text(key, "\n".join(lines), step)

        self.guard.call("media", send)

    def finish(
        self,
        results: dict[str, Any] | None = None,
        files: Sequence[Path] = (),
        failed: bool = False,
    ) -> None:
        if self.writer is None:
            return
        summary = results_lib.summary(results) if results else {}
        self.media(files, _schedule_table(results))
        if summary:
            step = self.last_step + 1
            self.guard.call("final row", self._scalars, step, summary)
            text = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
            self.guard.call(
                "summary",
                self.writer.add_text,
                "summary",
                "| key | value |\n|---|---|\n" + text,
                step,
            )
        writer, self.writer = self.writer, None
        self.guard.call("finish", writer.close)


class CSVLogger:
    """Plain CSV files written with the csv module: ``metrics.csv``, one row per outer step
    (column ``step``, then every key logged so far; the file is rewritten when a new key
    appears), ending with the final row (the summary, one step after the last outer step);
    ``summary.csv`` (``key,value``: :func:`metahpo.results.summary`). A failure warns once.

    Args:
        dir: parent directory (a subdirectory per run name); ``None``: ``<run dir>/csv``.
    """

    def __init__(self, dir: str | None = None) -> None:
        self.dir = dir
        self.path: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        self.last_step = -1
        self.guard = _Guard("CSV")

    def start(
        self,
        config: dict[str, Any],
        name: str,
        output_dir: Path | None,
        tags: Sequence[str] = (),
        job_type: str = "train",
        group: str | None = None,
    ) -> None:
        self.rows, self.columns, self.last_step = [], ["step"], -1
        self.guard.reset(output_dir)

        def make() -> Path:
            path = _log_dir(self.dir, output_dir, "csv", name)
            path.mkdir(parents=True, exist_ok=True)
            return path

        self.path = self.guard.call("start", make)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.last_step = max(self.last_step, step)
        if self.path is not None:
            self.guard.call("log", self._append, step, metrics)

    def _append(self, step: int, metrics: Mapping[str, Any]) -> None:
        assert self.path is not None
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        self.columns += new
        file = self.path / "metrics.csv"
        with file.open("w" if new or len(self.rows) == 1 else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            if new or len(self.rows) == 1:  # a new column: the whole file again
                writer.writeheader()
                writer.writerows(self.rows)
            else:
                writer.writerow(row)

    def media(self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None) -> None:
        """Tables as ``<name>.csv`` (``/`` in names becomes ``_``); images stay where they are."""
        if self.path is None:
            return

        def send() -> None:
            assert self.path is not None
            for key, (columns, rows) in (tables or {}).items():
                with (self.path / f"{key.replace('/', '_')}.csv").open("w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(columns)
                    writer.writerows(rows)

        self.guard.call("media", send)

    def finish(
        self,
        results: dict[str, Any] | None = None,
        files: Sequence[Path] = (),
        failed: bool = False,
    ) -> None:
        if self.path is None:
            return
        self.media(files, _schedule_table(results))
        summary = results_lib.summary(results) if results else {}
        if summary:
            self.guard.call("final row", self._append, self.last_step + 1, summary)

            def write_summary() -> None:
                assert self.path is not None
                with (self.path / "summary.csv").open("w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(["key", "value"])
                    writer.writerows(summary.items())

            self.guard.call("summary", write_summary)
        self.path = None


class LoggerGroup:
    """Several loggers at once (``logger=[wandb,tensorboard,csv]``): every call goes to each."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)

    def start(self, *args: Any, **kwargs: Any) -> None:
        for logger in self.loggers:
            logger.start(*args, **kwargs)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def media(self, images: Sequence[Path] = (), tables: Mapping[str, Table] | None = None) -> None:
        for logger in self.loggers:
            logger.media(images, tables)

    def finish(
        self,
        results: dict[str, Any] | None = None,
        files: Sequence[Path] = (),
        failed: bool = False,
    ) -> None:
        for logger in self.loggers:
            logger.finish(results, files, failed)


class _Guard:
    """Calls into a tracker's library: the first failure warns once, later calls are skipped."""

    def __init__(self, name: str) -> None:
        self.name, self.broken, self.where = name, False, "the run directory"

    def reset(self, output_dir: Path | None) -> None:
        self.broken = False
        self.where = str(output_dir) if output_dir else "the dict metahpo.run returns"

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.broken = True
            cause = str(e).strip().splitlines()
            log.warning(
                "%s %s failed (%s%s); %s logging is off for the rest of this run, "
                "results stay in %s",
                self.name,
                what,
                type(e).__name__,
                f": {cause[0]}" if cause else "",
                self.name,
                self.where,
            )
            return None
