"""The ``metahpo`` command (also ``python -m metahpo``): a Hydra app over :func:`metahpo.run`."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from metahpo import distributed
from metahpo.config import check_composes, check_overrides, check_writable, config_dir
from metahpo.core import ConfigError, DivergenceError
from metahpo.runner import format_table, run

# Jobs of this process's sweep that failed: a bad job is reported and the sweep goes on, and the
# command exits non-zero at the end.
_failed_jobs: list[str] = []


class SweepJobFailed(CompactHydraException):
    """A sweep job's one-line error, carried back to the sweep from a launcher's process.

    Hydra marks the job failed, runs the rest of the sweep, then prints this message alone
    (a compact exception) and exits 1.
    """


def _fail(message: str, code: int = 2) -> None:
    print(f"metahpo: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")
def _app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out = hydra_cfg.runtime.output_dir
    try:
        results = run(cfg, out)
    except (ConfigError, DivergenceError, distributed.PeerError) as e:
        code = 2 if isinstance(e, ConfigError) else 1
        if hydra_cfg.mode != RunMode.MULTIRUN:
            _fail(str(e), code)
        job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
        print(f"metahpo: error in {job}: {e}", file=sys.stderr)
        if "BasicLauncher" not in str(hydra_cfg.launcher.get("_target_")):
            # The job runs in another process (joblib, submitit): only its result gets back.
            raise SweepJobFailed(f"metahpo: error: {job} failed: {e}") from None
        _failed_jobs.append(job)
        return
    if distributed.is_main():
        print(format_table(results))
        print(f"results, plots and config: {out}")


def docs_dir() -> Path | None:
    """The Markdown docs: ``metahpo/docs`` in a wheel, ``docs/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "docs", here.parent / "docs"):
        if (candidate / "extending.md").is_file():
            return candidate
    return None


def _precheck_overrides(overrides: list[str], config_dir: str | None) -> list[str]:
    """The overrides with ``--config-dir`` as one more ``hydra.searchpath`` entry, so that the
    checks before Hydra know the names and files in the user's directory too."""
    if not config_dir:
        return overrides
    entries = [f"file://{Path(config_dir).expanduser().resolve()}"]
    rest = []
    for o in overrides:
        if o.lstrip("+~").startswith("hydra.searchpath="):
            value = o.split("=", 1)[1].strip()
            inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
            entries += [e.strip() for e in inner.split(",") if e.strip()]
        else:
            rest.append(o)
    return [*rest, f"hydra.searchpath=[{','.join(entries)}]"]


def main() -> None:
    """Entry point: reject unknown names and keys in one line before Hydra runs anything."""
    from hydra._internal.utils import get_args_parser

    if sys.argv[1:] == ["--docs"]:
        where = docs_dir()
        print(where if where is not None else "metahpo: the docs are not installed")
        return
    # A user's own package in the working directory is importable by its _target_s (appended:
    # it never shadows an installed module).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    known, _ = get_args_parser().parse_known_args(sys.argv[1:])
    overrides = _precheck_overrides(list(known.overrides), known.config_dir)
    try:
        check_overrides(overrides)
        check_composes(overrides)
        for o in overrides:  # before Hydra opens its log file there
            if o.startswith("hydra.run.dir=") and not known.multirun:
                check_writable(o.partition("=")[2], "hydra.run.dir")
    except ConfigError as e:
        _fail(str(e))
    if distributed.launched() and not distributed.is_main():
        # Ranks other than 0 write nothing: Hydra's run directory and log go to a scratch one.
        with tempfile.TemporaryDirectory(prefix=f"metahpo-rank{distributed.rank()}-") as tmp:
            sys.argv += [
                f"hydra.run.dir={tmp}",
                f"hydra.sweep.dir={tmp}",
                "hydra/job_logging=disabled",
            ]
            _app()
    else:
        _app()
    if _failed_jobs:
        _fail(f"{len(_failed_jobs)} sweep job(s) failed: {'; '.join(_failed_jobs)}", code=1)


if __name__ == "__main__":
    main()
