"""Configs compose and instantiate; bad input stops before training with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import instantiate

import metahpo
from metahpo.build import _loggers, build
from metahpo.config import GROUPS, config_dir, options
from metahpo.core import ConfigError
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes_and_instantiates(group: str) -> None:
    for option in options(group):
        # a schedule named after an optimiser is that optimiser's
        extra = (
            [f"optimizer={option}"]
            if group == "schedule" and option in options("optimizer")
            else []
        )
        cfg = metahpo.compose([f"{group}={option}", *extra])
        if group == "experiment":
            continue
        if group == "estimator":
            instantiate(cfg[group])
        elif group == "logger":
            _loggers(cfg.logger)
        elif group == "outer":
            instantiate(cfg.outer.optimizer)
        elif group == "task" and "download" in cfg.task:
            continue  # vision tasks need their data; tests/test_vision.py covers them
        else:
            build(cfg)


def test_defaults_are_the_main_job() -> None:
    cfg = metahpo.compose()
    assert cfg.task._target_ == "metahpo.tasks.digits.Digits"
    assert cfg.estimator._target_ == "metahpo.estimators.forward.ForwardMode"
    assert cfg.outer.optimizer._target_ == "metahpo.outer.Rprop"
    assert cfg.outer.accept == "meta_loss" and cfg.outer.seeds == 1 and cfg.outer.budget == 32
    assert all(cfg.schedule[n].init == 0.0 for n in HYPERPARAMETERS)
    assert config_dir().name == "configs"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator.hvp=magic"], "estimator.hvp='magic' is unknown; allowed: auto, fwd_rev"),
        (["estimator.chunk_size=0"], "estimator.chunk_size=0 must be an integer >= 1 or null"),
        (["task.batch_size=5000"], "task.batch_size=5000 must be between 1 and the"),
        (["outer=sign", "outer.optimizer.step_size.lr=0"], "outer.optimizer.step_size.lr=0 must"),
        (["outer.optimizer.step=2"], "outer.optimizer.step=2 must be a number > 0 and <= 1 "),
        (["estimator._target_=nowhere.Nothing"], "estimator._target_='nowhere.Nothing' could not"),
        (
            ["logger=wandb", "logger.wandb.mode=sometimes"],
            "logger.wandb.mode='sometimes' is unknown",
        ),
    ],
)
def test_bad_plugin_arguments_fail_before_training(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metahpo.inner

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("training started")

    monkeypatch.setattr(metahpo.inner, "train", no_training)
    with pytest.raises(ConfigError) as err:
        metahpo.run(metahpo.compose(["experiment=smoke", *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["estimator=nope"],
            "metahpo: error: estimator='nope' is unknown; allowed: auto, checkpointed_reverse, "
            "es, evograd, exact_reverse, forward",
        ),
        (["-m", "task=digits,nope"], "metahpo: error: task='nope' is unknown"),
        (["horizon=-3"], "metahpo: error: horizon=-3 must be an integer >= 1"),
        (["schedule.lr.init=abc"], "metahpo: error: schedule.lr.init='abc' must be a number"),
    ],
)
def test_cli_reports_bad_input_in_one_line(args: list[str], message: str, tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metahpo",
            *args,
            f"hydra.run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("metahpo: error")]
    assert lines and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_claim_from_zero_is_claim_greedy_s_forward_arm() -> None:
    # docs/results.md reuses claim 2's forward runs for claim 3
    from omegaconf import OmegaConf

    a = metahpo.compose(["experiment=claim_from_zero"])
    b = metahpo.compose(["experiment=claim_greedy", "estimator=forward"])
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert all(a.schedule[n].init == 0.0 and a.schedule[n].learn for n in HYPERPARAMETERS)


def test_logger_keys_sit_under_their_tracker() -> None:
    cases = {
        ("logger=wandb", "logger.mode=offline"): (
            "logger.mode is not a key of this config; keys under logger: wandb (a tracker's "
            "keys are logger.<tracker>.<key>: logger.wandb.mode=...)"
        ),
        ("logger.mode=offline",): (
            "logger.mode is not a key of this config; keys under logger: none (a tracker's keys "
            "are logger.<tracker>.<key>: logger.<tracker>.mode=...); no tracker is selected: "
            "logger=wandb, tensorboard, csv or a list"
        ),
        ("logger=[csv,nope]",): "logger='nope' is unknown; allowed: csv, none, tensorboard, wandb",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError) as err:
            metahpo.compose(list(overrides))
        assert str(err.value) == message
    cfg = metahpo.compose(["logger=[wandb,tensorboard,csv]", "logger.csv.dir=/tmp/x"])
    assert sorted(cfg.logger) == ["csv", "tensorboard", "wandb"]
    assert cfg.logger.csv.dir == "/tmp/x"
