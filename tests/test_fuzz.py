"""Bad values in randomly chosen keys of every config group: always one ConfigError line naming
the key (in process, through ``metahpo.compose``), and on the command line exit code 2 with one
``metahpo: error:`` line and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

import metahpo
from metahpo.config import config_dir, options
from metahpo.core import ConfigError

SKIP = {"_target_", "_partial_", "defaults", "resume"}  # resume: checked when the run starts


def _leaves(node: DictConfig, prefix: str) -> list[str]:
    out = []
    for k, v in node.items():
        if str(k) in SKIP:
            continue
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, DictConfig) and v else [key]
    return out


def _targets() -> list[tuple[str, str]]:
    """(group option to select, key to break) for every key of every shipped config file."""
    root = config_dir()
    out = [("", k) for k in _leaves(OmegaConf.load(root / "config.yaml"), "") if k != "hydra"]
    out = [(g, k) for g, k in out if not k.startswith("hydra")]
    for group in ("task", "estimator", "optimizer", "outer", "logger", "schedule"):
        for option in options(group):
            path = root / group / f"{option}.yaml"
            node = OmegaConf.load(path)
            is_global = "@package _global_" in path.read_text()
            select = f"{group}={option}"
            if group == "schedule" and option in options("optimizer"):
                select = f"optimizer={option}"
            out += [(select, k) for k in _leaves(node, "" if is_global else f"{group}.")]
    return out


TARGETS = _targets()
BAD = st.sampled_from(
    [
        "abc",
        "nan",
        "inf",
        "-inf",
        "-5",
        "-0.5",
        "0",
        "2.5",
        "1e30",
        "10000000000",
        "true",
        "[]",
        "[1,2,3]",
        "[abc]",
        "{a: 1}",
        "''",
        "${nope}",
        "[1,",
        "'x=y'",
    ]
)


def test_every_group_has_fuzzed_keys() -> None:
    groups = {k.split(".")[0] for _, k in TARGETS}
    assert {"task", "estimator", "optimizer", "outer", "logger", "schedule", "final"} <= groups
    assert len(TARGETS) > 100


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(target=st.sampled_from(TARGETS), value=BAD)
def test_a_bad_value_anywhere_is_one_line_naming_the_key(
    target: tuple[str, str], value: str
) -> None:
    select, key = target
    overrides = [select] if select else []
    overrides.append(f"{key}={value}")
    try:
        metahpo.compose(overrides)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and message
        # the key itself, or (a relation) the key's value named beside the one it breaks
        assert key in message or key.split(".")[-1] in message, (overrides, message)
    # any other exception fails the test: a traceback on the command line


@pytest.mark.parametrize(
    "args",
    [
        ["=5"],
        ["horizon=${nope}"],
        ["experiment=smoke", "estimator.chunk_size=2.5"],
        ["task.n_train=-5"],
        ["outer=adam", "outer.optimizer.betas=[1.5,0.9]"],
    ],
)
def test_cli_bad_input_is_exit_code_2_and_one_line(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metahpo", *args, f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metahpo: error: "), proc.stderr
    assert not (tmp_path / "run").exists()  # stopped before Hydra made the run directory
