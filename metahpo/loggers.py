"""Experiment trackers: a no-op one and Weights & Biases (offline by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing; the run directory still gets results.json and plots."""

    def start(self, config: dict[str, Any], name: str, output_dir: Path | None) -> None:
        pass

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any], files: list[Path], failed: bool = False) -> None:
        pass


class WandbLogger:
    """One W&B run per metahpo run: per-outer-step metrics, final summary, plots.

    Args:
        project, entity, group, tags: as in ``wandb.init``; group runs of a sweep to compare
            estimators side by side.
        mode: ``offline`` (default: nothing needs a network; ``wandb sync`` uploads later),
            ``online`` or ``disabled``.
        dir: where W&B writes its files (default: the run's output directory).
    """

    def __init__(
        self,
        project: str = "metahpo",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        dir: str | None = None,
    ) -> None:
        from metahpo.core import ConfigError

        if mode not in ("online", "offline", "disabled"):
            raise ConfigError(
                f"logger.mode={mode!r} is unknown; allowed: online, offline, disabled"
            )
        self.kwargs = dict(project=project, entity=entity, mode=mode, group=group, tags=list(tags))
        self.dir = dir
        self.run: Any = None

    def start(self, config: dict[str, Any], name: str, output_dir: Path | None) -> None:
        import wandb

        directory = self.dir or (str(output_dir) if output_dir else None)
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            config=config, name=name, dir=directory, reinit="finish_previous", **self.kwargs
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any], files: list[Path], failed: bool = False) -> None:
        import wandb

        if self.run is None:
            return
        try:
            for path in files:
                if path.suffix == ".png" and path.is_file():
                    self.run.log({f"plots/{path.stem}": wandb.Image(str(path))})
            self.run.summary.update(summary)
        finally:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
