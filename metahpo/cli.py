"""The ``metahpo`` command (also ``python -m metahpo``): a Hydra app over :func:`metahpo.run`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metahpo.config import check_overrides, config_dir
from metahpo.core import ConfigError, DivergenceError
from metahpo.runner import format_table, run


def _fail(message: str, code: int = 2) -> None:
    print(f"metahpo: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")
def _app(cfg: DictConfig) -> None:
    out = HydraConfig.get().runtime.output_dir
    try:
        results = run(cfg, out)
    except ConfigError as e:
        _fail(str(e))
    except DivergenceError as e:
        _fail(str(e), code=1)
    print(format_table(results))
    print(f"results, plots and config: {out}")


def main() -> None:
    """Entry point: reject unknown names in one line before Hydra composes anything."""
    from hydra._internal.utils import get_args_parser

    known, _ = get_args_parser().parse_known_args(sys.argv[1:])
    try:
        check_overrides(known.overrides)
    except ConfigError as e:
        _fail(str(e))
    _app()


if __name__ == "__main__":
    main()
